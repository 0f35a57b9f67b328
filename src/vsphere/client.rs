//! A VI/JSON client: `POST https://HOST/sdk/vim25/{release}/{type}/{moId}/{method}` with the
//! method's request body as JSON, `GET .../{type}/{moId}/{property}` for properties, the
//! session token in the `vmware-api-session-id` header of every call.
//!
//! The release: `--vsphere-release`, else the server's own `about.apiVersion`, read from
//! `ServiceInstance/content` asked at 8.0.1.0 (the first release with VI/JSON, which every
//! VI/JSON server serves).
//!
//! Answers (VMware's VI/JSON conventions): 200 with JSON, 204 (or an empty 200) for void
//! methods and unset values, HTTP 500 with the fault object. Every body is capped at
//! [`ClientOptions::max_body`] before it is parsed.

use crate::http_body::{read_bounded, BodyError};
use crate::https::OpenError;
use crate::tls::{self, Trust};
use crate::xapi::Secret;
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use serde_json::Value;
use std::fmt;

pub use super::types::{clean, is_release, path_safe, Endpoint, MoRef, VimFault, VsphereError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The header that carries the session token, both ways.
pub const SESSION_HEADER: &str = "vmware-api-session-id";
/// The release asked for `ServiceInstance/content` when none was given.
pub const FIRST_JSON_RELEASE: &str = "8.0.1.0";

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub trust: Trust,
    /// `--vsphere-release`; None: the server's `about.apiVersion`.
    pub release: Option<String>,
    pub connect_timeout: Duration,
    /// One call, connect included.
    pub request_timeout: Duration,
    /// The largest JSON body accepted.
    pub max_body: usize,
    /// How long a task may take before we give up waiting.
    pub task_timeout: Duration,
}

impl ClientOptions {
    pub fn new(trust: Trust) -> ClientOptions {
        ClientOptions {
            trust,
            release: None,
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
            max_body: 16 << 20,
            task_timeout: Duration::from_secs(3600),
        }
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// A logged-in VI/JSON session. Call [`Client::logout`] on every exit path.
pub struct Client {
    endpoint: Endpoint,
    label: String,
    authority: String,
    tls: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    opts: ClientOptions,
    release: String,
    user: String,
    password: Secret,
    session: tokio::sync::Mutex<Secret>,
    relogins: AtomicU64,
    logged_out: AtomicBool,
    idle: Mutex<Option<Sender>>,
    content: Value,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("host", &self.label)
            .field("release", &self.release)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("session", &"***")
            .finish()
    }
}

/// An HTTP answer: status and (capped) body, plus the session header when there was one.
struct Answer {
    status: StatusCode,
    body: Bytes,
    token: Option<Secret>,
}

impl Client {
    /// `ServiceInstance/content`, then `SessionManager.Login`.
    pub async fn login(
        url: &str,
        user: &str,
        password: &Secret,
        opts: &ClientOptions,
    ) -> Result<Client, VsphereError> {
        let endpoint = Endpoint::parse(url)?;
        let tls = tls::client_config(&opts.trust)?;
        let server_name = tls::server_name(&endpoint.host)?;
        let mut client = Client {
            label: endpoint.label(),
            authority: endpoint.authority(),
            endpoint,
            tls,
            server_name,
            opts: opts.clone(),
            release: opts
                .release
                .clone()
                .unwrap_or_else(|| FIRST_JSON_RELEASE.into()),
            user: user.to_owned(),
            password: password.clone(),
            session: tokio::sync::Mutex::new(Secret::new("")),
            relogins: AtomicU64::new(0),
            logged_out: AtomicBool::new(true),
            idle: Mutex::new(None),
            content: Value::Null,
        };
        let what = "ServiceInstance content";
        let path = client.path("ServiceInstance", "ServiceInstance", "content");
        let answer = client
            .exchange(Method::GET, &path, None, None, what)
            .await?;
        let content = client
            .decode(answer, what)?
            .ok_or_else(|| VsphereError::protocol(what, "no content"))?;
        if opts.release.is_none() {
            let version = content
                .pointer("/about/apiVersion")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if !is_release(version) {
                return Err(VsphereError::protocol(
                    what,
                    format!(
                        "about.apiVersion {:?} is not a release (give --vsphere-release)",
                        clean(version, 40)
                    ),
                ));
            }
            client.release = version.to_owned();
        }
        client.content = content;
        let token = client.login_once().await?;
        *client.session.get_mut() = token;
        client.logged_out = AtomicBool::new(false);
        tracing::info!(
            "vSphere login at {} as {user} (release {})",
            client.label,
            client.release
        );
        Ok(client)
    }

