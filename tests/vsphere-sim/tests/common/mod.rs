//! A small HTTPS client for the simulator's tests: hyper's HTTP/1 client over tokio-rustls,
//! one kept-alive connection, trusting exactly the simulator's CA.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use cbtstream_vsphere_sim::{Simulator, SESSION_HEADER};

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Client {
    addr: SocketAddr,
    connector: TlsConnector,
    sender: Mutex<Option<SendRequest<Full<Bytes>>>>,
    /// How many TLS connections this client opened.
    pub connections: std::sync::atomic::AtomicUsize,
    pub release: String,
}

impl Client {
    pub fn new(sim: &Simulator) -> Client {
        Client::with_ca(sim.addr(), sim.ca_der(), sim.release())
    }

    pub fn with_ca(addr: SocketAddr, ca_der: &[u8], release: &str) -> Client {
        let cfg = cbtstream_testkit::rustls_client_config(&[ca_der.to_vec()]).unwrap();
        Client {
            addr,
            connector: TlsConnector::from(cfg),
            sender: Mutex::new(None),
            connections: Default::default(),
            release: release.into(),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let tls = self
            .connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        self.connections
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(sender)
    }

    /// One request on the kept-alive connection (a new one if the last closed).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Resp> {
        tokio::time::timeout(
            Duration::from_secs(30),
            self.request_inner(method, path, headers, body),
        )
        .await
        .context("request timed out")?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Resp> {
        let mut guard = self.sender.lock().await;
        if guard.as_ref().is_none_or(|s| s.is_closed()) {
            *guard = Some(self.connect().await?);
        }
        let sender = guard.as_mut().unwrap();
        sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    fn vi_path(&self, rest: &str) -> String {
        format!("/sdk/vim25/{}/{rest}", self.release)
    }

    /// `GET /sdk/vim25/{release}/{rest}`.
    pub async fn get(&self, token: Option<&str>, rest: &str) -> Resp {
        let h: Vec<(&str, &str)> = token.map(|t| (SESSION_HEADER, t)).into_iter().collect();
        self.request("GET", &self.vi_path(rest), &h, None)
            .await
            .unwrap()
    }

    /// `POST /sdk/vim25/{release}/{rest}` with a JSON body.
    pub async fn post(&self, token: Option<&str>, rest: &str, body: Value) -> Resp {
        let h: Vec<(&str, &str)> = token.map(|t| (SESSION_HEADER, t)).into_iter().collect();
        self.request(
            "POST",
            &self.vi_path(rest),
            &h,
            Some(body.to_string().into_bytes()),
        )
        .await
        .unwrap()
    }

    /// Logs in; returns the session token.
    pub async fn login(&self, user: &str, password: &str) -> String {
        let r = self
            .post(
                None,
                "SessionManager/SessionManager/Login",
                json!({"userName": user, "password": password}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.header(SESSION_HEADER)
            .expect("the session header")
            .to_owned()
    }

    /// Test API call, `POST /sim/<name>`.
    pub async fn sim(&self, token: &str, name: &str, body: Value) -> Resp {
        self.request(
            "POST",
            &format!("/sim/{name}"),
            &[(SESSION_HEADER, token)],
            Some(body.to_string().into_bytes()),
        )
        .await
        .unwrap()
    }

    /// Polls the task until it ends; returns its final TaskInfo and the states seen.
    pub async fn wait_task(&self, token: &str, task: &Value) -> (Value, Vec<String>) {
        assert_eq!(task["_typeName"], "ManagedObjectReference", "{task}");
        assert_eq!(task["type"], "Task");
        let id = task["value"].as_str().unwrap();
        let mut seen = Vec::new();
        for _ in 0..2000 {
            let r = self.get(Some(token), &format!("Task/{id}/info")).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let info = r.json();
            let state = info["state"].as_str().unwrap().to_owned();
            if seen.last() != Some(&state) {
                seen.push(state.clone());
            }
            if state == "success" || state == "error" {
                return (info, seen);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("task {id} never ended: {seen:?}");
    }

    /// Creates a snapshot, waits, returns its moid.
    pub async fn snapshot(&self, token: &str, vm: &str, name: &str) -> String {
        let r = self
            .post(
                Some(token),
                &format!("VirtualMachine/{vm}/CreateSnapshotEx_Task"),
                json!({"name": name, "memory": false}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let (info, _) = self.wait_task(token, &r.json()).await;
        assert_eq!(info["state"], "success", "{info}");
        let result = &info["result"];
        assert_eq!(result["_typeName"], "ManagedObjectReference");
        assert_eq!(result["_value"]["type"], "VirtualMachineSnapshot");
        result["_value"]["value"].as_str().unwrap().to_owned()
    }

    pub async fn remove_snapshot(&self, token: &str, snap: &str) -> Value {
        let r = self
            .post(
                Some(token),
                &format!("VirtualMachineSnapshot/{snap}/RemoveSnapshot_Task"),
                json!({"removeChildren": false, "consolidate": true}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        self.wait_task(token, &r.json()).await.0
    }

    /// Every page of QueryChangedDiskAreas; checks the pages tile the disk. Returns the
    /// areas and how many pages it took.
    pub async fn changed_areas(
        &self,
        token: &str,
        vm: &str,
        snap: &str,
        key: i32,
        change_id: &str,
        capacity: u64,
    ) -> Result<(Vec<(u64, u64)>, usize)> {
        let mut areas = Vec::new();
        let mut offset = 0;
        let mut pages = 0;
        loop {
            let r = self
                .post(
                    Some(token),
                    &format!("VirtualMachine/{vm}/QueryChangedDiskAreas"),
                    json!({
                        "snapshot": {"_typeName": "ManagedObjectReference", "type": "VirtualMachineSnapshot", "value": snap},
                        "deviceKey": key,
                        "startOffset": offset,
                        "changeId": change_id,
                    }),
                )
                .await;
            if r.status != 200 {
                bail!("QueryChangedDiskAreas answered {}: {}", r.status, r.text());
            }
            let info = r.json();
            assert_eq!(info["_typeName"], "DiskChangeInfo");
            assert_eq!(info["startOffset"].as_u64(), Some(offset));
            let len = info["length"].as_u64().unwrap();
            for a in info["changedArea"].as_array().unwrap() {
                assert_eq!(a["_typeName"], "DiskChangeExtent");
                let (s, l) = (a["start"].as_u64().unwrap(), a["length"].as_u64().unwrap());
                assert!(
                    s >= offset && s + l <= offset + len && l > 0,
                    "{a} outside the page"
                );
                areas.push((s, l));
            }
            pages += 1;
            offset += len;
            assert!(len > 0 || offset == capacity);
            if offset >= capacity {
                assert_eq!(offset, capacity);
                return Ok((areas, pages));
            }
        }
    }
}

/// Whether `[off, off+len)` lies inside the union of `areas`.
pub fn covered(areas: &[(u64, u64)], off: u64, len: u64) -> bool {
    (off..off + len).all(|b| areas.iter().any(|&(s, l)| b >= s && b < s + l))
}
