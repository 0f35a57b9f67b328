//! `cbtstream merge`: a full stream and ten incrementals made into one synthetic full. Streams
//! are made with the encoder of cbtstream-proto (records of odd sizes that overlap each other's
//! ranges in every way, DATA zstd and raw, ZERO, a disk that grows once); the real binary
//! merges and restores them.

mod common;

use cbtstream_proto::stream::{checksum, Codec, Encoder, Header};
use cbtstream_testkit::images::Prng;
use common::{assert_fails, assert_nothing_written, assert_same, code, json_summary, ok, p, run};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
const FIRST_SIZE: u64 = 6 * MIB;
/// The disk grows to this at incremental 5 (not a multiple of anything).
const GROWN_SIZE: u64 = 7 * MIB + 12_345;
const INCREMENTALS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Zstd,
    Raw,
    Zero,
}

#[derive(Clone, Copy, Debug)]
struct Rec {
    offset: u64,
    length: u64,
    kind: Kind,
}

/// Compressible but not trivial bytes.
fn data(rng: &mut Prng, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    let mut i = 0;
    while i < v.len() {
        let run = (rng.range_inclusive(1, 64) as usize).min(v.len() - i);
        let byte = rng.next_u64() as u8;
        v[i..i + run].fill(byte);
        i += run;
    }
    v
}

/// Writes a stream of `recs` over `image` (the disk at this point) and applies them to it.
fn write_stream(path: &Path, header: &Header, recs: &[Rec], image: &mut Vec<u8>, rng: &mut Prng) {
    image.resize(header.virtual_size as usize, 0);
    let (mut enc, mut out) = Encoder::new(header).unwrap();
    for r in recs {
        let range = r.offset as usize..(r.offset + r.length) as usize;
        if r.kind == Kind::Zero {
            image[range].fill(0);
            out.extend(enc.zero(r.offset, r.length).unwrap());
            continue;
        }
        let bytes = data(rng, r.length);
        image[range].copy_from_slice(&bytes);
        let (codec, payload) = match r.kind {
            Kind::Zstd => (Codec::Zstd, zstd::bulk::compress(&bytes, 1).unwrap()),
            _ => (Codec::None, bytes.clone()),
        };
        let h = enc
            .data(r.offset, r.length, codec, checksum(&bytes), &payload)
            .unwrap();
        out.extend(h);
        out.extend(payload);
    }
    out.extend(enc.finish());
    fs::write(path, out).unwrap();
}

fn header(size: u64, point: usize) -> Header {
    Header {
        virtual_size: size,
        block_size: 65536,
        source_id: "vdi-1".into(),
        point_id: format!("p{point}"),
        incremental: point > 0,
        base_id: (point > 0).then(|| format!("p{}", point - 1)),
        created_unix_secs: 1_700_000_000 + point as u64,
        codec: Codec::Zstd,
    }
}

/// Random non-overlapping records in `[0, size)` of odd sizes from 1 byte to 1.5 MiB.
fn random_records(rng: &mut Prng, size: u64) -> Vec<Rec> {
    let mut recs = Vec::new();
    let mut pos = rng.below(MIB / 2);
    while pos < size {
        let length = match rng.below(4) {
            0 => rng.range_inclusive(1, 4096),
            1 => rng.range_inclusive(4097, 300_000),
            _ => rng.range_inclusive(300_001, 3 * MIB / 2),
        }
        .min(size - pos);
        let kind = match rng.below(6) {
            0 => Kind::Zero,
            1 => Kind::Raw,
            _ => Kind::Zstd,
        };
        recs.push(Rec {
            offset: pos,
            length,
            kind,
        });
        pos += length + rng.below(MIB);
    }
    recs
}

struct Chain {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    streams: Vec<PathBuf>,
    records: Vec<Vec<Rec>>,
    /// The disk at the last point.
    image: Vec<u8>,
}

/// A full stream of 1 MiB records (with a ZERO record and a gap), then ten incrementals.
fn chain(seed: u64) -> Chain {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut rng = Prng::new(seed);
    let mut image = Vec::new();
    let mut full: Vec<Rec> = (0..FIRST_SIZE / MIB)
        .filter(|&i| i != 4) // a gap: unallocated, reads as zeroes
        .map(|i| Rec {
            offset: i * MIB,
            length: MIB,
            kind: if i % 3 == 2 { Kind::Raw } else { Kind::Zstd },
        })
        .collect();
    full[1].kind = Kind::Zero;
    let mut streams = Vec::new();
    let mut records = Vec::new();
    for point in 0..=INCREMENTALS {
        let size = if point >= 5 { GROWN_SIZE } else { FIRST_SIZE };
        let recs = if point == 0 {
            full.clone()
        } else {
            random_records(&mut rng, size)
        };
        let path = dir.join(format!("p{point}.cbts"));
        write_stream(&path, &header(size, point), &recs, &mut image, &mut rng);
        streams.push(path);
        records.push(recs);
    }
    Chain {
        _tmp: tmp,
        dir,
        streams,
        records,
        image,
    }
}

