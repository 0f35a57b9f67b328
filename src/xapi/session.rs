//! A logged-in XenAPI session: login (following `HOST_IS_SLAVE` once), calls that log in
//! again once on `SESSION_INVALID`, and logout.
//!
//! Callers must `logout()` on every exit path, errors included: XAPI keeps an abandoned
//! session for 24 hours and drops the oldest beyond 500 per user. Dropping a session that was
//! not logged out spawns a best-effort background logout on the current tokio runtime, which
//! may not get to run if the runtime is shutting down.
//!
//! The NBD export names from `VDI.get_nbd_info` embed the session reference: they stop
//! working when the session is logged out or replaced by a re-login, so keep the session
//! alive for the whole transfer and fetch the NBD info again after [`XapiSession::relogins`]
//! changed.

use super::transport::{Endpoint, Transport, XapiOptions};
use super::{Secret, XapiError};
use crate::tls::Trust;
use cbtstream_proto::xmlrpc::Value;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// XAPI records this as the session's originator (its per-originator session limit).
pub const ORIGINATOR: &str = "cbtstream";
/// The API version sent at login (XAPI's default).
const API_VERSION: &str = "1.1";
/// How long the background logout of a dropped session may take.
const DROP_LOGOUT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct XapiSession {
    transport: Transport,
    user: String,
    password: Secret,
    /// The current session reference; replaced by a re-login.
    session: tokio::sync::Mutex<Secret>,
    relogins: AtomicU64,
    /// Set by `logout`, so that `Drop` does not log out again.
    logged_out: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for XapiSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XapiSession")
            .field("url", &self.transport.endpoint().url())
            .field("user", &self.user)
            .field("password", &self.password)
            .field("session", &"***")
            .finish()
    }
}

impl XapiSession {
    /// `session.login_with_password(user, password, "1.1", "cbtstream")` at `url`, with the
    /// default timeouts and size limit of [`XapiOptions::new`]. When the host is a pool member
    /// (`HOST_IS_SLAVE [master]`), log in at the master instead (same scheme, port and trust
    /// policy), once. `http://` URLs need `allow_plaintext`.
    pub async fn login(
        url: &str,
        user: &str,
        password: &Secret,
        trust: &Trust,
        allow_plaintext: bool,
    ) -> Result<XapiSession, XapiError> {
        let options = XapiOptions {
            allow_plaintext,
            ..XapiOptions::new(trust.clone())
        };
        XapiSession::login_with(url, user, password, &options).await
    }

