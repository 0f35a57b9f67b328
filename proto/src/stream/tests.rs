use super::*;
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

/// xorshift64*: a tiny deterministic PRNG for test data.
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Self {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[derive(Clone, Debug)]
enum Rec {
    /// Uncompressed data at an offset.
    Raw(u64, Vec<u8>),
    /// "Compressed" payload (opaque here) standing for `length` bytes.
    Packed(u64, u64, Vec<u8>),
    Zero(u64, u64),
}

fn header(codec: Codec, base: Option<&str>) -> Header {
    Header {
        virtual_size: 1 << 20,
        block_size: 65536,
        source_id: "vdi-0f3c".into(),
        point_id: "snap-2".into(),
        incremental: base.is_some(),
        base_id: base.map(str::to_owned),
        created_unix_secs: 1_700_000_000,
        codec,
    }
}

fn encode(h: &Header, recs: &[Rec]) -> Vec<u8> {
    let (mut enc, mut out) = Encoder::new(h).expect("valid header");
    for r in recs {
        match r {
            Rec::Raw(off, data) => {
                let hdr = enc
                    .data(*off, data.len() as u64, Codec::None, checksum(data), data)
                    .expect("valid record");
                out.extend_from_slice(&hdr);
                out.extend_from_slice(data);
            }
            Rec::Packed(off, len, payload) => {
                let hdr = enc
                    .data(*off, *len, Codec::Zstd, 0x1234, payload)
                    .expect("valid record");
                out.extend_from_slice(&hdr);
                out.extend_from_slice(payload);
            }
            Rec::Zero(off, len) => out.extend_from_slice(&enc.zero(*off, *len).expect("valid")),
        }
        assert_eq!(enc.bytes_written(), out.len() as u64);
    }
    out.extend_from_slice(&enc.finish());
    out
}

/// Feeds `bytes` in chunks of the given sizes (cycled), decoding everything.
fn decode_chunked(bytes: &[u8], chunks: &[usize]) -> Result<Vec<Item>, StreamError> {
    let mut dec = Decoder::new();
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    loop {
        while let Some(item) = dec.decode(&mut buf)? {
            items.push(item);
        }
        if pos == bytes.len() {
            dec.finish(buf.len())?;
            return Ok(items);
        }
        let step = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(usize::MAX)
            .max(1);
        i += 1;
        let end = pos.saturating_add(step).min(bytes.len());
        buf.extend_from_slice(&bytes[pos..end]);
        pos = end;
    }
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Item>, StreamError> {
    decode_chunked(bytes, &[])
}

/// Decodes and verifies every uncompressed record's checksum (what a reader does after
/// decompressing).
fn verify_all(bytes: &[u8]) -> Result<Vec<Item>, StreamError> {
    let items = decode_all(bytes)?;
    for item in &items {
        if let Item::Data {
            index,
            offset,
            length,
            codec: Codec::None,
            checksum,
            payload,
        } = item
        {
            verify_data(*index, *offset, *length, *checksum, payload)?;
        }
    }
    Ok(items)
}

fn small_stream() -> (Header, Vec<Rec>, Vec<u8>) {
    let mut rng = Prng::new(7);
    let h = header(Codec::None, Some("snap-1"));
    let recs = vec![
        Rec::Raw(0, rng.bytes(37)),
        Rec::Zero(37, 4096),
        Rec::Raw(0x2000, rng.bytes(64)),
        Rec::Raw(0x2040, rng.bytes(5)),
        Rec::Zero(0x10_0000 - 16, 16),
    ];
    let bytes = encode(&h, &recs);
    (h, recs, bytes)
}

#[test]
fn round_trip_items() {
    let (h, recs, bytes) = small_stream();
    let items = verify_all(&bytes).expect("valid stream");
    assert_eq!(items.len(), recs.len() + 2);
    assert_eq!(items[0], Item::Header(h));
    for (i, (item, rec)) in items[1..=recs.len()].iter().zip(&recs).enumerate() {
        match (item, rec) {
            (
                Item::Data {
                    index,
                    offset,
                    length,
                    codec,
                    payload,
                    ..
                },
                Rec::Raw(o, d),
            ) => {
                assert_eq!(
                    (*index, *offset, *length, *codec),
                    (i as u64, *o, d.len() as u64, Codec::None)
                );
                assert_eq!(&payload[..], &d[..]);
            }
            (
                Item::Zero {
                    index,
                    offset,
                    length,
                },
                Rec::Zero(o, l),
            ) => {
                assert_eq!((*index, *offset, *length), (i as u64, *o, *l));
            }
            other => panic!("mismatch {other:?}"),
        }
    }
    let Some(Item::End(t)) = items.last() else {
        panic!("no trailer")
    };
    assert_eq!(t.records, 5);
    assert_eq!(t.data_records, 3);
    assert_eq!(t.zero_records, 2);
    assert_eq!(t.data_bytes, 37 + 64 + 5);
    assert_eq!(t.stored_bytes, 37 + 64 + 5);
    assert_eq!(t.zero_bytes, 4096 + 16);
    assert_eq!(t.stream_bytes, bytes.len() as u64 - TRAILER_LEN as u64);
    assert_eq!(
        t.digest,
        digest_bytes(xxhash_rust::xxh3::xxh3_128(
            &bytes[..t.stream_bytes as usize]
        ))
    );
}

#[test]
fn layout_matches_format_md() {
    let (h, _, bytes) = small_stream();
    let hlen = HEADER_FIXED_LEN + h.source_id.len() + h.point_id.len() + 6 + HEADER_CHECK_LEN;
    assert_eq!(&bytes[..8], b"\x89CBT\r\n\x1a\n");
    assert_eq!(le_u16(&bytes, 8), 1);
    assert_eq!(le_u16(&bytes, 10), 0);
    assert_eq!(le_u32(&bytes, 12) as usize, hlen);
    assert_eq!(le_u64(&bytes, 16), 1 << 20);
    assert_eq!(le_u32(&bytes, 24), 65536);
    assert_eq!(bytes[28], 0);
    assert_eq!(bytes[29], 1);
    assert_eq!(le_u64(&bytes, 32), 1_700_000_000);
    assert_eq!(le_u16(&bytes, 40), 8);
    assert_eq!(le_u16(&bytes, 42), 6);
    assert_eq!(le_u16(&bytes, 44), 6);
    assert_eq!(&bytes[48..68], b"vdi-0f3csnap-2snap-1");
    assert_eq!(le_u64(&bytes, hlen - 8), xxh3_64(&bytes[..hlen - 8]));
    // First record: DATA of 37 bytes at 0.
    let r = &bytes[hlen..];
    assert_eq!(r[0], b'D');
    assert_eq!(r[1], 0);
    assert_eq!(le_u32(r, 4), 37);
    assert_eq!(le_u64(r, 8), 0);
    assert_eq!(le_u64(r, 16), 37);
    assert_eq!(le_u64(r, 24), checksum(&r[40..77]));
    assert_eq!(le_u32(r, 32), 0);
    assert_eq!(le_u32(r, 36), xxh3_64(&r[..36]) as u32);
    // Second record: ZERO.
    let z = &r[77..];
    assert_eq!(z[0], b'Z');
    assert_eq!(le_u32(z, 32), 1);
    // Trailer.
    let t = &bytes[bytes.len() - TRAILER_LEN..];
    assert_eq!(t[0], b'T');
    assert_eq!(le_u32(t, 4), 5);
    assert_eq!(le_u64(t, 8), 5);
    assert_eq!(&t[104..], b"\x89CBTEND\n");
    assert_eq!(le_u64(t, 96), xxh3_64(&t[..96]));
}

#[test]
fn empty_stream_round_trips() {
    let h = header(Codec::Zstd, None);
    let bytes = encode(&h, &[]);
    let items = decode_all(&bytes).unwrap();
    assert_eq!(items.len(), 2);
    let Item::End(t) = &items[1] else { panic!() };
    assert_eq!(t.records, 0);
}

#[test]
fn truncation_at_every_position_is_detected() {
    let (_, _, bytes) = small_stream();
    for cut in 0..bytes.len() {
        for chunks in [&[][..], &[1][..], &[7, 3][..]] {
            let err = decode_chunked(&bytes[..cut], chunks)
                .expect_err(&format!("cut at {cut} not detected"));
            assert!(err.is_truncation(), "cut at {cut}: {err}");
        }
    }
}

#[test]
fn truncation_messages_name_the_record() {
    let (_, _, bytes) = small_stream();
    let items = decode_all(&bytes).unwrap();
    // Cut right after record 3 (the 4th): the end of the 5th record's start.
    let hlen = le_u32(&bytes, 12) as usize;
    let lens = [40 + 37, 40, 40 + 64, 40 + 5];
    let cut = hlen + lens.iter().sum::<usize>();
    let err = decode_all(&bytes[..cut]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream truncated after record 3: no trailer"
    );
    let err = decode_all(&bytes[..hlen]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream truncated after the header: no trailer"
    );
    let err = decode_all(&bytes[..hlen + 50]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream truncated in record 0 (offset 0x0): 50 of 77 bytes"
    );
    let err = decode_all(&bytes[..bytes.len() - 1]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream truncated in the trailer: 111 of 112 bytes"
    );
    let err = decode_all(&[]).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    assert_eq!(items.len(), 7);
}

#[test]
fn every_single_byte_flip_is_detected() {
    let (_, _, bytes) = small_stream();
    for pos in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut m = bytes.clone();
            m[pos] ^= mask;
            // The decoder alone catches it (digest at the latest)...
            assert!(
                decode_all(&m).is_err(),
                "flip {mask:#x} at {pos} not detected by decode"
            );
            // ...and so does the full check.
            assert!(
                verify_all(&m).is_err(),
                "flip {mask:#x} at {pos} not detected"
            );
        }
    }
}

