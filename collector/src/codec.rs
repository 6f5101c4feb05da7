//! Decoding agent messages with bounds: the repeated fields of a message are counted on the
//! wire before protobuf decoding allocates them.
//!
//! A 16 MiB message of empty `ConnDelta`s would decode into eight million structs (over a
//! gigabyte); counting first turns it into one INVALID_ARGUMENT naming `deltas`.
use outflow_proto::v1::{AgentMessage, Batch, CollectorMessage, PartBatch, agent_message::Msg};
use prost::{Message as _, bytes::Buf};
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

use crate::{
    error::ApiError,
    model::{MAX_LABELS, ValidationError},
};

/// Reads a varint at `*pos`, advancing it; `None` if truncated or too long.
fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Calls `f(field, payload)` for each length-delimited field of `buf`, counting the others
/// (returns early at the first malformed byte: the protobuf decoder will report it).
fn each_len_field(buf: &[u8], mut f: impl FnMut(u64, &[u8])) {
    let mut pos = 0;
    while pos < buf.len() {
        let Some(tag) = varint(buf, &mut pos) else {
            return;
        };
        let (field, wire_type) = (tag >> 3, tag & 7);
        let skip = match wire_type {
            0 => varint(buf, &mut pos).map(|_| 0),
            1 => Some(8),
            5 => Some(4),
            2 => {
                let Some(len) = varint(buf, &mut pos).and_then(|l| usize::try_from(l).ok()) else {
                    return;
                };
                let Some(payload) = pos.checked_add(len).and_then(|end| buf.get(pos..end)) else {
                    return;
                };
                f(field, payload);
                Some(len)
            }
            _ => None,
        };
        match skip.and_then(|s| pos.checked_add(s)) {
            Some(p) => pos = p,
            None => return,
        }
    }
}

/// Counts the occurrences of length-delimited `field` in `buf`.
fn count_field(buf: &[u8], field: u64) -> usize {
    let mut n = 0usize;
    each_len_field(buf, |f, _| n += usize::from(f == field));
    n
}

/// Decodes an AgentMessage from `bytes`, refusing more than `max_deltas` deltas or
/// [`MAX_LABELS`] labels before decoding them. From `Bytes`, a bytes field is copied once
/// (from a slice: into a `Bytes` first, then into its `Vec`).
pub fn decode_agent_message(
    bytes: impl Buf + AsRef<[u8]>,
    max_deltas: usize,
) -> Result<AgentMessage, ApiError> {
    let (mut deltas, mut labels) = (0usize, 0usize);
    // Protobuf merges repeated occurrences of a message field, so every occurrence counts.
    each_len_field(bytes.as_ref(), |field, payload| match field {
        1 => labels = labels.saturating_add(count_field(payload, 6)),
        2 => deltas = deltas.saturating_add(count_field(payload, 4)),
        _ => {}
    });
    if deltas > max_deltas {
        return Err(ValidationError::new(
            "deltas",
            format!("{deltas} deltas, at most {max_deltas}"),
        )
        .into());
    }
    if labels > MAX_LABELS {
        return Err(ValidationError::new(
            "labels",
            format!("{labels} labels, at most {MAX_LABELS}"),
        )
        .into());
    }
    // A batch's deltas in one allocation of the size counted (prost merges into the oneof's
    // variant already there): growing the vector by doubling copied and faulted in megabytes
    // per batch.
    let mut msg = AgentMessage::default();
    if deltas > 0 {
        msg.msg = Some(Msg::Batch(Batch {
            deltas: Vec::with_capacity(deltas),
            ..Batch::default()
        }));
    }
    msg.merge(bytes)
        .map_err(|e| ApiError::Malformed(format!("malformed AgentMessage: {e}")))?;
    Ok(msg)
}

/// Decodes a cluster part (`outflow.v1.PartBatch`, read from JetStream by an aggregator),
/// refusing more than `max_deltas` deltas before decoding them.
pub fn decode_part_batch(
    bytes: impl Buf + AsRef<[u8]>,
    max_deltas: usize,
) -> Result<PartBatch, ApiError> {
    let mut deltas = 0usize;
    each_len_field(bytes.as_ref(), |field, payload| {
        if field == 6 {
            deltas = deltas.saturating_add(count_field(payload, 4));
        }
    });
    if deltas > max_deltas {
        return Err(ValidationError::new(
            "deltas",
            format!("{deltas} deltas, at most {max_deltas}"),
        )
        .into());
    }
    // Its deltas in one allocation of the size counted, as in [`decode_agent_message`].
    let mut part = PartBatch::default();
    if deltas > 0 {
        part.batch = Some(Batch {
            deltas: Vec::with_capacity(deltas),
            ..Batch::default()
        });
    }
    part.merge(bytes)
        .map_err(|e| ApiError::Malformed(format!("not an outflow.v1.PartBatch: {e}")))?;
    Ok(part)
}

