//! `cbtstream gc`: find the snapshots that killed runs left behind.
//!
//! With `--state`, the chain's lock is taken (so gc never runs beside an export of the same
//! chain) and every snapshot the chain still needs (its base, the older bases kept, a
//! pending point) is kept; the other snapshots cbtstream tagged are removed. Without
//! `--state` nothing says which tagged snapshot is a base or belongs to an export still
//! running, so gc only lists them unless `--force`.
//!
//! A run killed between `VDI.snapshot` and tagging its snapshot leaves an untagged
//! snapshot: gc lists the VDI's untagged snapshots (not `cbt_metadata`) as "possibly ours",
//! with their time, and never removes them. (Only those taken after the chain's base would
//! miss one left before the next successful export moved the base past it.)

use super::{load_state, lock_chain, login, retry_in_use, src, XapiLogin, TAG_SNAPSHOT};
use crate::exit::{Code, Failure};
use crate::xapi::XapiSession;
use std::path::PathBuf;

/// `cbtstream gc`, as the CLI gathered it.
#[derive(Debug, Clone)]
pub struct GcOptions {
    pub login: XapiLogin,
    pub vdi: String,
    pub state: Option<PathBuf>,
    /// List what would be removed, remove nothing.
    pub dry_run: bool,
    /// Without a state file: remove every tagged snapshot that is not `cbt_metadata`.
    pub force: bool,
}

/// What gc found, one line each (printed on stdout by the CLI).
#[derive(Debug, Default)]
pub struct GcReport {
    pub lines: Vec<String>,
    pub removed: usize,
}

pub async fn run(opts: GcOptions) -> Result<GcReport, Failure> {
    let _lock = match &opts.state {
        Some(p) => Some(lock_chain(p)?),
        None => None,
    };
    let state = match &opts.state {
        Some(p) => Some(load_state(p)?.ok_or_else(|| {
            // Nothing would be marked as needed, and every base would go.
            crate::exit::fail(Code::Usage, format!("no chain state at {}", p.display()))
        })?),
        None => None,
    };
    if let Some(s) = &state {
        if s.vdi != opts.vdi {
            return Err(crate::exit::fail(
                Code::Usage,
                format!("the state file is for VDI {}, not {}", s.vdi, opts.vdi),
            ));
        }
    }
    let session = login(&opts.login).await?;
    let result = collect(&session, &opts, state.as_ref()).await;
    session.logout().await;
    result
}

async fn collect(
    session: &XapiSession,
    opts: &GcOptions,
    state: Option<&crate::chain::ChainState>,
) -> Result<GcReport, Failure> {
    let vdi = session.vdi_get_by_uuid(&opts.vdi).await.map_err(src)?;
    let needed = state.map(|s| s.needed()).unwrap_or_default();
    let pending = state.and_then(|s| s.pending.as_ref().map(|p| p.snapshot.clone()));
    let act = !opts.dry_run && (opts.state.is_some() || opts.force);
    let mut report = GcReport::default();
    for snap in &session.vdi_get_snapshots(&vdi).await.map_err(src)? {
        let s = session.vdi_get_record(snap).await.map_err(src)?;
        let ours = s.other_config.get(TAG_SNAPSHOT) == Some(&opts.vdi);
        if needed.contains(&s.uuid) {
            if pending.as_deref() == Some(s.uuid.as_str()) {
                report.lines.push(format!(
                    "kept snapshot {}: the pending point, awaiting `cbtstream commit`",
                    s.uuid
                ));
            }
            continue;
        }
        if !ours {
            if s.vdi_type != "cbt_metadata" {
                report.lines.push(format!(
                    "possibly ours: untagged snapshot {} taken {} (a run killed between \
                     VDI.snapshot and tagging it leaves one); not removed: check it and remove \
                     it with `xe vdi-destroy uuid={}`",
                    s.uuid,
                    s.snapshot_time.as_deref().unwrap_or("at an unknown time"),
                    s.uuid
                ));
            }
            continue;
        }
        // Without a state file a cbt_metadata snapshot may be some chain's base.
        if opts.state.is_none() && s.vdi_type == "cbt_metadata" {
            report.lines.push(format!(
                "kept snapshot {} (cbt_metadata): possibly a chain's base; give --state to decide",
                s.uuid
            ));
            continue;
        }
        if !act {
            let why = if opts.dry_run {
                ""
            } else {
                " (without --state it may be a base kept after data_destroy failed, or belong to \
                 an export still running: give --state, or --force)"
            };
            report.lines.push(format!(
                "would remove snapshot {} ({}){why}",
                s.uuid, s.vdi_type
            ));
            continue;
        }
        retry_in_use(|| session.vdi_destroy(snap))
            .await
            .map_err(src)?;
        report
            .lines
            .push(format!("removed snapshot {} ({})", s.uuid, s.vdi_type));
        report.removed += 1;
    }
    tracing::info!(removed = report.removed, "gc done");
    Ok(report)
}
