//! The state of a backup chain, kept in a small JSON file next to the backups: which
//! snapshot the next incremental starts from, and a point exported but not yet committed.
//! It is replaced atomically (see [`crate::durable::replace`]), and the committed base moves
//! only after the export it records is complete and durable, so a crash at any point leaves
//! either the old state or the new one, never a mix and never a state that points past the
//! data.
//!
//! A stream written to a pipe is durable only once its reader says so: such a point is
//! recorded as `pending` (its snapshot kept as it is) until `cbtstream commit` confirms it.
//! The committed base stays where it was until then.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The format version this build writes. Version 1 (no pending point, a base always set)
/// is read too.
pub const STATE_VERSION: u32 = 2;
/// A state file is a few hundred bytes; refuse anything absurd before reading it.
pub const MAX_STATE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    pub version: u32,
    /// The VDI the chain belongs to.
    pub vdi: String,
    /// The XenAPI URL of the pool master used last (no credentials).
    pub host: String,
    /// The snapshot the next incremental starts from: a `cbt_metadata` VDI, or a full
    /// snapshot when `data_destroy` failed. None until a first point is committed.
    pub base: Option<String>,
    /// True once `data_destroy` turned the base into `cbt_metadata`.
    pub base_is_metadata: bool,
    /// The stream point id of the last committed export (the base's uuid).
    pub point_id: Option<String>,
    /// The virtual size at the last committed export.
    pub virtual_size: u64,
    pub updated_unix_secs: u64,
    /// Older bases kept by `--keep-bases`, oldest first.
    #[serde(default)]
    pub older_bases: Vec<String>,
    /// A point whose stream went to a pipe and awaits `cbtstream commit`.
    #[serde(default)]
    pub pending: Option<PendingPoint>,
    /// Snapshots of pending points that a later export gave up on (nothing may commit them
    /// any more), still to be destroyed.
    #[serde(default)]
    pub abandoned: Vec<String>,
}

/// An exported point not yet committed: its snapshot is still a full snapshot, tagged as
/// ours, and nothing on the host moved for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPoint {
    /// The snapshot's uuid (also the stream's point id).
    pub snapshot: String,
    /// The point its stream applies onto; None for a full stream (a new chain).
    pub stream_base: Option<String>,
    pub virtual_size: u64,
    pub created_unix_secs: u64,
    /// `--keep-bases` of the export, applied when it is committed.
    pub keep_bases: u32,
}

impl ChainState {
    /// An empty chain for `vdi`: nothing committed yet.
    pub fn new(vdi: &str, host: String) -> ChainState {
        ChainState {
            version: STATE_VERSION,
            vdi: vdi.to_string(),
            host,
            base: None,
            base_is_metadata: false,
            point_id: None,
            virtual_size: 0,
            updated_unix_secs: 0,
            older_bases: Vec::new(),
            pending: None,
            abandoned: Vec::new(),
        }
    }

    /// Every snapshot the chain still needs: the base, the older bases kept, the pending one.
    pub fn needed(&self) -> Vec<String> {
        let pending = self.pending.as_ref().map(|p| p.snapshot.clone());
        self.base
            .iter()
            .cloned()
            .chain(self.older_bases.iter().cloned())
            .chain(pending)
            .collect()
    }
}

/// The chain of a whole VM (`cbtstream backup --vm`): each disk's base, and the last point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    /// The VM the chain belongs to.
    pub vm: String,
    /// The XenAPI URL of the pool master used last (no credentials).
    pub host: String,
    /// The last committed point (its directory's name).
    pub point: Option<String>,
    /// Each disk's base, by VDI uuid.
    pub disks: std::collections::BTreeMap<String, DiskBase>,
    pub updated_unix_secs: u64,
}

/// Where one disk's next incremental starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBase {
    /// The snapshot VDI (a `cbt_metadata` one once `data_destroy` ran).
    pub base: String,
    pub base_is_metadata: bool,
    /// The disk's slot in the VM (`userdevice`).
    pub slot: String,
}