#[test]
fn payload_flip_names_the_record_when_verified() {
    let (_, _, bytes) = small_stream();
    let hlen = le_u32(&bytes, 12) as usize;
    let mut m = bytes.clone();
    // First payload byte of record 2 (DATA at 0x2000).
    let pos = hlen + (40 + 37) + 40 + 40;
    m[pos] ^= 1;
    // The decoder yields record 2 before it reaches the digest; verification fails there.
    let mut dec = Decoder::new();
    let mut buf = BytesMut::from(&m[..]);
    let mut first_err = None;
    while let Ok(Some(item)) = dec.decode(&mut buf) {
        if let Item::Data {
            index,
            offset,
            length,
            checksum,
            payload,
            ..
        } = item
        {
            if let Err(e) = verify_data(index, offset, length, checksum, &payload) {
                first_err = Some(e);
                break;
            }
        }
    }
    let e = first_err.expect("checksum mismatch");
    assert!(
        e.to_string()
            .starts_with("record 2 (offset 0x2000): checksum mismatch"),
        "{e}"
    );
    assert_eq!(e.record_index(), Some(2));
    // Without verifying, the digest catches it at the end.
    assert!(matches!(
        decode_all(&m),
        Err(StreamError::DigestMismatch { .. })
    ));
}

#[test]
fn removed_or_repeated_records_are_detected() {
    let (_, _, bytes) = small_stream();
    let hlen = le_u32(&bytes, 12) as usize;
    let r0 = hlen..hlen + 77;
    let r1 = r0.end..r0.end + 40;
    // Drop record 1 (a ZERO).
    let mut m = bytes[..r1.start].to_vec();
    m.extend_from_slice(&bytes[r1.end..]);
    let e = decode_all(&m).unwrap_err();
    assert!(e.to_string().contains("sequence number"), "{e}");
    // Repeat record 0.
    let mut m = bytes[..r0.end].to_vec();
    m.extend_from_slice(&bytes[r0.clone()]);
    m.extend_from_slice(&bytes[r0.end..]);
    assert!(decode_all(&m).is_err());
    // Drop the trailer and append another stream's trailer.
    let other = encode(&header(Codec::None, Some("snap-1")), &[]);
    let mut m = bytes[..bytes.len() - TRAILER_LEN].to_vec();
    m.extend_from_slice(&other[other.len() - TRAILER_LEN..]);
    assert!(decode_all(&m).is_err());
}

