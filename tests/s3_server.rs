//! What the repository on object storage relies on, checked with object_store's S3 client
//! against a real S3 server (s3s-fs, started by testkit::S3Server): plain and ranged reads,
//! listing by prefix, multipart uploads and their abort, conditional puts, copy, and how an
//! upload fails when the server goes away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cbtstream_testkit::{require_tools, S3Server};
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3CopyIfNotExists};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, Error, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion, WriteMultipart,
};

const MIB: usize = 1 << 20;
/// S3's smallest part (but the last).
const PART: usize = 5 * MIB;
/// How long any failing request here may take: far more than the retry settings below need.
const FAIL_WITHIN: Duration = Duration::from_secs(10);

/// Starts the server (or fails the test when s3s-fs is missing); the root is `dir`.
fn server(test: &str, dir: &tempfile::TempDir) -> Option<S3Server> {
    if !require_tools(test, &[cbtstream_testkit::s3::S3S_FS]) {
        return None;
    }
    Some(S3Server::start(dir.path()).unwrap())
}

/// A client as the repository would build one, with few, short retries so that a test
/// against a stopped server fails in well under a second instead of retrying for minutes.
fn client(server: &S3Server) -> AmazonS3 {
    builder(server).build().unwrap()
}

fn builder(server: &S3Server) -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_virtual_hosted_style_request(false)
        .with_bucket_name(server.bucket())
        .with_region(server.region())
        .with_access_key_id(server.access_key())
        .with_secret_access_key(server.secret_key())
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(100),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(2),
        })
        // with_client_options replaces all client options, an earlier with_allow_http too:
        // it comes first.
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(5)),
        )
        .with_allow_http(true)
}

/// Bytes that differ at every offset (a wrong range or part order shows).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
}

