//! `cbtstream prune`: forget old points of a VM without breaking what is kept.
//!
//! Under the VM's lock, in this order, so that a run killed at any moment leaves a
//! repository in which every listed point restores:
//! 1. Decide which points go ([`super::retention`]). A kept point whose chain runs through
//!    a point that goes is made a full one: each of its incremental disks is merged
//!    ([`crate::merge::merge_into`]) from its chain's streams into a new object of the
//!    point's directory, under a name no file there has.
//! 2. Each merged stream is read back and verified (records, digest, SHA-256, size).
//! 3. The point's point.json is replaced (atomically) to name the merged streams, with no
//!    base: from then on it is a full point. Until then it still names its old streams.
//! 4. Deleted points go one by one, each point.json first (it vanishes from `list` at once),
//!    a point before any point it needs; then the streams the rewritten points no longer
//!    name.
//!
//! What a killed run leaves (objects of point directories without point.json, streams no
//! point.json names, S3 uploads never completed) is removed by the next run under the lock.

use super::reader::ObjectReader;
use super::retention::{self, Dated, Keep, Policy};
use super::store::{valid_name, ObjectInfo, Store};
use super::upload::{self, Stored};
use super::{point_dir, points_dir, uploads_dir, Points, Repo, RepoError, StoredPoint};
use crate::engine::sink::FinishingWriter;
use crate::exit::Code;
use crate::merge::{merge_into, MergeError, MergeReport};
use crate::restore::verified::{open_chain, Payloads};
use crate::restore::{RestoreError, StreamInput};
use crate::xen::point::{PointDisk, PointInfo, POINT_FILE};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

/// Test hook: `CBTSTREAM_TEST_KILL_AT=<step>` makes prune kill itself with SIGKILL the
/// first time it reaches that step (the names are in [`STEPS`]), so that the tests can
/// check what every step leaves behind. Not for use outside tests.
pub const KILL_AT_ENV: &str = "CBTSTREAM_TEST_KILL_AT";
/// The steps [`KILL_AT_ENV`] names, in the order a prune reaches them.
pub const STEPS: &[&str] = &[
    "locked",
    "merge-written",
    "merge-stored",
    "verified",
    "recorded",
    "point-forgotten",
    "point-deleted",
    "old-streams-deleted",
];

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("VM {vm} in the repository: {reason}; nothing was changed")]
    Chain { vm: String, reason: String },
    #[error("merging disk {disk} of point {point}: {source}; nothing was deleted")]
    Merge {
        point: String,
        disk: String,
        source: MergeError,
    },
    #[error("the merged stream {what} failed verification: {reason}; nothing was deleted")]
    Verify { what: String, reason: String },
    #[error(transparent)]
    State(#[from] crate::chain::ChainError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl PruneError {
    pub fn exit_code(&self) -> Code {
        match self {
            PruneError::Repo(e) => crate::repo_cli::repo_code(e),
            PruneError::Chain { .. } | PruneError::Verify { .. } => Code::Integrity,
            PruneError::Merge { source, .. } => match source {
                // Reading the repository's objects, or writing the merged one.
                MergeError::Input(RestoreError::Open { .. } | RestoreError::Input { .. })
                | MergeError::Output { .. } => Code::Output,
                other => other.exit_code(),
            },
            PruneError::State(crate::chain::ChainError::Read { .. })
            | PruneError::State(crate::chain::ChainError::Write { .. }) => Code::Output,
            PruneError::State(_) => Code::Integrity,
            PruneError::Internal(_) => Code::Failure,
        }
    }
}

impl From<super::store::StoreError> for PruneError {
    fn from(e: super::store::StoreError) -> Self {
        PruneError::Repo(RepoError::Store(e))
    }
}

