//! The datastore file service: authentication, locks, byte ranges, keep-alive.

mod common;

use cbtstream_vsphere_sim::{SimConfig, Simulator, SESSION_HEADER};
use common::Client;
use serde_json::json;

const FLAT: &str = "/folder/testvm/testvm_1-flat.vmdk?dcPath=dc1&dsName=ds1";

#[tokio::test]
async fn ranges_of_the_frozen_flat_extent_with_the_session_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let c = Client::new(&sim);
    let token = c.login(sim.user(), sim.password()).await;
    let (key, capacity) = sim.disks()[1];
    sim.write("vm-42", key, capacity - 10, b"0123456789")
        .unwrap();
    let cookie = format!("vmware_soap_session=\"{token}\"");
    let hdr = |range: &'static str| vec![("cookie", cookie.clone()), ("range", range.to_owned())];
    let get = |h: Vec<(&'static str, String)>| {
        let c = &c;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            c.request("GET", FLAT, &h, None).await.unwrap()
        }
    };

    // No credentials: 401 and a basic challenge. The running VM locks its flat extent: 500.
    let r = c.request("GET", FLAT, &[], None).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    let r = get(hdr("bytes=0-9")).await;
    assert_eq!(r.status, 500, "{}", r.text());

    let snap = c.snapshot(&token, "vm-42", "backup").await;
    sim.write("vm-42", key, capacity - 10, b"changed!!!")
        .unwrap();
    let r = get(hdr("bytes=-10")).await;
    assert_eq!(r.status, 206);
    assert_eq!(
        r.body, b"0123456789",
        "the frozen bytes, not the later write"
    );
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes {}-{}/{capacity}", capacity - 10, capacity - 1)
    );
    let r = get(hdr("bytes=0-65535")).await;
    assert_eq!((r.status, r.body.len()), (206, 65536));
    assert!(r.body.iter().all(|&b| b == 0));
    let r = get(hdr("bytes=99999999-")).await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{capacity}")
    );
    // A large range streams whole (several 1 MiB chunks).
    let r = get(hdr("bytes=0-")).await;
    assert_eq!(r.body.len() as u64, capacity);
    assert_eq!(r.body, sim.read_snapshot(&snap, key).unwrap());

    // HEAD, the descriptor, wrong datastore or datacenter, delta links.
    let h = [("cookie", cookie.as_str())];
    let r = c.request("HEAD", FLAT, &h, None).await.unwrap();
    assert_eq!(
        (r.status, r.header("content-length")),
        (200, Some(capacity.to_string().as_str()))
    );
    let r = c
        .request(
            "GET",
            "/folder/testvm/testvm_1.vmdk?dcPath=dc1&dsName=ds1",
            &h,
            None,
        )
        .await
        .unwrap();
    assert!(
        r.text().contains("RW 8266 VMFS \"testvm_1-flat.vmdk\""),
        "{}",
        r.text()
    );
    let r = c
        .request(
            "GET",
            "/folder/testvm/testvm_1-flat.vmdk?dcPath=dc1&dsName=ds2",
            &h,
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let r = c
        .request(
            "GET",
            "/folder/testvm/testvm_1-flat.vmdk?dcPath=dc9&dsName=ds1",
            &h,
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let r = c
        .request(
            "GET",
            "/folder/testvm/testvm_1-000001.vmdk?dcPath=dc1&dsName=ds1",
            &h,
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 500, "the delta the VM writes is locked");
    // All of it over one kept-alive connection (plus the one the snapshot calls used: the same).
    assert_eq!(c.connections.load(std::sync::atomic::Ordering::SeqCst), 1);

    c.remove_snapshot(&token, &snap).await;
    assert_eq!(get(hdr("bytes=0-9")).await.status, 500, "locked again");
}

#[tokio::test]
async fn a_generic_service_ticket_opens_its_own_url_once() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let c = Client::new(&sim);
    let token = c.login(sim.user(), sim.password()).await;
    let snap = c.snapshot(&token, "vm-42", "backup").await;
    let ticket = |url: String| {
        let (c, token) = (&c, &token);
        async move {
            let r = c
                .post(
                    Some(token),
                    "SessionManager/SessionManager/AcquireGenericServiceTicket",
                    json!({"spec": {"_typeName": "SessionManagerHttpServiceRequestSpec", "method": "httpGet", "url": url}}),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let t = r.json();
            assert_eq!(t["_typeName"], "SessionManagerGenericServiceTicket");
            format!("vmware_cgi_ticket={}", t["id"].as_str().unwrap())
        }
    };
    let url = format!("{}{}", sim.url().trim_end_matches('/'), FLAT);
    let cookie = ticket(url.clone()).await;
    let h = [("cookie", cookie.as_str()), ("range", "bytes=0-3")];
    let r = c.request("GET", FLAT, &h, None).await.unwrap();
    assert_eq!(r.status, 206);
    let r = c.request("GET", FLAT, &h, None).await.unwrap();
    assert_eq!(r.status, 401, "a ticket is single use");
    // A ticket for another URL does not open this one.
    let cookie = ticket(url.replace("testvm_1", "testvm")).await;
    let r = c
        .request("GET", FLAT, &[("cookie", cookie.as_str())], None)
        .await
        .unwrap();
    assert_eq!(r.status, 401);

    // Basic auth opens a session and sets its cookie.
    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            sim.user(),
            sim.password()
        ))
    );
    let r = c
        .request(
            "GET",
            FLAT,
            &[("authorization", basic.as_str()), ("range", "bytes=0-0")],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 206);
    let set = r.header("set-cookie").unwrap();
    assert!(set.starts_with("vmware_soap_session=\""), "{set}");
    let bad = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("x:y")
    );
    let r = c
        .request("GET", FLAT, &[("authorization", bad.as_str())], None)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    // The JSON session header alone does not open the file service.
    let r = c
        .request("GET", FLAT, &[(SESSION_HEADER, token.as_str())], None)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    c.remove_snapshot(&token, &snap).await;
}

#[tokio::test]
async fn many_ranges_in_flight_over_several_connections_read_the_frozen_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let (key, capacity) = sim.disks()[1];
    let pattern: Vec<u8> = (0..capacity).map(|i| (i * 7 % 251) as u8).collect();
    sim.write("vm-42", key, 0, &pattern).unwrap();
    let c0 = Client::new(&sim);
    let token = c0.login(sim.user(), sim.password()).await;
    let snap = c0.snapshot(&token, "vm-42", "backup").await;
    sim.write("vm-42", key, 0, &vec![0xee; capacity as usize])
        .unwrap();
    let cookie = format!("vmware_soap_session={token}");
    let mut tasks = Vec::new();
    for conn in 0..4u64 {
        let client = Client::new(&sim);
        let cookie = cookie.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..16u64 {
                // Odd sizes and offsets spread over the disk, up to its last byte.
                let start = (conn * 16 + i) * (capacity / 64) + conn * 13;
                let end = (start + 40_000 + i * 997).min(capacity - 1);
                let range = format!("bytes={start}-{end}");
                let h = [("cookie", cookie.as_str()), ("range", range.as_str())];
                let r = client.request("GET", FLAT, &h, None).await.unwrap();
                assert_eq!(r.status, 206);
                got.push((start, r.body));
            }
            assert_eq!(
                client.connections.load(std::sync::atomic::Ordering::SeqCst),
                1
            );
            got
        }));
    }
    for t in tasks {
        for (start, body) in t.await.unwrap() {
            let s = start as usize;
            assert!(
                body == pattern[s..s + body.len()],
                "range at {start} differs"
            );
        }
    }
    c0.remove_snapshot(&token, &snap).await;
}
