//! Who the agent is to a collector: a stable agent id kept in the state directory, the host's
//! name and boot id, the agent's version and the operator's labels.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use crate::{
    durable_file::{create_private_dir, write_durably},
    random::random_bytes,
};

/// Name of the agent id's file in the state directory.
pub const AGENT_ID_FILE: &str = "agent-id";
/// Linux's id of the current boot: socket cookies (`conn_id`) are unique only within one boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{path} does not hold an agent id (1 to 128 printable ASCII characters): remove it to get a new one"
    )]
    BadAgentId { path: PathBuf },
}

/// What the agent says about itself in its `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    pub hostname: String,
    pub boot_id: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
}

impl Identity {
    /// Reads (or creates, once) the agent id in `state_dir`, and the host's facts. The bool is
    /// true when the id was created now (a new identity: everything numbered before is moot).
    pub fn load(
        state_dir: &Path,
        labels: BTreeMap<String, String>,
    ) -> Result<(Self, bool), IdentityError> {
        create_private_dir(state_dir).map_err(|source| IdentityError::CreateDir {
            path: state_dir.into(),
            source,
        })?;
        let (agent_id, created) = agent_id(state_dir)?;
        Ok((
            Self {
                agent_id,
                hostname: hostname(),
                boot_id: boot_id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                labels,
            },
            created,
        ))
    }
}

fn valid_agent_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

fn agent_id(state_dir: &Path) -> Result<(String, bool), IdentityError> {
    let path = state_dir.join(AGENT_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if valid_agent_id(id) {
                Ok((id.to_string(), false))
            } else {
                Err(IdentityError::BadAgentId { path })
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = new_uuid();
            write_durably(&path, format!("{id}\n").as_bytes())
                .map_err(|source| IdentityError::Write { path, source })?;
            Ok((id, true))
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// The host name (`uname -n`); "" if it cannot be read.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The boot id, e.g. `0e5c...-...`; "" if it cannot be read.
pub fn boot_id() -> String {
    fs::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A random (version 4) UUID in its usual text form.
pub fn new_uuid() -> String {
    let mut b: [u8; 16] = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_look_like_uuids_and_differ() {
        let a = new_uuid();
        let b = new_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4', "version 4: {a}");
        assert!(valid_agent_id(&a));
    }

    #[test]
    fn the_agent_id_is_created_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let (first, created) = Identity::load(&state, BTreeMap::new()).expect("create");
        assert!(created);
        let (second, created) = Identity::load(&state, BTreeMap::new()).expect("load");
        assert!(!created);
        assert_eq!(first.agent_id, second.agent_id);
        assert_eq!(first.version, env!("CARGO_PKG_VERSION"));

        fs::write(state.join(AGENT_ID_FILE), "\n").expect("write");
        let e = Identity::load(&state, BTreeMap::new()).expect_err("empty id");
        assert!(e.to_string().contains("agent-id"), "{e}");
    }
}
