//! The test API, `POST /sim/<name>` with a JSON body and the `vmware-api-session-id` header
//! of a logged-in session: guest writes and fault switches. 204 on success, 400 with the
//! reason for a bad request, 401 without a live session.

use std::sync::Arc;

use base64::Engine;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;

use crate::http::{no_content, read_json, session_token, text, Body};
use crate::state::{FailNext, Shared, State};
use crate::vim::session_user;

/// A failed test call: the status and the reason.
pub type SimError = (StatusCode, String);

fn bad(msg: impl Into<String>) -> SimError {
    (StatusCode::BAD_REQUEST, msg.into())
}

fn str_arg<'a>(body: &'a Value, name: &str) -> Result<&'a str, SimError> {
    body.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("`{name}` (a string) is required")))
}

fn int_arg(body: &Value, name: &str) -> Result<u64, SimError> {
    body.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(format!("`{name}` (a non-negative integer) is required")))
}

/// A guest write to disk `key` of `vm`, through the VM's current view (the top layer).
pub fn write(st: &mut State, vm: &str, key: i32, offset: u64, data: &[u8]) -> Result<(), SimError> {
    let vm = st.vm_mut(vm).ok_or_else(|| bad(format!("no VM {vm}")))?;
    let disk = vm
        .disks
        .iter_mut()
        .find(|d| d.key == key)
        .ok_or_else(|| bad(format!("no disk {key}")))?;
    if offset
        .checked_add(data.len() as u64)
        .is_none_or(|e| e > disk.capacity)
    {
        return Err(bad(format!(
            "the write ends past the disk's capacity {}",
            disk.capacity
        )));
    }
    disk.write(offset, data)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
}

/// A CBT reset: new tracking identity, every earlier change id refused.
pub fn reset_cbt(st: &mut State, vm: &str, key: i32) -> Result<(), SimError> {
    let vm = st.vm_mut(vm).ok_or_else(|| bad(format!("no VM {vm}")))?;
    let disk = vm
        .disks
        .iter_mut()
        .find(|d| d.key == key)
        .ok_or_else(|| bad(format!("no disk {key}")))?;
    disk.cbt.activate();
    Ok(())
}

/// Grows a disk (the guest sees zeroes past the old end); change tracking goes on, as VMware's
/// does, so clients must notice the capacity change themselves.
pub fn resize(st: &mut State, vm: &str, key: i32, size: u64) -> Result<(), SimError> {
    let vm = st.vm_mut(vm).ok_or_else(|| bad(format!("no VM {vm}")))?;
    if !vm.snapshots.is_empty() {
        return Err(bad("the simulator resizes only disks without snapshots"));
    }
    let disk = vm
        .disks
        .iter_mut()
        .find(|d| d.key == key)
        .ok_or_else(|| bad(format!("no disk {key}")))?;
    if size <= disk.capacity || size % 1024 != 0 || size > crate::MAX_DISK_SIZE {
        return Err(bad(format!(
            "a disk grows to a multiple of 1024 up to 2 TiB, from {} not to {size}",
            disk.capacity
        )));
    }
    disk.grow(size)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
}

fn disk_key(body: &Value) -> Result<i32, SimError> {
    i32::try_from(int_arg(body, "disk")?).map_err(|_| bad("`disk` is not a device key"))
}

fn dispatch(st: &mut State, name: &str, body: &Value) -> Result<(), SimError> {
    match name {
        "write" => {
            let data = base64::engine::general_purpose::STANDARD
                .decode(str_arg(body, "data")?)
                .map_err(|e| bad(format!("`data` is not base64: {e}")))?;
            let vm = str_arg(body, "vm")?.to_owned();
            write(st, &vm, disk_key(body)?, int_arg(body, "offset")?, &data)
        }
        "reset_cbt" => {
            let vm = str_arg(body, "vm")?.to_owned();
            reset_cbt(st, &vm, disk_key(body)?)
        }
        "resize" => {
            let vm = str_arg(body, "vm")?.to_owned();
            resize(st, &vm, disk_key(body)?, int_arg(body, "size")?)
        }
        "fail_next" => {
            let method = str_arg(body, "method")?.to_owned();
            let fault = body
                .get("fault")
                .and_then(Value::as_str)
                .unwrap_or("InvalidState")
                .to_owned();
            st.fail_next.push(FailNext { method, fault });
            Ok(())
        }
        "expire_sessions" => {
            st.sessions.clear();
            st.tickets.clear();
            Ok(())
        }
        "unupdatable_file" => {
            st.unupdatable_files.push(str_arg(body, "file")?.to_owned());
            Ok(())
        }
        _ => Err((StatusCode::NOT_FOUND, format!("no test call {name}"))),
    }
}

pub async fn serve(req: Request<Incoming>, shared: &Arc<Shared>, name: &str) -> Response<Body> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "test calls are POST");
    }
    let token = session_token(&req);
    if session_user(&shared.lock(), token.as_deref()).is_none() {
        return text(
            StatusCode::UNAUTHORIZED,
            "a logged-in session's vmware-api-session-id header is required",
        );
    }
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (shared, name) = (shared.clone(), name.to_owned());
    let res = tokio::task::spawn_blocking(move || dispatch(&mut shared.lock(), &name, &body)).await;
    match res {
        Ok(Ok(())) => no_content(),
        Ok(Err((status, msg))) => text(status, msg),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "the simulator failed"),
    }
}
