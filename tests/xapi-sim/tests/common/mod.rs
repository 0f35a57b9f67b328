//! Helpers shared by the simulator's integration tests: a started simulator with a logged-in
//! client, bitmap decoding, and a tiny raw NBD client (enough to hold a connection open and
//! read, the way a backup client does against xapi-nbd).

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cbtstream_proto::xmlrpc::{Value, XenApiError};
use cbtstream_xapi_sim::{SimConfig, Simulator, XapiClient};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

pub const BLOCK: u64 = 64 * 1024;

/// Every test body runs under this bound.
pub async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the test took more than 60 s")
}

pub struct Env {
    pub sim: Simulator,
    pub c: XapiClient,
    pub session: String,
    pub vdi: String,
    /// Kept last so the simulator is dropped before its files.
    pub dir: TempDir,
}

impl Env {
    pub async fn start(tweak: impl FnOnce(&mut SimConfig)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SimConfig::for_tests(dir.path());
        tweak(&mut cfg);
        let sim = Simulator::start(cfg).await.unwrap();
        let c = sim.client().unwrap();
        let session = c.login(sim.user(), sim.password()).await.unwrap();
        let vdi = sim.vdi_ref().to_owned();
        Env {
            sim,
            c,
            session,
            vdi,
            dir,
        }
    }

    /// `method(session, args...)`, which must succeed.
    pub async fn call(&self, method: &str, args: &[&str]) -> Value {
        self.c
            .call(method, &self.params(args))
            .await
            .unwrap_or_else(|e| panic!("{method}: {e:#}"))
    }

    /// `method(session, args...)` with arguments of any type, which must succeed.
    pub async fn call_values(&self, method: &str, args: Vec<Value>) -> Value {
        let mut params = vec![Value::from(self.session.as_str())];
        params.extend(args);
        self.c
            .call(method, &params)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e:#}"))
    }

    /// `method(session, args...)`, which must fail.
    pub async fn fail(&self, method: &str, args: &[&str]) -> XenApiError {
        self.c
            .call_err(method, &self.params(args))
            .await
            .unwrap_or_else(|e| panic!("{method}: {e:#}"))
    }

    pub fn params(&self, args: &[&str]) -> Vec<Value> {
        std::iter::once(self.session.as_str())
            .chain(args.iter().copied())
            .map(Value::from)
            .collect()
    }

    pub async fn snapshot(&self, vdi: &str) -> String {
        self.c
            .call(
                "VDI.snapshot",
                &[
                    self.session.as_str().into(),
                    vdi.into(),
                    Value::Struct(Default::default()),
                ],
            )
            .await
            .unwrap()
            .into_string()
            .unwrap()
    }

    pub async fn write(&self, offset: u64, data: &[u8]) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.call("sim.write", &[&self.vdi, &offset.to_string(), &b64])
            .await;
    }

    /// `sim.write` into any live VDI, by uuid.
    pub async fn write_vdi(&self, uuid: &str, offset: u64, data: &[u8]) {
        self.sim.write(uuid, offset, data).unwrap();
    }

    /// The changed blocks between two VDIs; checks the bitmap length for `size`.
    pub async fn changed(&self, from: &str, to: &str, size: u64) -> Vec<u64> {
        let v = self.call("VDI.list_changed_blocks", &[from, to]).await;
        blocks_of(v.as_str().unwrap(), size)
    }

    pub async fn uuid_of(&self, vdi: &str) -> String {
        self.call("VDI.get_uuid", &[vdi])
            .await
            .into_string()
            .unwrap()
    }

    /// The VM's disk VBDs (type `Disk`), in `userdevice` order.
    pub async fn disk_vbds(&self, vm: &str) -> Vec<String> {
        let mut out = Vec::new();
        for v in self.call("VM.get_VBDs", &[vm]).await.into_array().unwrap() {
            let r = v.into_string().unwrap();
            let rec = self.call("VBD.get_record", &[&r]).await;
            if rec.get("type").unwrap().as_str() == Some("Disk") {
                let slot: u32 = rec
                    .get("userdevice")
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                out.push((slot, r));
            }
        }
        out.sort();
        out.into_iter().map(|(_, r)| r).collect()
    }

    pub async fn nbd_info(&self, vdi: &str) -> (u16, String) {
        let v = self.call("VDI.get_nbd_info", &[vdi]).await;
        let recs = v.as_array().unwrap();
        assert_eq!(recs.len(), 1);
        let port = recs[0].get("port").unwrap().as_i64_str().unwrap();
        let name = recs[0].get("exportname").unwrap().as_str().unwrap();
        (u16::try_from(port).unwrap(), name.to_owned())
    }

    /// Copies `snapshot`'s export with nbdcopy (libnbd), by the URI a user would build from
    /// `get_nbd_info`, checks the copy is the snapshot's image byte for byte, and returns it.
    pub async fn nbdcopy_snapshot(&self, snapshot: &str) -> Vec<u8> {
        let (port, name) = self.nbd_info(snapshot).await;
        let out = self.dir.path().join("copy.raw");
        let uri = format!(
            "nbds://127.0.0.1:{port}/{}?tls-certificates={}",
            name.replace('?', "%3F"),
            self.sim.nbd_tls_dir().display()
        );
        let st = tokio::process::Command::new("nbdcopy")
            .arg(&uri)
            .arg(&out)
            .kill_on_drop(true)
            .status()
            .await
            .unwrap();
        assert!(st.success(), "nbdcopy {uri} failed: {st}");
        let snap =
            std::fs::read(self.sim.vdi_path(&self.uuid_of(snapshot).await).unwrap()).unwrap();
        let copy = std::fs::read(&out).unwrap();
        assert!(copy == snap, "nbdcopy's copy differs from the snapshot");
        copy
    }

    pub async fn nbd_connect(&self, vdi: &str) -> Result<Nbd> {
        let (port, name) = self.nbd_info(vdi).await;
        Nbd::connect(port, &name, self.sim.cert_der()).await
    }
}