/// Bytes of `[offset, offset + length)` that records of newer streams cover.
fn covered(newer: &[Vec<Rec>], r: &Rec) -> u64 {
    let mut ranges: Vec<(u64, u64)> = newer
        .iter()
        .flatten()
        .map(|n| {
            (
                n.offset.max(r.offset),
                (n.offset + n.length).min(r.offset + r.length),
            )
        })
        .filter(|(a, b)| a < b)
        .collect();
    ranges.sort();
    let (mut total, mut end) = (0, 0);
    for (a, b) in ranges {
        let a = a.max(end);
        if b > a {
            total += b - a;
            end = b;
        }
    }
    total
}

/// (DATA records covered in part, ZERO records covered in part, records covered whole,
/// records not covered at all) over the whole chain.
fn expected_counts(records: &[Vec<Rec>]) -> (u64, u64, u64, u64) {
    let (mut data_cut, mut zero_cut, mut dropped, mut copied) = (0, 0, 0, 0);
    for (i, recs) in records.iter().enumerate() {
        for r in recs {
            match covered(&records[i + 1..], r) {
                0 => copied += 1,
                c if c == r.length => dropped += 1,
                _ if r.kind == Kind::Zero => zero_cut += 1,
                _ => data_cut += 1,
            }
        }
    }
    (data_cut, zero_cut, dropped, copied)
}

fn args<'a>(first: &'a str, streams: &'a [PathBuf], rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![first];
    v.extend(streams.iter().map(|s| p(s)));
    v.extend_from_slice(rest);
    v
}

fn merge(streams: &[PathBuf], out: &Path) -> std::process::Output {
    run(&args("merge", streams, &["-o", p(out), "--json"]))
}

