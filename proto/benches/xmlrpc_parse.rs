//! Parse time of the largest XenAPI response we expect: `VDI.list_changed_blocks` for a
//! 3 TiB disk (a 6 MiB bitmap, 8 MiB of base64 in one string). Plain `harness = false` bench:
//! `cargo bench -p cbtstream-proto --bench xmlrpc_parse` prints median times over 21 runs.

use cbtstream_proto::{cbt, xmlrpc};
use std::hint::black_box;
use std::time::{Duration, Instant};

const RUNS: usize = 21;

fn median(mut f: impl FnMut()) -> Duration {
    f(); // warm-up
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

fn report(what: &str, bytes: usize, d: Duration) {
    let mbs = bytes as f64 / d.as_secs_f64() / 1e6;
    println!(
        "{what:<58} {:>8.2} ms  ({mbs:>6.0} MB/s)",
        d.as_secs_f64() * 1e3
    );
}

fn main() {
    // 3 TiB / 64 KiB = 48 Mi blocks = 6 MiB of bitmap; about 1 block in 50 changed, in runs.
    let disk: u64 = 3 << 40;
    let mut bitmap = vec![0u8; cbt::blocks_for(disk).div_ceil(8) as usize];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in bitmap.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 50 == 0 {
            *b = (x >> 8) as u8;
        }
    }
    let text = cbt::encode_base64(&bitmap);
    let doc = xmlrpc::encode_xenapi_success(&xmlrpc::Value::String(text.clone()));
    println!(
        "list_changed_blocks response for a 3 TiB disk: {} bytes of bitmap, {} bytes of base64, {} bytes of XML",
        bitmap.len(),
        text.len(),
        doc.len()
    );

    // Sanity check once, outside the timing.
    let v = xmlrpc::decode_xenapi(doc.as_bytes()).expect("decodes");
    assert_eq!(v.as_str(), Some(text.as_str()));

    let d = median(|| {
        black_box(xmlrpc::decode_xenapi(black_box(doc.as_bytes())).ok());
    });
    report(
        "decode_xenapi (parse + envelope, string copied out)",
        doc.len(),
        d,
    );

    let d = median(|| {
        let v = xmlrpc::decode_xenapi(black_box(doc.as_bytes())).ok();
        let s = v.and_then(xmlrpc::Value::into_string).unwrap_or_default();
        black_box(cbt::decode_base64(s.as_bytes()).ok());
    });
    report("decode_xenapi + base64 decode of the bitmap", doc.len(), d);

    let d = median(|| {
        black_box(xmlrpc::encode_xenapi_success(black_box(&v)));
    });
    report("encode_xenapi_success (simulator side)", doc.len(), d);

    // For comparison: many small values, like VM.get_all_records of a big pool (~8 MB).
    let records: Vec<xmlrpc::Value> = (0..4_000)
        .map(|i| {
            xmlrpc::Value::record((0..20).map(|f| {
                (
                    format!("field_{f}"),
                    match f % 4 {
                        0 => xmlrpc::Value::String(format!(
                            "OpaqueRef:{i:08x}-{f:04x}-4000-8000-000000000000"
                        )),
                        1 => xmlrpc::Value::int64_str(i * 1_000_003 + f),
                        2 => xmlrpc::Value::Bool(f % 3 == 0),
                        _ => {
                            xmlrpc::Value::Array(vec![xmlrpc::Value::String("a &amp; b".into()); 2])
                        }
                    },
                )
            }))
        })
        .collect();
    let doc = xmlrpc::encode_xenapi_success(&xmlrpc::Value::Array(records));
    let d = median(|| {
        black_box(xmlrpc::decode_xenapi(black_box(doc.as_bytes())).ok());
    });
    report(
        &format!(
            "decode_xenapi, 4000 records x 20 fields ({} bytes)",
            doc.len()
        ),
        doc.len(),
        d,
    );
}