/// Decodes a `list_changed_blocks` result (MSB first) into block numbers, checking its
/// length is `ceil(ceil(size / 64 KiB) / 8)` and that no bit past the disk end is set.
pub fn blocks_of(b64: &str, size: u64) -> Vec<u64> {
    let raw = cbtstream_proto::cbt::decode_base64(b64.as_bytes()).unwrap();
    let nblocks = size.div_ceil(BLOCK);
    assert_eq!(raw.len() as u64, nblocks.div_ceil(8), "bitmap length");
    let set: Vec<u64> = (0..raw.len() as u64 * 8)
        .filter(|&i| raw[(i / 8) as usize] & (0x80 >> (i % 8)) != 0)
        .collect();
    assert!(
        set.iter().all(|&b| b < nblocks),
        "bits past the end: {set:?}"
    );
    set
}

pub fn assert_code(e: &XenApiError, code: &str, args: &[&str]) {
    assert_eq!(e.code(), Some(code), "{}", e.unredacted());
    assert_eq!(e.args().unwrap(), args, "{}", e.unredacted());
}

/// A minimal NBD client with xapi-nbd's handshake: fixed newstyle, STARTTLS, EXPORT_NAME,
/// then simple READ requests.
pub struct Nbd {
    s: TlsStream<TcpStream>,
    pub size: u64,
    handle: u64,
}

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    s.flush().await?;
    Ok(())
}

async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0; n];
    s.read_exact(&mut b).await?;
    Ok(b)
}

impl Nbd {
    pub async fn connect(port: u16, export: &str, cert_der: &[u8]) -> Result<Nbd> {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let g = read_n(&mut tcp, 18).await.context("greeting")?;
        ensure!(g[..8] == *b"NBDMAGIC", "bad greeting");
        tcp.write_all(&1u32.to_be_bytes()).await?; // C_FIXED_NEWSTYLE
        send_option(&mut tcp, 5, &[]).await?; // STARTTLS
        let r = read_n(&mut tcp, 20).await.context("STARTTLS reply")?;
        ensure!(r[12..16] == 1u32.to_be_bytes(), "STARTTLS was not acked");
        let cfg = cbtstream_testkit::rustls_client_config(&[cert_der.to_vec()])?;
        let mut s = TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost")?, tcp)
            .await
            .context("TLS")?;
        send_option(&mut s, 1, export.as_bytes()).await?; // EXPORT_NAME
        let r = read_n(&mut s, 134)
            .await
            .context("the export was refused (connection closed)")?;
        let size = u64::from_be_bytes(r[..8].try_into()?);
        Ok(Nbd { s, size, handle: 0 })
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.handle += 1;
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // flags 0, READ
        b.extend_from_slice(&self.handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&b).await?;
        self.s.flush().await?;
        let r = read_n(&mut self.s, 16).await?;
        ensure!(r[..4] == 0x6744_6698u32.to_be_bytes(), "bad reply magic");
        let err = u32::from_be_bytes(r[4..8].try_into()?);
        if err != 0 {
            bail!("NBD error {err}");
        }
        read_n(&mut self.s, len as usize).await
    }

    /// Reads the whole export in 1 MiB requests (the last one clamped).
    pub async fn read_all(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.size as usize);
        while (out.len() as u64) < self.size {
            let n = (self.size - out.len() as u64).min(1 << 20);
            out.extend(self.read(out.len() as u64, n as u32).await?);
        }
        Ok(out)
    }

    /// NBD_CMD_DISC, then close.
    pub async fn disconnect(mut self) {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(&[0; 20]);
        let _ = self.s.write_all(&b).await;
        let _ = self.s.shutdown().await;
    }
}

/// A reply of the disk and metadata handlers, read until the server closed.
#[derive(Debug)]
pub struct HttpReply {
    pub status_line: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Everything after the head (a failed handler's 500 page included).
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Env {
    /// Whether some task failed with exactly this `error_info`.
    pub async fn failed_task_with(&self, error_info: &[&str]) -> bool {
        let want = Value::Array(error_info.iter().map(|&e| Value::from(e)).collect());
        for t in self.call("task.get_all", &[]).await.into_array().unwrap() {
            if self
                .call("task.get_error_info", &[t.as_str().unwrap()])
                .await
                == want
            {
                return true;
            }
        }
        false
    }

    /// `method path_and_query` over HTTPS with `body` (sent with a Content-Length).
    pub async fn http(&self, method: &str, path_and_query: &str, body: &[u8]) -> HttpReply {
        self.http_with(method, path_and_query, &[], body).await
    }

    /// Like vhd-tool: the request head, then (with a body) wait for the response head before
    /// streaming the body; then read until the server closes.
    pub async fn http_with(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpReply {
        let tcp = TcpStream::connect(self.sim.addr()).await.unwrap();
        let cfg = cbtstream_testkit::rustls_client_config(&[self.sim.cert_der().to_vec()]).unwrap();
        let mut s = TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut head = format!(
            "{method} {path_and_query} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        );
        let chunked = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"));
        if !chunked && (!body.is_empty() || method == "PUT") {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        if !body.is_empty() {
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            // The server may have answered and closed without reading the body.
            let _ = s.write_all(body).await;
            // Half-close: a body cut short then ends here, as when a client dies.
            let _ = s.shutdown().await;
        }
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let end = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&got)));
        let text = String::from_utf8(got[..end].to_vec()).unwrap();
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        HttpReply {
            status_line,
            headers,
            body: got[end + 4..].to_vec(),
        }
    }
}
