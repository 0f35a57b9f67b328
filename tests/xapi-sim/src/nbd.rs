//! The export-name resolver of the simulator's NBD server (xapi-nbd's role): it checks the
//! session and the VDI, and attaches the VDI to "dom0" for as long as the connection lives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cbtstream_testkit::xen_nbd::{Export, Resolver};
use cbtstream_testkit::{NbdKitOpts, NbdServer, QemuOpts, ServerKind};

use crate::state::{Shared, VdiType};

/// Splits `/<vdi-uuid>?session_id=<ref>` (xen-api `ocaml/nbd/src/main.ml` parses it as a URI:
/// path minus the leading `/`, query parameter `session_id`, both percent-decoded).
pub(crate) fn parse_export_name(name: &str) -> Option<(String, String)> {
    let (path, query) = name.split_once('?')?;
    let uuid = percent_decode(path.strip_prefix('/').unwrap_or(path))?;
    let session = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("session_id="))
        .and_then(percent_decode)?;
    (!uuid.is_empty() && !session.is_empty()).then_some((uuid, session))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Marks a VDI attached while alive; on drop it stays attached for the lag (xapi-nbd
/// unplugs and destroys its dom0 VBD only after the client is gone).
struct AttachGuard {
    shared: Arc<Shared>,
    vdi: String,
    lag: Duration,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(v) = st.vdis.get_mut(&self.vdi) {
            v.nbd_conns = v.nbd_conns.saturating_sub(1);
            let until = Instant::now() + self.lag;
            v.linger_until = Some(v.linger_until.map_or(until, |t| t.max(until)));
        }
        drop(st);
        self.shared.changed.notify_all();
    }
}

/// `None` closes the connection without a reply, as xapi-nbd does for a bad session, an
/// unknown VDI, a VDI without data, or a pool without an `nbd` network.
pub(crate) fn resolver(shared: Arc<Shared>) -> Resolver {
    Arc::new(move |name: &str| {
        let (uuid, session) = parse_export_name(name)?;
        let mut st = shared.lock();
        if !st.nbd_available() {
            return None;
        }
        st.sessions.get_mut(&session)?.last_active = Instant::now();
        let r = st.vdi_ref_by_uuid(&uuid)?;
        let lag = st.nbd_lag;
        let v = st.vdis.get_mut(&r)?;
        if v.typ == VdiType::CbtMetadata {
            return None;
        }
        let path = v.path.clone()?;
        v.nbd_conns += 1;
        Some(Export {
            path,
            size: v.virtual_size,
            guard: Some(Box::new(AttachGuard {
                shared: shared.clone(),
                vdi: r,
                lag,
            })),
        })
    })
}

/// A real NBD server (qemu-nbd or nbdkit) per export name handed out by `VDI.get_nbd_info`,
/// instead of the built-in XenServer-profile server (`--nbd-server qemu-nbd|nbdkit`).
///
/// Each process serves one VDI's image read-only, TLS required, on 127.0.0.1 and a free port.
/// qemu-nbd serves exactly the export name (`-x NAME`); nbdkit's `file` plugin serves any
/// name. Neither checks the session, and no attachment is tracked: the VDI is never reported
/// attached to dom0. The processes die when their VDI is data-destroyed or destroyed and when
/// the simulator stops (killed and reaped by [`NbdServer`]'s `Drop`).
pub(crate) struct RealNbd {
    pub kind: ServerKind,
    /// `--tls-certificates` / `tls-creds-x509,dir=` of the servers.
    pub tls_dir: PathBuf,
    /// The leaf PEM handed out as `cert`.
    pub cert_pem: String,
    /// By export name: the VDI ref and the server.
    servers: HashMap<String, (String, NbdServer)>,
}

impl RealNbd {
    pub(crate) fn new(kind: ServerKind, tls_dir: PathBuf, cert_pem: String) -> RealNbd {
        RealNbd {
            kind,
            tls_dir,
            cert_pem,
            servers: HashMap::new(),
        }
    }

    /// The port of the server for `name` (the VDI `vdi_ref` with its image at `image`),
    /// started now if not running yet. Blocks until the server greets (at most ~10 s).
    pub(crate) fn port_for(
        &mut self,
        name: &str,
        vdi_ref: &str,
        image: &Path,
    ) -> anyhow::Result<u16> {
        if let Some((_, s)) = self.servers.get_mut(name) {
            if s.is_running() {
                return Ok(s.port);
            }
        }
        let server = match self.kind {
            ServerKind::QemuNbd => NbdServer::qemu_nbd_tls_dir(
                image,
                Some(&self.tls_dir),
                // A second `-x` overrides the fixture's default export name.
                QemuOpts {
                    extra_args: vec!["-x".into(), name.into()],
                    ..QemuOpts::default()
                },
            )?,
            ServerKind::NbdKit => {
                NbdServer::nbdkit_tls_dir(image, Some(&self.tls_dir), NbdKitOpts::new())?
            }
        };
        let port = server.port;
        self.servers
            .insert(name.to_owned(), (vdi_ref.to_owned(), server));
        Ok(port)
    }

    /// Kills the servers of one VDI (by ref).
    pub(crate) fn stop_vdi(&mut self, vdi_ref: &str) {
        self.servers.retain(|_, (r, _)| r != vdi_ref);
    }

    /// Kills every server.
    pub(crate) fn stop_all(&mut self) {
        self.servers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_export_name;

    #[test]
    fn export_names() {
        assert_eq!(
            parse_export_name("/abc-1?session_id=OpaqueRef:x-y"),
            Some(("abc-1".into(), "OpaqueRef:x-y".into()))
        );
        assert_eq!(
            parse_export_name("/abc?a=b&session_id=OpaqueRef%3Ax"),
            Some(("abc".into(), "OpaqueRef:x".into()))
        );
        assert_eq!(parse_export_name("/abc"), None);
        assert_eq!(parse_export_name("/abc?session_id="), None);
        assert_eq!(parse_export_name("/abc?session_id=%zz"), None);
        assert_eq!(parse_export_name("?session_id=x"), None);
    }
}
