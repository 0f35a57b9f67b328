//! A point directory: one whole-VM backup point, `DIR/<point-id>/`, as docs/FORMAT.md
//! specifies it: the VM's metadata, one stream per disk, and `point.json`. It is written as
//! `DIR/<point-id>.partial/` and renamed only once every file in it is durable, so a
//! directory without `.partial` is always a complete point.

use crate::durable;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The name of the VM's configuration (`GET /export_metadata`: an XVA-style tar holding
/// `ova.xml`) in a point directory.
pub const METADATA_FILE: &str = "metadata.xva";
pub const POINT_FILE: &str = "point.json";

/// `point.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// The point's id (for XenServer, the snapshot VM's uuid).
    pub id: String,
    /// The VM's uuid.
    pub vm: String,
    /// The VM's name when it was backed up.
    pub name: String,
    /// When the snapshot was taken, RFC 3339 in UTC.
    pub time: String,
    /// The previous point of the chain, or null for a point of full streams only.
    pub base: Option<String>,
    pub disks: Vec<PointDisk>,
    /// Disks of the VM the point does not hold (changed block tracking off), by id: the
    /// VM's metadata still lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// One disk of a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointDisk {
    /// The disk's id at the source (for XenServer, the VDI's uuid).
    pub id: String,
    /// Its slot in the VM (XenServer's `userdevice`).
    pub slot: String,
    /// Its virtual size in bytes.
    pub size: u64,
    /// The stream's file name in the point directory.
    pub stream: String,
    /// SHA-256 of the stream file, lowercase hex.
    pub sha256: String,
    /// The point whose stream of this disk this one applies onto; null for a full stream.
    pub base: Option<String>,
}

/// The VM's metadata is a few hundred KiB; anything this large is not XenServer's.
pub const MAX_METADATA_BYTES: u64 = 64 << 20;

/// A point directory being written. Dropped before [`PartialPoint::finish`] (a failure, a
/// signal), it removes what was written.
#[derive(Debug)]
pub struct PartialPoint {
    dir: PathBuf,
    done: PathBuf,
    finished: bool,
}

impl Drop for PartialPoint {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl PartialPoint {
    /// Create `out/<id>.partial/` (0700), refusing when `out/<id>` exists.
    pub fn create(out: &Path, id: &str) -> std::io::Result<PartialPoint> {
        use std::os::unix::fs::DirBuilderExt;
        let done = out.join(id);
        if done.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists already", done.display()),
            ));
        }
        let dir = durable::with_suffix(&done, ".partial");
        // A leftover of a killed run with the same id cannot exist (ids are new snapshot
        // uuids), but be safe: start empty.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(PartialPoint {
            dir,
            done,
            finished: false,
        })
    }

    /// Path of a file in the partial directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Write `point.json` last, fsync every file and the directory, and rename it to its
    /// final name (then fsync the parent). The point exists from the rename on.
    pub fn finish(mut self, info: &PointInfo) -> std::io::Result<PathBuf> {
        let mut text = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
        text.push(b'\n');
        durable::replace(&self.dir.join(POINT_FILE), &text)?;
        for entry in std::fs::read_dir(&self.dir)? {
            std::fs::File::open(entry?.path())?.sync_all()?;
        }
        std::fs::File::open(&self.dir)?.sync_all()?;
        std::fs::rename(&self.dir, &self.done)?;
        self.finished = true;
        durable::sync_parent_dir(&self.done)?;
        Ok(self.done.clone())
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_appears_only_when_finished() {
        let out = tempfile::tempdir().unwrap();
        let p = PartialPoint::create(out.path(), "p1").unwrap();
        std::fs::write(p.file("0.cbts"), b"abc").unwrap();
        assert!(!out.path().join("p1").exists());
        let info = PointInfo {
            id: "p1".into(),
            vm: "vm".into(),
            name: "a vm".into(),
            time: "2026-11-30T00:00:00Z".into(),
            base: None,
            disks: vec![PointDisk {
                id: "vdi".into(),
                slot: "0".into(),
                size: 3,
                stream: "0.cbts".into(),
                sha256: sha256_file(&p.file("0.cbts")).unwrap(),
                base: None,
            }],
            skipped: vec![],
        };
        let done = p.finish(&info).unwrap();
        assert_eq!(done, out.path().join("p1"));
        assert!(!out.path().join("p1.partial").exists());
        let read: PointInfo =
            serde_json::from_slice(&std::fs::read(done.join(POINT_FILE)).unwrap()).unwrap();
        assert_eq!(read, info);
        assert_eq!(
            read.disks[0].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(PartialPoint::create(out.path(), "p1").is_err());
        drop(PartialPoint::create(out.path(), "p2").unwrap());
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
    }
}
