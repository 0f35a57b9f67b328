//! Restore of whole chains: in one call, one stream at a time, refused chains, damage.

use super::testutil::*;
use super::*;
use cbtstream_proto::stream::{checksum, Codec, Encoder, Header, MAX_RECORD_LEN};
use std::fs;

fn sidecar_text(image: &Path) -> String {
    fs::read_to_string(sidecar_path(image)).unwrap()
}

#[test]
fn restore_full_and_two_incrementals_in_one_go() {
    let c = chain();
    let img = c.dir.path().join("disk.raw");
    let r = restore(&img, &c.streams).unwrap();
    assert_eq!(fs::read(&img).unwrap(), c.disks[2]);
    assert_eq!(r.streams, 3);
    assert_eq!(r.full_streams, 1);
    assert_eq!(r.point_id, "p2");
    assert_eq!(r.virtual_size, c.disks[2].len() as u64);
    assert!(r.to_string().contains("to point p2"), "{r}");
    let state = image_state(&img).unwrap().unwrap();
    assert_eq!(state.status, ImageStatus::Complete);
    assert_eq!(state.point_id, "p2");
    assert_eq!(state.base_id.as_deref(), Some("p1"));
    assert_eq!(state.virtual_size, 80 * BLOCK as u64);
    assert!(sidecar_text(&img).starts_with("cbtstream-image 1\nstate=complete\n"));
}

#[test]
fn restore_one_stream_at_a_time_and_shrink() {
    let c = chain();
    let img = c.dir.path().join("disk.raw");
    for (i, s) in c.streams.iter().enumerate() {
        restore(&img, std::slice::from_ref(s)).unwrap();
        assert_eq!(fs::read(&img).unwrap(), c.disks[i], "after stream {i}");
    }
    // An incremental that shrinks the disk to 10 blocks and zeroes one that had data.
    let mut d3 = c.disks[2][..10 * BLOCK].to_vec();
    d3[3 * BLOCK..4 * BLOCK].fill(0);
    d3[4 * BLOCK] = 7;
    let s3 = c.dir.path().join("s3.cbt");
    fs::write(&s3, export(&d3, "p3", Some("p2"), &[3, 4])).unwrap();
    restore(&img, &[s3]).unwrap();
    assert_eq!(fs::read(&img).unwrap(), d3);
    // A full stream over an existing image replaces it.
    restore(&img, &c.streams[..1]).unwrap();
    assert_eq!(fs::read(&img).unwrap(), c.disks[0]);
}

#[test]
fn chain_mismatch_is_refused_before_writing() {
    let c = chain();
    let img = c.dir.path().join("disk.raw");
    // full then the second incremental: p0 -> (p1 missing) -> p2.
    let e = restore(&img, &[c.streams[0].clone(), c.streams[2].clone()]).unwrap_err();
    assert!(matches!(e, RestoreError::ChainMismatch { .. }), "{e}");
    assert!(e.to_string().contains("its base is point `p1`"), "{e}");
    assert!(!is_damaged(&e));
    assert!(!img.exists(), "nothing may be written on a chain mismatch");
    assert!(!sidecar_path(&img).exists());

    // Against the image's recorded state.
    restore(&img, &c.streams[..1]).unwrap();
    let e = restore(&img, &c.streams[2..]).unwrap_err();
    assert!(matches!(e, RestoreError::ChainMismatch { .. }), "{e}");
    assert!(e.to_string().contains("is at point `p0`"), "{e}");
    assert_eq!(fs::read(&img).unwrap(), c.disks[0]);
    // Applying the same incremental twice is a mismatch too.
    restore(&img, &c.streams[1..2]).unwrap();
    let e = restore(&img, &c.streams[1..2]).unwrap_err();
    assert!(matches!(e, RestoreError::ChainMismatch { .. }), "{e}");
    assert_eq!(fs::read(&img).unwrap(), c.disks[1]);
}