#[test]
fn bytes_needed_announces_whole_records() {
    let (_, _, bytes) = small_stream();
    let hlen = le_u32(&bytes, 12) as usize;
    let mut dec = Decoder::new();
    assert_eq!(dec.bytes_needed(), 1);
    let mut buf = BytesMut::from(&bytes[..20]);
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert_eq!(dec.bytes_needed(), hlen);
    buf.extend_from_slice(&bytes[20..hlen + 41]);
    assert!(matches!(dec.decode(&mut buf), Ok(Some(Item::Header(_)))));
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert_eq!(dec.bytes_needed(), 40 + 37);
}

#[test]
fn trailing_bytes_are_rejected() {
    let (_, _, bytes) = small_stream();
    let mut m = bytes.clone();
    m.push(0);
    assert!(matches!(
        decode_all(&m),
        Err(StreamError::TrailingBytes { count: 1 })
    ));
    let mut dec = Decoder::new();
    let mut buf = BytesMut::from(&bytes[..]);
    while dec.decode(&mut buf).unwrap().is_some() {}
    assert!(dec.is_done());
    assert!(dec.finish(0).is_ok());
    assert!(dec.finish(3).is_err());
}

#[test]
fn garbage_is_rejected_early() {
    let mut dec = Decoder::new();
    let mut buf = BytesMut::from(&b"x"[..]);
    assert_eq!(dec.decode(&mut buf), Err(StreamError::BadMagic));
    // Errors are sticky.
    let mut buf = BytesMut::new();
    assert_eq!(dec.decode(&mut buf), Err(StreamError::BadMagic));
    assert_eq!(dec.finish(0), Err(StreamError::BadMagic));

    let (_, _, bytes) = small_stream();
    let mut m = bytes.clone();
    m[8] = 2;
    assert_eq!(
        decode_all(&m).unwrap_err(),
        StreamError::UnsupportedVersion(2)
    );

    // A bad record type byte is reported as soon as it arrives.
    let hlen = le_u32(&bytes, 12) as usize;
    let mut dec = Decoder::new();
    let mut buf = BytesMut::from(&bytes[..hlen]);
    buf.extend_from_slice(b"?");
    assert!(matches!(dec.decode(&mut buf), Ok(Some(Item::Header(_)))));
    let e = dec.decode(&mut buf).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "record 0 (stream byte {hlen}): bad record type byte 0x3f (expected 'D', 'Z' or 'T')"
        )
    );
}