async fn read_all(store: &AmazonS3, key: &str) -> Vec<u8> {
    store
        .get(&Path::from(key))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn put_get_head_delete_and_list_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("put_get_head_delete_and_list_by_prefix", &dir) else {
        return;
    };
    let store = client(&server);
    let keys = [
        "vm1/chain-a/0001",
        "vm1/chain-a/0002",
        "vm1/chain-b/0001",
        "vm1/lock",
        "vm2/2026-11-30T03:24:48Z=a b+c",
    ];
    for key in keys {
        store
            .put(&Path::from(key), PutPayload::from(key.as_bytes().to_vec()))
            .await
            .unwrap();
    }

    assert_eq!(
        read_all(&store, "vm1/chain-a/0002").await,
        b"vm1/chain-a/0002"
    );
    assert_eq!(store.head(&Path::from("vm1/lock")).await.unwrap().size, 8);
    // The server really stored the objects where S3Server::object_path says, names as given.
    assert_eq!(server.keys().unwrap(), keys);
    let odd = "vm2/2026-11-30T03:24:48Z=a b+c";
    assert_eq!(
        std::fs::read(server.object_path(odd)).unwrap(),
        odd.as_bytes()
    );
    assert_eq!(read_all(&store, odd).await, odd.as_bytes());

    let listed = store
        .list_with_delimiter(Some(&Path::from("vm1")))
        .await
        .unwrap();
    let prefixes: Vec<String> = listed
        .common_prefixes
        .iter()
        .map(|p| p.to_string())
        .collect();
    let objects: Vec<String> = listed
        .objects
        .iter()
        .map(|o| o.location.to_string())
        .collect();
    assert_eq!(prefixes, ["vm1/chain-a", "vm1/chain-b"]);
    assert_eq!(objects, ["vm1/lock"]);

    let mut chain: Vec<String> = store
        .list(Some(&Path::from("vm1/chain-a")))
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    chain.sort();
    assert_eq!(chain, ["vm1/chain-a/0001", "vm1/chain-a/0002"]);

    store.delete(&Path::from("vm1/lock")).await.unwrap();
    let err = store.get(&Path::from("vm1/lock")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let err = store.head(&Path::from("vm1/lock")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    // Deleting what is not there succeeds, as on S3.
    store.delete(&Path::from("vm1/lock")).await.unwrap();
    assert!(!server.object_path("vm1/lock").exists());
}

#[tokio::test]
async fn ranged_reads_return_exactly_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("ranged_reads_return_exactly_the_range", &dir) else {
        return;
    };
    let store = client(&server);
    let data = pattern(100_000);
    let key = Path::from("stream");
    store
        .put(&key, PutPayload::from(data.clone()))
        .await
        .unwrap();

    assert_eq!(
        store.get_range(&key, 12_345..23_456).await.unwrap(),
        data[12_345..23_456]
    );
    for (range, want) in [
        (GetRange::Bounded(99_990..100_000), &data[99_990..]),
        (GetRange::Offset(70_000), &data[70_000..]),
        (GetRange::Suffix(17), &data[100_000 - 17..]),
    ] {
        let opts = GetOptions {
            range: Some(range.clone()),
            ..Default::default()
        };
        let got = store.get_opts(&key, opts).await.unwrap();
        assert_eq!(
            got.range,
            (100_000 - want.len() as u64)..100_000,
            "{range:?}"
        );
        assert_eq!(got.bytes().await.unwrap(), want, "{range:?}");
    }
    // A range past the end is an error, not an empty read.
    let err = store.get_range(&key, 100_000..100_010).await.unwrap_err();
    assert!(matches!(err, Error::Generic { .. }), "{err:?}");
}

#[tokio::test]
async fn multipart_upload_of_several_parts_reads_back_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server(
        "multipart_upload_of_several_parts_reads_back_byte_identical",
        &dir,
    ) else {
        return;
    };
    let store = client(&server);
    // Three full parts and a short last one.
    let data = pattern(3 * PART + 12_345);
    let key = Path::from("vm1/chain-a/0001");
    let mut upload =
        WriteMultipart::new_with_chunk_size(store.put_multipart(&key).await.unwrap(), PART);
    for chunk in data.chunks(MIB) {
        upload.write(chunk);
        upload.wait_for_capacity(2).await.unwrap();
    }
    assert_eq!(server.open_uploads().unwrap(), 1);
    upload.finish().await.unwrap();

    assert_eq!(store.head(&key).await.unwrap().size, data.len() as u64);
    assert!(read_all(&store, "vm1/chain-a/0001").await == data);
    assert_eq!(server.orphan_parts().unwrap(), 0);
    assert_eq!(server.open_uploads().unwrap(), 0);
}

#[tokio::test]
async fn aborted_multipart_upload_leaves_no_parts_and_no_object() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server(
        "aborted_multipart_upload_leaves_no_parts_and_no_object",
        &dir,
    ) else {
        return;
    };
    let store = client(&server);
    let key = Path::from("vm1/chain-a/0002");
    let mut upload = store.put_multipart(&key).await.unwrap();
    upload
        .put_part(PutPayload::from(pattern(PART)))
        .await
        .unwrap();
    upload
        .put_part(PutPayload::from(pattern(PART)))
        .await
        .unwrap();
    assert_eq!(server.orphan_parts().unwrap(), 2);
    assert_eq!(server.open_uploads().unwrap(), 1);

    upload.abort().await.unwrap();
    assert_eq!(server.orphan_parts().unwrap(), 0);
    assert_eq!(server.open_uploads().unwrap(), 0);
    let err = store.head(&key).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