#[test]
fn incremental_needs_an_image_with_a_complete_sidecar() {
    let c = chain();
    let img = c.dir.path().join("disk.raw");
    let e = restore(&img, &c.streams[1..2]).unwrap_err();
    assert!(matches!(e, RestoreError::MissingImage { .. }), "{e}");
    fs::write(&img, &c.disks[0]).unwrap();
    let e = restore(&img, &c.streams[1..2]).unwrap_err();
    assert!(matches!(e, RestoreError::IncompleteImage { .. }), "{e}");
    assert!(e.to_string().contains("no sidecar"), "{e}");
    fs::write(sidecar_path(&img), "garbage").unwrap();
    let e = restore(&img, &c.streams[1..2]).unwrap_err();
    assert!(matches!(e, RestoreError::IncompleteImage { .. }), "{e}");
    // A complete sidecar whose size disagrees with the image.
    restore(&img, &c.streams[..1]).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1)
        .unwrap();
    let e = restore(&img, &c.streams[1..2]).unwrap_err();
    assert!(e.to_string().contains("differs"), "{e}");
}

#[test]
fn truncated_stream_leaves_image_applying_and_blocks_incrementals() {
    let c = chain();
    let img = c.dir.path().join("disk.raw");
    restore(&img, &c.streams[..1]).unwrap();
    let good = fs::read(&c.streams[1]).unwrap();
    let cut = c.dir.path().join("cut.cbt");
    // Cut inside the trailer: every record is applied, the stream is still refused.
    fs::write(&cut, &good[..good.len() - 5]).unwrap();
    let e = restore(&img, std::slice::from_ref(&cut)).unwrap_err();
    assert!(is_damaged(&e), "{e}");
    assert!(
        matches!(&e, RestoreError::Damaged { error, .. } if error.is_truncation()),
        "{e}"
    );
    assert!(e.to_string().contains("stream truncated"), "{e}");
    assert!(sidecar_text(&img).contains("state=applying\npoint_id=p1\n"));
    // The good incremental cannot go on top of a half-applied image.
    let e = restore(&img, &c.streams[1..2]).unwrap_err();
    assert!(matches!(e, RestoreError::IncompleteImage { .. }), "{e}");
    assert!(e.to_string().contains("did not finish"), "{e}");
    // Cut in the middle.
    fs::write(&cut, &good[..good.len() / 2]).unwrap();
    restore(&img, &c.streams[..1]).unwrap();
    let e = restore(&img, std::slice::from_ref(&cut)).unwrap_err();
    assert!(is_damaged(&e), "{e}");
    assert_eq!(
        image_state(&img).unwrap().unwrap().status,
        ImageStatus::Applying
    );
    // Starting again from the full stream works.
    restore(&img, &c.streams).unwrap();
    assert_eq!(fs::read(&img).unwrap(), c.disks[2]);
}

#[test]
fn flipped_bytes_are_refused() {
    let c = chain();
    let good = fs::read(&c.streams[0]).unwrap();
    let bad = c.dir.path().join("bad.cbt");
    let mut rng = Prng(99);
    for round in 0..40 {
        let img = c.dir.path().join(format!("img{round}"));
        let mut m = good.clone();
        let pos = if round == 0 {
            // Inside the first payload (header, then a 40-byte record header).
            u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize + 45
        } else {
            rng.below(good.len() as u64) as usize
        };
        m[pos] ^= 1 << rng.below(8);
        fs::write(&bad, &m).unwrap();
        let e = restore(&img, std::slice::from_ref(&bad)).unwrap_err();
        assert!(is_damaged(&e), "flip at {pos}: {e}");
        if round == 0 {
            assert!(e.to_string().contains("record 0 (offset 0x0)"), "{e}");
        }
        assert!(is_damaged(&inspect(&bad).unwrap_err()));
        // A failed full restore leaves nothing behind: no image, no sidecar, no partial.
        assert!(
            !img.exists() && !sidecar_path(&img).exists(),
            "flip at {pos}"
        );
        assert!(!partial_path(&img).exists(), "flip at {pos}");
    }
}

fn partial_path(image: &Path) -> PathBuf {
    crate::durable::with_suffix(image, PARTIAL_SUFFIX)
}

