//! `cbtstream export --xapi URL --vdi UUID`: one point of a VDI's chain (see the module
//! documentation of [`crate::xen`] for the order of the steps and why).

use super::allocation;
use super::commit::{commit_point, Point};
use super::nbd::{keepalive, NbdParams, XenNbd};
use super::point::{PointDisk, PointInfo};
use super::{
    destroy_if_ours, destroy_snapshot, load_state, lock_chain, lock_repo_vm, login, save_state,
    src, XapiLogin, TAG_SNAPSHOT,
};
use crate::chain::{ChainState, PendingPoint};
use crate::engine::sink::Output;
use crate::engine::ExportSummary;
use crate::exit::{fail, Code, Failure, WithCode};
use crate::export::{
    created_now, send_stream, shutdown_signal, DataPlaneOptions, Destination, StreamIds, What,
};
use crate::repo::point_writer::{PointTarget, PointWriter};
use crate::repo::Repo;
use crate::xapi::{Ref, XapiError, XapiSession};
use cbtstream_proto::cbt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `export --xapi`, as the CLI gathered it.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub login: XapiLogin,
    pub vdi: String,
    pub state: Option<PathBuf>,
    /// Start from this snapshot instead of the state's base.
    pub base: Option<String>,
    pub full: bool,
    pub enable_cbt: bool,
    pub fallback_full: bool,
    pub keep_bases: u32,
    pub destination: ExportTarget,
    /// Commit once a pipe took the last byte (trusting its reader).
    pub commit_on_eof: bool,
    /// How often to use the XenAPI session during the export.
    pub keepalive: Duration,
    pub dp: DataPlaneOptions,
}

/// Where `export --xapi` writes its point.
#[derive(Debug, Clone)]
pub enum ExportTarget {
    /// A file, stdout, or a command (`-o`, `--to-command`).
    Stream(Destination),
    /// A repository (`--repo`): the point is stored under the VDI, as a one-disk point.
    Repo { repo: Repo, break_lock: bool },
}

/// What one export did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub summary: ExportSummary,
    /// The new point (the snapshot's uuid).
    pub point: String,
    /// The point it applies onto; None for a full stream.
    pub base: Option<String>,
    /// False when the point awaits `cbtstream commit`.
    pub committed: bool,
}

/// When the new point may be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitWhen {
    /// The output is durable when the data plane returns (an fsynced file; or a pipe with
    /// `--commit-on-eof`).
    Written,
    /// When `--to-command` exits 0.
    CommandSucceeded,
    /// Never in this run: `cbtstream commit` does it once the pipe's reader stored the stream.
    Later,
}

fn commit_when(opts: &ExportOptions) -> Result<CommitWhen, Failure> {
    let path = match &opts.destination {
        ExportTarget::Stream(Destination::Command(_)) => return Ok(CommitWhen::CommandSucceeded),
        ExportTarget::Stream(Destination::Upload(_)) | ExportTarget::Repo { .. } => {
            return Ok(CommitWhen::Written)
        }
        ExportTarget::Stream(Destination::Output(path)) => path,
    };
    if matches!(Output::from_arg(path), Output::File(_)) || opts.commit_on_eof {
        Ok(CommitWhen::Written)
    } else if opts.state.is_some() {
        Ok(CommitWhen::Later)
    } else {
        Err(fail(
            Code::Usage,
            "a stream to a pipe is durable only once its reader stored it: give --state FILE \
             (then `cbtstream commit --state FILE` once it is stored), --to-command CMD, or \
             --commit-on-eof to trust the reader",
        ))
    }
}

