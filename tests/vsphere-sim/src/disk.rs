//! One virtual disk: a chain of layers (the flat extent, then one delta per snapshot) and
//! its changed-block tracking.
//!
//! Snapshots freeze the way VMware's do: creating one puts a new delta on top of the chain,
//! the guest writes go there (copy-on-write in [`GRAIN`] units), and every layer below is
//! read-only; removing a snapshot merges the delta it created into the layer below
//! (consolidation). With no older snapshots, the layer a backup snapshot freezes is the flat
//! extent `<vm>-flat.vmdk` itself, which the datastore file service serves.
//!
//! CBT keeps, per grain, the sequence numbers of the points during which it was written, so
//! any interval between two change ids can be answered exactly. A `changeId` is
//! `"<tracking uuid>/<point>"`; a CBT reset draws a new uuid, so older change ids no longer
//! match.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Copy-on-write and change-tracking unit: changed areas are reported in whole grains
/// (clipped to the capacity), so they are supersets of what was written.
pub const GRAIN: u64 = 64 << 10;

/// A layer of the chain.
#[derive(Debug)]
pub struct Layer {
    /// The data file: the flat extent for layer 0, a sparse file of the simulator's own for a
    /// delta (its content is raw, at disk offsets).
    pub path: PathBuf,
    /// The descriptor's datastore path, `vm/vm-000001.vmdk`.
    pub descriptor: String,
    /// Grains present in a delta; `None` for the flat extent (every grain present).
    pub grains: Option<BTreeSet<u64>>,
}

/// Changed-block tracking state of one disk.
#[derive(Debug)]
pub struct Cbt {
    /// Whether tracking runs now (the VM's `changeTrackingEnabled` after the last stun).
    pub active: bool,
    /// Tracking identity, the first part of a change id; new after a reset.
    pub uuid: String,
    /// The point writes are tagged with now; a snapshot freezes point `seq` and moves on.
    pub seq: u64,
    /// Change ids of this uuid from this point on are valid.
    pub valid_from: u64,
    /// Grain → the points during which it was written (point 0: before tracking started).
    pub written: BTreeMap<u64, Vec<u64>>,
}

impl Cbt {
    fn new(active: bool) -> Cbt {
        let mut c = Cbt {
            active: false,
            uuid: String::new(),
            seq: 0,
            valid_from: 0,
            written: BTreeMap::new(),
        };
        if active {
            c.activate();
        }
        c
    }

    /// Starts tracking afresh (a stun after `changeTrackingEnabled` was set, or a reset):
    /// a new uuid, nothing written before now is reported as changed.
    pub fn activate(&mut self) {
        self.active = true;
        self.uuid = vmware_uuid();
        self.seq += 1;
        self.valid_from = self.seq - 1;
    }

    /// The change id of the disk as it runs: the last frozen point (so every write since is
    /// reported against it).
    pub fn live_change_id(&self) -> Option<String> {
        self.active
            .then(|| format!("{}/{}", self.uuid, self.seq - 1))
    }
}

/// VMware writes UUIDs as 16 hex bytes, `52 03 66 63 84 8d 00 3d-15 62 47 74 7e 26 df b5`.
pub fn vmware_uuid() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

/// Why a change id cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum ChangeIdError {
    /// Not `uuid/number`.
    Malformed,
    /// The uuid is not the disk's current tracking identity (CBT reset, or another disk).
    OtherTracking,
    /// The point is before tracking (re)started or after the snapshot's.
    OutOfRange,
}

/// Parses `"<uuid>/<point>"`.
pub fn parse_change_id(id: &str) -> Result<(&str, u64), ChangeIdError> {
    let (uuid, point) = id.rsplit_once('/').ok_or(ChangeIdError::Malformed)?;
    let point = point.parse().map_err(|_| ChangeIdError::Malformed)?;
    if uuid.is_empty() {
        return Err(ChangeIdError::Malformed);
    }
    Ok((uuid, point))
}

#[derive(Debug)]
pub struct Disk {
    /// Device key (2000, 2001, ...).
    pub key: i32,
    pub capacity: u64,
    /// `ddb.uuid` of the base disk, also `backing.uuid`.
    pub uuid: String,
    /// The chain, flat extent first.
    pub layers: Vec<Layer>,
    pub cbt: Cbt,
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Creates a sparse file of `size` bytes, mode 0600.
pub fn create_sparse(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    Ok(())
}

impl Disk {
    pub fn new(key: i32, capacity: u64, flat: PathBuf, descriptor: String, cbt: bool) -> Disk {
        Disk {
            key,
            capacity,
            uuid: vmware_uuid(),
            layers: vec![Layer {
                path: flat,
                descriptor,
                grains: None,
            }],
            cbt: Cbt::new(cbt),
        }
    }