/// If-None-Match: * one request after another. s3s-fs 0.14.1 checks for the object and then
/// writes it, without a lock: of concurrent creates of one name several can succeed, so a
/// test of two writers racing for a lock cannot rely on this server.
#[tokio::test]
async fn create_only_put_refuses_an_existing_object() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("create_only_put_refuses_an_existing_object", &dir) else {
        return;
    };
    let store = client(&server);
    let key = Path::from("vm1/lock");
    let create = || PutOptions::from(PutMode::Create);
    store
        .put_opts(&key, PutPayload::from_static(b"first"), create())
        .await
        .unwrap();

    let err = store
        .put_opts(&key, PutPayload::from_static(b"second"), create())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(read_all(&store, "vm1/lock").await, b"first");

    // Once deleted, the name can be created again.
    store.delete(&key).await.unwrap();
    store
        .put_opts(&key, PutPayload::from_static(b"third"), create())
        .await
        .unwrap();
    assert_eq!(read_all(&store, "vm1/lock").await, b"third");
}

#[tokio::test]
async fn update_put_needs_the_current_etag() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("update_put_needs_the_current_etag", &dir) else {
        return;
    };
    let store = client(&server);
    let key = Path::from("vm1/head");
    let first = store
        .put(&key, PutPayload::from_static(b"one"))
        .await
        .unwrap();
    let update = |e_tag: Option<String>| {
        PutOptions::from(PutMode::Update(UpdateVersion {
            e_tag,
            version: None,
        }))
    };

    let second = store
        .put_opts(
            &key,
            PutPayload::from_static(b"two"),
            update(first.e_tag.clone()),
        )
        .await
        .unwrap();
    assert_ne!(second.e_tag, first.e_tag);
    // The first ETag is stale now.
    let err = store
        .put_opts(&key, PutPayload::from_static(b"three"), update(first.e_tag))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Precondition { .. }), "{err:?}");
    assert_eq!(read_all(&store, "vm1/head").await, b"two");

    // An update of an object that does not exist fails the same way.
    let err = store
        .put_opts(
            &Path::from("vm1/none"),
            PutPayload::from_static(b"x"),
            update(second.e_tag),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Precondition { .. }), "{err:?}");
    assert!(!server.object_path("vm1/none").exists());
}

#[tokio::test]
async fn copy_makes_an_identical_object() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("copy_makes_an_identical_object", &dir) else {
        return;
    };
    let store = client(&server);
    let data = pattern(PART + 7);
    store
        .put(&Path::from("a/full"), PutPayload::from(data.clone()))
        .await
        .unwrap();
    store
        .copy(&Path::from("a/full"), &Path::from("b/full"))
        .await
        .unwrap();
    assert!(read_all(&store, "b/full").await == data);
    assert!(read_all(&store, "a/full").await == data);
}

/// Create-only copy: S3 has no native one, object_store refuses it unless configured; with
/// `S3CopyIfNotExists::Multipart` it is an UploadPartCopy completed with If-None-Match: *.
#[tokio::test]
async fn copy_if_not_exists_needs_the_multipart_setting() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("copy_if_not_exists_needs_the_multipart_setting", &dir) else {
        return;
    };
    let (from, to) = (Path::from("staging/full"), Path::from("vm1/full"));
    let plain = client(&server);
    plain
        .put(&from, PutPayload::from_static(b"new"))
        .await
        .unwrap();
    let err = plain.copy_if_not_exists(&from, &to).await.unwrap_err();
    assert!(matches!(err, Error::NotSupported { .. }), "{err:?}");

    let store = builder(&server)
        .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
        .build()
        .unwrap();
    store.copy_if_not_exists(&from, &to).await.unwrap();
    assert_eq!(read_all(&store, "vm1/full").await, b"new");
    store
        .put(&from, PutPayload::from_static(b"newer"))
        .await
        .unwrap();
    let err = store.copy_if_not_exists(&from, &to).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(read_all(&store, "vm1/full").await, b"new");
    // The refused copy's upload was aborted.
    assert_eq!(server.open_uploads().unwrap(), 0);
    assert_eq!(server.orphan_parts().unwrap(), 0);
}