pub async fn run(opts: ExportOptions) -> Result<ExportReport, Failure> {
    let started = std::time::Instant::now();
    let when = commit_when(&opts)?;
    let _lock = match &opts.state {
        Some(p) => Some(lock_chain(p)?),
        None => None,
    };
    let repo_lock = match &opts.destination {
        ExportTarget::Repo { repo, break_lock } => {
            Some(lock_repo_vm(repo, &opts.vdi, "export", *break_lock).await?)
        }
        ExportTarget::Stream(_) => None,
    };
    // The state before anything happens on the host: a damaged state file, or one of
    // another VDI, is the caller's to fix.
    let mut state = match &opts.state {
        Some(p) => load_state(p)?,
        None => None,
    };
    if let (Some(p), Some(s)) = (&opts.state, &mut state) {
        if s.vdi != opts.vdi {
            return Err(fail(
                Code::Usage,
                format!("the state file is for VDI {}, not {}", s.vdi, opts.vdi),
            ));
        }
        abandon_pending_point(p, s)?;
    }
    let session = Arc::new(login(&opts.login).await?);
    // The snapshot taken but not yet recorded: whatever happens, it is removed.
    let uncommitted: Arc<Mutex<Option<Ref>>> = Arc::default();
    let exported = tokio::select! {
        r = export(&session, &opts, &mut state, uncommitted.clone()) => r,
        sig = shutdown_signal() => Err(fail(Code::Interrupted, format!("interrupted by {sig}; nothing was committed"))),
    };
    // The output is durable: the commit runs to its end, whatever signal comes now.
    let result = match exported {
        Ok(done) => finish(&session, &opts, when, state, done, &uncommitted).await,
        Err(e) => Err(e),
    };
    let leftover = uncommitted.lock().ok().and_then(|mut g| g.take());
    if let Some(snap) = leftover {
        destroy_snapshot(&session, &snap).await;
    }
    session.logout().await;
    if let Some(lock) = repo_lock {
        lock.release().await;
    }
    // The summary's time is the whole run's: login, snapshot, transfer and commit.
    result.map(|mut report| {
        report.summary.seconds = started.elapsed().as_secs_f64();
        report
    })
}

/// A point exported earlier whose stream was never confirmed stored: it may exist nowhere,
/// so nothing may build on it, and once a later run has started nothing may commit it (a
/// `commit` chained after a failed export would otherwise commit the older point). It is
/// set aside before anything else, its snapshot destroyed once logged in, and this export
/// starts from the committed base (the CBT log of a destroyed snapshot is merged into the
/// next one, so no change is lost).
fn abandon_pending_point(path: &std::path::Path, state: &mut ChainState) -> Result<(), Failure> {
    let Some(pending) = state.pending.take() else {
        return Ok(());
    };
    tracing::warn!(
        "the point {} exported earlier was never committed (its stream may not have been stored); \
         removing its snapshot and exporting from the committed base{}",
        pending.snapshot,
        state
            .base
            .as_ref()
            .map(|b| format!(" {b}"))
            .unwrap_or_default()
    );
    state.abandoned.push(pending.snapshot);
    save_state(path, state)
}

/// Destroy the snapshots of abandoned points; those that cannot be destroyed now stay listed.
async fn destroy_abandoned(
    session: &XapiSession,
    path: &std::path::Path,
    state: &mut ChainState,
) -> Result<(), Failure> {
    if state.abandoned.is_empty() {
        return Ok(());
    }
    let mut left = Vec::new();
    for uuid in std::mem::take(&mut state.abandoned) {
        if !destroy_if_ours(session, &state.vdi, &uuid, "uncommitted snapshot").await {
            left.push(uuid);
        }
    }
    state.abandoned = left;
    save_state(path, state)
}

/// What an export leaves for its commit: the stream is complete and durable.
struct Exported {
    summary: ExportSummary,
    snapshot: Ref,
    point: PendingPoint,
    /// The committed base this export followed (the state's, or `--base`).
    previous: Option<String>,
}

/// Commit the exported point, or record it as pending.
async fn finish(
    session: &XapiSession,
    opts: &ExportOptions,
    when: CommitWhen,
    state: Option<ChainState>,
    done: Exported,
    uncommitted: &Mutex<Option<Ref>>,
) -> Result<ExportReport, Failure> {
    let recorded = || {
        if let Ok(mut g) = uncommitted.lock() {
            *g = None;
        }
    };
    let report = ExportReport {
        summary: done.summary,
        point: done.point.snapshot.clone(),
        base: done.point.stream_base.clone(),
        committed: when != CommitWhen::Later,
    };
    // (commit_when gives Later only with a state file.)
    if let Some(path) = opts.state.as_ref().filter(|_| when == CommitWhen::Later) {
        // The stream is complete on the pipe; whether it is stored is the reader's to say.
        let mut s = state.unwrap_or_else(|| ChainState::new(&opts.vdi, String::new()));
        s.host = session.endpoint().url();
        s.pending = Some(done.point);
        save_state(path, &s)?;
        recorded();
        eprintln!(
            "cbtstream: point {} exported; it becomes the chain's base once you run \
             `cbtstream commit --state {}` after the stream is stored",
            report.point,
            path.display()
        );
        return Ok(report);
    }
    let point = Point {
        vdi: &opts.vdi,
        snapshot: &done.snapshot,
        info: done.point,
        previous: done.previous,
    };
    commit_point(session, opts.state.as_deref(), state, point, recorded).await?;
    Ok(report)
}