    fn grain_range(&self, g: u64) -> (u64, u64) {
        let start = g * GRAIN;
        (start, (start + GRAIN).min(self.capacity))
    }

    /// Reads `buf.len()` bytes at `offset` as the first `depth` layers show them.
    pub fn read_view(&self, depth: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        anyhow::ensure!(end <= self.capacity, "read past the end of the disk");
        let mut pos = offset;
        while pos < end {
            let g = pos / GRAIN;
            let chunk_end = ((g + 1) * GRAIN).min(end);
            let layer = self.layers[..depth]
                .iter()
                .rev()
                .find(|l| l.grains.as_ref().is_none_or(|s| s.contains(&g)))
                .context("the chain has no flat extent")?;
            let dst = &mut buf[(pos - offset) as usize..(chunk_end - offset) as usize];
            File::open(&layer.path)?.read_exact_at(dst, pos)?;
            pos = chunk_end;
        }
        Ok(())
    }

    /// A guest write: into the top layer (copy-on-write of partly written grains of a
    /// delta), tagged for CBT.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset + data.len() as u64;
        anyhow::ensure!(end <= self.capacity, "write past the end of the disk");
        if data.is_empty() {
            return Ok(());
        }
        let top = self.layers.len() - 1;
        let first = offset / GRAIN;
        let last = (end - 1) / GRAIN;
        for g in first..=last {
            let missing = self.layers[top]
                .grains
                .as_ref()
                .is_some_and(|s| !s.contains(&g));
            if missing {
                let (gs, ge) = self.grain_range(g);
                let mut old = vec![0u8; (ge - gs) as usize];
                self.read_view(top, gs, &mut old)?;
                open_rw(&self.layers[top].path)?.write_all_at(&old, gs)?;
                if let Some(s) = self.layers[top].grains.as_mut() {
                    s.insert(g);
                }
            }
            let tags = self.cbt.written.entry(g).or_default();
            if tags.last() != Some(&self.cbt.seq) {
                tags.push(self.cbt.seq);
            }
        }
        open_rw(&self.layers[top].path)?.write_all_at(data, offset)?;
        Ok(())
    }

    /// Grows the disk (only without deltas): the flat extent gets longer, sparse.
    pub fn grow(&mut self, size: u64) -> Result<()> {
        anyhow::ensure!(self.layers.len() == 1, "the disk has deltas");
        open_rw(&self.layers[0].path)?.set_len(size)?;
        self.capacity = size;
        Ok(())
    }

    /// Puts a new delta on top (a snapshot was taken): `path` is created sparse.
    pub fn push_delta(&mut self, path: PathBuf, descriptor: String) -> Result<()> {
        create_sparse(&path, self.capacity)?;
        self.layers.push(Layer {
            path,
            descriptor,
            grains: Some(BTreeSet::new()),
        });
        Ok(())
    }

    /// Merges layer `i` (a delta) into layer `i - 1` and drops it (consolidation).
    pub fn merge_down(&mut self, i: usize) -> Result<()> {
        anyhow::ensure!(i >= 1 && i < self.layers.len(), "no delta at layer {i}");
        let upper = self.layers.remove(i);
        let grains = upper.grains.clone().unwrap_or_default();
        let src = File::open(&upper.path)?;
        let dst = open_rw(&self.layers[i - 1].path)?;
        for g in grains {
            let (gs, ge) = self.grain_range(g);
            let mut buf = vec![0u8; (ge - gs) as usize];
            src.read_exact_at(&mut buf, gs)?;
            dst.write_all_at(&buf, gs)?;
            if let Some(s) = self.layers[i - 1].grains.as_mut() {
                s.insert(g);
            }
        }
        drop(src);
        std::fs::remove_file(&upper.path)
            .with_context(|| format!("removing {}", upper.path.display()))?;
        Ok(())
    }

    /// Checks `change_id` against a snapshot frozen at `point` of tracking `uuid`; returns
    /// the first point whose writes count as changes (`None`: `*`, allocated areas).
    pub fn changes_from(
        &self,
        uuid: &str,
        point: u64,
        change_id: &str,
    ) -> Result<Option<u64>, ChangeIdError> {
        if change_id == "*" {
            return Ok(None);
        }
        let (id_uuid, since) = parse_change_id(change_id)?;
        if id_uuid != uuid || uuid != self.cbt.uuid {
            return Err(ChangeIdError::OtherTracking);
        }
        if since < self.cbt.valid_from || since > point {
            return Err(ChangeIdError::OutOfRange);
        }
        Ok(Some(since + 1))
    }

