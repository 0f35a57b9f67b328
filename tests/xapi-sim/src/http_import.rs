//! `PUT /import_raw_vdi`: raw (plain or in vhd-tool's chunked framing) and VHD bodies
//! written into a VDI's sparse image, its CBT log marked.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use cbtstream_proto::xmlrpc::{encode_value, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::http_disk::{
    authenticate, find_vdi, finish, io_error, task_for, unauthorised, unknown_format, Dom0Attach,
    PIECE,
};
use crate::http_raw::{error_page, send_and_close, Body, Head};
use crate::pool::{self, task_finish, Record};
use crate::state::{Fail, Shared};
use crate::{disk, vhd};

pub(crate) async fn import_raw_vdi<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    head: &Head,
    mut body: Body<'_, S>,
) {
    let prepared = prepare_import(shared, head);
    let (r, task) = match prepared {
        Ok(p) => p,
        Err(page) => return send_and_close(body.s, &page).await,
    };
    let ok = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nCache-Control: no-cache, no-store\r\n\
         task-id:{task}\r\ncontent-type: application/octet-stream\r\n\r\n"
    );
    if body.s.write_all(ok.as_bytes()).await.is_err() || body.s.flush().await.is_err() {
        return task_finish(&mut shared.lock(), &task, Err(io_error()));
    }
    let outcome = match attach_for_import(shared, &r) {
        Err(f) => Err(f),
        Ok((_attach, f, size)) => {
            let sink = Sink {
                shared,
                vdi: &r,
                f: &f,
                size,
            };
            let vhd = head
                .param("format")
                .is_some_and(|f| f.eq_ignore_ascii_case("vhd"));
            let res = if head.has_param("chunked") {
                sink.chunked(&mut body).await
            } else if vhd {
                sink.vhd(&mut body).await
            } else {
                sink.plain(&mut body, head.content_length().unwrap_or(size))
                    .await
            };
            res.map(|()| encode_value(&Value::from(r.as_str())))
        }
    };
    finish(shared, &task, body.s, outcome).await;
}

/// The checks before the `200`: credentials, framing, format, the VDI (or the SR to create
/// it in). `Err` is the response to send.
fn prepare_import(shared: &Shared, head: &Head) -> Result<(String, String), Vec<u8>> {
    let mut st = shared.lock();
    if !authenticate(&mut st, head) {
        return Err(unauthorised(head));
    }
    // A failed lookup of the VDI happens before the import starts: no task is touched.
    let vdi = match head.param("vdi") {
        Some(v) => Some(find_vdi(&st, v).ok_or_else(|| error_page(&head.version, 500, &[]))?),
        None => None,
    };
    let task = task_for(&mut st, head, "VDI import");
    let format = head.param("format").unwrap_or("raw").to_ascii_lowercase();
    let refused = if let Some(te) = head.header("transfer-encoding") {
        Some(Fail::new(
            "INTERNAL_ERROR",
            [format!("Cannot handle encoding: {te}")],
        ))
    } else if head.has_param("chunked") && format != "raw" {
        Some(Fail::new("INTERNAL_ERROR", ["Cannot handle chunked VHD"]))
    } else if !matches!(format.as_str(), "raw" | "vhd") {
        Some(unknown_format(&format))
    } else if vdi.is_none() && format == "vhd" {
        Some(Fail::new(
            "INTERNAL_ERROR",
            ["Importing a VHD directly into an SR not yet supported"],
        ))
    } else {
        None
    };
    if let Some(f) = refused {
        // xapi answers 400 to a VHD without a VDI, 404 to the rest.
        let status = if vdi.is_none() && format == "vhd" {
            400
        } else {
            404
        };
        task_finish(&mut st, &task, Err(f));
        return Err(error_page("HTTP/1.0", status, &[]));
    }
    if let Some(r) = vdi {
        return Ok((r, task));
    }
    // No VDI: a raw import of Content-Length bytes into a new VDI of the named SR.
    let sr = head.param("sr_id").map(str::to_owned).or_else(|| {
        let u = head.param("sr_uuid")?;
        (u == st.sr_uuid).then(|| st.sr_ref.clone())
    });
    let (Some(sr), Some(len)) = (sr, head.content_length()) else {
        task_finish(
            &mut st,
            &task,
            Err(Fail::new("VDI_MISSING", Vec::<String>::new())),
        );
        return Err(error_page("HTTP/1.1", 400, &[]));
    };
    let args = BTreeMap::from([
        ("SR".to_owned(), Value::from(sr)),
        ("virtual_size".to_owned(), Value::int64_str(len as i64)),
        ("name_label".to_owned(), Value::from("Imported VDI")),
        ("type".to_owned(), Value::from("user")),
        ("sharable".to_owned(), Value::Bool(false)),
        ("read_only".to_owned(), Value::Bool(false)),
        ("other_config".to_owned(), Value::Struct(BTreeMap::new())),
    ]);
    match pool::vdi_create(&mut st, &Record(&args)) {
        Ok(v) => Ok((v.into_string().unwrap_or_default(), task)),
        Err(f) => {
            task_finish(&mut st, &task, Err(f));
            Err(error_page("HTTP/1.1", 500, &[]))
        }
    }
}

/// Attaches the VDI read-write to dom0; a VDI plugged into a running VM is refused.
fn attach_for_import(shared: &Arc<Shared>, r: &str) -> Result<(Dom0Attach, File, u64), Fail> {
    {
        let st = shared.lock();
        let running = st.vbds.values().any(|b| {
            b.vdi == r
                && b.currently_attached
                && st
                    .vms
                    .get(&b.vm)
                    .is_some_and(|vm| vm.power_state == "Running")
        });
        if running {
            return Err(Fail::in_use(r, "import_raw_vdi"));
        }
    }
    Dom0Attach::new(shared, r)
}

