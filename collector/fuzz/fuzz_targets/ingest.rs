//! What an agent sends, through the collector's path: the bounded decode, validation, the fold
//! per key and the key budget, then the keys and rollups in their store form. No panic; every
//! byte of a server-role delta counted once in its host's key and once in the prefix group;
//! the store forms round-trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_collector::{
    aggregate::{State, aggregate},
    budget::{Folds, KeyBudget},
    codec::decode_agent_message,
    keys::Key,
    model::{Batch, BatchLimits, Hello, Role},
    window::Rollup,
};
use outflow_proto::v1::agent_message::Msg;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = decode_agent_message(data, 1000) else {
        return;
    };
    match msg.msg {
        Some(Msg::Hello(h)) => {
            let _ = Hello::try_from(h);
        }
        Some(Msg::Batch(b)) => {
            let limits = BatchLimits {
                max_deltas: 1000,
                latest_end_ms: Some(4_102_444_800_000),
                // An agent's batch.
                parts: false,
            };
            let Ok(batch) = Batch::from_wire(b, &limits) else {
                return;
            };
            apply(&batch);
        }
        None => {}
    }
});

fn apply(batch: &Batch) {
    let agg = aggregate(batch, 3);
    let server = batch.deltas.iter().filter(|d| d.role == Role::Server);
    let sent = server.fold(0u128, |s, d| s + u128::from(d.counters.bytes_out));
    // A small budget, so that folding runs too.
    let mut budget = KeyBudget::new(1000, 50);
    let mut st = State::default();
    let mut folds = Folds::default();
    budget.start_group();
    let (mut host, mut prefixes) = (0u128, 0u128);
    for (key, totals) in &agg.entries {
        let bytes = u128::from(totals.response_bytes);
        match key {
            Key::Host(_) => host += bytes,
            Key::Prefix(_) => prefixes += bytes,
            _ => {}
        }
        let Some(k) = budget.route(
            &st,
            key.clone(),
            3,
            totals,
            |k| st.get(k).is_none(),
            &mut folds,
        ) else {
            continue;
        };
        let mut r = st.get(&k).cloned().unwrap_or_default();
        r.add(agg.time_ms, 3, totals);
        assert_eq!(Key::decode(&k.to_bytes()).as_ref(), Some(&k), "{k:?}");
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        assert_eq!(Rollup::decode(&bytes).as_ref(), Some(&r));
        st.put(k, r);
    }
    // Totals saturate at u64::MAX (the host's at once, the prefixes' each).
    assert_eq!(host, sent.min(u128::from(u64::MAX)));
    assert!(prefixes <= sent);
    if sent <= u128::from(u64::MAX) {
        assert_eq!(prefixes, sent);
    }
}