/// What one VM's prune did (or, with `dry_run`, would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pruned {
    pub vm: String,
    pub dry_run: bool,
    pub kept: Vec<KeptPoint>,
    pub deleted: Vec<String>,
    /// Kept points made full (merged), oldest first.
    pub merged: Vec<String>,
    /// The streams written for them (none in a dry run).
    pub merged_streams: Vec<MergedStream>,
    /// Bytes of the objects removed (would be removed).
    pub bytes_deleted: u64,
    /// Bytes of the merged streams written.
    pub bytes_written: u64,
    /// `bytes_deleted - bytes_written`.
    pub bytes_freed: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KeptPoint {
    pub id: String,
    pub time: String,
    /// Which rule kept it.
    pub reason: &'static str,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergedStream {
    pub point: String,
    pub disk: String,
    pub stream: String,
    pub sha256: String,
    pub bytes: u64,
    pub records_copied: u64,
    pub records_recompressed: u64,
    pub zero_records_cut: u64,
    pub records_dropped: u64,
}

/// Prunes `vm` (the caller holds its lock unless `dry_run`) by `policy`.
pub async fn prune_vm(
    repo: &Repo,
    vm: &str,
    policy: Policy,
    dry_run: bool,
) -> Result<Pruned, PruneError> {
    if !dry_run {
        kill_point("locked");
    }
    let found = repo.points(vm).await?;
    let state = super::state::StateHome::Repo {
        repo: repo.clone(),
        vm: vm.to_owned(),
    }
    .load()
    .await?;
    let pinned: Vec<&str> = state
        .as_ref()
        .and_then(|s| s.point.as_deref())
        .into_iter()
        .collect();
    let dated: Vec<Dated> = found
        .points
        .iter()
        .map(|p| Dated {
            id: &p.info.id,
            time: &p.info.time,
        })
        .collect();
    let decisions = retention::decide(&dated, policy, &pinned);
    let plan = plan(vm, &found, &decisions)?;
    let garbage = unreferenced_streams(vm, &found);

    let mut out = Pruned {
        vm: vm.to_owned(),
        dry_run,
        kept: found
            .points
            .iter()
            .zip(&decisions)
            .filter_map(|(p, k)| {
                k.map(|k| KeptPoint {
                    id: p.info.id.clone(),
                    time: p.info.time.clone(),
                    reason: k.as_str(),
                })
            })
            .collect(),
        deleted: plan.delete.clone(),
        merged: plan.rewrite.clone(),
        merged_streams: Vec::new(),
        bytes_deleted: 0,
        bytes_written: 0,
        bytes_freed: 0,
    };
    if dry_run {
        out.bytes_deleted = garbage.iter().map(|o| o.size).sum::<u64>()
            + plan
                .delete
                .iter()
                .filter_map(|id| found.get(id))
                .map(StoredPoint::bytes)
                .sum::<u64>()
            + plan
                .rewrite
                .iter()
                .filter_map(|id| found.get(id))
                .map(|p| old_streams_size(vm, p))
                .sum::<u64>();
        out.bytes_freed = i64::try_from(out.bytes_deleted).unwrap_or(i64::MAX);
        return Ok(out);
    }

    // What a killed run left in kept points: merged streams never recorded, or old ones
    // recorded over.
    for o in &garbage {
        tracing::info!(
            "removing {}, a stream no point names (left by a prune that did not finish)",
            repo.store.describe(&o.key)
        );
        repo.store.delete(&o.key).await?;
        out.bytes_deleted += o.size;
    }

    // Steps 1 to 3, oldest kept point first: a later one's chain may run through an
    // earlier one, which by then is full.
    let mut view = Points {
        points: found.points.clone(),
        incomplete: Vec::new(),
    };
    for p in &mut view.points {
        p.files.retain(|f| !garbage.contains(f));
    }
    let mut old_streams: Vec<String> = Vec::new();
    for id in &plan.rewrite {
        let (info, streams, replaced) = make_full(repo, vm, &view, id).await?;
        out.bytes_written += streams.iter().map(|s| s.bytes).sum::<u64>();
        out.merged_streams.extend(streams);
        old_streams.extend(replaced);
        let p = view
            .points
            .iter_mut()
            .find(|p| p.info.id == *id)
            .ok_or_else(|| PruneError::Internal(format!("point {id} vanished")))?;
        p.info = info;
    }

    // Step 4: a point before any point it needs, each point.json first.
    for id in deletion_order(&view, &plan.delete) {
        let Some(p) = view.get(&id) else { continue };
        let record = format!("{}/{POINT_FILE}", point_dir(vm, &id));
        repo.store.delete(&record).await?;
        kill_point("point-forgotten");
        for f in &p.files {
            if f.key != record {
                repo.store.delete(&f.key).await?;
            }
        }
        out.bytes_deleted += p.bytes();
        kill_point("point-deleted");
    }
    for key in &old_streams {
        let size = repo.store.size(key).await?.unwrap_or(0);
        repo.store.delete(key).await?;
        out.bytes_deleted += size;
    }
    kill_point("old-streams-deleted");
    out.bytes_freed = i64::try_from(out.bytes_deleted)
        .unwrap_or(i64::MAX)
        .saturating_sub(i64::try_from(out.bytes_written).unwrap_or(i64::MAX));
    Ok(out)
}