    /// The ServiceContent read at login.
    pub fn content(&self) -> &Value {
        &self.content
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    #[cfg(test)]
    pub fn release(&self) -> &str {
        &self.release
    }

    pub fn trust(&self) -> &Trust {
        &self.opts.trust
    }

    /// How many times the session was replaced after `NotAuthenticated`.
    #[cfg(test)]
    pub fn relogins(&self) -> u64 {
        self.relogins.load(Ordering::Relaxed)
    }

    /// The current session token (for the datastore file service's cookie). Never log it.
    pub async fn session_token(&self) -> Secret {
        self.session.lock().await.clone()
    }

    fn path(&self, kind: &str, moid: &str, tail: &str) -> String {
        format!("/sdk/vim25/{}/{kind}/{moid}/{tail}", self.release)
    }

    fn session_manager(&self) -> MoRef {
        self.content
            .get("sessionManager")
            .and_then(MoRef::parse)
            .unwrap_or_else(|| MoRef::new("SessionManager", "SessionManager"))
    }

    async fn login_once(&self) -> Result<Secret, VsphereError> {
        let what = "SessionManager.Login";
        let sm = self.session_manager();
        let body = serde_json::json!({"userName": self.user, "password": self.password.expose()});
        let path = self.path(&sm.kind, &sm.value, "Login");
        let answer = self
            .exchange(Method::POST, &path, Some(body), None, what)
            .await?;
        let token = answer.token.clone();
        self.decode(answer, what)?;
        token.ok_or_else(|| VsphereError::protocol(what, "no vmware-api-session-id header"))
    }

    /// A method of a managed object; None for a void method or an unset result. On
    /// `NotAuthenticated` (the session expired) log in again and retry, once.
    pub async fn invoke(
        &self,
        object: &MoRef,
        method: &str,
        body: Value,
    ) -> Result<Option<Value>, VsphereError> {
        let what = format!("{}.{method}", object.kind);
        let path = self.path(&object.kind, &object.value, method);
        self.with_session(&what, |session| {
            let (path, body, what) = (path.clone(), body.clone(), what.clone());
            async move {
                let a = self
                    .exchange(Method::POST, &path, Some(body), Some(&session), &what)
                    .await?;
                self.decode(a, &what)
            }
        })
        .await
    }

    /// A property of a managed object; None when it is unset.
    pub async fn property(
        &self,
        object: &MoRef,
        property: &str,
    ) -> Result<Option<Value>, VsphereError> {
        let what = format!("{}.{property}", object.kind);
        let path = self.path(&object.kind, &object.value, property);
        self.with_session(&what, |session| {
            let (path, what) = (path.clone(), what.clone());
            async move {
                let a = self
                    .exchange(Method::GET, &path, None, Some(&session), &what)
                    .await?;
                self.decode(a, &what)
            }
        })
        .await
    }

    async fn with_session<T, F, Fut>(&self, what: &str, op: F) -> Result<T, VsphereError>
    where
        F: Fn(Secret) -> Fut,
        Fut: std::future::Future<Output = Result<T, VsphereError>>,
    {
        let used = self.session.lock().await.clone();
        match op(used.clone()).await {
            Err(e) if e.is_fault("NotAuthenticated") => {
                let mut current = self.session.lock().await;
                if *current == used {
                    tracing::info!(
                        "vSphere session at {} expired ({what}); logging in again",
                        self.label
                    );
                    *current = self.login_once().await?;
                    self.relogins.fetch_add(1, Ordering::Relaxed);
                }
                let fresh = current.clone();
                drop(current);
                op(fresh).await
            }
            r => r,
        }
    }

    /// Wait for a task to end: its `result` on success, its fault on error. Polls
    /// `Task/{id}/info` with backoff (50 ms doubling to 2 s), within the task timeout.
    pub async fn wait_task(&self, task: &MoRef, what: &str) -> Result<Option<Value>, VsphereError> {
        if task.kind != "Task" {
            return Err(VsphereError::protocol(
                what,
                format!("answered a {} instead of a Task", task.kind),
            ));
        }
        let deadline = tokio::time::Instant::now() + self.opts.task_timeout;
        let mut delay = Duration::from_millis(50);
        loop {
            let info = self
                .property(task, "info")
                .await?
                .ok_or_else(|| VsphereError::protocol(what, "the task has no info"))?;
            match info.get("state").and_then(|s| s.as_str()) {
                Some("success") => return Ok(info.get("result").cloned()),
                Some("error") => {
                    let fault = info
                        .get("error")
                        // The VI/JSON reference: the MethodFault itself; the SOAP-era shape
                        // (a LocalizedMethodFault around it) is read too.
                        .and_then(|e| VimFault::parse_localized(e).or_else(|| VimFault::parse(e)))
                        .unwrap_or_else(|| VimFault {
                            type_name: "unknown".into(),
                            message: "the task failed without saying why".into(),
                            invalid_property: None,
                            file: None,
                        });
                    return Err(VsphereError::Fault {
                        what: what.to_owned(),
                        fault,
                    });
                }
                Some("queued" | "running") => {}
                _ => return Err(VsphereError::protocol(what, "the task has no known state")),
            }
            if tokio::time::Instant::now() + delay > deadline {
                return Err(VsphereError::Timeout {
                    addr: self.label.clone(),
                    what: format!("waiting for {what} ({})", task.value),
                    after: self.opts.task_timeout,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Invoke a `*_Task` method: its task.
    pub async fn start_task(
        &self,
        object: &MoRef,
        method: &str,
        body: Value,
    ) -> Result<MoRef, VsphereError> {
        let what = format!("{}.{method}", object.kind);
        let task = self
            .invoke(object, method, body)
            .await?
            .as_ref()
            .and_then(MoRef::parse)
            .ok_or_else(|| VsphereError::protocol(&what, "no task reference"))?;
        tracing::debug!(task = %task.value, "{what} started");
        Ok(task)
    }

    /// Invoke a `*_Task` method and wait for it.
    pub async fn run_task(
        &self,
        object: &MoRef,
        method: &str,
        body: Value,
    ) -> Result<Option<Value>, VsphereError> {
        let task = self.start_task(object, method, body).await?;
        self.wait_task(&task, &format!("{}.{method}", object.kind))
            .await
    }

    /// `SessionManager.Logout`; a failure is only logged (the session expires anyway).
    pub async fn logout(&self) {
        if self.logged_out.swap(true, Ordering::Relaxed) {
            return;
        }
        let sm = self.session_manager();
        let session = self.session.lock().await.clone();
        let path = self.path(&sm.kind, &sm.value, "Logout");
        let what = "SessionManager.Logout";
        let r = self
            .exchange(
                Method::POST,
                &path,
                Some(serde_json::json!({})),
                Some(&session),
                what,
            )
            .await
            .and_then(|a| self.decode(a, what));
        if let Err(e) = r {
            tracing::warn!("vSphere logout failed: {e}");
        }
    }

    /// The JSON of an answer: None for 204 or an empty body, the fault for 500.
    fn decode(&self, a: Answer, what: &str) -> Result<Option<Value>, VsphereError> {
        let json = || -> Result<Value, VsphereError> {
            serde_json::from_slice(&a.body)
                .map_err(|e| VsphereError::protocol(what, format!("not JSON ({e})")))
        };
        match a.status {
            StatusCode::OK if a.body.iter().all(u8::is_ascii_whitespace) => Ok(None),
            StatusCode::OK => Ok(Some(json()?)),
            StatusCode::NO_CONTENT => Ok(None),
            StatusCode::INTERNAL_SERVER_ERROR => {
                let fault = json().ok().as_ref().and_then(VimFault::parse);
                match fault {
                    Some(fault) => Err(VsphereError::Fault {
                        what: what.to_owned(),
                        fault,
                    }),
                    None => Err(self.http(what, a.status)),
                }
            }
            status => Err(self.http(what, status)),
        }
    }

    fn http(&self, what: &str, status: StatusCode) -> VsphereError {
        VsphereError::Http {
            addr: self.label.clone(),
            what: what.to_owned(),
            status: status.as_u16(),
        }
    }

    /// One request on the kept-alive connection (or a new one), the body capped.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        session: Option<&Secret>,
        what: &str,
    ) -> Result<Answer, VsphereError> {
        tracing::debug!(call = what, "vSphere call");
        let timeout = self.opts.request_timeout;
        tokio::time::timeout(timeout, self.round_trip(method, path, body, session, what))
            .await
            .map_err(|_| VsphereError::Timeout {
                addr: self.label.clone(),
                what: what.to_owned(),
                after: timeout,
            })?
    }

    async fn round_trip(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        session: Option<&Secret>,
        what: &str,
    ) -> Result<Answer, VsphereError> {
        let idle = self.idle.lock().ok().and_then(|mut g| g.take());
        let (mut sender, reused) = match idle {
            Some(s) if !s.is_closed() && s.is_ready() => (s, true),
            _ => (self.connect().await?, false),
        };
        let body = body.map(|b| Bytes::from(b.to_string()));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.authority.as_str())
            .header(USER_AGENT, concat!("cbtstream/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(s) = session {
            req = req.header(SESSION_HEADER, s.expose());
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| VsphereError::protocol(what, "building the request"))?;
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            // The server closed the idle connection before our request went out.
            Err(mut e) if reused && e.message().is_some() => {
                let req = e
                    .take_message()
                    .ok_or_else(|| VsphereError::protocol(what, "hyper lost the request"))?;
                sender = self.connect().await?;
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| self.transport(e))?
            }
            Err(e) => return Err(self.transport(e.into_error())),
        };
        let status = resp.status();
        let token = resp
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
            .map(Secret::new);
        let limit = self.opts.max_body;
        let too_large = || VsphereError::TooLarge {
            what: what.to_owned(),
            limit,
        };
        let body = read_bounded(resp, limit as u64)
            .await
            .map_err(|e| match e {
                BodyError::Http(e) => self.transport(e),
                BodyError::TooLarge => too_large(),
                BodyError::Other(e) => {
                    VsphereError::protocol(what, format!("reading the body: {e}"))
                }
            })?;
        if let Ok(mut g) = self.idle.lock() {
            if g.is_none() {
                *g = Some(sender);
            }
        }
        Ok(Answer {
            status,
            body,
            token,
        })
    }

    fn transport(&self, source: hyper::Error) -> VsphereError {
        VsphereError::Transport {
            addr: self.label.clone(),
            source,
        }
    }

    /// TCP, TLS and the HTTP/1.1 handshake, within the connect timeout.
    async fn connect(&self) -> Result<Sender, VsphereError> {
        let after = self.opts.connect_timeout;
        tokio::time::timeout(after, self.open())
            .await
            .map_err(|_| VsphereError::Timeout {
                addr: self.label.clone(),
                what: "connecting".into(),
                after,
            })?
    }

    async fn open(&self) -> Result<Sender, VsphereError> {
        let ep = &self.endpoint;
        let opened = crate::https::open(
            &ep.host,
            ep.port,
            self.tls.clone(),
            self.server_name.clone(),
            &self.label,
        )
        .await;
        let addr = self.label.clone();
        match opened {
            Ok((sender, _)) => Ok(sender),
            Err(OpenError::Connect(source)) => Err(VsphereError::Connect { addr, source }),
            Err(OpenError::Tls(reason)) => Err(VsphereError::Tls { addr, reason }),
            Err(OpenError::Http(e)) => Err(self.transport(e)),
        }
    }
}