#[test]
fn oversized_lengths_are_rejected_before_buffering() {
    let h = header(Codec::Zstd, None);
    let head = h.encode().unwrap();
    // A well-formed record header announcing a 4 GiB payload.
    let rec = encode_record_header(KIND_DATA, Codec::Zstd, u32::MAX, 0, 4096, 0, 0);
    let mut buf = BytesMut::from(&head[..]);
    buf.extend_from_slice(&rec);
    let mut dec = Decoder::new();
    assert!(matches!(dec.decode(&mut buf), Ok(Some(Item::Header(_)))));
    let e = dec.decode(&mut buf).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("record 0 (offset 0x0): stored length"),
        "{e}"
    );

    // A DATA record longer than MAX_RECORD_LEN.
    let mut big = h.clone();
    big.virtual_size = 1 << 40;
    let head = big.encode().unwrap();
    let rec = encode_record_header(KIND_DATA, Codec::Zstd, 100, 0, MAX_RECORD_LEN + 1, 0, 0);
    let mut buf = BytesMut::from(&head[..]);
    buf.extend_from_slice(&rec);
    let mut dec = Decoder::new();
    dec.decode(&mut buf).unwrap();
    let e = dec.decode(&mut buf).unwrap_err();
    assert!(
        e.to_string().contains("exceeds the maximum record length"),
        "{e}"
    );

    // A header announcing ids longer than allowed.
    let mut m = h.encode().unwrap();
    m[12..16].copy_from_slice(&100_000u32.to_le_bytes());
    let mut dec = Decoder::new();
    let mut buf = BytesMut::from(&m[..]);
    assert!(matches!(dec.decode(&mut buf), Err(StreamError::Header(_))));
}