#[tokio::test]
async fn bad_secret_and_missing_bucket_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("bad_secret_and_missing_bucket_give_clear_errors", &dir) else {
        return;
    };
    let wrong = builder(&server)
        .with_secret_access_key("not-the-secret")
        .build()
        .unwrap();
    let err = wrong
        .put(&Path::from("x"), PutPayload::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("SignatureDoesNotMatch"), "{err}");
    assert!(!server.object_path("x").exists());
    // Neither the error nor the built store shows a secret. (AmazonS3Builder's derived
    // Debug does: it must never be logged.)
    assert!(
        !format!("{err} {err:?}").contains("not-the-secret"),
        "{err:?}"
    );
    assert!(!format!("{wrong:?}").contains("not-the-secret"));
    assert!(!format!("{:?}", client(&server)).contains(server.secret_key()));

    let other = builder(&server)
        .with_bucket_name("no-such-bucket")
        .build()
        .unwrap();
    let err = other.head(&Path::from("x")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

/// The variables of `env()` are what a child process's `AmazonS3Builder::from_env()` reads:
/// applied the way from_env applies them, they reach the server.
#[tokio::test]
async fn env_variables_configure_a_working_client() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("env_variables_configure_a_working_client", &dir) else {
        return;
    };
    let mut b = AmazonS3Builder::new().with_bucket_name(server.bucket());
    for (key, value) in server.env() {
        b = b.with_config(key.to_ascii_lowercase().parse().unwrap(), value);
    }
    let store = b.build().unwrap();
    store
        .put(&Path::from("from-env"), PutPayload::from_static(b"ok"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(server.object_path("from-env")).unwrap(),
        b"ok"
    );
}

#[test]
fn apply_env_leaves_a_child_only_the_servers_aws_variables() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server(
        "apply_env_leaves_a_child_only_the_servers_aws_variables",
        &dir,
    ) else {
        return;
    };
    let mut cmd = std::process::Command::new("env");
    cmd.env("AWS_SESSION_TOKEN", "someone-elses")
        .env("KEPT", "1");
    server.apply_env(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    let mut aws: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("AWS_") || l.starts_with("KEPT="))
        .map(str::to_string)
        .collect();
    aws.sort();
    let endpoint = format!("AWS_ENDPOINT_URL={}", server.endpoint());
    let want = [
        "AWS_ACCESS_KEY_ID=cbtstream-test-access",
        "AWS_ALLOW_HTTP=true",
        &endpoint,
        "AWS_REGION=us-east-1",
        "AWS_SECRET_ACCESS_KEY=cbtstream-test-secret",
        "KEPT=1",
    ];
    assert_eq!(aws, want);
}

#[tokio::test]
async fn upload_to_a_stopped_server_fails_fast_and_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut server) = server(
        "upload_to_a_stopped_server_fails_fast_and_resumes_after_restart",
        &dir,
    ) else {
        return;
    };
    let store = client(&server);
    store
        .put(&Path::from("before"), PutPayload::from_static(b"kept"))
        .await
        .unwrap();
    let mut upload = store.put_multipart(&Path::from("big")).await.unwrap();
    upload
        .put_part(PutPayload::from(pattern(PART)))
        .await
        .unwrap();

    server.stop().unwrap();
    let started = Instant::now();
    let err = upload
        .put_part(PutPayload::from(pattern(PART)))
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("put_part to a stopped server failed after {took:?}: {err}");
    assert!(matches!(err, Error::Generic { store: "S3", .. }), "{err:?}");
    assert!(took < FAIL_WITHIN, "{took:?}");

    // Same port, same data: the object and the part from before the stop are there, and the
    // upload can still be aborted.
    server.restart().unwrap();
    assert_eq!(read_all(&store, "before").await, b"kept");
    assert_eq!(server.orphan_parts().unwrap(), 1);
    upload.abort().await.unwrap();
    assert_eq!(server.orphan_parts().unwrap(), 0);
    assert_eq!(server.open_uploads().unwrap(), 0);
}

