//! The small files the agent keeps across crashes (its id, the epoch, the spool's files): a
//! private directory for them, writes that are all or nothing, removals.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// Suffix of the temporary file a write goes to before it is renamed into place: a file with it
/// is a write that never completed.
pub const TMP_SUFFIX: &str = ".tmp";

/// Creates `dir` (and its parents) readable by root only, if missing.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes and fsyncs `data` beside `path` under a temporary name, which it returns.
pub fn write_tmp(path: &Path, data: &[u8]) -> io::Result<PathBuf> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    Ok(tmp)
}

/// fsyncs a directory, so that the creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `path` so that after a crash it holds either its old content or `bytes`, never a
/// mix: a temporary file beside it, fsync'd, renamed over it, and the directory fsync'd.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = write_tmp(path, bytes)?;
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Removes a file; one already gone is no error.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
