//! The base64 bitmap of VDI.list_changed_blocks, against an arbitrary disk size.
#![no_main]
use cbtstream_proto::cbt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8])) % (1 << 40);
    let request = (u64::from(data[8] % 8) + 1) * cbt::CBT_BLOCK;
    let text = &data[9..];
    // Both as base64 text and as a raw bitmap.
    let decoded = cbt::decode_base64(text).ok();
    for bm in decoded.as_deref().into_iter().chain([text]) {
        if let Ok(it) = cbt::extents(bm, size, request) {
            let mut last = 0;
            for e in it.take(1 << 16) {
                assert!(e.offset >= last && e.length > 0 && e.length <= request);
                assert!(e.offset + e.length <= size);
                last = e.offset + e.length;
            }
        }
    }
    // Decoded in pieces: the same outcome.
    let mut pieces = cbt::Base64Decoder::new(1 << 20);
    let chunked = text
        .chunks(usize::from(data[8]).max(1))
        .try_for_each(|c| pieces.push(c))
        .and_then(|()| pieces.finish());
    assert_eq!(chunked.ok(), decoded);
    // Round trip.
    if let Some(bm) = decoded {
        assert_eq!(cbt::decode_base64(cbt::encode_base64(&bm).as_bytes()).ok(), Some(bm));
    }
});