/// The stream's name in a one-disk point of `export --repo`.
const REPO_STREAM: &str = "disk0.cbts";

/// Checks the stored stream and writes point.json: the point exists from then on.
async fn store_point(
    mut w: PointWriter,
    info: impl FnOnce(String) -> PointInfo,
) -> Result<(), Failure> {
    let sha256 = match w.sha256(REPO_STREAM).await {
        Ok(s) => s,
        Err(e) => {
            w.discard().await;
            return Err(fail(Code::Output, e));
        }
    };
    w.finish(&info(sha256)).await.code(Code::Output)?;
    Ok(())
}

pub(super) fn is_chain_broken(e: &XapiError) -> bool {
    e.is("SR_BACKEND_FAILURE_460") || e.is("SR_BACKEND_FAILURE_459") || e.is("VDI_NO_CBT_METADATA")
}

/// The chain cannot continue: a full export with --fallback-full, else a clear error.
fn chain_broken(opts: &ExportOptions, why: String) -> Result<(), Failure> {
    if opts.fallback_full {
        tracing::warn!("{why}; --fallback-full: starting a new chain with a full export");
        Ok(())
    } else {
        Err(fail(
            Code::Source,
            format!("{why}; start a new chain with --full, or pass --fallback-full"),
        ))
    }
}