#[test]
fn encoder_rejects_bad_records_without_changing_state() {
    let h = header(Codec::None, None);
    let (mut enc, head) = Encoder::new(&h).unwrap();
    let d = [1u8; 16];
    let c = checksum(&d);
    enc.data(0x100, 16, Codec::None, c, &d).unwrap();
    let before = enc.trailer();
    let cases: Vec<Result<Vec<u8>, StreamError>> = vec![
        enc.data(0x100, 16, Codec::None, c, &d),         // overlaps
        enc.data(0x0, 16, Codec::None, c, &d),           // out of order
        enc.data(0x108, 16, Codec::None, c, &d),         // overlaps
        enc.data(0x200, 15, Codec::None, c, &d),         // stored != length
        enc.data(0x200, 16, Codec::Zstd, c, &d),         // codec not in header
        enc.data(0x200, 0, Codec::None, c, &[]),         // empty
        enc.data((1 << 20) - 8, 16, Codec::None, c, &d), // past the end
        enc.data(u64::MAX - 4, 16, Codec::None, c, &d),  // overflow
        enc.zero(0x10, 1),                               // out of order
        enc.zero(0x200, 0),                              // empty
        enc.zero(0x200, u64::MAX),                       // past the end
    ];
    for (i, r) in cases.into_iter().enumerate() {
        let e = r.expect_err(&format!("case {i} accepted"));
        assert_eq!(e.record_index(), Some(1), "case {i}: {e}");
    }
    assert_eq!(enc.trailer(), before);
    // Adjacent records are fine.
    enc.zero(0x110, 0x10).unwrap();
    assert_eq!(enc.records(), 2);
    assert!(head.len() < MAX_HEADER_LEN);

    let h = header(Codec::Zstd, None);
    let (mut enc, _) = Encoder::new(&h).unwrap();
    let too_big = vec![0u8; max_stored_len(1000) as usize + 1];
    assert!(enc.data(0, 1000, Codec::Zstd, 0, &too_big).is_err());
    assert!(enc.data(0, 1000, Codec::Zstd, 0, &[]).is_err());
    assert!(enc
        .data(0, MAX_RECORD_LEN + 1, Codec::Zstd, 0, &[1, 2, 3])
        .is_err());
    enc.data(0, 1000, Codec::Zstd, 0, &too_big[1..]).unwrap();
    enc.data(1000, 1000, Codec::None, checksum(&[0; 1000]), &[0; 1000])
        .unwrap();
}

#[test]
fn header_validation() {
    let ok = header(Codec::Zstd, Some("base"));
    assert!(Encoder::new(&ok).is_ok());
    let bad = |f: &dyn Fn(&mut Header)| {
        let mut h = ok.clone();
        f(&mut h);
        Encoder::new(&h).map(|_| ()).unwrap_err()
    };
    bad(&|h| h.point_id.clear());
    bad(&|h| h.base_id = Some(String::new()));
    bad(&|h| h.source_id = "x".repeat(257));
    bad(&|h| h.point_id = "a\nb".into());
    bad(&|h| h.base_id = Some("\u{7f}".into()));
    bad(&|h| h.block_size = 0);
    bad(&|h| h.block_size = 3000);
    bad(&|h| h.block_size = 1 << 26);
    bad(&|h| h.virtual_size = u64::MAX);
    let mut h = ok.clone();
    h.source_id = "é".repeat(128); // 256 bytes
    h.point_id = "p".repeat(256);
    h.base_id = Some("b".repeat(256));
    let bytes = encode(&h, &[]);
    assert_eq!(le_u32(&bytes, 12) as usize, MAX_HEADER_LEN);
    assert_eq!(decode_all(&bytes).unwrap()[0], Item::Header(h));
    let mut h = ok;
    h.source_id.clear();
    h.base_id = None;
    let bytes = encode(&h, &[]);
    assert_eq!(le_u32(&bytes, 12) as usize, HEADER_FIXED_LEN + 6 + 8);
    assert_eq!(decode_all(&bytes).unwrap()[0], Item::Header(h));
}

