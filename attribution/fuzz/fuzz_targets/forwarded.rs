//! Hop lists: no panic, at most MAX_HOPS, normalised addresses. The first byte picks the header,
//! NUL bytes split the rest into header lines.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_attribution::forwarded::{self, MAX_HOPS};

const NAMES: [&str; 4] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-envoy-external-address",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let name = NAMES[usize::from(pick) % NAMES.len()];
    let hops = forwarded::hops(name, rest.split(|&b| b == 0));
    assert!(hops.len() <= MAX_HOPS);
    assert!(hops.iter().flatten().all(|a| *a == a.to_canonical()));
});
