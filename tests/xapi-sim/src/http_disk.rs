//! xapi's HTTP handlers for disks and VM metadata: `GET /export_raw_vdi` here,
//! `PUT /import_raw_vdi` in `http_import`, `GET /export_metadata` and `PUT /import_metadata`
//! in `metadata`; what they share (credentials, tasks, the dom0 attachment) is here.
//!
//! As on a real host: authentication by `session_id` (query or cookie) or HTTP Basic, else
//! `401` with `WWW-Authenticate`; the `200` head goes out before the disk is attached and
//! before a request body is read; export bodies end when the connection closes; outcomes
//! after the `200` go into the task (`task_id`, else a task made for the request, named in
//! the `task-id` header), and a failed handler writes a `500` page into the body.

use std::fs::{File, OpenOptions};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::http_raw::{error_page, send_and_close, Body, Head};
use crate::pool::{self, task_finish};
use crate::state::{Fail, Shared, State, VdiType};
use crate::{disk, http_import, metadata, vhd};

/// Pieces in which disk data is read and written.
pub(crate) const PIECE: usize = 1 << 20;

/// Serves one request on a disk path and closes the connection.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    head: Head,
    pending: &[u8],
    s: &mut S,
) {
    let body = Body { pending, s };
    let method = match head.path.as_str() {
        "/export_raw_vdi" | "/export_metadata" => "GET",
        _ => "PUT",
    };
    // xapi registers each handler for one method; another one finds no handler.
    if head.method != method {
        return send_and_close(body.s, &error_page(&head.version, 404, &[])).await;
    }
    // Counted like XenAPI calls, e.g. `Simulator::calls("GET /export_raw_vdi")`.
    *shared
        .lock()
        .calls
        .entry(format!("{method} {}", head.path))
        .or_default() += 1;
    match head.path.as_str() {
        "/export_raw_vdi" => export_raw_vdi(&shared, &head, body.s).await,
        "/import_raw_vdi" => http_import::import_raw_vdi(&shared, &head, body).await,
        "/export_metadata" => metadata::export(&shared, &head, body.s).await,
        _ => metadata::import(&shared, &head, body).await,
    }
}

/// Checks the credentials: a `session_id` (which must be valid), else HTTP Basic with the
/// pool's user and password.
pub(crate) fn authenticate(st: &mut State, head: &Head) -> bool {
    if let Some(s) = head.param("session_id") {
        return match st.sessions.get_mut(s) {
            Some(sess) => {
                sess.last_active = Instant::now();
                true
            }
            None => false,
        };
    }
    let Some(b64) = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    let text = String::from_utf8_lossy(&raw);
    text.split_once(':')
        .is_some_and(|(u, p)| u == st.user && p == st.password)
}

/// `401 Unauthorised` with xapi's realm.
pub(crate) fn unauthorised(head: &Head) -> Vec<u8> {
    error_page(
        &head.version,
        401,
        &[("WWW-Authenticate", "Basic realm=\"xapi\"")],
    )
}

/// The client's `task_id` if it names a task, else a new task for this request.
pub(crate) fn task_for(st: &mut State, head: &Head, label: &str) -> String {
    match head.param("task_id") {
        Some(t) if st.tasks.contains_key(t) => t.to_owned(),
        _ => pool::task_create(st, label, ""),
    }
}

/// A VDI by ref, else by uuid (xapi's `vdi` parameter).
pub(crate) fn find_vdi(st: &State, v: &str) -> Option<String> {
    if st.vdis.contains_key(v) {
        return Some(v.to_owned());
    }
    st.vdi_ref_by_uuid(v)
}

pub(crate) fn io_error() -> Fail {
    Fail::new("VDI_IO_ERROR", ["Device I/O errors"])
}

/// The VDI attached to dom0 for the length of a transfer (xapi's dom0 VBD): `VDI.destroy`
/// and `VDI.data_destroy` see it in use meanwhile.
pub(crate) struct Dom0Attach {
    shared: Arc<Shared>,
    vdi: String,
}

impl Dom0Attach {
    /// Attaches `r` and returns its image and size; `cbt_metadata` VDIs cannot be plugged.
    pub(crate) fn new(shared: &Arc<Shared>, r: &str) -> Result<(Dom0Attach, File, u64), Fail> {
        let mut st = shared.lock();
        let v = st.vdi_mut(r)?;
        let path = match (&v.path, v.typ) {
            (Some(p), VdiType::User) => p.clone(),
            _ => return Err(Fail::incompatible_type(r, "cbt_metadata")),
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|_| io_error())?;
        v.nbd_conns += 1;
        let size = v.virtual_size;
        Ok((
            Dom0Attach {
                shared: shared.clone(),
                vdi: r.to_owned(),
            },
            f,
            size,
        ))
    }
}

impl Drop for Dom0Attach {
    fn drop(&mut self) {
        if let Some(v) = self.shared.lock().vdis.get_mut(&self.vdi) {
            v.nbd_conns = v.nbd_conns.saturating_sub(1);
        }
        self.shared.changed.notify_all();
    }
}

