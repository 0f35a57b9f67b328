//! The XenServer / XCP-ng flows: `export --xapi`, `commit`, `gc` and `restore --xapi`.
//!
//! ```text
//! lock the chain → login → check the VDI → VDI.snapshot → tag it → list_changed_blocks(base, snapshot)
//!       → get_nbd_info(snapshot) → data plane → output complete and durable
//!       → commit: state file (atomic) → data_destroy(snapshot), retried on VDI_IN_USE
//!                 → destroy the bases no longer kept → logout
//! ```
//!
//! The invariant: the base advances only after the new export is complete and durable. A
//! file is durable once fsynced and renamed; a pipe only once its reader says so, so a stream
//! sent to stdout leaves a *pending* point that `cbtstream commit` finishes (or `--to-command`
//! commits when its command exits 0, or `--commit-on-eof` trusts the reader). On any failure
//! or signal before the commit, the new snapshot is destroyed and the state file and the old
//! base stay as they were. `list_changed_blocks` runs before any NBD connection: an open
//! connection plugs the snapshot into dom0 and the call would fail with VDI_IN_USE.

mod allocation;
pub mod commit;
pub mod export;
pub mod gc;
mod nbd;
pub mod point;
pub mod restore;
pub mod restore_vm;
mod rollback;
pub mod vm;

use crate::exit::{fail, Code, Failure};
use crate::lock::{ChainLock, LockError};
use crate::tls::Trust;
use crate::xapi::{retry_on, Backoff, Ref, Secret, XapiError, XapiSession};
use std::path::Path;
use std::time::Duration;

/// other_config key on every snapshot cbtstream takes; its value is the VDI's uuid. `gc`
/// only ever removes snapshots that carry it.
pub const TAG_SNAPSHOT: &str = "cbtstream_snapshot_of";

/// How to reach and log in to the pool master, as the CLI gathered it.
#[derive(Debug, Clone)]
pub struct XapiLogin {
    pub url: String,
    pub user: String,
    pub password: Secret,
    pub trust: Trust,
    pub allow_plaintext: bool,
}

/// The XenAPI password, from a file or $XAPI_PASSWORD: never from argv.
pub fn read_password(file: Option<&Path>) -> Result<Secret, Failure> {
    crate::xapi::read_password(file, "XAPI_PASSWORD", "XenAPI")
}

fn src(e: XapiError) -> Failure {
    Failure {
        code: Code::Source,
        error: e.into(),
    }
}

async fn login(l: &XapiLogin) -> Result<XapiSession, Failure> {
    XapiSession::login(&l.url, &l.user, &l.password, &l.trust, l.allow_plaintext)
        .await
        .map_err(|e| Failure {
            code: Code::Source,
            error: anyhow::Error::new(e).context("XenAPI login"),
        })
}

/// The chain's lock, for the whole run (see [`crate::lock`]).
pub(crate) fn lock_chain(state: &Path) -> Result<ChainLock, Failure> {
    ChainLock::acquire(state).map_err(|e| {
        let code = match e {
            LockError::Held { .. } => Code::Locked,
            LockError::Io { .. } => Code::Output,
        };
        Failure {
            code,
            error: e.into(),
        }
    })
}

/// Retry `op` while it fails with VDI_IN_USE (the host keeps the snapshot attached to dom0
/// for a few seconds after the NBD connections close), with backoff, for about a minute.
async fn retry_in_use<F, Fut>(op: F) -> Result<(), XapiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), XapiError>>,
{
    let backoff = Backoff {
        first: Duration::from_millis(200),
        max: Duration::from_secs(5),
    };
    retry_on(&["VDI_IN_USE"], 16, backoff, op).await
}

async fn destroy_snapshot(session: &XapiSession, snap: &Ref) {
    match retry_in_use(|| session.vdi_destroy(snap)).await {
        Ok(()) => tracing::info!("removed the uncommitted snapshot"),
        Err(e) => {
            tracing::warn!("could not remove the uncommitted snapshot ({e}); `cbtstream gc` will")
        }
    }
}

/// Destroy the snapshot `uuid` if it is still there and cbtstream took it of `vdi` (tagged
/// with that VDI's uuid); a snapshot someone else made is left alone. True when the snapshot
/// is gone or not ours (nothing more to do), false when destroying it failed.
async fn destroy_if_ours(session: &XapiSession, vdi: &str, uuid: &str, what: &str) -> bool {
    let r = match session.vdi_get_by_uuid(uuid).await {
        Ok(r) => r,
        Err(e) if e.is("UUID_INVALID") => return true,
        Err(e) => {
            tracing::warn!("could not look up the {what} {uuid}: {e}");
            return false;
        }
    };
    match session.vdi_get_record(&r).await {
        Ok(rec) if rec.other_config.get(TAG_SNAPSHOT).map(String::as_str) == Some(vdi) => {
            match retry_in_use(|| session.vdi_destroy(&r)).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("could not destroy the {what} {uuid}: {e}; `cbtstream gc` will");
                    false
                }
            }
        }
        Ok(_) => {
            tracing::info!("left the {what} {uuid} alone: cbtstream did not take it of VDI {vdi}");
            true
        }
        Err(e) => {
            tracing::warn!("could not read the {what} {uuid}: {e}");
            false
        }
    }
}

/// Map a chain-state error to its exit code: an unreadable or damaged state is the caller's
/// to fix (2); failing to write it is an output failure (5).
fn state_code(e: &crate::chain::ChainError) -> Code {
    match e {
        crate::chain::ChainError::Write { .. } => Code::Output,
        _ => Code::Usage,
    }
}

fn load_state(path: &Path) -> Result<Option<crate::chain::ChainState>, Failure> {
    crate::chain::load(path).map_err(|e| Failure {
        code: state_code(&e),
        error: e.into(),
    })
}

/// The chain state of `backup --vm` for `vm`, or `None` when there is none yet; a state of
/// another VM is refused.
async fn load_vm_state(
    home: &crate::repo::state::StateHome,
    vm: &str,
) -> Result<Option<crate::chain::VmState>, Failure> {
    let state = home.load().await.map_err(|e| Failure {
        code: state_code(&e),
        error: e.into(),
    })?;
    if let Some(s) = state.as_ref().filter(|s| s.vm != vm) {
        return Err(fail(
            Code::Usage,
            format!("the state file is for VM {}, not {vm}", s.vm),
        ));
    }
    Ok(state)
}

/// Takes the repository's lock of `vm`, then clears what an earlier run of it left: S3
/// uploads it could not abort, and point directories without point.json.
pub(crate) async fn lock_repo_vm(
    repo: &crate::repo::Repo,
    vm: &str,
    operation: &str,
    break_lock: bool,
) -> Result<crate::repo::lock::RepoLock, Failure> {
    use crate::repo::lock::{RepoLock, RepoLockError};
    let lock = RepoLock::acquire(repo, vm, operation, break_lock)
        .await
        .map_err(|e| {
            let code = match &e {
                RepoLockError::Held { .. }
                | RepoLockError::Stale { .. }
                | RepoLockError::Local(crate::lock::LockError::Held { .. }) => Code::Locked,
                _ => Code::Output,
            };
            Failure {
                code,
                error: e.into(),
            }
        })?;
    crate::repo::clean_leftovers(repo, vm)
        .await
        .map_err(|e| fail(Code::Output, e))?;
    Ok(lock)
}

fn save_state(path: &Path, state: &crate::chain::ChainState) -> Result<(), Failure> {
    crate::chain::save(path, state).map_err(|e| Failure {
        code: state_code(&e),
        error: e.into(),
    })
}