/// The Ingest service's codec: prost, with [`decode_agent_message`] for what agents send.
#[derive(Debug, Clone, Copy)]
pub struct AgentCodec {
    /// Most deltas in one batch.
    pub max_deltas: usize,
}

/// Decoder half of [`AgentCodec`].
#[derive(Debug, Clone, Copy)]
pub struct AgentDecoder {
    max_deltas: usize,
}

impl Codec for AgentCodec {
    type Encode = CollectorMessage;
    type Decode = AgentMessage;
    type Encoder = ProstEncoder<CollectorMessage>;
    type Decoder = AgentDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        AgentDecoder {
            max_deltas: self.max_deltas,
        }
    }
}

impl Decoder for AgentDecoder {
    type Item = AgentMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<AgentMessage>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        decode_agent_message(bytes, self.max_deltas)
            .map(Some)
            .map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use outflow_proto::v1::{ConnDelta, Hello};
    use prost::bytes::Bytes;

    use super::*;

    fn batch_msg(n: usize) -> Vec<u8> {
        AgentMessage {
            msg: Some(Msg::Batch(Batch {
                seq: 1,
                deltas: vec![ConnDelta::default(); n],
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_before_decoding() {
        assert!(decode_agent_message(Bytes::from(batch_msg(3)), 3).is_ok());
        let e = decode_agent_message(Bytes::from(batch_msg(4)), 3).unwrap_err();
        assert_eq!(e.to_string(), "deltas: 4 deltas, at most 3");
        // Two batch fields merge into one of 4 deltas: still refused.
        let mut two = batch_msg(2);
        two.extend(batch_msg(2));
        assert!(decode_agent_message(Bytes::from(two), 3).is_err());
        let hello = AgentMessage {
            msg: Some(Msg::Hello(Hello {
                labels: (0..40).map(|i| (i.to_string(), String::new())).collect(),
                ..Default::default()
            })),
        };
        let e = decode_agent_message(Bytes::from(hello.encode_to_vec()), 3).unwrap_err();
        assert_eq!(e.to_string(), "labels: 40 labels, at most 32");
    }

    #[test]
    fn parts_are_counted_before_decoding() {
        let part = |n: usize| {
            PartBatch {
                agent_id: "a".into(),
                partition: 1,
                partitions: 4,
                batch: Some(Batch {
                    seq: 1,
                    deltas: vec![ConnDelta::default(); n],
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert_eq!(
            decode_part_batch(Bytes::from(part(3)), 3)
                .unwrap()
                .partition,
            1
        );
        let e = decode_part_batch(Bytes::from(part(4)), 3).unwrap_err();
        assert_eq!(e.to_string(), "deltas: 4 deltas, at most 3");
        let mut two = part(2);
        two.extend(part(2));
        assert!(decode_part_batch(Bytes::from(two), 3).is_err());
        assert!(matches!(
            decode_part_batch(&[0xff, 0xff][..], 3),
            Err(ApiError::Malformed(_))
        ));
    }

    #[test]
    fn decodes_as_prost_does() {
        let hello = AgentMessage {
            msg: Some(Msg::Hello(Hello {
                agent_id: "a".into(),
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let cases = [
            batch_msg(0),
            batch_msg(3),
            [batch_msg(2), hello.clone()].concat(),
            [hello.clone(), batch_msg(2)].concat(),
            [batch_msg(1), batch_msg(2)].concat(),
        ];
        for bytes in cases {
            let ours = decode_agent_message(Bytes::from(bytes.clone()), 10).unwrap();
            assert_eq!(ours, AgentMessage::decode(&*bytes).unwrap());
        }
        let part = PartBatch {
            batch: Some(Batch {
                seq: 4,
                deltas: vec![ConnDelta::default(); 2],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        for bytes in [part.clone(), [part.clone(), part].concat()] {
            let ours = decode_part_batch(Bytes::from(bytes.clone()), 10).unwrap();
            assert_eq!(ours, PartBatch::decode(&*bytes).unwrap());
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [
            &[0xff][..],
            &[0x12, 0x05, 1],
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ] {
            match decode_agent_message(bytes, 10) {
                Err(ApiError::Malformed(m)) => {
                    assert!(m.starts_with("malformed AgentMessage"), "{m}")
                }
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
        assert_eq!(
            decode_agent_message(&[][..], 10).unwrap(),
            AgentMessage::default()
        );
    }
}