/// The text of a state file, or `None` when there is none; at most [`MAX_STATE_BYTES`].
fn read_small(path: &Path) -> Result<Option<String>, ChainError> {
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
    Ok(Some(text))
}

/// Load a VM chain state, or `None` when there is none yet.
pub fn load_vm(path: &Path) -> Result<Option<VmState>, ChainError> {
    let Some(text) = read_small(path)? else {
        return Ok(None);
    };
    parse_vm(&text, path).map(Some)
}

/// A VM chain state from its text (`path` names it in errors).
pub fn parse_vm(text: &str, path: &Path) -> Result<VmState, ChainError> {
    if text.len() as u64 > MAX_STATE_BYTES {
        return Err(ChainError::Damaged {
            path: path.to_path_buf(),
            why: "larger than 1 MiB".into(),
        });
    }
    let state: VmState = serde_json::from_str(text).map_err(|e| ChainError::Damaged {
        path: path.to_path_buf(),
        why: if is_vsphere(text) {
            "it is the state of a vSphere chain, not of a XenServer VM".into()
        } else {
            e.to_string()
        },
    })?;
    if state.version != 1 {
        return Err(ChainError::Version {
            path: path.to_path_buf(),
            found: state.version,
        });
    }
    Ok(state)
}

/// The text of a VM chain state.
pub fn vm_text(state: &VmState) -> String {
    let mut text = serde_json::to_string_pretty(state).expect("a VmState serializes");
    text.push('\n');
    text
}

/// Replace a VM chain state atomically and durably.
pub fn save_vm(path: &Path, state: &VmState) -> Result<(), ChainError> {
    let text = vm_text(state);
    crate::durable::replace(path, text.as_bytes()).map_err(|source| ChainError::Write {
        path: path.to_path_buf(),
        source,
    })
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
        "the chain state {path} has version {found}; this cbtstream reads versions 1 to {STATE_VERSION}"
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
    let Some(text) = read_small(path)? else {
        return Ok(None);
    };
    let state: ChainState = serde_json::from_str(&text).map_err(|e| ChainError::Damaged {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if !(1..=STATE_VERSION).contains(&state.version) {
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
            base: Some("snap-2".into()),
            base_is_metadata: true,
            point_id: Some("snap-2".into()),
            virtual_size: 1 << 30,
            updated_unix_secs: 1_795_000_000,
            older_bases: vec![],
            pending: None,
            abandoned: vec![],
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
        next.base = Some("snap-3".into());
        next.pending = Some(PendingPoint {
            snapshot: "snap-4".into(),
            stream_base: Some("snap-3".into()),
            virtual_size: 1 << 30,
            created_unix_secs: 1_795_000_100,
            keep_bases: 1,
        });
        assert_eq!(next.needed(), ["snap-3", "snap-4"]);
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
        s["version"] = 3.into();
        std::fs::write(&path, s.to_string()).unwrap();
        assert!(matches!(
            load(&path),
            Err(ChainError::Version { found: 3, .. })
        ));
    }

    #[test]
    fn version_1_states_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chain.json");
        let v1 = r#"{"version": 1, "vdi": "vdi-1", "host": "https://pool/", "base": "snap-2",
            "base_is_metadata": true, "point_id": "snap-2", "virtual_size": 1073741824,
            "updated_unix_secs": 1795000000}"#;
        std::fs::write(&path, v1).unwrap();
        let s = load(&path).unwrap().unwrap();
        assert_eq!((s.base.as_deref(), s.pending), (Some("snap-2"), None));
    }
}

/// The chain of a vSphere VM (`backup --vsphere`, `export --vsphere`): each disk's
/// `changeId` at the last committed point, the next incremental's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsphereState {
    pub version: u32,
    /// Always `vsphere`: a XenServer state file given by mistake is refused.
    pub source: String,
    /// The VM's moId.
    pub vm: String,
    /// The vCenter used last (`https://host:port/`, no credentials).
    pub host: String,
    /// The last committed point's id.
    pub point: Option<String>,
    /// Each disk's base, by device key.
    pub disks: std::collections::BTreeMap<i32, VsphereDisk>,
    /// A point whose stream went to a pipe: not the base until its reader confirmed it.
    #[serde(default)]
    pub pending: Option<VspherePending>,
    pub updated_unix_secs: u64,
}

