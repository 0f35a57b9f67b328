//! `--nbd-server qemu-nbd|nbdkit`: `VDI.get_nbd_info` hands out a real NBD server process,
//! which nbdcopy (libnbd) reads with the name and certificate from `get_nbd_info`.

mod common;

use std::time::{Duration, Instant};

use cbtstream_xapi_sim::NbdServerChoice;
use common::*;

async fn copy_with_nbdcopy(choice: NbdServerChoice, tool: &str) {
    let test = format!("real_nbd_server_{}", choice.as_str());
    if !cbtstream_testkit::require_tools(&test, &[tool, "nbdcopy"]) {
        return;
    }
    bounded(async {
        let env = Env::start(|c| c.nbd_server = choice).await;
        env.write(70_000, b"seen through a real server").await;
        let s = env.snapshot(&env.vdi).await;
        let info = env.call("VDI.get_nbd_info", &[&s]).await;
        let rec = &info.as_array().unwrap()[0];
        assert_eq!(rec.get("address").unwrap().as_str(), Some("127.0.0.1"));
        assert_eq!(rec.get("subject").unwrap().as_str(), Some("localhost"));
        let cert = rec.get("cert").unwrap().as_str().unwrap().to_owned();
        let (port, name) = env.nbd_info(&s).await;
        assert_ne!(
            port,
            env.sim.nbd_port(),
            "the built-in server was handed out"
        );
        // The second call reuses the running process.
        assert_eq!(env.nbd_info(&s).await, (port, name));
        let expected_cert = match choice {
            NbdServerChoice::QemuNbd => {
                std::fs::read_to_string(env.sim.nbd_tls_dir().join("server-cert.pem")).unwrap()
            }
            _ => env.sim.cert_pem().to_owned(),
        };
        assert_eq!(cert, expected_cert);

        let copy = env.nbdcopy_snapshot(&s).await;
        assert_eq!(&copy[70_000..70_026], b"seen through a real server");

        // A real server never reports the VDI attached; data_destroy stops its process.
        assert!(!env.sim.is_attached(&env.uuid_of(&s).await));
        env.call("VDI.data_destroy", &[&s]).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            assert!(
                Instant::now() < deadline,
                "the server still listens after data_destroy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_serves_the_snapshot() {
    copy_with_nbdcopy(NbdServerChoice::QemuNbd, "qemu-nbd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_serves_the_snapshot() {
    copy_with_nbdcopy(NbdServerChoice::NbdKit, "nbdkit").await;
}
