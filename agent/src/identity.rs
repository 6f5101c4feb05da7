//! Who the agent is to a collector: a stable agent id kept in the state directory, the host's
//! name and boot id, the agent's version and the operator's labels. Also the small durable-file
//! helpers the state files and the spool share.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
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

/// Random bytes from the kernel (`getrandom(2)`, blocking only before the pool is seeded).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into buf[filled..].
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // getrandom(2) cannot fail otherwise on Linux >= 3.17; never hand out zeros.
            let fallback = fastrand::u128(..).to_le_bytes();
            for (i, b) in buf[filled..].iter_mut().enumerate() {
                *b = fallback[i % fallback.len()];
            }
            filled = N;
        }
    }
    buf
}

/// A random, non-zero u64.
pub fn random_nonzero_u64() -> u64 {
    loop {
        let v = u64::from_le_bytes(random_bytes());
        if v != 0 {
            return v;
        }
    }
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

/// Creates `dir` (and its parents) readable by root only, if missing.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// fsyncs a directory, so that the creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `path` so that after a crash it holds either its old content or `bytes`, never a
/// mix: a temporary file beside it, fsync'd, renamed over it, and the directory fsync'd.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = crate::spool::write_tmp(path, bytes)?;
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
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

    #[test]
    fn random_u64s_are_nonzero() {
        for _ in 0..100 {
            assert_ne!(random_nonzero_u64(), 0);
        }
    }
}
