//! What the cluster's second stage reads from JetStream (`outflow.v1.CohortSummary`; anyone
//! who may publish to the stream chooses the bytes): the decode never panics, and what it
//! accepts encodes and decodes back the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_collector::cluster::second_stage::{decode, encode_to_bytes};

fuzz_target!(|data: &[u8]| {
    let Ok((partition, at_ms, seen)) = decode(data, 8) else {
        return;
    };
    let again = encode_to_bytes(partition, 8, at_ms, &seen);
    assert_eq!(decode(&again, 8), Ok((partition, at_ms, seen)));
});