    /// One page of QueryChangedDiskAreas for a snapshot frozen at `point`: the grains written
    /// during points `from..=point` (`from` `None`: at or before `point`, i.e. allocated),
    /// from `start` on, at most `max_areas` areas spanning at most `max_bytes`. Returns the
    /// page's length and its areas `(start, length)`.
    pub fn changed_areas(
        &self,
        point: u64,
        from: Option<u64>,
        start: u64,
        max_areas: usize,
        max_bytes: u64,
    ) -> (u64, Vec<(u64, u64)>) {
        let limit = start.saturating_add(max_bytes).min(self.capacity);
        let mut areas: Vec<(u64, u64)> = Vec::new();
        let first = start / GRAIN;
        for (&g, tags) in self.cbt.written.range(first..) {
            let hit = tags
                .iter()
                .any(|&t| t <= point && from.is_none_or(|f| t >= f));
            if !hit {
                continue;
            }
            let (gs, ge) = self.grain_range(g);
            let (gs, ge) = (gs.max(start), ge.min(limit));
            if gs >= limit {
                break;
            }
            match areas.last_mut() {
                Some((s, l)) if *s + *l == gs => *l += ge - gs,
                _ => {
                    if areas.len() == max_areas {
                        // The page ends where the last area ends.
                        let (s, l) = areas[max_areas - 1];
                        return (s + l - start, areas);
                    }
                    areas.push((gs, ge - gs));
                }
            }
        }
        (limit - start, areas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, capacity: u64) -> Disk {
        let flat = dir.join("d-flat.vmdk");
        create_sparse(&flat, capacity).unwrap();
        Disk::new(2000, capacity, flat, "d/d.vmdk".into(), true)
    }

    fn read(d: &Disk, depth: usize, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        d.read_view(depth, off, &mut b).unwrap();
        b
    }

    #[test]
    fn a_snapshot_freezes_the_layers_below_and_merging_keeps_the_newest_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = disk(dir.path(), 3 * GRAIN + 512);
        d.write(100, b"before").unwrap();
        d.push_delta(dir.path().join("delta1"), "d/d-000001.vmdk".into())
            .unwrap();
        d.write(103, b"AFTER").unwrap();
        assert_eq!(read(&d, 1, 100, 8), b"before\0\0");
        assert_eq!(read(&d, 2, 100, 8), b"befAFTER");
        d.merge_down(1).unwrap();
        assert_eq!(d.layers.len(), 1);
        assert_eq!(read(&d, 1, 100, 8), b"befAFTER");
        assert!(!dir.path().join("delta1").exists());
    }

    #[test]
    fn changed_areas_page_by_count_and_clip_to_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 5 * GRAIN + 1024;
        let mut d = disk(dir.path(), cap);
        d.write(1, b"x").unwrap();
        d.write(2 * GRAIN, b"y").unwrap();
        d.write(5 * GRAIN + 3, b"z").unwrap();
        let point = d.cbt.seq;
        let (len, areas) = d.changed_areas(point, None, 0, 2, u64::MAX);
        assert_eq!(
            (len, areas.clone()),
            (3 * GRAIN, vec![(0, GRAIN), (2 * GRAIN, GRAIN)])
        );
        let (len, areas) = d.changed_areas(point, None, 3 * GRAIN, 2, u64::MAX);
        assert_eq!((len, areas), (cap - 3 * GRAIN, vec![(5 * GRAIN, 1024)]));
        // A byte cap cuts an area at the page end.
        let (len, areas) = d.changed_areas(point, None, 10, 10, GRAIN);
        assert_eq!((len, areas), (GRAIN, vec![(10, GRAIN - 10)]));
    }

    #[test]
    fn change_ids_from_before_a_reset_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = disk(dir.path(), 4 * GRAIN);
        let old = d.cbt.live_change_id().unwrap();
        let (uuid, point) = (d.cbt.uuid.clone(), d.cbt.seq);
        assert_eq!(d.changes_from(&uuid, point, &old), Ok(Some(1)));
        d.cbt.activate();
        let (uuid, point) = (d.cbt.uuid.clone(), d.cbt.seq);
        assert_eq!(
            d.changes_from(&uuid, point, &old),
            Err(ChangeIdError::OtherTracking)
        );
        assert_eq!(
            d.changes_from(&uuid, point, "nonsense"),
            Err(ChangeIdError::Malformed)
        );
    }
}