/// Bytes of the incremental streams of `p`, which making it full replaces.
fn old_streams_size(vm: &str, p: &StoredPoint) -> u64 {
    let dir = point_dir(vm, &p.info.id);
    p.info
        .disks
        .iter()
        .filter(|d| d.base.is_some())
        .filter_map(|d| {
            let key = format!("{dir}/{}", d.stream);
            p.files.iter().find(|f| f.key == key).map(|f| f.size)
        })
        .sum()
}

/// What [`plan`] decided.
struct Plan {
    /// Kept points to make full, oldest first.
    rewrite: Vec<String>,
    delete: Vec<String>,
}

/// Which kept points must become full: those whose chain (of points, or of any disk's
/// streams) runs through a point that goes, once the older ones are made full.
fn plan(vm: &str, found: &Points, decisions: &[Option<Keep>]) -> Result<Plan, PruneError> {
    let chain_err = |reason: String| PruneError::Chain {
        vm: vm.to_owned(),
        reason,
    };
    let delete: Vec<String> = found
        .points
        .iter()
        .zip(decisions)
        .filter(|(_, k)| k.is_none())
        .map(|(p, _)| p.info.id.clone())
        .collect();
    let mut view = Points {
        points: found.points.clone(),
        incomplete: Vec::new(),
    };
    let mut rewrite = Vec::new();
    for (p, keep) in found.points.iter().zip(decisions) {
        if keep.is_none() {
            continue;
        }
        let id = &p.info.id;
        let mut needed: Vec<String> = view
            .chain(id)
            .map_err(chain_err)?
            .iter()
            .map(|p| p.info.id.clone())
            .collect();
        for d in &p.info.disks {
            for key in view.disk_chain(vm, id, &d.id).map_err(chain_err)? {
                needed.push(key_point(vm, &key).to_owned());
            }
        }
        if needed.iter().any(|n| delete.contains(n)) {
            rewrite.push(id.clone());
            let v = view
                .points
                .iter_mut()
                .find(|v| v.info.id == *id)
                .ok_or_else(|| PruneError::Internal(format!("point {id} vanished")))?;
            v.info.base = None;
            v.info.disks.iter_mut().for_each(|d| d.base = None);
        }
    }
    Ok(Plan { rewrite, delete })
}

/// The point of a stream key `vms/<vm>/points/<point>/<file>`.
fn key_point<'a>(vm: &str, key: &'a str) -> &'a str {
    key.strip_prefix(&format!("{}/", points_dir(vm)))
        .and_then(|rest| rest.split_once('/'))
        .map_or("", |(point, _)| point)
}

