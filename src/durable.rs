//! Files that hold backups, and the one way they are made durable.
//!
//! Streams, images, sidecars and chain state hold whole guest disks or say where they are, so
//! everything cbtstream creates is 0600 (owner only). A file appears under its final name
//! only once its contents are on disk: write it elsewhere, fsync it, rename it into place,
//! fsync the directory, so a crash leaves the old file or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The mode of every file cbtstream creates.
pub const PRIVATE_MODE: u32 = 0o600;

/// Options to create (or open) a file readable and writable by its owner only. The mode
/// applies when the file is created; an existing file keeps its mode.
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true).create(true).mode(PRIVATE_MODE);
    o
}

/// `path` with `suffix` appended to its file name (`disk.cbts` + `.partial`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The directory a path lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// fsync the directory holding `path`, so a rename or a new name in it is durable.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

/// Give the finished file `from` the name `to`, durably: fsync `from`, rename it over `to`,
/// fsync the directory.
pub fn commit_rename(from: &Path, to: &Path) -> io::Result<()> {
    File::open(from)?.sync_all()?;
    fs::rename(from, to)?;
    sync_parent_dir(to)
}

/// Replace `path` with `contents` atomically and durably, through a temporary file in the
/// same directory (removed if anything fails). The new file is 0600.
pub fn replace(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = with_suffix(path, &format!(".tmp-{}", std::process::id()));
    // A new file, never one that is there already (or a link planted in a shared directory).
    let create = || {
        let mut o = OpenOptions::new();
        o.write(true)
            .create_new(true)
            .mode(PRIVATE_MODE)
            .custom_flags(libc::O_NOFOLLOW);
        o.open(&tmp)
    };
    let result = (|| {
        let mut f = match create() {
            // Left by a crashed run whose pid this process now has: ours to replace.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp)?;
                create()?
            }
            other => other?,
        };
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_parent_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn replace_is_private_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"one").unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // A temporary file left by a crashed run (same pid), even a symbolic link planted
        // there, is replaced, never written through.
        let tmp = with_suffix(&path, &format!(".tmp-{}", std::process::id()));
        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, &tmp).unwrap();
        replace(&path, b"three").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert!(!elsewhere.exists());
        // A failed replace (the directory is gone) leaves nothing and says so.
        let gone = dir.path().join("no-such-dir").join("x");
        assert!(replace(&gone, b"x").is_err());
    }

    #[test]
    fn private_files_and_renames() {
        let dir = tempfile::tempdir().unwrap();
        let partial = with_suffix(&dir.path().join("disk.cbts"), ".partial");
        assert!(partial.ends_with("disk.cbts.partial"));
        private_options().open(&partial).unwrap();
        assert_eq!(mode(&partial), 0o600);
        let done = dir.path().join("disk.cbts");
        commit_rename(&partial, &done).unwrap();
        assert!(done.exists() && !partial.exists());
        assert_eq!(parent_dir(Path::new("x.json")), Path::new("."));
    }
}