#[test]
fn failed_full_restore_keeps_the_old_image_and_sidecar() {
    let c = chain();
    let img = c.dir.path().join("disk.raw");
    restore(&img, &c.streams[..2]).unwrap();
    let (image_before, sidecar_before) = (fs::read(&img).unwrap(), sidecar_text(&img));
    let unchanged = |what: &str| {
        assert!(
            fs::read(&img).unwrap() == image_before,
            "{what}: image changed"
        );
        assert_eq!(
            sidecar_text(&img),
            sidecar_before,
            "{what}: sidecar changed"
        );
        assert!(!partial_path(&img).exists(), "{what}: partial left");
    };

    // A full stream damaged near its end: the records before were written (to the partial
    // file), and the image is still the old one.
    let mut bad = fs::read(&c.streams[0]).unwrap();
    let last_payload = bad.len() - 112 - 10;
    bad[last_payload] ^= 1;
    let bad_path = c.dir.path().join("bad.cbt");
    fs::write(&bad_path, &bad).unwrap();
    let e = restore(&img, std::slice::from_ref(&bad_path)).unwrap_err();
    assert!(is_damaged(&e), "{e}");
    unchanged("damaged full stream");

    // A good full stream followed by a damaged incremental: all or nothing.
    let inc = fs::read(&c.streams[1]).unwrap();
    fs::write(&bad_path, &inc[..inc.len() - 1]).unwrap();
    let e = restore(&img, &[c.streams[0].clone(), bad_path]).unwrap_err();
    assert!(e.to_string().contains("stream truncated"), "{e}");
    unchanged("full stream, then a truncated incremental");

    // The old image is still good for its next incremental.
    restore(&img, &c.streams[2..]).unwrap();
    assert_eq!(fs::read(&img).unwrap(), c.disks[2]);
}

#[test]
fn a_leftover_partial_file_is_overwritten_and_removed() {
    let c = chain();
    let img = c.dir.path().join("disk.raw");
    fs::write(partial_path(&img), vec![0xee; 2 * c.disks[0].len()]).unwrap();
    restore(&img, &c.streams[..1]).unwrap();
    assert_eq!(fs::read(&img).unwrap(), c.disks[0]);
    assert!(!partial_path(&img).exists());
}

#[test]
fn largest_records_round_trip() {
    // One 32 MiB zstd record, one raw record, across many 4 MiB reads.
    let big = MAX_RECORD_LEN as usize;
    let mut d = vec![0u8; big + BLOCK];
    let mut rng = Prng(3);
    for (i, x) in d[..big].iter_mut().enumerate() {
        *x = (i >> 12) as u8;
    }
    d[big..].iter_mut().for_each(|x| *x = rng.next() as u8);
    let h = Header {
        virtual_size: d.len() as u64,
        block_size: BLOCK as u32,
        source_id: "vdi-big".into(),
        point_id: "big".into(),
        incremental: false,
        base_id: None,
        created_unix_secs: 0,
        codec: Codec::Zstd,
    };
    let (mut enc, mut out) = Encoder::new(&h).unwrap();
    let packed = zstd::bulk::compress(&d[..big], 1).unwrap();
    out.extend(
        enc.data(0, big as u64, Codec::Zstd, checksum(&d[..big]), &packed)
            .unwrap(),
    );
    out.extend_from_slice(&packed);
    let tail = &d[big..];
    out.extend(
        enc.data(big as u64, BLOCK as u64, Codec::None, checksum(tail), tail)
            .unwrap(),
    );
    out.extend_from_slice(tail);
    out.extend(enc.finish());
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("big.cbt");
    fs::write(&s, &out).unwrap();
    let img = dir.path().join("img");
    let r = restore(&img, &[s]).unwrap();
    assert_eq!(r.bytes_written, d.len() as u64);
    assert!(fs::read(&img).unwrap() == d);
}

#[test]
fn usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x");
    assert!(matches!(restore(&img, &[]), Err(RestoreError::Usage(_))));
    let dash = PathBuf::from("-");
    assert!(matches!(
        restore(&img, &[dash.clone(), dash]),
        Err(RestoreError::Usage(_))
    ));
    assert!(matches!(
        restore(dir.path(), &[dir.path().join("nope")]),
        Err(RestoreError::Usage(_))
    ));
    let e = restore(&img, &[dir.path().join("nope")]).unwrap_err();
    assert!(matches!(e, RestoreError::Open { .. }), "{e}");
    assert_eq!(e.exit_code(), Code::Usage);
    assert!(e.to_string().starts_with("cannot open "), "{e}");
    let e = restore(&img, &[dir.path().to_owned()]).unwrap_err();
    assert!(matches!(e, RestoreError::Open { .. }), "{e}");
    assert!(e.to_string().contains("directory"), "{e}");
    // A symbolic link would be replaced by a full restore, not written through.
    let link = dir.path().join("link");
    fs::write(&img, b"").unwrap();
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let e = restore(&link, &[dir.path().join("nope")]).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(e.exit_code(), Code::Usage);
}