#[test]
fn header_rejects_invalid_utf8_even_with_valid_check() {
    let h = header(Codec::None, None);
    let mut m = h.encode().unwrap();
    let n = m.len();
    m[48] = 0xff;
    let c = xxh3_64(&m[..n - 8]);
    m[n - 8..].copy_from_slice(&c.to_le_bytes());
    let e = decode_all(&m).unwrap_err();
    assert_eq!(e.to_string(), "stream header: source id is not valid UTF-8");
}

#[test]
fn checksum_mismatch_message() {
    let e = verify_data(17, 0x120000, 3, 0, b"abc").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("record 17 (offset 0x120000): checksum mismatch"),
        "{e}"
    );
    let e = verify_data(17, 0x120000, 4, checksum(b"abc"), b"abc").unwrap_err();
    assert!(e.to_string().contains("decodes to 3 bytes"), "{e}");
    assert!(verify_data(17, 0x120000, 3, checksum(b"abc"), b"abc").is_ok());
}

#[test]
fn zstd_bound() {
    // ZSTD_COMPRESSBOUND from zstd.h.
    assert_eq!(max_stored_len(0), 64);
    assert_eq!(max_stored_len(1), 64);
    assert_eq!(max_stored_len(4096), 4096 + 16 + 62);
    assert_eq!(max_stored_len(128 * 1024), 128 * 1024 + 512);
    assert_eq!(
        max_stored_len(MAX_RECORD_LEN),
        MAX_RECORD_LEN + MAX_RECORD_LEN / 256
    );
    assert!(RECORD_HEADER_LEN as u64 + max_stored_len(MAX_RECORD_LEN) < u64::from(u32::MAX));
}

#[test]
fn random_streams_survive_random_damage() {
    let mut rng = Prng::new(42);
    for round in 0..200 {
        let h = header(Codec::None, None);
        let mut recs = Vec::new();
        let mut off = 0u64;
        for _ in 0..rng.below(6) {
            off += rng.below(300);
            let len = 1 + rng.below(200);
            if rng.below(2) == 0 {
                recs.push(Rec::Raw(off, rng.bytes(len as usize)));
            } else {
                recs.push(Rec::Zero(off, len));
            }
            off += len;
        }
        let bytes = encode(&h, &recs);
        verify_all(&bytes).unwrap();
        let pos = rng.below(bytes.len() as u64) as usize;
        let mut m = bytes.clone();
        m[pos] ^= 1 + rng.below(255) as u8;
        assert!(verify_all(&m).is_err(), "round {round}: flip at {pos}");
        let cut = rng.below(bytes.len() as u64) as usize;
        assert!(
            decode_all(&bytes[..cut]).is_err(),
            "round {round}: cut at {cut}"
        );
    }
}

fn id_strategy(min: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!("[a-zA-Z0-9._:-]{{{min},64}}")).unwrap(),
        proptest::string::string_regex(&format!("\\PC{{{min},60}}")).unwrap(),
    ]
}

prop_compose! {
    fn arb_header()(
        virtual_size in prop_oneof![0..=(1u64 << 24), Just(MAX_VIRTUAL_SIZE)],
        block_log in 0u32..=25,
        source_id in id_strategy(0),
        point_id in id_strategy(1),
        base_id in proptest::option::of(id_strategy(1)),
        any_base in any::<bool>(),
        created_unix_secs in any::<u64>(),
        zstd in any::<bool>(),
    ) -> Header {
        Header {
            virtual_size,
            block_size: 1 << block_log,
            source_id,
            point_id,
            incremental: base_id.is_some() || any_base,
            base_id,
            created_unix_secs,
            codec: if zstd { Codec::Zstd } else { Codec::None },
        }
    }
}

