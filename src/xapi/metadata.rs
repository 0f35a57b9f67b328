//! `PUT /import_metadata`: a VM's configuration (the XVA-style tar of `GET /export_metadata`,
//! holding `ova.xml`) imported as a new VM whose disks are VDIs already in the pool
//! (docs/XENSERVER.md section 11). Flags are query parameters that count only as the literal
//! `true`; each `vdi:<old-uuid>=<new-uuid>` maps a disk of the archive to a VDI. XAPI answers
//! `200` before it reads the body, so the head goes out, the answer is awaited, then the body
//! (its length in `Content-Length`); the task's result names the new VM.

use super::import::task_outcome;
use super::{Ref, XapiError, XapiSession};
use cbtstream_proto::xmlrpc::decode_value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METHOD: &str = "PUT /import_metadata";

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct MetadataImport {
    /// `vdi:<old>=<new>`: the archive's disk `old` is the pool's VDI `new`.
    pub vdi_map: Vec<(String, String)>,
    /// `restore=true`: keep the VM's uuid and MACs (disaster recovery).
    pub preserve: bool,
    /// `dry_run=true`: check, create nothing.
    pub dry_run: bool,
}

impl XapiSession {
    /// Imports `archive`; returns the new VM (none for a dry run).
    pub async fn import_metadata(
        &self,
        archive: &[u8],
        how: &MetadataImport,
    ) -> Result<Option<Ref>, XapiError> {
        let timeout = self.for_handler().await.1.options().request_timeout;
        let mut query: Vec<String> = how
            .vdi_map
            .iter()
            .map(|(old, new)| format!("vdi:{old}={new}"))
            .collect();
        if how.preserve {
            query.push("restore=true".into());
        }
        if how.dry_run {
            query.push("dry_run=true".into());
        }
        if query.iter().any(|q| {
            !q.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-:=._".contains(&b))
        }) {
            return Err(XapiError::protocol(
                METHOD,
                "a VDI uuid holds characters a query cannot",
            ));
        }
        let target = format!("/import_metadata?{}", query.join("&"));
        let (mut io, task, addr) = self
            .handler_put(METHOD, &target, Some(archive.len() as u64))
            .await?;
        let io_error = |what: &str, source| XapiError::Io {
            addr: addr.clone(),
            what: format!("{METHOD}: {what}"),
            source,
        };
        io.write_all(archive)
            .await
            .map_err(|e| io_error("sending the archive", e))?;
        io.flush()
            .await
            .map_err(|e| io_error("sending the archive", e))?;
        // Whatever the server sends before it closes (an error page at most).
        let mut tail = (&mut io).take(1 << 20);
        let _ = tokio::io::copy(&mut tail, &mut tokio::io::sink()).await;
        if let Some(e) = task_outcome(self, task.as_ref(), &addr, METHOD, timeout).await? {
            return Err(e);
        }
        if how.dry_run {
            return Ok(None);
        }
        let Some(task) = task else {
            return Ok(None);
        };
        // The result: an XML-RPC array of the new VMs' references.
        let result = self.task_get_result(&task).await?;
        let value = decode_value(result.as_bytes()).map_err(|_| {
            XapiError::protocol(METHOD, "the task's result is not an XML-RPC value")
        })?;
        Ok(value
            .as_array()
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .and_then(|s| Ref::parse(s.to_owned())))
    }
}
