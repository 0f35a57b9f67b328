//! A vSphere chain's state around a run: loaded (and checked) before it, moved after the point
//! is durable, and `cbtstream commit` of a point whose stream went to a pipe.
//!
//! The state moves only once the output is durable: a point directory or a file once renamed
//! into place, `--to-command` once its command exited 0. A stream to stdout or a FIFO is
//! recorded as `pending` until its reader confirms it (`cbtstream commit`).

use super::client::MoRef;
use super::flow::{Done, Output, RunReport};
use crate::chain::{self, ChainError, VspherePending, VsphereState};
use crate::exit::{fail, Code, Failure, WithCode};
use crate::repo::point_writer::base_point_present;
use crate::repo::state::StateHome;

/// The chain's state, checked against the VM. A chain whose last point is not where this
/// point goes starts over there, with a full one (an incremental could not be restored).
pub(super) async fn load(
    home: Option<&StateHome>,
    vm: &MoRef,
    output: &Output,
) -> Result<Option<VsphereState>, Failure> {
    let Some(home) = home else {
        return Ok(None);
    };
    let state = home.load_vsphere().await.map_err(|e| {
        let code = match e {
            ChainError::Read { .. } => Code::Output,
            _ => Code::Integrity,
        };
        fail(code, e)
    })?;
    let Some(mut state) = state else {
        return Ok(None);
    };
    if state.vm != vm.value {
        return Err(fail(
            Code::Usage,
            format!(
                "the chain state belongs to VM {}, not to {}",
                state.vm, vm.value
            ),
        ));
    }
    if let Output::Point(target) = output {
        let present = base_point_present(target, &vm.value, state.point.as_deref())
            .await
            .code(Code::Output)?;
        if !present {
            state.point = None;
            state.disks.clear();
        }
    }
    Ok(Some(state))
}

/// Move the chain to the point `done` describes (or record it as pending).
pub(super) async fn commit(
    home: Option<&StateHome>,
    vm: &MoRef,
    host: &str,
    state: Option<VsphereState>,
    done: Done,
) -> Result<RunReport, Failure> {
    let mut report = done.report;
    let Some(home) = home else {
        return Ok(report);
    };
    let point = report.point.clone();
    let mut s = state.unwrap_or_else(|| VsphereState::new(&vm.value, host.to_owned()));
    s.host = host.to_owned();
    s.updated_unix_secs = crate::export::created_now();
    if done.durable {
        s.point = Some(point);
        s.disks.extend(done.disks);
        s.pending = None;
    } else {
        tracing::warn!(
            "the stream went to a pipe: point {point} is pending, the chain stays at its \
             previous point until its reader confirmed it"
        );
        s.pending = Some(VspherePending {
            point,
            disks: done.disks,
            created_unix_secs: crate::export::created_now(),
        });
    }
    home.save_vsphere(&s).await.code(Code::Output)?;
    report.committed = done.durable;
    Ok(report)
}

/// `cbtstream commit --state FILE` of a vSphere chain: the pending point becomes the base
/// (nothing on vCenter changes: the change ids stay valid without the snapshot). None when
/// FILE is not a vSphere state (the XenServer commit then handles it).
pub fn commit_pending(
    path: &std::path::Path,
    point: Option<&str>,
) -> Result<Option<String>, Failure> {
    if !matches!(chain::load_vsphere(path), Ok(Some(_))) {
        return Ok(None);
    }
    let _lock = crate::xen::lock_chain(path)?;
    let mut state = chain::load_vsphere(path)
        .code(Code::Integrity)?
        .ok_or_else(|| fail(Code::Usage, format!("{} is gone", path.display())))?;
    let Some(pending) = state.pending.take() else {
        return Err(fail(
            Code::Usage,
            format!("the chain {} has no pending point", path.display()),
        ));
    };
    if point.is_some_and(|p| p != pending.point) {
        return Err(fail(
            Code::Usage,
            format!(
                "the pending point is {}, not {}: a later export superseded it",
                pending.point,
                point.unwrap_or_default()
            ),
        ));
    }
    state.point = Some(pending.point.clone());
    state.disks.extend(pending.disks);
    state.updated_unix_secs = crate::export::created_now();
    chain::save_vsphere(path, &state).code(Code::Output)?;
    Ok(Some(pending.point))
}
