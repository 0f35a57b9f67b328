//! Committing a point: the one step that moves a chain's base, taken only once the point's
//! stream is durable. `export --xapi` commits by itself when it wrote a file (or its
//! `--to-command` succeeded); `cbtstream commit` finishes a point whose stream went to a pipe.
//!
//! ```text
//! state file: base = the new snapshot (atomic) → VDI.data_destroy(snapshot), retried on
//! VDI_IN_USE → state file: base is cbt_metadata → destroy the bases no longer kept
//! ```

use super::{
    destroy_if_ours, load_state, lock_chain, login, retry_in_use, save_state, src, XapiLogin,
    TAG_SNAPSHOT,
};
use crate::chain::{ChainState, PendingPoint, STATE_VERSION};
use crate::exit::{fail, Code, Failure};
use crate::xapi::{Ref, XapiSession};
use std::path::{Path, PathBuf};

/// A point ready to commit.
pub(super) struct Point<'a> {
    pub vdi: &'a str,
    pub snapshot: &'a Ref,
    pub info: PendingPoint,
    /// The committed base this point follows (the state's, or `--base`), if any.
    pub previous: Option<String>,
}

/// Make `point` the chain's base: the state file first (so a crash after it leaves a state
/// naming a snapshot that exists), then `data_destroy`, then the bases no longer kept.
/// `recorded` runs once the state names the new snapshot (at once without a state file): from
/// then on the snapshot is the chain's, not a leftover to destroy.
pub(super) async fn commit_point(
    session: &XapiSession,
    state_path: Option<&Path>,
    prev: Option<ChainState>,
    point: Point<'_>,
    recorded: impl FnOnce(),
) -> Result<(), Failure> {
    let (mut older, abandoned) = prev
        .map(|s| (s.older_bases, s.abandoned))
        .unwrap_or_default();
    older.extend(point.previous.clone());
    // A point that starts a new chain (a full stream) leaves no use for the old bases.
    let keep_older = match point.info.stream_base {
        None => 0,
        Some(_) => (point.info.keep_bases as usize).saturating_sub(1),
    };
    let drop_count = older.len().saturating_sub(keep_older);
    let to_destroy: Vec<String> = older.drain(..drop_count).collect();
    let mut state = ChainState {
        version: STATE_VERSION,
        vdi: point.vdi.to_string(),
        // The master actually used (after a HOST_IS_SLAVE redirect), without credentials.
        host: session.endpoint().url(),
        base: Some(point.info.snapshot.clone()),
        base_is_metadata: false,
        point_id: Some(point.info.snapshot.clone()),
        virtual_size: point.info.virtual_size,
        updated_unix_secs: crate::export::created_now(),
        older_bases: older,
        pending: None,
        abandoned,
    };
    if let Some(p) = state_path {
        save_state(p, &state)?;
    }
    recorded();

    // The snapshot's data goes; its CBT metadata stays as the next base.
    match retry_in_use(|| session.vdi_data_destroy(point.snapshot)).await {
        Ok(()) => {
            state.base_is_metadata = true;
            if let Some(p) = state_path {
                save_state(p, &state)?;
            }
        }
        Err(e) => tracing::warn!(
            "VDI.data_destroy failed ({e}): the full snapshot {} stays on the host as the base; the next export still works",
            point.info.snapshot
        ),
    }
    for uuid in to_destroy {
        destroy_if_ours(session, point.vdi, &uuid, "previous base").await;
    }
    Ok(())
}

/// `cbtstream commit`: what the CLI gathered.
#[derive(Debug, Clone)]
pub struct CommitOptions {
    /// The pool master; `None` means the one the state file recorded.
    pub url: Option<String>,
    /// Commit only if this is the pending point (the id the export printed).
    pub point: Option<String>,
    pub login: XapiLogin,
    pub state: PathBuf,
}

/// `cbtstream commit --state FILE`: the reader of a piped stream has stored it; commit the
/// pending point. Returns the committed point's id.
pub async fn run(opts: CommitOptions) -> Result<String, Failure> {
    let _lock = lock_chain(&opts.state)?;
    let Some(state) = load_state(&opts.state)? else {
        return Err(fail(
            Code::Usage,
            format!(
                "no chain state at {}: nothing to commit",
                opts.state.display()
            ),
        ));
    };
    let Some(pending) = state.pending.clone() else {
        return Err(fail(
            Code::Usage,
            format!(
                "the chain state {} has no pending point: nothing to commit",
                opts.state.display()
            ),
        ));
    };
    if let Some(point) = opts.point.as_deref().filter(|p| *p != pending.snapshot) {
        return Err(fail(
            Code::Usage,
            format!(
                "the pending point is {}, not {point}: that export was superseded by a later \
                 one, which may not have been stored; nothing committed",
                pending.snapshot
            ),
        ));
    }
    let mut login_to = opts.login.clone();
    login_to.url = opts.url.clone().unwrap_or_else(|| state.host.clone());
    let session = login(&login_to).await?;
    let result = async {
        // The VDI first: a host that does not know it is the wrong host, not a vanished point.
        session.vdi_get_by_uuid(&state.vdi).await.map_err(src)?;
        let snap = match session.vdi_get_by_uuid(&pending.snapshot).await {
            Ok(r) => r,
            Err(e) if e.is("UUID_INVALID") => {
                return Err(fail(
                    Code::Source,
                    format!(
                        "the pending point's snapshot {} no longer exists; it cannot be \
                         committed (the next export starts from the committed base)",
                        pending.snapshot
                    ),
                ));
            }
            Err(e) => return Err(src(e)),
        };
        let rec = session.vdi_get_record(&snap).await.map_err(src)?;
        if rec.other_config.get(TAG_SNAPSHOT) != Some(&state.vdi) {
            return Err(fail(
                Code::Source,
                format!(
                    "snapshot {} is not a cbtstream snapshot of VDI {}; refusing to commit it",
                    pending.snapshot, state.vdi
                ),
            ));
        }
        let vdi = state.vdi.clone();
        let point = Point {
            vdi: &vdi,
            snapshot: &snap,
            info: pending.clone(),
            previous: state.base.clone(),
        };
        commit_point(&session, Some(&opts.state), Some(state), point, || {}).await
    }
    .await;
    session.logout().await;
    result.map(|()| pending.snapshot)
}