/// Where one vSphere disk's next incremental starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsphereDisk {
    /// The disk backing's uuid when the point was taken: another uuid is another disk.
    pub backing_uuid: Option<String>,
    /// The snapshot's `changeId` for this disk.
    pub change_id: String,
    pub capacity: u64,
    /// The point whose stream of this disk holds that state.
    pub point: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VspherePending {
    pub point: String,
    pub disks: std::collections::BTreeMap<i32, VsphereDisk>,
    pub created_unix_secs: u64,
}

pub const VSPHERE_STATE_VERSION: u32 = 1;

impl VsphereState {
    pub fn new(vm: &str, host: String) -> VsphereState {
        VsphereState {
            version: VSPHERE_STATE_VERSION,
            source: "vsphere".into(),
            vm: vm.to_owned(),
            host,
            point: None,
            disks: Default::default(),
            pending: None,
            updated_unix_secs: 0,
        }
    }
}

/// Load a vSphere chain state, or `None` when there is none yet.
pub fn load_vsphere(path: &Path) -> Result<Option<VsphereState>, ChainError> {
    let Some(text) = read_small(path)? else {
        return Ok(None);
    };
    parse_vsphere(&text, path).map(Some)
}

/// Whether a state's text is a vSphere chain's (`"source": "vsphere"`).
pub fn is_vsphere(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|v| v.get("source").and_then(|s| s.as_str()) == Some("vsphere"))
}

/// A vSphere chain state from its text (`path` names it in errors).
pub fn parse_vsphere(text: &str, path: &Path) -> Result<VsphereState, ChainError> {
    let damaged = |why: String| ChainError::Damaged {
        path: path.to_path_buf(),
        why,
    };
    if text.len() as u64 > MAX_STATE_BYTES {
        return Err(damaged("larger than 1 MiB".into()));
    }
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| damaged(e.to_string()))?;
    if v.get("source").and_then(|s| s.as_str()) != Some("vsphere") {
        return Err(damaged("not the state of a vSphere chain".into()));
    }
    let state: VsphereState = serde_json::from_value(v).map_err(|e| damaged(e.to_string()))?;
    if state.version != VSPHERE_STATE_VERSION {
        return Err(ChainError::Version {
            path: path.to_path_buf(),
            found: state.version,
        });
    }
    Ok(state)
}

/// The text of a vSphere chain state.
pub fn vsphere_text(state: &VsphereState) -> String {
    let mut text = serde_json::to_string_pretty(state).expect("a VsphereState serializes");
    text.push('\n');
    text
}

/// Replace a vSphere chain state atomically and durably (0600).
pub fn save_vsphere(path: &Path, state: &VsphereState) -> Result<(), ChainError> {
    let text = vsphere_text(state);
    crate::durable::replace(path, text.as_bytes()).map_err(|source| ChainError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod vsphere_tests {
    use super::*;

    #[test]
    fn vsphere_states_round_trip_and_other_states_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        assert_eq!(load_vsphere(&path).unwrap(), None);
        let mut s = VsphereState::new("vm-42", "https://vc:443/".into());
        s.disks.insert(
            2000,
            VsphereDisk {
                backing_uuid: Some("6000C29a".into()),
                change_id: "52 03/7".into(),
                capacity: 1 << 20,
                point: "p1".into(),
            },
        );
        save_vsphere(&path, &s).unwrap();
        assert_eq!(load_vsphere(&path).unwrap(), Some(s));
        std::fs::write(&path, r#"{"version": 1, "vm": "x", "host": "h", "point": null, "disks": {}, "updated_unix_secs": 0}"#).unwrap();
        let e = load_vsphere(&path).unwrap_err().to_string();
        assert!(e.contains("not the state of a vSphere chain"), "{e}");
    }
}
