//! Malformed and hostile requests get clear refusals, never a crash.

mod common;

use cbtstream_vsphere_sim::{SimConfig, Simulator, SESSION_HEADER};
use common::Client;
use serde_json::json;

#[tokio::test]
async fn malformed_requests_are_refused_and_the_simulator_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let c = Client::new(&sim);
    let token = c.login(sim.user(), sim.password()).await;
    let h = [(SESSION_HEADER, token.as_str())];

    let r = c
        .request(
            "POST",
            "/sdk/vim25/8.0.2.0/VirtualMachine/vm-42/QueryChangedDiskAreas",
            &h,
            Some(b"{not json".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("not JSON"), "{}", r.text());

    let snap = c.snapshot(&token, "vm-42", "s").await;
    let snap_ref = json!({"type": "VirtualMachineSnapshot", "value": snap});
    for (body, property) in [
        (
            json!({"snapshot": snap_ref, "deviceKey": "2000", "startOffset": 0, "changeId": "*"}),
            "deviceKey",
        ),
        (
            json!({"snapshot": snap_ref, "deviceKey": 2000, "startOffset": -1, "changeId": "*"}),
            "startOffset",
        ),
        (
            json!({"snapshot": snap_ref, "deviceKey": 2000, "startOffset": 0}),
            "changeId",
        ),
        (
            json!({"snapshot": snap_ref, "deviceKey": 2000, "startOffset": 0, "changeId": "x/99999999999999999999999"}),
            "changeId",
        ),
        (
            json!({"snapshot": {"type": "Folder", "value": snap}, "deviceKey": 2000, "startOffset": 0, "changeId": "*"}),
            "snapshot",
        ),
        (json!([1, 2, 3]), "snapshot"),
    ] {
        let r = c
            .post(
                Some(&token),
                "VirtualMachine/vm-42/QueryChangedDiskAreas",
                body.clone(),
            )
            .await;
        assert_eq!(r.status, 500, "{body}");
        let f = r.json();
        assert_eq!(
            (f["_typeName"].as_str(), f["invalidProperty"].as_str()),
            (Some("InvalidArgument"), Some(property)),
            "{body}"
        );
    }
    let r = c
        .post(
            None,
            "SessionManager/SessionManager/Login",
            json!({"userName": 7}),
        )
        .await;
    assert_eq!(r.json()["invalidProperty"], "userName");
    let r = c
        .post(
            Some(&token),
            "VirtualMachine/vm-42/CreateSnapshotEx_Task",
            json!({"name": "q", "quiesceSpec": {"_typeName": "Bogus"}}),
        )
        .await;
    assert_eq!(r.json()["invalidProperty"], "quiesceSpec");

    // The test API: bad base64, writes past the end or overflowing, unknown disks.
    for body in [
        json!({"vm": "vm-42", "disk": 2000, "offset": 0, "data": "***"}),
        json!({"vm": "vm-42", "disk": 2000, "offset": u64::MAX, "data": "AAAA"}),
        json!({"vm": "vm-42", "disk": 2000, "offset": 4u64 << 20, "data": "AA=="}),
        json!({"vm": "vm-42", "disk": 1, "offset": 0, "data": "AA=="}),
        json!({"vm": "vm-42", "disk": 99999999999u64, "offset": 0, "data": "AA=="}),
        json!({"vm": "vm-9", "disk": 2000, "offset": 0, "data": "AA=="}),
    ] {
        let r = c.sim(&token, "write", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
    }
    assert_eq!(c.sim(&token, "no_such_call", json!({})).await.status, 404);

    // The file service serves only the disks' files, whatever the path says.
    let cookie = format!("vmware_soap_session={token}");
    let hc = [("cookie", cookie.as_str())];
    for path in [
        "/folder/../../etc/passwd?dcPath=dc1&dsName=ds1",
        "/folder/%2e%2e/%2e%2e/etc/passwd?dcPath=dc1&dsName=ds1",
        "/folder/.sim/tls/server-key.pem?dcPath=dc1&dsName=ds1",
        "/folder/testvm/testvm-flat.vmdk",
    ] {
        let r = c.request("GET", path, &hc, None).await.unwrap();
        assert!(matches!(r.status, 400 | 404), "{path}: {}", r.status);
    }
    let r = c
        .request(
            "GET",
            "/folder/testvm/testvm-flat.vmdk?dcPath=dc1&dsName=ds1",
            &[
                ("cookie", cookie.as_str()),
                ("range", "bytes=18446744073709551615-"),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 416);
    let r = c
        .request("GET", "/folder/%zz?dcPath=dc1&dsName=ds1", &hc, None)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        c.request(
            "GET",
            "/sdk/vim25/8.0.2.0/VirtualMachine/vm-42/config/extra",
            &h,
            None
        )
        .await
        .unwrap()
        .status,
        404
    );
    assert_eq!(
        c.request(
            "DELETE",
            "/sdk/vim25/8.0.2.0/VirtualMachine/vm-42/config",
            &h,
            None
        )
        .await
        .unwrap()
        .status,
        405
    );

    // Still serving.
    assert_eq!(c.remove_snapshot(&token, &snap).await["state"], "success");
}
