//! What an aggregator reads from JetStream (`outflow.v1.PartBatch`; anyone who may publish to
//! the stream chooses the bytes): the bounded decode and the batch's validation never panic,
//! and a valid batch split again into parts (as an agent's: every delta whole) keeps every
//! delta once for its client address's keys and once for the rest, each part valid.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_collector::{
    cluster::partition::Partitions,
    codec::decode_part_batch,
    model::{AgentKey, Batch, BatchLimits, Share},
};

fuzz_target!(|data: &[u8]| {
    let Ok(part) = decode_part_batch(data, 1000) else {
        return;
    };
    let Some(b) = part.batch else {
        return;
    };
    let limits = BatchLimits {
        max_deltas: 1000,
        latest_end_ms: Some(4_102_444_800_000),
        parts: true,
    };
    let Ok(mut batch) = Batch::from_wire(b, &limits) else {
        return;
    };
    for d in &mut batch.deltas {
        d.share = Share::All;
    }
    let Ok(partitions) = Partitions::new(part.partitions % 64 + 1) else {
        return;
    };
    let agent = AgentKey {
        agent_id: part.agent_id.as_str().into(),
        epoch: part.epoch,
    };
    let parts = partitions.split(&agent, &part.hostname, &batch);
    let (mut address, mut rest) = (0, 0);
    for p in parts {
        let b = Batch::from_wire(p.batch.expect("a part has its batch"), &limits)
            .expect("a part of a valid batch is valid");
        address += b.deltas.iter().filter(|d| d.share.address()).count();
        rest += b.deltas.iter().filter(|d| d.share.rest()).count();
    }
    assert_eq!((address, rest), (batch.deltas.len(), batch.deltas.len()));
});
