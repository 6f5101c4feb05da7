//! What the aggregators read from the cluster's key-value buckets (anyone who may write to them
//! chooses the bytes): the peers' ratios another aggregator shares (`<stream>-peer-ratios`)
//! and a membership entry (`<stream>-members`). A ratios value that parses encodes back to the
//! same bytes, and whatever it holds, the ratio an aggregator judges against (its own combined
//! with it) stays a ratio two byte counts can have; a membership entry reads the same after it
//! is written back.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_collector::{
    cluster::membership::Entry,
    detect::{
        baseline::{MAX_LOG2_RATIO, Peers},
        persist::{peers_of_value, peers_value},
    },
};

fuzz_target!(|data: &[u8]| {
    // One per subject kind, as a detector keeps them.
    let mut others = [Peers::default(); 5];
    if peers_of_value(data, &mut others) {
        assert_eq!(peers_value(&others), data);
        let own = Peers { mean: 4.0, n: 50 };
        for other in &others {
            let c = Peers::combine([&own, other]);
            assert!(c.n >= own.n, "{c:?}");
            assert!(
                c.mean.is_finite() && c.mean.abs() <= MAX_LOG2_RATIO + 1e-9,
                "{c:?}"
            );
        }
        let c = Peers::combine(&others);
        assert!(
            c.mean.is_finite() && c.mean.abs() <= MAX_LOG2_RATIO + 1e-9,
            "{c:?}"
        );
    }
    let entry = Entry::parse(data);
    assert_eq!(Entry::parse(entry.to_string().as_bytes()), entry);
});