/// Ends the task and the connection: success, or a failure with a `500` page in the body.
pub(crate) async fn finish<S: AsyncWrite + Unpin>(
    shared: &Shared,
    task: &str,
    s: &mut S,
    outcome: Result<String, Fail>,
) {
    let failed = outcome.is_err();
    task_finish(&mut shared.lock(), task, outcome);
    let page = if failed {
        error_page("HTTP/1.1", 500, &[])
    } else {
        Vec::new()
    };
    send_and_close(s, &page).await;
}

/// The checks before the `200`: credentials, the VDI, the format. `Err` is the response
/// to send.
fn prepare_export(
    shared: &Shared,
    head: &Head,
) -> Result<(String, String, String, String), Vec<u8>> {
    let mut st = shared.lock();
    if !authenticate(&mut st, head) {
        return Err(unauthorised(head));
    }
    let Some(r) = head.param("vdi").and_then(|v| find_vdi(&st, v)) else {
        return Err(error_page(&head.version, 500, &[]));
    };
    let task = task_for(&mut st, head, "VDI export");
    // `sim.fail_next("GET /export_raw_vdi", ...)`: the handler fails as on an SR it cannot
    // export from (xapi's plain 500 page, the task failed).
    if let Err(f) = crate::api::take_injected(&mut st, "GET /export_raw_vdi") {
        task_finish(&mut st, &task, Err(f));
        return Err(error_page(&head.version, 500, &[]));
    }
    let format = head.param("format").unwrap_or("raw").to_ascii_lowercase();
    if !matches!(format.as_str(), "raw" | "vhd") {
        task_finish(&mut st, &task, Err(unknown_format(&format)));
        return Err(error_page(&head.version, 404, &[]));
    }
    let uuid = st.vdi(&r).map(|v| v.uuid.clone()).unwrap_or_default();
    Ok((r, task, format, uuid))
}

async fn export_raw_vdi<S: AsyncWrite + Unpin>(shared: &Arc<Shared>, head: &Head, s: &mut S) {
    let (r, task, format, uuid) = match prepare_export(shared, head) {
        Ok(p) => p,
        Err(page) => return send_and_close(s, &page).await,
    };
    let content_type = if format == "vhd" {
        "application/vhd"
    } else {
        "application/octet-stream"
    };
    let ok = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nCache-Control: no-cache, no-store\r\n\
         task-id:{task}\r\ncontent-type:{content_type}\r\n\
         content-disposition: attachment; filename=\"{uuid}.{format}\"\r\n\r\n"
    );
    if s.write_all(ok.as_bytes()).await.is_err() {
        return task_finish(&mut shared.lock(), &task, Err(io_error()));
    }
    let outcome = match Dom0Attach::new(shared, &r) {
        Err(f) => Err(f),
        Ok((_, _, size)) if format == "vhd" && size > vhd::MAX_VHD_SIZE => Err(Fail::new(
            "VDI_TOO_LARGE",
            [r.clone(), vhd::MAX_VHD_SIZE.to_string()],
        )),
        Ok((_attach, f, size)) => {
            let sent = if format == "vhd" {
                send_vhd(&f, size, s).await
            } else {
                send_raw(&f, size, s).await
            };
            sent.map(|()| String::new()).map_err(|_| io_error())
        }
    };
    finish(shared, &task, s, outcome).await;
}

/// xapi knows `tar` and `qcow2` too; the simulator does not.
pub(crate) fn unknown_format(format: &str) -> Fail {
    match format {
        "tar" | "qcow2" => Fail::new(
            "INTERNAL_ERROR",
            [format!("format {format} is not simulated")],
        ),
        _ => Fail::new("INTERNAL_ERROR", [format!("Unknown format {format}")]),
    }
}

/// The whole disk, holes as zeroes.
async fn send_raw<S: AsyncWrite + Unpin>(f: &File, size: u64, s: &mut S) -> std::io::Result<()> {
    let mut buf = vec![0u8; PIECE];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(PIECE as u64) as usize;
        disk::read_padded(f, off, &mut buf[..n])?;
        s.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    s.flush().await
}

async fn send_vhd<S: AsyncWrite + Unpin>(f: &File, size: u64, s: &mut S) -> std::io::Result<()> {
    let blocks = disk::data_blocks(f, size, vhd::BLOCK)?;
    let stream = vhd::stream(size, &blocks, uuid::Uuid::new_v4().into_bytes());
    s.write_all(&stream.prefix).await?;
    let mut buf = vec![0u8; vhd::BLOCK as usize];
    for b in blocks {
        disk::read_padded(f, b * vhd::BLOCK, &mut buf)?;
        // Past the disk's end the last block reads as zeroes.
        let valid = (size - b * vhd::BLOCK).min(vhd::BLOCK) as usize;
        buf[valid..].fill(0);
        s.write_all(&vhd::SECTOR_BITMAP).await?;
        s.write_all(&buf).await?;
    }
    s.write_all(&stream.footer).await?;
    s.flush().await
}