/// The order to delete points in: a point before any point it needs (every other
/// remaining one that names it as its base, or a disk's base, goes first), so that each
/// point still listed keeps its chain.
fn deletion_order(view: &Points, delete: &[String]) -> Vec<String> {
    let mut left: Vec<&StoredPoint> = delete.iter().filter_map(|id| view.get(id)).collect();
    let mut order = Vec::new();
    while !left.is_empty() {
        let needs = |p: &StoredPoint, id: &str| {
            p.info.base.as_deref() == Some(id)
                || p.info.disks.iter().any(|d| d.base.as_deref() == Some(id))
        };
        // The newest one nobody left needs; with bases in a loop (a damaged repository),
        // the newest.
        let pick = (0..left.len())
            .rev()
            .find(|&i| !left.iter().any(|o| needs(o, &left[i].info.id)))
            .unwrap_or(left.len() - 1);
        order.push(left.remove(pick).info.id.clone());
    }
    order
}

/// Streams (`*.cbts`) in the directories of listed points that their point.json does
/// not name: merged streams a killed prune never recorded, or old ones it recorded over.
fn unreferenced_streams(vm: &str, found: &Points) -> Vec<ObjectInfo> {
    let mut out = Vec::new();
    for p in &found.points {
        let dir = point_dir(vm, &p.info.id);
        let named: BTreeSet<String> = p
            .info
            .disks
            .iter()
            .map(|d| format!("{dir}/{}", d.stream))
            .collect();
        out.extend(
            p.files
                .iter()
                .filter(|f| f.key.ends_with(".cbts") && !named.contains(&f.key))
                .cloned(),
        );
    }
    out
}

/// Steps 1 to 3 for kept point `id`: each incremental disk merged into a new stream of the
/// point's directory, read back and verified; then point.json replaced. Returns the new
/// point.json, the merged streams, and the keys of the streams it no longer names.
async fn make_full(
    repo: &Repo,
    vm: &str,
    view: &Points,
    id: &str,
) -> Result<(PointInfo, Vec<MergedStream>, Vec<String>), PruneError> {
    let point = view
        .get(id)
        .ok_or_else(|| PruneError::Internal(format!("point {id} vanished")))?;
    let dir = point_dir(vm, id);
    let mut taken: BTreeSet<String> = point.files.iter().map(|f| f.key.clone()).collect();
    let mut info = point.info.clone();
    let mut merged = Vec::new();
    let mut replaced = Vec::new();
    for disk in info.disks.iter_mut() {
        if disk.base.is_none() {
            continue;
        }
        let chain_err = |reason: String| PruneError::Chain {
            vm: vm.to_owned(),
            reason,
        };
        let inputs = view.disk_chain(vm, id, &disk.id).map_err(chain_err)?;
        let name = new_stream_name(&disk.slot, &dir, &taken).ok_or_else(|| PruneError::Chain {
            vm: vm.to_owned(),
            reason: format!("point {id}: disk slot {:?} cannot name a file", disk.slot),
        })?;
        let key = format!("{dir}/{name}");
        taken.insert(key.clone());
        let (report, stored) = merge_disk(repo, vm, id, disk, &inputs, &key).await?;
        kill_point("merge-stored");
        verify_stored(&repo.store, &key, &stored, disk.size).await?;
        kill_point("verified");
        replaced.push(format!("{dir}/{}", disk.stream));
        merged.push(MergedStream {
            point: id.to_owned(),
            disk: disk.id.clone(),
            stream: name.clone(),
            sha256: stored.sha256.clone(),
            bytes: stored.bytes,
            records_copied: report.copied,
            records_recompressed: report.recompressed,
            zero_records_cut: report.zero_cut,
            records_dropped: report.dropped,
        });
        disk.stream = name;
        disk.sha256 = stored.sha256;
        disk.base = None;
    }
    info.base = None;
    let mut text = serde_json::to_vec_pretty(&info).map_err(super::store::StoreError::from_json)?;
    text.push(b'\n');
    repo.store.put(&format!("{dir}/{POINT_FILE}"), text).await?;
    kill_point("recorded");
    Ok((info, merged, replaced))
}

