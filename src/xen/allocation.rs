//! Full exports that read only allocated blocks. XenServer's NBD server offers no block
//! status, so a full export would read every byte of the disk, zeros included. Instead, as
//! Xen Orchestra does, open `GET /export_raw_vdi?vdi=<snapshot>&format=vhd`, read the VHD's
//! footer, header and block allocation table (one entry per 2 MiB block), and hang up: a
//! block the VHD does not allocate is zero in the snapshot, so it is not read
//! (docs/XENSERVER.md section 11). The map only ever removes reads: when it cannot be had
//! (an SR whose images are not VHD, an error), the whole disk is read, and the log says so.

use crate::export::What;
use crate::xapi::XapiSession;
use bytes::BytesMut;
use cbtstream_proto::vhd::{Step, VhdAllocation, VhdAllocationReader};
use http_body_util::BodyExt;

/// What a full export of `snapshot` reads: its VHD allocation, or the whole disk.
pub async fn full_export_reads(session: &XapiSession, snapshot: &str, size: u64) -> What {
    let read = tokio::time::timeout(super::vm::READ_TIMEOUT, vhd_allocation(session, snapshot));
    let alloc = match read.await {
        Ok(r) => r,
        Err(_) => Err("the VHD export's head did not arrive in time".to_owned()),
    };
    // The VHD's size is rounded up to whole blocks; smaller than the disk, it cannot say
    // what the rest of the disk holds.
    let alloc = alloc.and_then(|a| {
        if a.virtual_size >= size {
            Ok(a)
        } else {
            Err(format!(
                "the VHD export is {} bytes, the disk {size}",
                a.virtual_size
            ))
        }
    });
    match alloc {
        Ok(alloc) => {
            tracing::info!(
                allocated_bytes = alloc.allocated_bytes(),
                "full export: reading only the blocks the snapshot's VHD allocates"
            );
            What::Allocated(alloc)
        }
        Err(why) => {
            tracing::warn!("no allocation map of the snapshot ({why}); reading the whole disk");
            What::Full
        }
    }
}

/// The allocation table from the start of the snapshot's VHD export.
async fn vhd_allocation(session: &XapiSession, snapshot: &str) -> Result<VhdAllocation, String> {
    let resp = session
        .http_get("/export_raw_vdi", &[("vdi", snapshot), ("format", "vhd")])
        .await
        .map_err(|e| e.to_string())?;
    let mut body = resp.into_body();
    let mut reader = VhdAllocationReader::new();
    let mut buf = BytesMut::new();
    loop {
        match reader.poll(&mut buf).map_err(|e| e.to_string())? {
            // Dropping the body closes the connection: the rest of the disk is not sent.
            Step::Done(alloc) => return Ok(alloc),
            Step::NeedBytes(n) => {
                while buf.len() < n {
                    let frame = match body.frame().await {
                        Some(f) => f.map_err(|e| format!("reading the VHD export: {e}"))?,
                        None => return Err(reader.end_of_stream().to_string()),
                    };
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
