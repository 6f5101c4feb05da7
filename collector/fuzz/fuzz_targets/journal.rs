//! What the collector reads back from its store's journal when it opens (its own bytes, but a
//! disk can hand back anything): the replay never panics, and an entry it accepts applies the
//! same way twice.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_collector::{aggregate::State, journal::replay};

fuzz_target!(|data: &[u8]| {
    let mut st = State::default();
    if let Ok(keys) = replay(data, &mut st) {
        let mut again = State::default();
        assert_eq!(replay(data, &mut again), Ok(keys));
    }
});