/// `disk<slot>.full.cbts`, or with a number added when a file has that name.
fn new_stream_name(slot: &str, dir: &str, taken: &BTreeSet<String>) -> Option<String> {
    (0..1000u32)
        .map(|n| match n {
            0 => format!("disk{slot}.full.cbts"),
            n => format!("disk{slot}.full{n}.cbts"),
        })
        .find(|name| !taken.contains(&format!("{dir}/{name}")))
        .filter(|name| valid_name(name))
}

/// Merges the streams `inputs` (keys, oldest first) into a new object `key`.
async fn merge_disk(
    repo: &Repo,
    vm: &str,
    point: &str,
    disk: &PointDisk,
    inputs: &[String],
    key: &str,
) -> Result<(MergeReport, Stored), PruneError> {
    let mut readers = Vec::new();
    let mut input_bytes = 0u64;
    for k in inputs {
        let r = ObjectReader::open(&repo.store, k).await?;
        input_bytes = input_bytes.saturating_add(repo.store.size(k).await?.unwrap_or(0));
        readers.push(StreamInput::Reader {
            name: repo.store.describe(k),
            reader: Box::new(r),
        });
    }
    // An upper bound of the merged stream's size (for S3's part size): all the inputs.
    let (upload, writer) = upload::start(
        &repo.store,
        key,
        input_bytes.max(disk.size),
        &uploads_dir(vm),
    )
    .await?;
    let name = repo.store.describe(key);
    let merged = tokio::task::spawn_blocking(move || -> Result<MergeReport, MergeError> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, writer);
        let report = merge_into(readers, &mut out, &name)?;
        let writer = out.into_inner().map_err(|e| MergeError::Output {
            output: name.clone(),
            error: e.into_error(),
        })?;
        kill_point("merge-written");
        Box::new(writer)
            .finish()
            .map_err(|error| MergeError::Output {
                output: name,
                error,
            })?;
        Ok(report)
    })
    .await
    .map_err(|e| PruneError::Internal(format!("the merge thread failed: {e}")))?;
    let merge_err = |source| PruneError::Merge {
        point: point.to_owned(),
        disk: disk.id.clone(),
        source,
    };
    match merged {
        Ok(report) => Ok((report, upload.finish().await?)),
        Err(e) => {
            // The writer was dropped unfinished: the upload removes what it wrote.
            if let Err(cleanup) = upload.finish().await {
                tracing::debug!("the merged stream's upload ended: {cleanup}");
            }
            Err(merge_err(e))
        }
    }
}

/// Reads the stored object `key` back: a full stream whose records, digest and trailer
/// verify, of a disk of `disk_size` bytes, with the SHA-256 and size the upload reported.
async fn verify_stored(
    store: &Store,
    key: &str,
    stored: &Stored,
    disk_size: u64,
) -> Result<(), PruneError> {
    let what = store.describe(key);
    let failed = |reason: String| PruneError::Verify {
        what: what.clone(),
        reason,
    };
    let reader = ObjectReader::open(store, key).await?;
    let hashed = Arc::new(Mutex::new((
        ring::digest::Context::new(&ring::digest::SHA256),
        0u64,
    )));
    let input = StreamInput::Reader {
        name: what.clone(),
        reader: Box::new(Hashing {
            inner: reader,
            hashed: hashed.clone(),
        }),
    };
    let checked = tokio::task::spawn_blocking(move || -> Result<u64, RestoreError> {
        let mut streams = open_chain(vec![input], &|input| {
            Err(RestoreError::ChainMismatch {
                input: input.to_owned(),
                reason: "a merged stream is a full one, and this is an incremental".into(),
            })
        })?;
        let stream = streams
            .pop()
            .ok_or_else(|| RestoreError::Internal("no stream".into()))?;
        let size = stream.header.virtual_size;
        stream.verify(&mut Payloads::new()?, |_| Ok(()))?;
        Ok(size)
    })
    .await
    .map_err(|e| PruneError::Internal(format!("the verifying thread failed: {e}")))?
    .map_err(|e| failed(e.to_string()))?;
    if checked != disk_size {
        return Err(failed(format!(
            "it is of a disk of {checked} bytes, and the point's disk has {disk_size}"
        )));
    }
    let (ctx, bytes) = {
        let guard = hashed
            .lock()
            .map_err(|_| PruneError::Internal("hash lock poisoned".into()))?;
        (guard.0.clone(), guard.1)
    };
    let sha256 = upload::hex(ctx.finish().as_ref());
    if sha256 != stored.sha256 || bytes != stored.bytes {
        return Err(failed(format!(
            "read back {bytes} bytes with SHA-256 {sha256}, but {} bytes with SHA-256 {} were written",
            stored.bytes, stored.sha256
        )));
    }
    Ok(())
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hashed: Arc<Mutex<(ring::digest::Context, u64)>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut h = self
            .hashed
            .lock()
            .map_err(|_| std::io::Error::other("hash lock poisoned"))?;
        h.0.update(&buf[..n]);
        h.1 += n as u64;
        Ok(n)
    }
}