/// Records laid out from gaps and lengths, clipped to the header's virtual size.
fn layout(h: &Header, specs: &[(u64, u64, u8, Vec<u8>)]) -> Vec<Rec> {
    let mut recs = Vec::new();
    let mut off = 0u64;
    for (gap, len, kind, payload) in specs {
        let Some(start) = off.checked_add(*gap) else {
            break;
        };
        let len = match kind % 3 {
            0 => payload.len().max(1) as u64,
            _ => *len,
        };
        let Some(end) = start.checked_add(len) else {
            break;
        };
        if end > h.virtual_size {
            break;
        }
        match kind % 3 {
            0 => {
                let mut d = payload.clone();
                if d.is_empty() {
                    d.push(0);
                }
                recs.push(Rec::Raw(start, d));
            }
            1 if h.codec == Codec::Zstd && !payload.is_empty() => {
                let len = len.min(MAX_RECORD_LEN);
                let stored = payload.len().min(max_stored_len(len) as usize);
                recs.push(Rec::Packed(start, len, payload[..stored].to_vec()));
                off = start + len;
                continue;
            }
            _ => recs.push(Rec::Zero(start, len)),
        }
        off = end;
    }
    recs
}

fn arb_specs() -> impl Strategy<Value = Vec<(u64, u64, u8, Vec<u8>)>> {
    proptest::collection::vec(
        (
            prop_oneof![Just(0u64), 0..5000u64, any::<u64>()],
            prop_oneof![1..5000u64, 1..=MAX_RECORD_LEN, Just(u64::MAX / 2)],
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        ),
        0..12,
    )
}

proptest! {
    #[test]
    fn prop_round_trip(h in arb_header(), specs in arb_specs(), chunks in proptest::collection::vec(1usize..700, 0..8)) {
        let recs = layout(&h, &specs);
        let bytes = encode(&h, &recs);
        let items = decode_chunked(&bytes, &chunks).unwrap();
        prop_assert_eq!(items.len(), recs.len() + 2);
        prop_assert_eq!(&items[0], &Item::Header(h.clone()));
        for (i, (item, rec)) in items[1..=recs.len()].iter().zip(&recs).enumerate() {
            let i = i as u64;
            match (item, rec) {
                (Item::Data { index, offset, length, codec: Codec::None, checksum: c, payload }, Rec::Raw(o, d)) => {
                    prop_assert_eq!((*index, *offset, *length), (i, *o, d.len() as u64));
                    prop_assert_eq!(&payload[..], &d[..]);
                    prop_assert_eq!(*c, checksum(d));
                }
                (Item::Data { index, offset, length, codec: Codec::Zstd, checksum: c, payload }, Rec::Packed(o, l, p)) => {
                    prop_assert_eq!((*index, *offset, *length, *c), (i, *o, *l, 0x1234));
                    prop_assert_eq!(&payload[..], &p[..]);
                }
                (Item::Zero { index, offset, length }, Rec::Zero(o, l)) => {
                    prop_assert_eq!((*index, *offset, *length), (i, *o, *l));
                }
                other => prop_assert!(false, "mismatch {:?}", other),
            }
        }
        let Some(Item::End(t)) = items.last() else { panic!("no trailer") };
        prop_assert_eq!(t.records, recs.len() as u64);
        prop_assert_eq!(t.stream_bytes + TRAILER_LEN as u64, bytes.len() as u64);
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000), chunks in proptest::collection::vec(1usize..300, 0..4)) {
        let _ = decode_chunked(&bytes, &chunks);
    }

    #[test]
    fn prop_valid_header_then_garbage_never_panics(h in arb_header(), tail in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut bytes = h.encode().unwrap();
        bytes.extend_from_slice(&tail);
        let _ = decode_all(&bytes);
        // Garbage that starts like a record.
        for kind in [KIND_DATA, KIND_ZERO, KIND_TRAILER] {
            let mut b = h.encode().unwrap();
            b.push(kind);
            b.extend_from_slice(&tail);
            let _ = decode_all(&b);
        }
    }

    #[test]
    fn prop_damage_is_detected(h in arb_header(), specs in arb_specs(), pos in any::<prop::sample::Index>(), mask in 1u8..=255, cut in any::<prop::sample::Index>()) {
        let recs = layout(&h, &specs);
        let bytes = encode(&h, &recs);
        let mut m = bytes.clone();
        let p = pos.index(m.len());
        m[p] ^= mask;
        prop_assert!(decode_all(&m).is_err(), "flip at {} not detected", p);
        let c = cut.index(bytes.len());
        let e = decode_all(&bytes[..c]);
        prop_assert!(e.is_err(), "cut at {} not detected", c);
    }
}