/// Reads `out.len()` bytes at stream offset `at`, skipping forward from `pos`; a position
/// behind the reader is an error (vhd-tool reads a VHD stream strictly forward).
async fn read_at<S: AsyncRead + Unpin>(
    body: &mut Body<'_, S>,
    pos: &mut u64,
    at: u64,
    out: &mut [u8],
) -> Result<(), Fail> {
    if at < *pos {
        return Err(io_error());
    }
    let mut skip = [0u8; 4096];
    while *pos < at {
        let n = (at - *pos).min(skip.len() as u64) as usize;
        body.read_exact(&mut skip[..n])
            .await
            .map_err(|_| io_error())?;
        *pos += n as u64;
    }
    body.read_exact(out).await.map_err(|_| io_error())?;
    *pos += out.len() as u64;
    Ok(())
}

/// Where imported data goes: the image, the CBT log and the byte counter.
struct Sink<'a> {
    shared: &'a Shared,
    vdi: &'a str,
    f: &'a File,
    size: u64,
}

impl Sink<'_> {
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Fail> {
        disk::write_sparse(self.f, offset, data).map_err(|_| io_error())?;
        let mut st = self.shared.lock();
        st.bytes_imported += data.len() as u64;
        if let Some(log) = st.vdis.get_mut(self.vdi).and_then(|v| v.log.as_mut()) {
            log.bitmap.mark(offset, data.len() as u64);
        }
        Ok(())
    }

    /// Copies `len` body bytes to `offset`.
    async fn copy<S: AsyncRead + Unpin>(
        &self,
        body: &mut Body<'_, S>,
        offset: u64,
        len: u64,
    ) -> Result<(), Fail> {
        let mut buf = vec![0u8; PIECE.min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE as u64) as usize;
            body.read_exact(&mut buf[..n])
                .await
                .map_err(|_| io_error())?;
            self.write(offset + done, &buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// `format=raw`: `len` bytes (Content-Length, else the disk size) from offset 0.
    async fn plain<S: AsyncRead + Unpin>(
        &self,
        body: &mut Body<'_, S>,
        len: u64,
    ) -> Result<(), Fail> {
        if len == 0 || len > self.size {
            return Err(io_error());
        }
        self.copy(body, 0, len).await
    }

    /// `format=vhd`, read strictly forward as vhd-tool does: footer, dynamic header, BAT,
    /// then the blocks in stream order; only the sectors marked in a block's bitmap are
    /// written. The trailing footer is not needed. Sectors past the end of the disk (the
    /// last block of a disk that is not a whole number of 2 MiB blocks) must be zero.
    async fn vhd<S: AsyncRead + Unpin>(&self, body: &mut Body<'_, S>) -> Result<(), Fail> {
        let bad = |_| io_error();
        let mut pos = 0u64;
        let mut footer = [0u8; 512];
        read_at(body, &mut pos, 0, &mut footer).await?;
        let layout = vhd::parse_footer(&footer).map_err(bad)?;
        let mut header = [0u8; 1024];
        read_at(body, &mut pos, layout.header_offset, &mut header).await?;
        let dynamic = vhd::parse_header(&header).map_err(bad)?;
        if dynamic.entries > vhd::table_entries(self.size) {
            return Err(io_error());
        }
        let mut bat = vec![0u8; (dynamic.entries * 4).next_multiple_of(512) as usize];
        read_at(body, &mut pos, dynamic.table_offset, &mut bat).await?;
        let mut bitmap = [0u8; 512];
        let mut block = vec![0u8; vhd::BLOCK as usize];
        for (at, index) in vhd::allocated(&bat[..(dynamic.entries * 4) as usize]) {
            read_at(body, &mut pos, at, &mut bitmap).await?;
            read_at(body, &mut pos, at + 512, &mut block).await?;
            let start = index * vhd::BLOCK;
            // Runs of marked sectors (MSB first), each written in one go.
            let marked = |i: usize| bitmap[i / 8] & (0x80 >> (i % 8)) != 0;
            let mut i = 0;
            while i < 4096 {
                if !marked(i) {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < 4096 && marked(i) {
                    i += 1;
                }
                let (from, to) = (start + first as u64 * 512, start + i as u64 * 512);
                let inside = to.min(self.size).max(from);
                let data = &block[first * 512..i * 512];
                let (keep, beyond) = data.split_at((inside - from) as usize);
                if beyond.iter().any(|&b| b != 0) {
                    return Err(io_error());
                }
                if !keep.is_empty() {
                    self.write(from, keep)?;
                }
            }
        }
        Ok(())
    }

    /// vhd-tool's chunked framing: `{offset u64 LE, length u32 LE, data}` records, sector
    /// aligned, ended by a record of zeroes.
    async fn chunked<S: AsyncRead + Unpin>(&self, body: &mut Body<'_, S>) -> Result<(), Fail> {
        loop {
            let mut rec = [0u8; 12];
            body.read_exact(&mut rec).await.map_err(|_| io_error())?;
            let offset = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default());
            let len = u64::from(u32::from_le_bytes(rec[8..].try_into().unwrap_or_default()));
            if offset == 0 && len == 0 {
                return Ok(());
            }
            let fits = offset.checked_add(len).is_some_and(|end| end <= self.size);
            if offset % 512 != 0 || len % 512 != 0 || !fits {
                return Err(io_error());
            }
            self.copy(body, offset, len).await?;
        }
    }
}