/// The test hook of [`KILL_AT_ENV`].
fn kill_point(step: &str) {
    debug_assert!(STEPS.contains(&step));
    if std::env::var(KILL_AT_ENV).is_ok_and(|s| s == step) {
        // What is written so far must be what a crash leaves: nothing buffered in this
        // process (every object written is durable or abandoned), so SIGKILL at once.
        let _ = std::io::stderr().flush();
        kill_self();
    }
}

#[allow(unsafe_code)]
fn kill_self() {
    // SAFETY: kill(2) with our own pid and a valid signal number has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// The text `prune` prints for one VM.
pub fn table(p: &Pruned) -> String {
    let mut out = format!(
        "VM {}: {} kept, {} deleted, {} made full by merging; {} bytes deleted, {} bytes written{}\n",
        p.vm,
        p.kept.len(),
        p.deleted.len(),
        p.merged.len(),
        p.bytes_deleted,
        p.bytes_written,
        if p.dry_run {
            " (dry run: nothing was changed; merged streams not counted)"
        } else {
            ""
        }
    );
    for k in &p.kept {
        let merged = if p.merged.contains(&k.id) {
            ", merged into a full"
        } else {
            ""
        };
        out.push_str(&format!(
            "  keep    {:<36}  {:<20}  ({}{merged})\n",
            k.id, k.time, k.reason
        ));
    }
    for d in &p.deleted {
        out.push_str(&format!("  delete  {d}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbtstream_proto::stream::{checksum, Codec, Encoder, Header};

    fn point(id: &str, base: Option<&str>, disks: &[(&str, Option<&str>)]) -> StoredPoint {
        StoredPoint {
            info: PointInfo {
                id: id.into(),
                vm: "vm".into(),
                name: "a vm".into(),
                time: "2026-11-30T00:00:00Z".into(),
                base: base.map(Into::into),
                disks: disks
                    .iter()
                    .enumerate()
                    .map(|(slot, (disk, base))| PointDisk {
                        id: (*disk).into(),
                        slot: slot.to_string(),
                        size: 4096,
                        stream: format!("disk{slot}.cbts"),
                        sha256: String::new(),
                        base: base.map(Into::into),
                    })
                    .collect(),
                skipped: vec![],
            },
            files: vec![],
        }
    }

    /// p1 holds disk a; p2 adds disk b (a full stream) to a's incremental; p3 has two
    /// incrementals.
    fn points() -> Points {
        Points {
            points: vec![
                point("p1", None, &[("a", None)]),
                point("p2", Some("p1"), &[("a", Some("p1")), ("b", None)]),
                point("p3", Some("p2"), &[("a", Some("p2")), ("b", Some("p2"))]),
            ],
            incomplete: vec![],
        }
    }

    fn rewrites(keep: [bool; 3]) -> (Vec<String>, Vec<String>) {
        let decisions: Vec<Option<Keep>> = keep.iter().map(|&k| k.then_some(Keep::Last)).collect();
        let plan = plan("vm", &points(), &decisions).unwrap();
        (plan.rewrite, plan.delete)
    }

    #[test]
    fn only_kept_points_whose_chain_loses_a_point_are_made_full() {
        assert_eq!(rewrites([true, true, true]), (vec![], vec![]));
        assert_eq!(
            rewrites([false, true, true]),
            (vec!["p2".into()], vec!["p1".into()])
        );
        // p3 needs p2 and p1; once p2 is full, p3 needs nothing that goes.
        assert_eq!(
            rewrites([false, false, true]),
            (vec!["p3".into()], vec!["p1".into(), "p2".into()])
        );
        assert_eq!(
            rewrites([true, false, true]),
            (vec!["p3".into()], vec!["p2".into()])
        );
        assert_eq!(rewrites([true, true, false]), (vec![], vec!["p3".into()]));
    }

    #[test]
    fn a_broken_chain_is_refused_before_anything_happens() {
        let mut found = points();
        found.points.remove(0);
        let e = plan("vm", &found, &[None, Some(Keep::Newest)])
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), Code::Integrity);
        assert!(e.to_string().contains("p1"), "{e}");
    }

    #[test]
    fn points_are_deleted_before_the_points_they_need() {
        let found = points();
        let all = ["p1".to_string(), "p2".into(), "p3".into()];
        assert_eq!(deletion_order(&found, &all), ["p3", "p2", "p1"]);
        assert_eq!(deletion_order(&found, &all[..2]), ["p2", "p1"]);
    }

    #[test]
    fn new_stream_names_avoid_every_file_of_the_point() {
        let dir = "vms/vm/points/p";
        let mut taken = BTreeSet::new();
        assert_eq!(
            new_stream_name("0", dir, &taken).unwrap(),
            "disk0.full.cbts"
        );
        taken.insert(format!("{dir}/disk0.full.cbts"));
        assert_eq!(
            new_stream_name("0", dir, &taken).unwrap(),
            "disk0.full1.cbts"
        );
        assert_eq!(new_stream_name("../x", dir, &taken), None);
    }

    fn full_stream(data: &[u8]) -> Vec<u8> {
        let h = Header {
            virtual_size: data.len() as u64,
            block_size: 4096,
            source_id: "a".into(),
            point_id: "snap".into(),
            incremental: false,
            base_id: None,
            created_unix_secs: 1_700_000_000,
            codec: Codec::None,
        };
        let (mut enc, mut out) = Encoder::new(&h).unwrap();
        let hdr = enc
            .data(0, data.len() as u64, Codec::None, checksum(data), data)
            .unwrap();
        out.extend_from_slice(&hdr);
        out.extend_from_slice(data);
        out.extend_from_slice(&enc.finish());
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stored_stream_that_does_not_read_back_whole_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(dir.path().to_path_buf());
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let stream = full_stream(&data);
        let stored = Stored {
            sha256: upload::hex(ring::digest::digest(&ring::digest::SHA256, &stream).as_ref()),
            bytes: stream.len() as u64,
        };
        store.put("p/s.cbts", stream.clone()).await.unwrap();
        verify_stored(&store, "p/s.cbts", &stored, 4096)
            .await
            .unwrap();
        // Another disk size, another digest: refused.
        let e = verify_stored(&store, "p/s.cbts", &stored, 8192)
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), Code::Integrity, "{e}");
        let other = Stored {
            sha256: "0".repeat(64),
            ..stored.clone()
        };
        let e = verify_stored(&store, "p/s.cbts", &other, 4096)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("SHA-256"), "{e}");
        // A flipped byte in the record: its checksum fails.
        let mut bad = stream;
        let at = bad.len() - 2000;
        bad[at] ^= 1;
        store.put("p/s.cbts", bad).await.unwrap();
        let e = verify_stored(&store, "p/s.cbts", &stored, 4096)
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), Code::Integrity, "{e}");
        assert!(e.to_string().contains("p/s.cbts"), "{e}");
    }
}