/// Everything up to a complete and durable stream: snapshot, changed blocks, the data plane.
async fn export(
    session: &Arc<XapiSession>,
    opts: &ExportOptions,
    state: &mut Option<ChainState>,
    uncommitted: Arc<Mutex<Option<Ref>>>,
) -> Result<Exported, Failure> {
    let vdi_uuid = opts.vdi.clone();
    let vdi = session.vdi_get_by_uuid(&vdi_uuid).await.map_err(src)?;
    let rec = session.vdi_get_record(&vdi).await.map_err(src)?;
    if rec.is_a_snapshot {
        return Err(fail(
            Code::Usage,
            format!("VDI {vdi_uuid} is a snapshot; give the VDI itself"),
        ));
    }
    if let (Some(p), Some(s)) = (&opts.state, state.as_mut()) {
        destroy_abandoned(session, p, s).await?;
    }
    let mut full = opts.full;
    if !rec.cbt_enabled {
        if !opts.enable_cbt {
            return Err(fail(
                Code::Source,
                format!("changed block tracking is off for VDI {vdi_uuid}; pass --enable-cbt to turn it on (that export is a full one)"),
            ));
        }
        tracing::warn!(
            "turning changed block tracking on for VDI {vdi_uuid}; this export is a full one"
        );
        session.vdi_enable_cbt(&vdi).await.map_err(src)?;
        full = true;
    }

    // The committed base this run follows, and whether the chain can go on from it.
    let previous = match (&opts.base, &*state) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(s)) => s.base.clone(),
        (None, None) => None,
    };
    if previous.is_none() && !full {
        tracing::info!("no chain state yet: this is the first, full export");
    }
    let mut base: Option<(String, Ref)> = None;
    if let Some(uuid) = previous.as_ref().filter(|_| !full) {
        match session.vdi_get_by_uuid(uuid).await {
            Ok(r) => base = Some((uuid.clone(), r)),
            Err(e) if e.is("UUID_INVALID") || e.is("HANDLE_INVALID") => {
                chain_broken(opts, format!("the base snapshot {uuid} no longer exists"))?
            }
            Err(e) => return Err(src(e)),
        }
    }

    // The snapshot. From here until the commit, any failure removes it. Tagging is a second
    // call: a run killed between the two leaves an untagged snapshot, which `gc` lists.
    let snap = session
        .vdi_snapshot(&vdi, BTreeMap::new())
        .await
        .map_err(src)?;
    if let Ok(mut g) = uncommitted.lock() {
        *g = Some(snap.clone());
    }
    session
        .vdi_add_to_other_config(&snap, TAG_SNAPSHOT, &vdi_uuid)
        .await
        .map_err(src)?;
    let snap_rec = session.vdi_get_record(&snap).await.map_err(src)?;

    // The changed blocks, before any NBD connection to the snapshot.
    let mut bitmap = None;
    if let Some((uuid, vref)) = &base {
        match session.vdi_list_changed_blocks(vref, &snap).await {
            Ok(b64) => {
                // The host's answer: a bitmap that does not fit the snapshot is the source's
                // fault (3), not a usage error as a bad --changed-blocks file would be.
                let bm = cbt::decode_base64(b64.as_bytes()).code(Code::Source)?;
                drop(b64);
                cbt::validate(&bm, snap_rec.virtual_size).code(Code::Source)?;
                bitmap = Some(bm);
            }
            Err(e) if is_chain_broken(&e) => {
                chain_broken(opts, format!("the chain from base {uuid} is broken ({e})"))?;
                base = None;
            }
            Err(e) => return Err(src(e)),
        }
    }

    // A full export reads only what the snapshot's VHD allocates (also before any NBD
    // connection: the VHD export attaches the snapshot too).
    let what = match bitmap {
        Some(bm) => What::Changed(bm),
        None => allocation::full_export_reads(session, &snap_rec.uuid, snap_rec.virtual_size).await,
    };

    let params = NbdParams {
        connect_timeout: opts.dp.connect_timeout.max(Duration::from_secs(1)),
        extended_headers: opts.dp.extended_headers,
    };
    let stream_base = base.as_ref().map(|(u, _)| u.clone());
    let ids = StreamIds {
        source_id: vdi_uuid.clone(),
        point_id: snap_rec.uuid.clone(),
        base_id: stream_base.clone(),
    };
    let mut point_writer = match &opts.destination {
        ExportTarget::Repo { repo, .. } => Some(
            PointWriter::create(&PointTarget::Repo(repo.clone()), &vdi_uuid, &snap_rec.uuid)
                .await
                .code(Code::Output)?,
        ),
        ExportTarget::Stream(_) => None,
    };
    let destination = match (&opts.destination, &mut point_writer) {
        (ExportTarget::Stream(d), _) => d.clone(),
        (ExportTarget::Repo { .. }, Some(w)) => {
            let expected = snap_rec.virtual_size + snap_rec.virtual_size / 64 + (1 << 20);
            w.stream(REPO_STREAM, expected).await.code(Code::Output)?
        }
        (ExportTarget::Repo { .. }, None) => unreachable!("the writer was made above"),
    };
    let transfer = async {
        let (nbd, first) = XenNbd::open(session.clone(), snap.clone(), params).await?;
        let progress = Arc::new(crate::progress::Bar::stderr());
        send_stream(first, nbd, what, ids, &opts.dp, &destination, progress).await
    };
    // Every NBD connection is closed when this returns.
    let summary = keepalive(session, &snap, opts.keepalive, transfer).await;
    let summary = match (summary, point_writer) {
        (Ok(s), Some(w)) => {
            let info = |sha256| PointInfo {
                id: snap_rec.uuid.clone(),
                vm: vdi_uuid.clone(),
                name: rec.name_label.clone(),
                time: crate::restore::report::rfc3339(created_now()),
                base: stream_base.clone(),
                disks: vec![PointDisk {
                    id: vdi_uuid.clone(),
                    slot: "0".into(),
                    size: snap_rec.virtual_size,
                    stream: REPO_STREAM.into(),
                    sha256,
                    base: stream_base.clone(),
                }],
                skipped: vec![],
            };
            store_point(w, info).await?;
            s
        }
        (Ok(s), None) => s,
        (Err(e), Some(w)) => {
            w.discard().await;
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };

    let point = PendingPoint {
        snapshot: snap_rec.uuid.clone(),
        stream_base,
        virtual_size: snap_rec.virtual_size,
        created_unix_secs: created_now(),
        keep_bases: opts.keep_bases,
    };
    Ok(Exported {
        summary,
        snapshot: snap,
        point,
        previous,
    })
}
