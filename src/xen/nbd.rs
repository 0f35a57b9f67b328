//! Reaching a snapshot over NBD the way `VDI.get_nbd_info` says, and staying reachable.
//!
//! Each record of `get_nbd_info` names a server, the exact certificate to trust, the name
//! that certificate is for (`subject`), and an export name that embeds the session
//! reference: xapi-nbd checks that session on every new connection. So a session that dies
//! mid-export (expiry, the per-user session limit evicting old sessions, a master failover)
//! makes every later connect fail with the old name. [`XenNbd`] asks `get_nbd_info` again
//! whenever the session was renewed since the name was fetched, or when the server refused
//! the name, and [`keepalive`] keeps the session in use during long exports.

use super::src;
use crate::engine::connector::Connecting;
use crate::engine::SourceConnection;
use crate::exit::{fail, Code, Failure};
use crate::nbd::{Address, ConnError, ConnectOptions, Connection};
use crate::tls::{self, Trust};
use crate::xapi::{NbdInfo, Ref, XapiSession};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to open connections, from the data-plane options.
#[derive(Debug, Clone, Copy)]
pub struct NbdParams {
    pub connect_timeout: Duration,
    pub extended_headers: bool,
}

/// The connect options of one `get_nbd_info` record: the exact certificate it carries, for
/// the name it gives. A record whose certificate does not parse or does not name its
/// `subject` is refused (the caller moves on to the next record).
fn record_options(info: &NbdInfo, params: NbdParams) -> Result<ConnectOptions, tls::TlsError> {
    let trust = Trust::exact_cert_for_subject(info.cert_pem.as_bytes(), &info.subject)?;
    let config = tls::client_config(&trust)?;
    Ok(ConnectOptions {
        address: Address::Tcp {
            host: info.address.clone(),
            port: info.port,
        },
        export: info.exportname.expose().to_string(),
        // The certificate is pinned by its exact bytes; the name only goes out as SNI. A
        // wildcard subject is no server name: then the address is sent instead.
        tls: Some((
            config,
            tls::server_name(&info.subject).or_else(|_| tls::server_name(&info.address))?,
        )),
        connect_timeout: params.connect_timeout,
        handshake_timeout: params.connect_timeout,
        extended_headers: params.extended_headers,
        meta_context: true,
    })
}

/// Why no server of `get_nbd_info` could be used.
#[derive(Debug, thiserror::Error)]
pub enum NoServer {
    #[error(
        "VDI.get_nbd_info returned no server: no network in the pool has the `nbd` purpose \
         (xe network-param-add param-name=purpose param-key=nbd uuid=<network>)"
    )]
    Empty,
    #[error("no NBD server of VDI.get_nbd_info could be used; {0}")]
    AllFailed(String),
}

/// Connect to the first record that answers. One bad record (a certificate that does not
/// parse or name its subject, a server that is down) falls through to the next.
async fn connect_first(
    infos: &[NbdInfo],
    params: NbdParams,
) -> Result<(Connection, ConnectOptions), NoServer> {
    if infos.is_empty() {
        return Err(NoServer::Empty);
    }
    let mut errors = Vec::new();
    for (i, info) in infos.iter().enumerate() {
        let server = format!("{}:{}", info.address, info.port);
        let opts = match record_options(info, params) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%server, "NBD server record {i} refused: {e}; trying the next one");
                errors.push(format!("{server}: {e}"));
                continue;
            }
        };
        match Connection::connect(&opts).await {
            Ok(c) => return Ok((c, opts)),
            Err(e) => {
                tracing::warn!(%server, "NBD server failed: {e}; trying the next one");
                errors.push(format!("{server}: {e}"));
            }
        }
    }
    Err(NoServer::AllFailed(errors.join("; ")))
}

/// The NBD side of one snapshot: opens connections with a current export name.
pub struct XenNbd {
    session: Arc<XapiSession>,
    snapshot: Ref,
    params: NbdParams,
    /// The options in use, and the session's re-login count when they were fetched.
    current: Mutex<(ConnectOptions, u64)>,
}

impl XenNbd {
    /// `get_nbd_info` for the snapshot and the first connection.
    pub async fn open(
        session: Arc<XapiSession>,
        snapshot: Ref,
        params: NbdParams,
    ) -> Result<(Arc<XenNbd>, Box<dyn SourceConnection>), Failure> {
        let relogins = session.relogins();
        let infos = session.vdi_get_nbd_info(&snapshot).await.map_err(src)?;
        let (conn, opts) = connect_first(&infos, params)
            .await
            .map_err(|e| fail(Code::Source, e))?;
        let nbd = XenNbd {
            session,
            snapshot,
            params,
            current: Mutex::new((opts, relogins)),
        };
        Ok((Arc::new(nbd), Box::new(conn)))
    }

