//! PROXY v1/v2 parsing: no panic, and a header never claims more bytes than it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_attribution::proxy::{self, MAX_KEPT_TLVS, MAX_TLV_VALUE_LEN, ProxyParse};

fuzz_target!(|data: &[u8]| {
    if let ProxyParse::Header(h) = proxy::parse(data) {
        assert!(h.len <= data.len());
        assert!(h.version == 1 || h.version == 2);
        assert!(h.tlvs.len() <= MAX_KEPT_TLVS);
        assert!(h.tlvs.iter().all(|(_, v)| v.len() <= MAX_TLV_VALUE_LEN));
        assert!(h.source.is_none_or(|s| s.ip() == s.ip().to_canonical()));
        // The same header, whatever follows it.
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(proxy::parse(&longer), ProxyParse::Header(h));
    }
});
