//! Request head classification: no panic, bounded output.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_attribution::http::{self, Head, MAX_HEADERS};

fuzz_target!(|data: &[u8]| {
    if let Head::Request(r) = http::classify(data) {
        assert!(r.header_len <= data.len());
        assert!(r.headers.len() <= MAX_HEADERS);
        assert!(
            r.headers
                .iter()
                .all(|(n, _)| !n.bytes().any(|b| b.is_ascii_uppercase()))
        );
    }
});
