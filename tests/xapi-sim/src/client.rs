//! A minimal XenAPI client for tests: one HTTPS connection per call (`Connection: close`),
//! trusting exactly the simulator's certificate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use cbtstream_proto::xmlrpc::{decode_xenapi, encode_call, Value, XenApiError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// Each call (connect, TLS, request, response) must finish within this.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct XapiClient {
    host: String,
    port: u16,
    path: String,
    connector: TlsConnector,
}

impl std::fmt::Debug for XapiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XapiClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl XapiClient {
    /// `url` is `https://HOST:PORT/PATH`; `cert_der` the one certificate to trust.
    pub fn new(url: &str, cert_der: &[u8]) -> Result<XapiClient> {
        let rest = url
            .strip_prefix("https://")
            .with_context(|| format!("not an https URL: {url}"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        // `host:port` or `[v6]:port`; the port defaults to 443.
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                (h, p.parse().with_context(|| format!("bad port in {url}"))?)
            }
            _ => (hostport, 443),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let config = cbtstream_testkit::rustls_client_config(&[cert_der.to_vec()])?;
        Ok(XapiClient {
            host,
            port,
            path: path.to_owned(),
            connector: TlsConnector::from(Arc::<tokio_rustls::rustls::ClientConfig>::clone(
                &config,
            )),
        })
    }

    /// Sends `body` with `POST` to `path` (default: the URL's); returns the HTTP status and
    /// body.
    pub async fn post(
        &self,
        path: Option<&str>,
        method: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        tokio::time::timeout(CALL_TIMEOUT, self.post_inner(path, method, body))
            .await
            .map_err(|_| anyhow!("XenAPI call timed out after {CALL_TIMEOUT:?}"))?
    }

    async fn post_inner(
        &self,
        path: Option<&str>,
        method: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to {}:{}", self.host, self.port))?;
        let name = ServerName::try_from(self.host.clone())?;
        let mut tls = self
            .connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        let head = format!(
            "{method} {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            path.unwrap_or(&self.path),
            self.host,
            self.port,
            body.len()
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body).await?;
        tls.flush().await?;
        let mut resp = Vec::new();
        // The server closes after the response; a missing close_notify is not an error here.
        if let Err(e) = tls.read_to_end(&mut resp).await {
            if resp.is_empty() {
                return Err(e).context("reading the response");
            }
        }
        let end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of HTTP headers")?;
        let head = std::str::from_utf8(&resp[..end]).context("HTTP headers are not UTF-8")?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("bad HTTP status line")?;
        let mut body = resp[end + 4..].to_vec();
        let len = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        });
        if let Some(len) = len {
            if body.len() < len {
                bail!("short HTTP body: {} of {len} bytes", body.len());
            }
            body.truncate(len);
        }
        Ok((status, body))
    }

    /// A call; the outer error is transport trouble, the inner one the XenAPI answer.
    pub async fn try_call(
        &self,
        method: &str,
        params: &[Value],
    ) -> Result<Result<Value, XenApiError>> {
        let (status, body) = self
            .post(None, "POST", encode_call(method, params).as_bytes())
            .await?;
        if status != 200 {
            bail!("HTTP {status} for {method}");
        }
        Ok(decode_xenapi(&body))
    }

    /// A call that must succeed.
    pub async fn call(&self, method: &str, params: &[Value]) -> Result<Value> {
        self.try_call(method, params)
            .await?
            .with_context(|| format!("calling {method}"))
    }

    /// A call that must fail with a XenAPI error, which is returned.
    pub async fn call_err(&self, method: &str, params: &[Value]) -> Result<XenApiError> {
        match self.try_call(method, params).await? {
            Ok(_) => bail!("{method} succeeded, expected a failure"),
            Err(e) => Ok(e),
        }
    }

    /// `session.login_with_password`: the session ref.
    pub async fn login(&self, user: &str, password: &str) -> Result<String> {
        self.call(
            "session.login_with_password",
            &[
                user.into(),
                password.into(),
                "1.1".into(),
                "cbtstream-test".into(),
            ],
        )
        .await?
        .into_string()
        .context("the session ref is not a string")
    }
}