    fn current(&self) -> (ConnectOptions, u64) {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Ask `get_nbd_info` again (the export name carries the session) and connect.
    async fn refresh(&self) -> Result<Connection, ConnError> {
        let relogins = self.session.relogins();
        let infos = self
            .session
            .vdi_get_nbd_info(&self.snapshot)
            .await
            .map_err(|e| ConnError::Io(Arc::new(std::io::Error::other(e.to_string()))))?;
        let (conn, opts) = connect_first(&infos, self.params)
            .await
            .map_err(|e| ConnError::Io(Arc::new(std::io::Error::other(e.to_string()))))?;
        *self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = (opts, relogins);
        Ok(conn)
    }

    /// Open one more connection: with the current export name while the session that name
    /// carries is still ours, else (or when the server refuses the name) with a fresh one.
    pub async fn connect(&self) -> Result<Connection, ConnError> {
        let (opts, fetched_at) = self.current();
        if self.session.relogins() != fetched_at {
            tracing::info!("the XenAPI session was renewed; asking VDI.get_nbd_info again");
            return self.refresh().await;
        }
        match Connection::connect(&opts).await {
            Ok(c) => Ok(c),
            // XenServer closes a 17th connection before its greeting, which a fresh name does
            // not help: that one is passed on as it is.
            Err(e) if is_connection_limit(&e) => Err(e),
            // xapi-nbd closes the connection without a reply when it refuses an export name
            // (a dead session); the server may also have moved (a master failover).
            Err(e) => {
                tracing::info!("the NBD connection failed ({e}); asking VDI.get_nbd_info again");
                self.refresh().await
            }
        }
    }
}

fn is_connection_limit(e: &ConnError) -> bool {
    matches!(
        e,
        ConnError::Protocol(cbtstream_proto::nbd::NbdError::ClosedBeforeGreeting)
    )
}

impl crate::engine::Connector for XenNbd {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let conn = XenNbd::connect(self).await?;
            Ok(Box::new(conn) as Box<dyn SourceConnection>)
        })
    }

    fn server(&self) -> &'static str {
        "the NBD server"
    }
}

/// Keep the session in use while `work` runs: a cheap call every `every`, so that neither
/// XAPI's idle-session expiry nor its per-user limit (which evicts the least recently used
/// sessions) ends it under a long export (`docs/XENSERVER.md` section 10). A call that finds
/// the session dead logs in again (`XapiSession::call`), and [`XenNbd`] then fetches a fresh
/// export name. The calls run in a task of their own, so a slow XenAPI never holds up `work`.
pub async fn keepalive<T>(
    session: &Arc<XapiSession>,
    snapshot: &Ref,
    every: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let (session, snapshot) = (session.clone(), snapshot.clone());
    let pinger = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            match session.vdi_get_uuid(&snapshot).await {
                Ok(_) => tracing::debug!("XenAPI session keepalive"),
                Err(e) => tracing::warn!("XenAPI session keepalive failed: {e}"),
            }
        }
    });
    let result = work.await;
    pinger.abort();
    result
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::xapi::Secret;
    use cbtstream_testkit::xen_nbd::{file_resolver, XenNbdConfig, XenNbdServer};
    use cbtstream_testkit::{make_image, xapi_style_self_signed, Pattern};

    fn record(port: u16, cert_pem: &str, subject: &str) -> NbdInfo {
        NbdInfo {
            address: "127.0.0.1".into(),
            port,
            cert_pem: cert_pem.into(),
            subject: subject.into(),
            exportname: Secret::new("/disk"),
        }
    }

    /// One bad record (a certificate that does not parse, a subject the certificate does not
    /// name, a server that is down) does not stop the loop: the good record after it is used.
    #[tokio::test]
    async fn a_bad_record_falls_through_to_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("disk.raw");
        make_image(&img, 1 << 20, 1, Pattern::Mixed).unwrap();
        let cert = xapi_style_self_signed(&tmp.path().join("xapi")).unwrap();
        let server = XenNbdServer::start(XenNbdConfig::new(
            &cert.cert_pem_path,
            &cert.key_pem_path,
            file_resolver(None, &img),
        ))
        .await
        .unwrap();
        let pem = std::fs::read_to_string(&cert.cert_pem_path).unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let params = NbdParams {
            connect_timeout: Duration::from_secs(10),
            extended_headers: true,
        };
        let records = [
            record(server.port, "not a certificate", "localhost"),
            record(server.port, &pem, "some-other-host"),
            record(closed, &pem, "localhost"),
            record(server.port, &pem, "localhost"),
        ];
        let (conn, opts) = connect_first(&records, params).await.unwrap();
        assert_eq!(conn.negotiated.size, 1 << 20);
        assert_eq!(opts.address_label(), format!("127.0.0.1:{}", server.port));

        // Every record bad: one error naming each server's problem.
        let Err(err) = connect_first(&records[..3], params).await else {
            panic!("three bad records connected");
        };
        let text = err.to_string();
        assert!(text.contains("certificate"), "{text}");
        assert!(text.contains("some-other-host"), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{closed}")), "{text}");
        assert!(!text.contains("/disk"), "the export name leaked: {text}");
        assert!(matches!(
            connect_first(&[], params).await,
            Err(NoServer::Empty)
        ));
    }
}