/// The server is killed while a part is on its way (it has begun writing the part): the
/// request fails within the retry bounds rather than hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_in_flight_when_the_server_is_killed_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server(
        "upload_in_flight_when_the_server_is_killed_fails_fast",
        &dir,
    ) else {
        return;
    };
    let server = Arc::new(std::sync::Mutex::new(server));
    let store = client(&server.lock().unwrap());
    let mut upload = store.put_multipart(&Path::from("big")).await.unwrap();
    let started = Instant::now();
    let part = upload.put_part(PutPayload::from(pattern(64 * MIB)));
    let killer = {
        let server = server.clone();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || {
            // s3s-fs writes a part into ROOT/.tmp.N.internal.part before renaming it.
            let deadline = Instant::now() + FAIL_WITHIN;
            while Instant::now() < deadline {
                let writing = std::fs::read_dir(&root).unwrap().any(|e| {
                    e.unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(".tmp.")
                });
                if writing {
                    server.lock().unwrap().stop().unwrap();
                    return true;
                }
                std::thread::yield_now();
            }
            false
        })
    };
    let result = part.await;
    let took = started.elapsed();
    assert!(
        killer.join().unwrap(),
        "the server never began writing the part"
    );
    let err = result.unwrap_err();
    eprintln!("put_part in flight when the server was killed failed after {took:?}: {err}");
    assert!(matches!(err, Error::Generic { store: "S3", .. }), "{err:?}");
    assert!(took < FAIL_WITHIN, "{took:?}");

    // After a restart the upload is still open, without the part that was cut off, and its
    // abort is what cleans it up.
    let mut server = Arc::into_inner(server).unwrap().into_inner().unwrap();
    server.restart().unwrap();
    assert_eq!(server.orphan_parts().unwrap(), 0);
    assert_eq!(server.open_uploads().unwrap(), 1);
    upload.abort().await.unwrap();
    assert_eq!(server.open_uploads().unwrap(), 0);
    assert_eq!(server.keys().unwrap(), Vec::<String>::new());
}

/// More objects than one ListObjectsV2 page (1,000) under a prefix: the client pages through
/// all of them. The objects are made as files in the bucket directory, which s3s-fs serves.
#[tokio::test]
async fn listing_pages_past_a_thousand_objects() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("listing_pages_past_a_thousand_objects", &dir) else {
        return;
    };
    let store = client(&server);
    std::fs::create_dir_all(server.object_path("vm1/chain-a")).unwrap();
    let mut want: Vec<String> = (0..1234).map(|i| format!("vm1/chain-a/{i:05}")).collect();
    for key in &want {
        std::fs::write(server.object_path(key), key).unwrap();
    }
    std::fs::write(server.object_path("vm1/other"), "x").unwrap();

    let mut listed: Vec<String> = store
        .list(Some(&Path::from("vm1/chain-a")))
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(listed, want);
    assert_eq!(
        read_all(&store, "vm1/chain-a/01233").await,
        b"vm1/chain-a/01233"
    );
    want.push("vm1/other".to_string());
    assert_eq!(server.keys().unwrap(), want);
}

/// A server that accepts connections but never answers (SIGSTOP): requests fail once the
/// client's timeout is up, and work again once the server goes on.
#[tokio::test]
async fn hung_server_fails_requests_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server("hung_server_fails_requests_at_the_timeout", &dir) else {
        return;
    };
    let store = builder(&server)
        .with_client_options(ClientOptions::new().with_timeout(Duration::from_secs(1)))
        .with_allow_http(true)
        .build()
        .unwrap();
    server.pause().unwrap();
    let started = Instant::now();
    let err = store
        .put(&Path::from("x"), PutPayload::from_static(b"x"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("put to a hung server failed after {took:?}: {err}");
    assert!(matches!(err, Error::Generic { store: "S3", .. }), "{err:?}");
    assert!(took < FAIL_WITHIN, "{took:?}");

    server.resume().unwrap();
    store
        .put(&Path::from("x"), PutPayload::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(read_all(&store, "x").await, b"after");
}
