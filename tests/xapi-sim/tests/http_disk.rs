//! `GET /export_raw_vdi` (raw and vhd, checked by qemu-img), `PUT /import_raw_vdi` (raw,
//! plain and chunked), their authentication, status codes and tasks.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use cbtstream_proto::xmlrpc::Value;
use common::*;

const MIB: u64 = 1 << 20;

/// A disk of 9 MiB + 512 (not a multiple of 2 MiB), data in block 0 and in the partial last
/// block 4 only.
async fn mostly_empty_disk() -> (Env, u64) {
    let size = 9 * MIB + 512;
    let env = Env::start(|c| c.disk_size = size).await;
    env.write(100, b"first block").await;
    env.write(2 * MIB - 3, b"xyz").await; // the end of block 0
    env.write(size - 512, &[0xab; 512]).await; // the last sector, in block 4
    (env, size)
}

fn disk_bytes(env: &Env) -> Vec<u8> {
    std::fs::read(env.sim.vdi_path(env.sim.vdi_uuid()).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_export_is_the_whole_disk() {
    bounded(async {
        let (env, size) = mostly_empty_disk().await;
        let uuid = env.sim.vdi_uuid().to_owned();
        let r = env
            .http(
                "GET",
                &format!(
                    "/export_raw_vdi?session_id={}&vdi={uuid}&format=raw",
                    env.session
                ),
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(
            r.header("content-disposition"),
            Some(format!("attachment; filename=\"{uuid}.raw\"").as_str())
        );
        // Close-delimited: no length, no chunked encoding.
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.header("transfer-encoding"), None);
        assert_eq!(r.body.len() as u64, size);
        assert!(
            r.body == disk_bytes(&env),
            "the raw export differs from the disk"
        );
        let task = r.header("task-id").unwrap().to_owned();
        assert_eq!(
            env.call("task.get_status", &[&task]).await,
            Value::from("success")
        );
        // By ref, without format (raw is the default), with a cookie session.
        let r = env
            .http_with(
                "GET",
                &format!("/export_raw_vdi?vdi={}", env.vdi),
                &[("Cookie", &format!("session_id={}", env.session))],
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert_eq!(r.body.len() as u64, size);
        // The export does not leave the VDI attached.
        assert!(!env.sim.is_attached(&uuid));
        // A VDI without data cannot be attached: the failure follows the 200 head.
        let snap = env.snapshot(&env.vdi).await;
        env.call("VDI.data_destroy", &[&snap]).await;
        let r = env
            .http(
                "GET",
                &format!("/export_raw_vdi?session_id={}&vdi={snap}", env.session),
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert!(r.body.starts_with(b"HTTP/1.1 500 Internal Error\r\n"));
        let task = r.header("task-id").unwrap().to_owned();
        assert_eq!(
            env.call("task.get_error_info", &[&task]).await,
            Value::Array(vec![
                "VDI_INCOMPATIBLE_TYPE".into(),
                snap.as_str().into(),
                "cbt_metadata".into()
            ])
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_export_is_vhd_tools_stream_and_qemu_reads_it_back() {
    bounded(async {
        let (env, size) = mostly_empty_disk().await;
        let r = env
            .http(
                "GET",
                &format!(
                    "/export_raw_vdi?session_id={}&vdi={}&format=VHD",
                    env.session, env.vdi
                ),
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert_eq!(r.header("content-type"), Some("application/vhd"));
        let v = &r.body;
        // Footer copy, header, zeros, a 512-byte BAT (5 entries) at 2048, blocks 0 and 4
        // with their bitmaps, the footer.
        assert_eq!(v.len() as u64, 2048 + 512 + 2 * (512 + 2 * MIB) + 512);
        assert_eq!(&v[..8], b"conectix");
        assert_eq!(&v[..512], &v[v.len() - 512..]);
        assert_eq!(&v[28..32], b"caml");
        assert_eq!(u64::from_be_bytes(v[48..56].try_into().unwrap()), 10 * MIB);
        assert_eq!(&v[512..520], b"cxsparse");
        assert!(v[1536..2048].iter().all(|&b| b == 0));
        let bat: Vec<u32> = (0..5)
            .map(|i| u32::from_be_bytes(v[2048 + 4 * i..2052 + 4 * i].try_into().unwrap()))
            .collect();
        assert_eq!(bat, [5, u32::MAX, u32::MAX, u32::MAX, 5 + 4097]);
        assert!(v[2052 + 16..2560].iter().all(|&b| b == 0));
        assert!(v[2560..3072].iter().all(|&b| b == 0xff));

        // qemu's vpc driver turns it back into the disk. vhd-tool's creator `caml` makes qemu
        // size the image by CHS geometry, so it is told to use current_size, which vhd-tool
        // rounds up to whole 2 MiB blocks: the disk, then zeroes.
        let dir = tempfile::tempdir().unwrap();
        let vhd = dir.path().join("disk.vhd");
        let raw = dir.path().join("disk.raw");
        std::fs::write(&vhd, v).unwrap();
        let out = std::process::Command::new("qemu-img")
            .arg("convert")
            .arg("--image-opts")
            .arg(format!(
                "driver=vpc,force_size_calc=current_size,file.driver=file,file.filename={}",
                vhd.display()
            ))
            .args(["-O", "raw"])
            .arg(&raw)
            .output()
            .expect("qemu-img is needed (scripts/install-deps.sh installs it)");
        assert!(
            out.status.success(),
            "qemu-img: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let back = std::fs::read(&raw).unwrap();
        assert_eq!(back.len() as u64, 10 * MIB);
        assert!(
            back[..size as usize] == disk_bytes(&env),
            "qemu-img's copy differs"
        );
        assert!(back[size as usize..].iter().all(|&b| b == 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_export_of_a_whole_number_of_blocks_is_byte_identical() {
    bounded(async {
        let env = Env::start(|c| c.disk_size = 6 * MIB).await;
        env.write(4 * MIB + 7, b"third block").await;
        let r = env
            .http(
                "GET",
                &format!(
                    "/export_raw_vdi?session_id={}&vdi={}&format=vhd",
                    env.session, env.vdi
                ),
                b"",
            )
            .await;
        assert_eq!(r.body.len() as u64, 2048 + 512 + (512 + 2 * MIB) + 512);
        let dir = tempfile::tempdir().unwrap();
        let (vhd, raw) = (dir.path().join("d.vhd"), dir.path().join("d.raw"));
        std::fs::write(&vhd, &r.body).unwrap();
        let st = std::process::Command::new("qemu-img")
            .arg("convert")
            .arg("--image-opts")
            .arg(format!(
                "driver=vpc,force_size_calc=current_size,file.filename={}",
                vhd.display()
            ))
            .args(["-O", "raw"])
            .arg(&raw)
            .status()
            .expect("qemu-img is needed");
        assert!(st.success());
        assert!(std::fs::read(&raw).unwrap() == disk_bytes(&env));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_request_errors() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let vdi = env.sim.vdi_uuid().to_owned();
        for q in [
            format!("vdi={vdi}"),
            format!("session_id=OpaqueRef:nope&vdi={vdi}"),
        ] {
            let r = env.http("GET", &format!("/export_raw_vdi?{q}"), b"").await;
            assert_eq!(r.status_line, "HTTP/1.1 401 Unauthorised");
            assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"xapi\""));
            assert!(String::from_utf8_lossy(&r.body).contains("HTTP 401 unauthorised"));
            let r = env.http("PUT", &format!("/import_raw_vdi?{q}"), b"x").await;
            assert_eq!(r.status_line, "HTTP/1.1 401 Unauthorised");
        }
        // HTTP Basic with the pool's credentials works; a wrong password does not.
        use base64::Engine;
        let basic = |p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{}:{p}", env.sim.user()))
            )
        };
        let good = basic(env.sim.password());
        let r = env
            .http_with(
                "GET",
                &format!("/export_raw_vdi?vdi={vdi}"),
                &[("Authorization", &good)],
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert_eq!(r.body.len(), 4 << 20);
        let bad = basic("wrong");
        let r = env
            .http_with(
                "GET",
                &format!("/export_raw_vdi?vdi={vdi}"),
                &[("Authorization", &bad)],
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 401 Unauthorised");

        let s = &env.session;
        let r = env
            .http("GET", &format!("/export_raw_vdi?session_id={s}"), b"")
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 500 Internal Error");
        let r = env
            .http(
                "GET",
                &format!("/export_raw_vdi?session_id={s}&vdi=no-such"),
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 500 Internal Error");
        let r = env
            .http(
                "GET",
                &format!("/export_raw_vdi?session_id={s}&vdi={vdi}&format=zip"),
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 404 Not Found");
        assert!(
            env.failed_task_with(&["INTERNAL_ERROR", "Unknown format zip"])
                .await
        );
        // A handler answers one method only.
        let r = env
            .http(
                "PUT",
                &format!("/export_raw_vdi?session_id={s}&vdi={vdi}"),
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 404 Not Found");
        // XML-RPC still works on the same listener.
        env.call("VDI.get_record", &[&env.vdi]).await;
    })
    .await;
}

fn new_vdi_args(sr: &str, size: u64) -> Value {
    Value::Struct(BTreeMap::from([
        ("SR".to_owned(), Value::from(sr)),
        ("virtual_size".to_owned(), Value::int64_str(size as i64)),
        ("type".to_owned(), Value::from("user")),
        ("sharable".to_owned(), Value::Bool(false)),
        ("read_only".to_owned(), Value::Bool(false)),
        ("other_config".to_owned(), Value::Struct(BTreeMap::new())),
    ]))
}

impl Env {
    async fn new_vdi(&self, size: u64) -> (String, String) {
        let sr = self
            .call("VDI.get_SR", &[&self.vdi])
            .await
            .into_string()
            .unwrap();
        let r = self
            .call_values("VDI.create", vec![new_vdi_args(&sr, size)])
            .await
            .into_string()
            .unwrap();
        let uuid = self.uuid_of(&r).await;
        (r, uuid)
    }
}

fn chunk(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = offset.to_le_bytes().to_vec();
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_import_plain_and_chunked() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let size = 3 * MIB + 512;
        let (vdi, uuid) = env.new_vdi(size).await;
        let path = env.sim.vdi_path(&uuid).unwrap();

        // Plain: the whole disk from offset 0, the task of the client's choosing.
        let mut disk = vec![0u8; size as usize];
        disk[10..20].copy_from_slice(b"0123456789");
        disk[size as usize - 5..].copy_from_slice(b"tail!");
        let task = env
            .call("task.create", &["import", ""])
            .await
            .into_string()
            .unwrap();
        let r = env
            .http(
                "PUT",
                &format!(
                    "/import_raw_vdi?session_id={}&vdi={uuid}&format=raw&task_id={task}",
                    env.session
                ),
                &disk,
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert_eq!(r.header("task-id"), Some(task.as_str()));
        assert!(r.body.is_empty());
        assert_eq!(
            env.call("task.get_status", &[&task]).await,
            Value::from("success")
        );
        assert_eq!(
            env.call("task.get_result", &[&task]).await,
            Value::from(format!("<value>{vdi}</value>"))
        );
        assert!(std::fs::read(&path).unwrap() == disk);
        assert_eq!(env.sim.bytes_imported(), size);
        // Zeroes are not stored: the image stays sparse.
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);

        // Chunked: only the records are written, the rest keeps its content.
        let mut body = chunk(2 * MIB, &[7u8; 1024]);
        body.extend(chunk(512, &[9u8; 512]));
        body.extend([0u8; 12]);
        let r = env
            .http(
                "PUT",
                &format!(
                    "/import_raw_vdi?session_id={}&vdi={vdi}&chunked=true",
                    env.session
                ),
                &body,
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        let task = r.header("task-id").unwrap().to_owned();
        assert_eq!(
            env.call("task.get_status", &[&task]).await,
            Value::from("success")
        );
        assert_eq!(env.sim.bytes_imported(), size + 1536);
        disk[2 * MIB as usize..2 * MIB as usize + 1024].fill(7);
        disk[512..1024].fill(9);
        assert!(std::fs::read(&path).unwrap() == disk);

        // A misaligned record, a record past the end, a stream cut short: VDI_IO_ERROR in the
        // task and a 500 page after the 200 head; what came before stays written.
        for body in [
            chunk(100, &[1u8; 512]),
            chunk(size - 512, &[1u8; 1024]),
            chunk(0, &[1u8; 512])[..100].to_vec(),
        ] {
            let r = env
                .http(
                    "PUT",
                    &format!(
                        "/import_raw_vdi?session_id={}&vdi={vdi}&chunked",
                        env.session
                    ),
                    &body,
                )
                .await;
            assert_eq!(r.status_line, "HTTP/1.1 200 OK");
            assert!(
                r.body.starts_with(b"HTTP/1.1 500 Internal Error"),
                "{:?}",
                String::from_utf8_lossy(&r.body)
            );
            let task = r.header("task-id").unwrap().to_owned();
            assert_eq!(
                env.call("task.get_status", &[&task]).await,
                Value::from("failure")
            );
            assert_eq!(
                env.call("task.get_error_info", &[&task]).await,
                Value::Array(vec!["VDI_IO_ERROR".into(), "Device I/O errors".into()])
            );
        }
        assert!(std::fs::read(&path).unwrap() == disk);
        // A plain body longer than the disk.
        let r = env
            .http(
                "PUT",
                &format!("/import_raw_vdi?session_id={}&vdi={vdi}", env.session),
                &vec![1u8; size as usize + 512],
            )
            .await;
        assert!(r.body.starts_with(b"HTTP/1.1 500"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_import_refusals() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let s = env.session.clone();
        // The running VM's disk: VDI_IN_USE, nothing written.
        let r = env
            .http(
                "PUT",
                &format!("/import_raw_vdi?session_id={s}&vdi={}", env.vdi),
                &[5u8; 4096],
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert!(r.body.starts_with(b"HTTP/1.1 500 Internal Error"));
        let task = r.header("task-id").unwrap().to_owned();
        assert_eq!(
            env.call("task.get_error_info", &[&task]).await,
            Value::Array(vec![
                "VDI_IN_USE".into(),
                env.vdi.as_str().into(),
                "import_raw_vdi".into()
            ])
        );
        assert!(disk_bytes(&env).iter().all(|&b| b == 0));
        assert_eq!(env.sim.bytes_imported(), 0);

        let (vdi, _) = env.new_vdi(MIB).await;
        // HTTP chunked encoding, chunked with VHD, an unknown format: HTTP/1.0 404.
        let r = env
            .http_with(
                "PUT",
                &format!("/import_raw_vdi?session_id={s}&vdi={vdi}"),
                &[("Transfer-Encoding", "chunked")],
                b"0\r\n\r\n",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.0 404 Not Found");
        let task = r.header("task-id");
        assert_eq!(task, None);
        for (q, msg) in [
            ("chunked=false&format=vhd", "Cannot handle chunked VHD"),
            ("format=bmp", "Unknown format bmp"),
        ] {
            let r = env
                .http(
                    "PUT",
                    &format!("/import_raw_vdi?session_id={s}&vdi={vdi}&{q}"),
                    b"",
                )
                .await;
            assert_eq!(r.status_line, "HTTP/1.0 404 Not Found");
            assert!(
                env.failed_task_with(&["INTERNAL_ERROR", msg]).await,
                "{msg}"
            );
        }
        // No VDI and no SR: 400.
        let r = env
            .http("PUT", &format!("/import_raw_vdi?session_id={s}"), b"abc")
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
        // No VDI but an SR: a new "Imported VDI" of Content-Length bytes.
        let sr = env
            .call("VDI.get_SR", &[&env.vdi])
            .await
            .into_string()
            .unwrap();
        let r = env
            .http(
                "PUT",
                &format!("/import_raw_vdi?session_id={s}&sr_id={sr}"),
                &[3u8; 1536],
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        let task = r.header("task-id").unwrap().to_owned();
        let result = env
            .call("task.get_result", &[&task])
            .await
            .into_string()
            .unwrap();
        let new = result
            .trim_start_matches("<value>")
            .trim_end_matches("</value>");
        let rec = env.call("VDI.get_record", &[new]).await;
        assert_eq!(rec.get("name_label"), Some(&Value::from("Imported VDI")));
        assert_eq!(rec.get("virtual_size"), Some(&Value::from("1536")));
        let path = env
            .sim
            .vdi_path(rec.get("uuid").unwrap().as_str().unwrap())
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), vec![3u8; 1536]);
    })
    .await;
}

/// Writes `bytes` on a fresh TLS connection, half-closes, and returns whatever comes back.
async fn raw_exchange(env: &Env, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(env.sim.addr())
        .await
        .unwrap();
    let cfg = cbtstream_testkit::rustls_client_config(&[env.sim.cert_der().to_vec()]).unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out
}

/// Hostile heads, parameters and bodies: an HTTP answer or a failed task, never a panic or a
/// hung server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_breaks_the_handlers() {
    bounded(async {
        let env = Env::start(|_| {}).await;
        let s = env.session.clone();
        let (vdi, _) = env.new_vdi(MIB).await;
        let heads: Vec<Vec<u8>> = vec![
            b"\xff\xfe\r\n\r\n".to_vec(),
            b"GET /export_raw_vdi".to_vec(),
            b"GET /export_raw_vdi?vdi=%zz HTTP/1.1\r\n\r\n".to_vec(),
            vec![b'A'; 40_000],
            format!("PUT /import_raw_vdi?session_id={s}&vdi={vdi} HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\nabc").into_bytes(),
            format!("PUT /import_metadata?session_id={s}&vdi%E2%82%AC=x&vdi=&vdi:=y HTTP/1.1\r\n\r\nnot a tar").into_bytes(),
            format!("GET /export_raw_vdi?session_id={s}&vdi={vdi}&format=%00 HTTP/1.1\r\n\r\n").into_bytes(),
            b"GET /export_metadata?session_id=x HTTP/1.0\r\nAuthorization: Basic !!!\r\n\r\n".to_vec(),
        ];
        for h in &heads {
            raw_exchange(&env, h).await;
        }
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend(u32::MAX.to_le_bytes());
        let mut wrap = (u64::MAX - 511).to_le_bytes().to_vec();
        wrap.extend(1024u32.to_le_bytes());
        for body in [huge, wrap, vec![0xff; 11]] {
            let r = env
                .http("PUT", &format!("/import_raw_vdi?session_id={s}&vdi={vdi}&chunked"), &body)
                .await;
            assert!(r.body.starts_with(b"HTTP/1.1 500"));
        }
        for body in [vec![0u8; 512], vec![b'x'; 2048], vec![0xffu8; 5000]] {
            env.http("PUT", &format!("/import_metadata?session_id={s}&dry_run=true"), &body)
                .await;
        }
        let r = env
            .http("PUT", &format!("/import_raw_vdi?session_id={s}&vdi={vdi}"), b"")
            .await;
        assert!(r.body.starts_with(b"HTTP/1.1 500"), "an empty body is refused");
        assert!(env.failed_task_with(&["VDI_IO_ERROR", "Device I/O errors"]).await);
        // Every handler finished its task (a panic would leave one pending).
        for t in env.call("task.get_all", &[]).await.into_array().unwrap() {
            let status = env.call("task.get_status", &[t.as_str().unwrap()]).await;
            assert_ne!(status, Value::from("pending"));
        }
        // Still serving; the handlers were counted.
        env.call("VDI.get_record", &[&vdi]).await;
        assert!(env.sim.calls("PUT /import_raw_vdi") >= 4);
        assert!(env.sim.calls("PUT /import_metadata") >= 4);
        assert!(!env.sim.is_attached(&env.uuid_of(&vdi).await));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_import_writes_the_marked_sectors() {
    bounded(async {
        let (env, size) = mostly_empty_disk().await;
        let s = env.session.clone();
        let vhd = env
            .http(
                "GET",
                &format!("/export_raw_vdi?session_id={s}&vdi={}&format=vhd", env.vdi),
                b"",
            )
            .await
            .body;
        // Onto a VDI with other data: the blocks of the stream replace theirs, block 2 keeps
        // its own (a VHD with some blocks acts as a delta).
        let (vdi, uuid) = env.new_vdi(size).await;
        let mut old = vec![0u8; size as usize];
        old[4 * MIB as usize..4 * MIB as usize + 4].copy_from_slice(b"keep");
        old[5..9].copy_from_slice(b"gone");
        env.http(
            "PUT",
            &format!("/import_raw_vdi?session_id={s}&vdi={vdi}"),
            &old,
        )
        .await;
        let before = env.sim.bytes_imported();
        let r = env
            .http(
                "PUT",
                &format!("/import_raw_vdi?session_id={s}&vdi={uuid}&format=vhd"),
                &vhd,
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        let task = r.header("task-id").unwrap().to_owned();
        assert_eq!(
            env.call("task.get_status", &[&task]).await,
            Value::from("success"),
            "{:?}",
            env.call("task.get_error_info", &[&task]).await
        );
        // Block 0 whole, and the part of block 4 inside the disk.
        assert_eq!(env.sim.bytes_imported() - before, 2 * MIB + MIB + 512);
        let mut want = disk_bytes(&env);
        want[4 * MIB as usize..4 * MIB as usize + 4].copy_from_slice(b"keep");
        assert!(std::fs::read(env.sim.vdi_path(&uuid).unwrap()).unwrap() == want);

        // A VHD made by qemu-img (footer at both ends, BAT at 1536, creator qem2).
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("src.raw"), dir.path().join("src.vhd"));
        let mut data = vec![0u8; 6 * MIB as usize];
        data[3 * MIB as usize + 512..3 * MIB as usize + 1024].fill(0x5a);
        std::fs::write(&src, &data).unwrap();
        let st = std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=dynamic,force_size=on",
            ])
            .arg(&src)
            .arg(&out)
            .status()
            .expect("qemu-img is needed (scripts/install-deps.sh installs it)");
        assert!(st.success());
        let (vdi2, uuid2) = env.new_vdi(6 * MIB).await;
        env.write_vdi(&uuid2, 0, b"old").await;
        let r = env
            .http(
                "PUT",
                &format!("/import_raw_vdi?session_id={s}&vdi={vdi2}&format=vhd"),
                &std::fs::read(&out).unwrap(),
            )
            .await;
        let task = r.header("task-id").unwrap().to_owned();
        assert_eq!(
            env.call("task.get_status", &[&task]).await,
            Value::from("success")
        );
        let mut want = data.clone();
        want[..3].copy_from_slice(b"old");
        assert!(std::fs::read(env.sim.vdi_path(&uuid2).unwrap()).unwrap() == want);

        // Broken streams: VDI_IO_ERROR. A bad footer; a block placed before the BAT (the
        // reader cannot go back); a stream cut inside a block.
        let mut bad_cookie = vhd.clone();
        bad_cookie[0] = b'C';
        let mut backwards = vhd.clone();
        backwards[2048..2052].copy_from_slice(&1u32.to_be_bytes());
        for body in [bad_cookie, backwards, vhd[..5000].to_vec()] {
            let r = env
                .http(
                    "PUT",
                    &format!("/import_raw_vdi?session_id={s}&vdi={vdi}&format=vhd"),
                    &body,
                )
                .await;
            assert!(r.body.starts_with(b"HTTP/1.1 500"));
            let task = r.header("task-id").unwrap().to_owned();
            assert_eq!(
                env.call("task.get_error_info", &[&task]).await,
                Value::Array(vec!["VDI_IO_ERROR".into(), "Device I/O errors".into()])
            );
        }
        // A VHD needs an existing VDI.
        let sr = env
            .call("VDI.get_SR", &[&env.vdi])
            .await
            .into_string()
            .unwrap();
        let r = env
            .http(
                "PUT",
                &format!("/import_raw_vdi?session_id={s}&sr_id={sr}&format=vhd"),
                &vhd,
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.0 400 Bad Request");
        assert!(
            env.failed_task_with(&[
                "INTERNAL_ERROR",
                "Importing a VHD directly into an SR not yet supported"
            ])
            .await
        );
    })
    .await;
}