    /// [`XapiSession::login`] with explicit options.
    pub async fn login_with(
        url: &str,
        user: &str,
        password: &Secret,
        options: &XapiOptions,
    ) -> Result<XapiSession, XapiError> {
        let transport = Transport::new(Endpoint::parse(url)?, options)?;
        let (transport, session) = match login_at(&transport, user, password).await {
            Ok(s) => (transport, s),
            Err(e) if e.is("HOST_IS_SLAVE") => {
                let master = e
                    .args()
                    .and_then(|a| a.first())
                    .ok_or_else(|| {
                        XapiError::protocol(LOGIN, "HOST_IS_SLAVE without the master's address")
                    })?
                    .clone();
                let endpoint = transport.endpoint().redirect(&master)?;
                tracing::info!(
                    "{} is a pool member; logging in at the pool master {}",
                    transport.endpoint().label(),
                    endpoint.label()
                );
                let master = transport.with_endpoint(endpoint)?;
                // A second HOST_IS_SLAVE is returned as the error: no redirect loops.
                let session = login_at(&master, user, password).await?;
                (master, session)
            }
            Err(e) => return Err(e),
        };
        tracing::debug!("XenAPI login at {} as {user}", transport.endpoint().label());
        Ok(XapiSession {
            transport,
            user: user.to_owned(),
            password: password.clone(),
            session: tokio::sync::Mutex::new(session),
            relogins: AtomicU64::new(0),
            logged_out: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The endpoint in use (the master's, after a `HOST_IS_SLAVE` redirect).
    pub fn endpoint(&self) -> &Endpoint {
        self.transport.endpoint()
    }

    /// The current session reference, for a request to an HTTP handler (which takes it as
    /// the `session_id` cookie), and the transport that reaches the same host.
    pub(crate) async fn for_handler(&self) -> (Secret, &Transport) {
        (self.session.lock().await.clone(), &self.transport)
    }

    /// How many times the session was replaced after `SESSION_INVALID`. Export names from
    /// `VDI.get_nbd_info` fetched before a change carry the dead session.
    pub fn relogins(&self) -> u64 {
        self.relogins.load(Ordering::Relaxed)
    }

    /// Call `method` with the session reference prepended to `params`. On `SESSION_INVALID`
    /// log in again and retry, once. Safe to call from several tasks at once.
    pub async fn call(&self, method: &str, params: &[Value]) -> Result<Value, XapiError> {
        let used = self.session.lock().await.clone();
        match self.call_as(&used, method, params).await {
            Err(e) if e.is("SESSION_INVALID") => {
                self.relogin(&used).await?;
                let current = self.session.lock().await.clone();
                self.call_as(&current, method, params).await
            }
            r => r,
        }
    }

    async fn call_as(
        &self,
        session: &Secret,
        method: &str,
        params: &[Value],
    ) -> Result<Value, XapiError> {
        let mut all = Vec::with_capacity(params.len() + 1);
        all.push(Value::from(session.expose()));
        all.extend_from_slice(params);
        self.transport.call(method, &all).await
    }

    /// `GET path?query` on one of XenServer's HTTP handlers (`/export_raw_vdi`, ...), with
    /// the session in a `session_id` cookie (they read the query or the cookie). The response once it
    /// is 200, its body still to read.
    pub async fn http_get(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, XapiError> {
        let what = format!("GET {path}");
        let session = self.session.lock().await.clone();
        let mut target = format!("{path}?");
        for (k, v) in query {
            target.push_str(k);
            target.push('=');
            target.push_str(&query_escape(v));
            target.push('&');
        }
        target.pop();
        // The session in a cookie, as the handlers accept it: URLs end up in access logs.
        self.transport.get(&what, &target, &session).await
    }

    /// Replace the session `stale`, unless another task already did.
    async fn relogin(&self, stale: &Secret) -> Result<(), XapiError> {
        let mut current = self.session.lock().await;
        if *current != *stale {
            return Ok(());
        }
        tracing::info!(
            "XenAPI session at {} expired; logging in again",
            self.transport.endpoint().label()
        );
        *current = login_at(&self.transport, &self.user, &self.password).await?;
        self.relogins.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `session.logout`. Call it on every exit path; see the module documentation. A failure
    /// is only logged: the session expires on the host anyway, and nothing else can be done.
    pub async fn logout(&self) {
        if self.logged_out.swap(true, Ordering::Relaxed) {
            return;
        }
        let session = self.session.lock().await.clone();
        if let Err(e) = logout_at(&self.transport, &session).await {
            tracing::warn!("XenAPI logout failed: {e}");
        }
    }
}

impl Drop for XapiSession {
    fn drop(&mut self) {
        if *self.logged_out.get_mut() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("XenAPI session dropped outside a runtime without logout; it expires on the host in 24 h");
            return;
        };
        let transport = self.transport.clone();
        let session = self.session.get_mut().clone();
        tracing::debug!("XenAPI session dropped without logout; logging out in the background");
        handle.spawn(async move {
            let _ =
                tokio::time::timeout(DROP_LOGOUT_TIMEOUT, logout_at(&transport, &session)).await;
        });
    }
}

const LOGIN: &str = "session.login_with_password";

/// Percent-encode a query value: everything but unreserved characters and `:` (references
/// are `OpaqueRef:<uuid>`).
fn query_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn login_at(
    transport: &Transport,
    user: &str,
    password: &Secret,
) -> Result<Secret, XapiError> {
    let params = [
        Value::from(user),
        Value::from(password.expose()),
        Value::from(API_VERSION),
        Value::from(ORIGINATOR),
    ];
    let v = transport.call(LOGIN, &params).await?;
    match v.into_string() {
        Some(s) if s.starts_with("OpaqueRef:") => Ok(Secret::from(s)),
        _ => Err(XapiError::protocol(
            LOGIN,
            "the session reference is not an OpaqueRef string",
        )),
    }
}

async fn logout_at(transport: &Transport, session: &Secret) -> Result<(), XapiError> {
    transport
        .call("session.logout", &[Value::from(session.expose())])
        .await
        .map(drop)
}
