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
//! What a killed run leaves is removed under the lock by the next run: objects of point
//! directories without point.json and S3 uploads never completed by any run (backup or
//! prune, [`super::clean_leftovers`]); streams no point.json names by the next prune.

mod full;
#[cfg(test)]
mod tests;

use super::retention::{self, Dated, Keep, Policy};
use super::store::{valid_name, ObjectInfo};
use super::{point_dir, points_dir, Points, Repo, RepoError, StoredPoint};
use crate::exit::Code;
use crate::merge::MergeError;
use crate::restore::RestoreError;
use crate::xen::point::POINT_FILE;
use std::collections::BTreeSet;
use std::io::Write;

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
    #[error("VM {vm} in the repository: {reason}; no point was deleted")]
    Chain { vm: String, reason: String },
    #[error("merging disk {disk} of point {point}: {source}; no point was deleted")]
    Merge {
        point: String,
        disk: String,
        source: MergeError,
    },
    #[error("the merged stream {what} failed verification: {reason}; no point was deleted")]
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
    let pinned = pinned_points(repo, vm).await?;
    let pinned: Vec<&str> = pinned.iter().map(String::as_str).collect();
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
        let (info, streams, replaced) = full::make_full(repo, vm, &view, id).await?;
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

/// The points the chain states name: the next backup builds on them, so they stay even
/// when a newer point exists (a run killed between its point.json and its state).
/// `state.json` is a VM's (`backup --repo`); `chain.json` a disk's (`export --repo`, the
/// `--state` format of export, whose `point_id` is its last point's id).
async fn pinned_points(repo: &Repo, vm: &str) -> Result<Vec<String>, PruneError> {
    let mut pinned = Vec::new();
    // A XenServer VM's state or a vSphere one's: both name their last point `point`.
    if let Some((text, name)) = super::state::load_text(repo, vm).await? {
        let point = if crate::chain::is_vsphere(&text) {
            crate::chain::parse_vsphere(&text, &name)?.point
        } else {
            crate::chain::parse_vm(&text, &name)?.point
        };
        pinned.extend(point);
    }
    let key = format!("{}/chain.json", super::vm_dir(vm));
    if let Some(text) = repo.store.get(&key, crate::chain::MAX_STATE_BYTES).await? {
        let damaged = |why: String| {
            PruneError::State(crate::chain::ChainError::Damaged {
                path: repo.store.describe(&key).into(),
                why,
            })
        };
        let state: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| damaged(e.to_string()))?;
        match &state["point_id"] {
            serde_json::Value::String(id) => pinned.push(id.clone()),
            serde_json::Value::Null => {}
            _ => return Err(damaged("its point_id is not a string".into())),
        }
    }
    Ok(pinned)
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
    // Stream names are keys prune reads and deletes: a point.json naming anything but a
    // file of its own directory is not one cbtstream wrote.
    for p in &found.points {
        if let Some(d) = p.info.disks.iter().find(|d| !valid_name(&d.stream)) {
            return Err(chain_err(format!(
                "point {} names the stream {:?}, which is not a file name",
                p.info.id, d.stream
            )));
        }
    }
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