#[test]
fn merge_equals_restore_of_the_chain_and_copies_what_no_newer_record_touches() {
    let c = chain(11);
    let merged = c.dir.join("merged.cbts");
    let o = ok(merge(&c.streams, &merged));
    let summary = json_summary(&o);

    // The merged stream restores to the same image as the whole chain, and to the model.
    let from_chain = c.dir.join("chain.img");
    ok(run(&args("restore", &c.streams, &["--to", p(&from_chain)])));
    let from_merged = c.dir.join("merged.img");
    ok(run(&["restore", "--to", p(&from_merged), p(&merged)]));
    assert_same(&from_chain, &from_merged);
    assert_eq!(fs::read(&from_merged).unwrap(), c.image);

    let inspected = ok(run(&["inspect", p(&merged)]));
    let report = String::from_utf8_lossy(&inspected.stdout);
    assert!(
        report.contains("base id:       none (full export)"),
        "{report}"
    );
    assert!(report.contains("point id:      p10"), "{report}");
    assert_eq!(
        fs::metadata(&merged).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (data_cut, zero_cut, dropped, copied) = expected_counts(&c.records);
    assert!(
        data_cut > 5 && dropped > 0 && copied > 5,
        "a weak chain: {data_cut} {dropped} {copied}"
    );
    assert_eq!(summary["records_recompressed"], data_cut, "{summary}");
    assert_eq!(summary["zero_records_cut"], zero_cut, "{summary}");
    assert_eq!(summary["records_dropped"], dropped, "{summary}");
    assert_eq!(summary["records_copied"], copied, "{summary}");
    let inputs: u64 = c
        .streams
        .iter()
        .map(|s| fs::metadata(s).unwrap().len())
        .sum();
    assert_eq!(summary["bytes_in"], inputs);
    assert_eq!(summary["bytes_out"], fs::metadata(&merged).unwrap().len());

    // Same inputs, same bytes.
    let again = c.dir.join("again.cbts");
    ok(merge(&c.streams, &again));
    assert_same(&merged, &again);
}

#[test]
fn a_merged_stream_piped_to_stdout_restores() {
    let c = chain(12);
    let mut merge = Command::new(common::BIN)
        .args(args("merge", &c.streams, &["-o", "-"]))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let image = c.dir.join("piped.img");
    let restored = Command::new(common::BIN)
        .args(["restore", "--to", p(&image), "-"])
        .stdin(merge.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(merge.wait().unwrap().success());
    assert!(restored.status.success(), "{}", common::stderr(&restored));
    assert_eq!(fs::read(&image).unwrap(), c.image);
}

#[test]
fn a_damaged_incremental_fails_with_exit_4_and_leaves_no_output() {
    let c = chain(13);
    // One byte near the end of incremental 3: its digest (at least) no longer matches, found
    // only after much of the merged stream was written.
    let damaged = &c.streams[3];
    let mut bytes = fs::read(damaged).unwrap();
    let at = bytes.len() - 200;
    bytes[at] ^= 0x40;
    fs::write(damaged, bytes).unwrap();
    let out = c.dir.join("merged.cbts");
    let o = merge(&c.streams, &out);
    assert_fails(&o, 4, "p3.cbts");
    assert_nothing_written(&out);
}

#[test]
fn a_broken_chain_fails_with_exit_4_before_writing() {
    let c = chain(14);
    let out = c.dir.join("merged.cbts");
    let missing_one: Vec<PathBuf> = [&c.streams[..4], &c.streams[5..]].concat();
    let o = merge(&missing_one, &out);
    assert_fails(&o, 4, "p5.cbts does not follow on: its base is point `p4`");
    assert_nothing_written(&out);

    let o = merge(&c.streams[1..], &out);
    assert_fails(&o, 4, "merge starts from a full stream");
    assert_nothing_written(&out);

    let two_fulls = [c.streams[0].clone(), c.streams[0].clone()];
    let o = merge(&two_fulls, &out);
    assert_fails(&o, 4, "it is a full stream");
    assert_eq!(code(&o), 4);
    assert_nothing_written(&out);
}

#[test]
fn a_record_newer_ones_cover_whole_is_still_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write = |name: &str, header: &Header, bad_checksum: bool| {
        let bytes = vec![7u8; MIB as usize];
        let payload = zstd::bulk::compress(&bytes, 1).unwrap();
        let sum = checksum(&bytes) ^ u64::from(bad_checksum);
        let (mut enc, mut out) = Encoder::new(header).unwrap();
        out.extend(enc.data(0, MIB, Codec::Zstd, sum, &payload).unwrap());
        out.extend(payload);
        out.extend(enc.finish());
        let path = dir.join(name);
        fs::write(&path, out).unwrap();
        path
    };
    // The full stream's only record has a wrong checksum (its digest is right: it was
    // written that way); the incremental replaces all of it, so nothing of it is written.
    let streams = [
        write("p0.cbts", &header(MIB, 0), true),
        write("p1.cbts", &header(MIB, 1), false),
    ];
    let out = dir.join("merged.cbts");
    let o = merge(&streams, &out);
    assert_fails(&o, 4, "p0.cbts: record 0");
    assert_nothing_written(&out);
}

#[test]
fn an_output_that_cannot_be_created_fails_with_exit_5() {
    let c = chain(15);
    let out = c.dir.join("no-such-dir").join("merged.cbts");
    let o = merge(&c.streams, &out);
    assert_fails(&o, 5, "no-such-dir");
    assert_nothing_written(&out);
}

#[test]
fn a_disk_that_shrank_and_grew_again_reads_as_zeroes_where_it_was_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Prng::new(16);
    let mut image = Vec::new();
    let rec = |offset, length| Rec {
        offset,
        length,
        kind: Kind::Zstd,
    };
    let points: [(u64, Vec<Rec>); 3] = [
        (4 * MIB, (0..4).map(|i| rec(i * MIB, MIB)).collect()),
        // Shrinks into the middle of record 2 of the full stream.
        (2 * MIB + 777, vec![rec(1000, 5000)]),
        // Grows again; one record where the full stream's data was.
        (5 * MIB, vec![rec(3 * MIB + 10, 1000)]),
    ];
    let mut streams = Vec::new();
    for (point, (size, recs)) in points.iter().enumerate() {
        let path = dir.join(format!("p{point}.cbts"));
        write_stream(&path, &header(*size, point), recs, &mut image, &mut rng);
        streams.push(path);
    }
    let merged = dir.join("merged.cbts");
    let summary = json_summary(&ok(merge(&streams, &merged)));
    let from_chain = dir.join("chain.img");
    ok(run(&args("restore", &streams, &["--to", p(&from_chain)])));
    let from_merged = dir.join("merged.img");
    ok(run(&["restore", "--to", p(&from_merged), p(&merged)]));
    assert_same(&from_chain, &from_merged);
    // Full records 0 and 2 are cut (by p1's record and by the shrink), 3 is cut off whole.
    assert_eq!(summary["records_recompressed"], 2, "{summary}");
    assert_eq!(summary["records_dropped"], 1, "{summary}");
}
