//! A whole connection: a few turns, each fed in two steps, with annotations. No panic; a complete
//! turn is always decided; untrusted peers are never believed.
//!
//! Input: byte 0 picks the peer and the flags; the rest is split on "\n--\n" into turns.
#![no_main]
use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use outflow_attribution::{
    HeaderKind, HeaderRule, Progress, Resolver, Settings, Source, SourceKind,
};

fn resolver(hash: bool, precedence_flip: bool) -> Resolver {
    let rule = |name: &str, kind| HeaderRule {
        name: name.into(),
        kind,
    };
    let mut precedence = SourceKind::DEFAULT_PRECEDENCE.to_vec();
    if precedence_flip {
        precedence.reverse();
    }
    let settings = Settings {
        trusted_peers: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        hash_ids: hash,
        id_key_file: Some("/k".into()),
        annotations: true,
        precedence,
        headers: vec![
            rule("x-forwarded-for", HeaderKind::Address),
            rule("forwarded", HeaderKind::Address),
            rule("x-real-ip", HeaderKind::Address),
            rule("x-client-id", HeaderKind::Id),
        ],
        ..Settings::default()
    };
    Resolver::new(&settings, Some(b"0123456789abcdef")).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let peers: [IpAddr; 4] = [
        "10.0.0.5".parse().unwrap(),
        "::ffff:10.0.0.5".parse().unwrap(),
        "198.51.100.7".parse().unwrap(),
        "2001:db8::7".parse().unwrap(),
    ];
    let peer = peers[usize::from(flags & 3)];
    let trusted = flags & 3 < 2;
    let r = resolver(flags & 4 != 0, flags & 8 != 0);
    let mut state = r.connection(peer);
    let mut turns: Vec<&[u8]> = Vec::new();
    let mut rest = rest;
    while let Some(i) = rest.windows(4).position(|w| w == b"\n--\n") {
        turns.push(&rest[..i]);
        rest = &rest[i + 4..];
        if turns.len() == 8 {
            break;
        }
    }
    turns.push(rest);
    for (i, turn) in turns.iter().enumerate() {
        let cut = turn.len() / 2;
        let first = i == 0;
        if let Progress::NeedMore = state.turn(&r, first, &turn[..cut], false) {
            if flags & 16 != 0 {
                let _ = state.annotate(&r, &turn[..cut.min(16)]);
            }
            let complete = flags & 32 != 0 || i + 1 < turns.len();
            match state.turn(&r, first, turn, complete) {
                Progress::Done(t) => {
                    assert_eq!(&t.client, state.current());
                    assert_eq!(t.client.addr, t.client.addr.to_canonical());
                    if !trusted {
                        assert!(matches!(t.client.source, Source::Peer | Source::Annotation));
                        assert_eq!(t.client.addr, peer.to_canonical());
                    }
                }
                Progress::NeedMore => assert!(!complete),
            }
        }
        assert!(
            state
                .current()
                .id
                .as_ref()
                .is_none_or(|id| id.chars().count() <= 256)
        );
    }
});
