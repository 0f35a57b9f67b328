//! One HTTPS connection for a hyper client: TCP (no delay), TLS with the caller's rustls
//! configuration (the trust rules of [`crate::tls`]), and the HTTP/1.1 handshake, whose
//! connection a task of its own drives until it closes. The vSphere client and the HTTPS
//! range source open theirs here, each with its own errors and timeouts.

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Why the connection could not be opened; the caller names the server.
#[derive(Debug)]
pub enum OpenError {
    Connect(std::io::Error),
    /// The TLS handshake failed, described by [`crate::tls::describe_io_error`].
    Tls(String),
    Http(hyper::Error),
}

/// An open connection's request side and how long the TCP connect took (about one round
/// trip). `label` names the server in the debug line logged when the connection ends.
pub async fn open<B>(
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    label: &str,
) -> Result<(SendRequest<B>, Duration), OpenError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(OpenError::Connect)?;
    let rtt = started.elapsed();
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| OpenError::Tls(crate::tls::describe_io_error(&e)))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(OpenError::Http)?;
    let label = label.to_owned();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("HTTPS connection to {label} ended: {e}");
        }
    });
    Ok((sender, rtt))
}
