//! The state of a backup chain, kept in a small JSON file next to the backups: which
//! snapshot the next incremental starts from. It is replaced atomically (write a temporary
//! file, fsync it, rename it over the old one, fsync the directory), and only after the
//! export it records is complete and durable, so a crash at any point leaves either the old
//! state or the new one, never a mix and never a state that points past the data.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The format version this build writes and reads.
pub const STATE_VERSION: u32 = 1;
/// A state file is a few hundred bytes; refuse anything absurd before reading it.
const MAX_STATE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    pub version: u32,
    /// The VDI the chain belongs to.
    pub vdi: String,
    /// The XenAPI URL of the pool master used last (no credentials).
    pub host: String,
    /// The snapshot the next incremental starts from: a `cbt_metadata` VDI, or a full
    /// snapshot when `data_destroy` failed.
    pub base: String,
    /// True once `data_destroy` turned the base into `cbt_metadata`.
    pub base_is_metadata: bool,
    /// The stream point id of the last export (the base's uuid).
    pub point_id: String,
    /// The virtual size at the last export.
    pub virtual_size: u64,
    pub updated_unix_secs: u64,
    /// Older bases kept by `--keep-bases`, oldest first.
    #[serde(default)]
    pub older_bases: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("reading the chain state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the chain state {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error(
        "the chain state {path} has version {found}; this cbtstream reads version {STATE_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("writing the chain state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Load the state, or `None` when there is no state file yet (the first, full export).
pub fn load(path: &Path) -> Result<Option<ChainState>, ChainError> {
    let read_err = |source| ChainError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut text = String::new();
    file.take(MAX_STATE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_STATE_BYTES {
        return Err(ChainError::Damaged {
            path: path.to_path_buf(),
            why: "larger than 1 MiB".into(),
        });
    }
    let state: ChainState = serde_json::from_str(&text).map_err(|e| ChainError::Damaged {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(ChainError::Version {
            path: path.to_path_buf(),
            found: state.version,
        });
    }
    Ok(Some(state))
}

/// Replace the state atomically and durably (0600: it names the chain's snapshots).
pub fn save(path: &Path, state: &ChainState) -> Result<(), ChainError> {
    let write_err = |source| ChainError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut text =
        serde_json::to_string_pretty(state).map_err(|e| write_err(std::io::Error::other(e)))?;
    text.push('\n');
    crate::durable::replace(path, text.as_bytes()).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ChainState {
        ChainState {
            version: STATE_VERSION,
            vdi: "vdi-1".into(),
            host: "https://pool/".into(),
            base: "snap-2".into(),
            base_is_metadata: true,
            point_id: "snap-2".into(),
            virtual_size: 1 << 30,
            updated_unix_secs: 1_795_000_000,
            older_bases: vec![],
        }
    }

    #[test]
    fn round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chain.json");
        assert_eq!(load(&path).unwrap(), None);
        save(&path, &state()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state()));
        let mut next = state();
        next.base = "snap-3".into();
        save(&path, &next).unwrap();
        assert_eq!(load(&path).unwrap(), Some(next));
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn damaged_and_future_states_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chain.json");
        std::fs::write(&path, "{ not json").unwrap();
        assert!(matches!(load(&path), Err(ChainError::Damaged { .. })));
        let mut s = serde_json::to_value(state()).unwrap();
        s["version"] = 2.into();
        std::fs::write(&path, s.to_string()).unwrap();
        assert!(matches!(
            load(&path),
            Err(ChainError::Version { found: 2, .. })
        ));
    }
}
