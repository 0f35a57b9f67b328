//! The data plane seam: read one disk's frozen flat extent from the datastore file service
//! into a stream. The reader (HTTP range reads on the engine) plugs in here; until then
//! every read fails with a clear error and the flows clean up as on any source failure.

use crate::engine::ExportSummary;
use crate::engine::Progress;
use crate::exit::{fail, Code, Failure};
use crate::export::{DataPlaneOptions, Destination, StreamIds};
use crate::tls::Trust;
use crate::xapi::Secret;
use std::sync::Arc;

/// Everything needed to read one disk of a snapshot.
#[allow(dead_code)] // read by the datastore reader, which is not connected yet
pub struct DiskReads {
    /// `https://HOST[:PORT]/folder/<dir>/<name>-flat.vmdk?dcPath=<dc>&dsName=<ds>`, escaped.
    pub url: String,
    /// The session token, sent as the cookie `vmware_soap_session="<token>"` (the file
    /// service's session cookie). A secret: never log it.
    pub session_cookie: Secret,
    /// How the server certificate is checked (the `--vsphere-*` trust flags).
    pub trust: Trust,
    /// The disk's capacity: the stream's virtual size (the extent is exactly this long).
    pub capacity: u64,
    /// One bit per 64 KiB block, most significant bit first, as `VDI.list_changed_blocks`:
    /// the changed areas of an incremental, or the allocated areas of a full.
    pub bitmap: Vec<u8>,
    /// A full stream (the bitmap then lists the allocated areas; the rest reads as zero).
    pub full: bool,
    pub ids: StreamIds,
}

impl std::fmt::Debug for DiskReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskReads")
            .field("url", &self.url)
            .field("session_cookie", &self.session_cookie)
            .field("capacity", &self.capacity)
            .field("full", &self.full)
            .field("point_id", &self.ids.point_id)
            .finish_non_exhaustive()
    }
}

/// Read the planned blocks and write the stream to `dest`; on success it is complete and
/// durable (as [`crate::export::send_stream`] leaves it).
pub async fn read_disk(
    plan: DiskReads,
    dest: &Destination,
    dp: &DataPlaneOptions,
    progress: Arc<dyn Progress>,
) -> Result<ExportSummary, Failure> {
    let _ = (plan, dest, dp, progress);
    Err(fail(Code::Source, "the datastore reader is not built yet"))
}
