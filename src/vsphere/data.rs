//! The data plane: one disk's frozen flat extent read from the datastore file service into a
//! stream, through the engine's HTTPS range source (the engine does not know it is not NBD).

use crate::engine::ExportSummary;
use crate::engine::Progress;
use crate::exit::{fail, Code, Failure};
use crate::export::{send_stream, DataPlaneOptions, Destination, StreamIds, What};
use crate::source::http_range::{
    head_cookies, HttpRange, HttpRangeError, HttpRangeOptions, RenewError, RenewHeaders,
    RequestHeaders,
};
use crate::tls::Trust;
use crate::xapi::Secret;
use cbtstream_proto::cbt::CBT_BLOCK;
use cbtstream_proto::vhd::VhdAllocation;
use std::sync::Arc;

/// Everything needed to read one disk of a snapshot.
pub struct DiskReads {
    /// `https://HOST[:PORT]/folder/<dir>/<name>-flat.vmdk?dcPath=<dc>&dsName=<ds>`, escaped.
    pub url: String,
    /// The session token, sent as the cookie `vmware_soap_session="<token>"` (the file
    /// service's session cookie). A secret: never log it.
    pub session_cookie: Secret,
    /// When the file service refuses that cookie (the VI/JSON token is not documented for
    /// it) or the session expires: its own login.
    pub login: Arc<FileServiceLogin>,
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
/// durable (as [`crate::export::send_stream`] leaves it). The reads are HTTP range requests
/// on the datastore file service (the engine's HTTPS range source), authenticated with the
/// session cookie, over `dp.connections` kept-alive TLS connections.
pub async fn read_disk(
    plan: DiskReads,
    dest: &Destination,
    dp: &DataPlaneOptions,
    progress: Arc<dyn Progress>,
) -> Result<ExportSummary, Failure> {
    // The file service's own session when an earlier disk opened one, else the API token.
    let cookie = match plan.login.session() {
        Some(session) => session.expose().to_owned(),
        None => format!("vmware_soap_session=\"{}\"", plan.session_cookie.expose()),
    };
    let headers = RequestHeaders::cookie(&cookie).map_err(|e| fail(Code::Source, e))?;
    let mut opts = HttpRangeOptions::new(plan.url, plan.trust, headers);
    opts.size = Some(plan.capacity);
    let renew: Arc<dyn RenewHeaders> = plan.login.clone();
    let (connector, first) = HttpRange::open(opts, Some(renew))
        .await
        .map_err(|e| fail(Code::Source, e))?;
    let what = if plan.full {
        // A full stream: the allocated areas are read, the rest becomes ZERO records.
        What::Allocated(VhdAllocation::from_block_bitmap(
            plan.capacity,
            CBT_BLOCK,
            &plan.bitmap,
        ))
    } else {
        What::Changed(plan.bitmap)
    };
    send_stream(first, connector, what, plan.ids, dp, dest, progress).await
}

/// The file service's own login, as virt-v2v does it against vCenter: a `HEAD` of the file
/// with HTTP basic auth opens a session whose `vmware_soap_session` cookie later requests
/// carry (tests/vsphere-sim/README.md [S7]). Over the same TLS and trust as every call.
/// One per run: the session it opens serves every disk.
pub struct FileServiceLogin {
    /// A file to `HEAD` (any the run reads).
    pub url: String,
    pub trust: Trust,
    pub user: String,
    pub password: Secret,
    /// The `vmware_soap_session=...` pair of the last session it opened.
    pub opened: std::sync::Mutex<Option<Secret>>,
    /// The service refused the credentials once: never send them again in this run (every
    /// connection retrying would soon lock the account out).
    pub refused: std::sync::atomic::AtomicBool,
}

impl FileServiceLogin {
    fn session(&self) -> Option<Secret> {
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl RenewHeaders for FileServiceLogin {
    fn renew(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<RequestHeaders, RenewError>> + Send + '_>,
    > {
        Box::pin(async move {
            use base64::Engine;
            use std::sync::atomic::Ordering;
            if self.refused.load(Ordering::Relaxed) {
                return Err("the datastore file service refused the user's credentials".into());
            }
            let pair = format!("{}:{}", self.user, self.password.expose());
            let basic = base64::engine::general_purpose::STANDARD.encode(pair);
            let mut headers = RequestHeaders::new();
            headers.insert("authorization", &format!("Basic {basic}"))?;
            let opts = HttpRangeOptions::new(self.url.clone(), self.trust.clone(), headers);
            let cookies = match head_cookies(&opts).await {
                Err(e @ HttpRangeError::NotAuthorized { .. }) => {
                    self.refused.store(true, Ordering::Relaxed);
                    return Err(e.into());
                }
                r => r?,
            };
            let session = cookies
                .iter()
                .find(|c| c.starts_with("vmware_soap_session="))
                .ok_or(
                    "the datastore file service accepted the login but set no \
                        vmware_soap_session cookie",
                )?;
            tracing::info!("logged in to the datastore file service");
            let headers = RequestHeaders::cookie(session)?;
            *self.opened.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Secret::new(session.clone()));
            Ok(headers)
        })
    }
}
