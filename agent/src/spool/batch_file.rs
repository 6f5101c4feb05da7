//! The batch file, `00000000000000000042.batch` for batch 42 (the seq zero-padded to 20
//! digits, so that names sort in sequence order): a 24-byte header (`OFLWBAT1`, the epoch and
//! the payload's length, little endian) and the protobuf `outflow.v1.Batch`.
use std::{
    fs::File,
    io::{self, Read as _},
    path::Path,
};

use outflow_proto::v1;
use prost::Message as _;

pub(super) const BATCH_SUFFIX: &str = ".batch";
const MAGIC: [u8; 8] = *b"OFLWBAT1";
/// Size of the header before the payload.
pub(super) const HEADER_LEN: usize = 24;

/// Why a batch file could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum BatchFileError {
    #[error("gone")]
    Gone,
    #[error(transparent)]
    Io(io::Error),
    #[error("corrupt: {0}")]
    Corrupt(String),
}

/// The file name of batch `seq`.
pub(super) fn batch_name(seq: u64) -> String {
    format!("{seq:020}{BATCH_SUFFIX}")
}

/// The seq of a batch file's name; `None` for any other name.
pub(super) fn parse_batch_name(name: &str) -> Option<u64> {
    name.strip_suffix(BATCH_SUFFIX)
        .and_then(|s| s.parse::<u64>().ok())
}

/// A batch file's content.
pub(super) fn encode_file(epoch: u64, b: &v1::Batch) -> Vec<u8> {
    let payload = b.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reads a batch file: its epoch and batch.
pub fn read_batch_file(path: &Path) -> Result<(u64, v1::Batch), BatchFileError> {
    let mut bytes = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BatchFileError::Gone),
        Err(e) => return Err(BatchFileError::Io(e)),
    }
    let corrupt = |m: &str| BatchFileError::Corrupt(m.to_string());
    if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
        return Err(corrupt("no batch header"));
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let (epoch, len) = (word(8), word(16));
    if len != (bytes.len() - HEADER_LEN) as u64 {
        return Err(corrupt("truncated"));
    }
    let batch = v1::Batch::decode(&bytes[HEADER_LEN..])
        .map_err(|e| BatchFileError::Corrupt(e.to_string()))?;
    Ok((epoch, batch))
}
