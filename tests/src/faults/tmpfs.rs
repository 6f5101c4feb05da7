//! A small tmpfs to fill up: a spool or a data directory that runs out of space.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted at `/tmp/outflow-tmpfs-<pid>-<serial>-<tag>`, unmounted and removed on drop.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes.
    pub fn new(tag: &str, size: u64) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "outflow-tmpfs-{}-{}-{}",
            std::process::id(),
            crate::next_serial(),
            crate::sanitize_tag(tag, 24)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let fs = Self { dir };
        fs.mount(&[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0755"),
            "tmpfs",
        ]);
        fs
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The mount point, for a command-line argument.
    pub fn as_arg(&self) -> &str {
        self.dir.to_str().expect("temp paths are UTF-8")
    }

    /// Changes its size; what it holds stays (a size below its use fails).
    pub fn resize(&self, size: u64) {
        self.mount(&["-o", &format!("remount,size={size}")]);
    }

    /// Fills what is left of it with a file `name`, so that the next write fails with ENOSPC.
    pub fn fill(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        self.top_up(&path);
        path
    }

    /// Fills again what was freed since (a spool removes the files of acknowledged batches and
    /// writes new ones into their pages): appends to `filler` until the disk is full.
    pub fn top_up(&self, filler: &Path) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(filler)
            .unwrap_or_else(|e| panic!("open {}: {e}", filler.display()));
        let chunk = vec![0xa5u8; 64 << 10];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("fill {}: {e}", filler.display()),
            }
        }
        // What is left in the last, partial block.
        while f.write_all(&[0]).is_ok() {}
    }

    fn mount(&self, args: &[&str]) {
        let status = Command::new("mount")
            .args(args)
            .arg(&self.dir)
            .status()
            .unwrap_or_else(|e| panic!("run mount: {e}"));
        assert!(
            status.success(),
            "mount {args:?} {}: {status}",
            self.dir.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
