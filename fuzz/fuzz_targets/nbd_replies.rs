//! Transmission replies (simple, structured, extended) and the READ coverage bookkeeping.
#![no_main]
use cbtstream_proto::nbd::transmission::parse_offset_data_prefix;
use cbtstream_proto::nbd::{parse_chunk_payload, parse_reply_header, ReadAssembly, ReplyHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let structured = mode & 1 != 0;
    let extended = mode & 2 != 0;
    let mut asm = ReadAssembly::new(1 << 20, 1 << 17);
    while !rest.is_empty() {
        let Ok(Some((h, n))) = parse_reply_header(rest, structured, extended) else { return };
        rest = &rest[n..];
        match h {
            ReplyHeader::Simple { .. } => {}
            ReplyHeader::Chunk { typ, length, .. } => {
                let len = (length as usize).min(rest.len());
                let payload = &rest[..len];
                rest = &rest[len..];
                if typ == 1 {
                    if let Ok((off, dlen)) = parse_offset_data_prefix(length, payload) {
                        let _ = asm.cover(off, dlen);
                    }
                } else if let Ok(cbtstream_proto::nbd::Chunk::OffsetHole { offset, length }) =
                    parse_chunk_payload(typ, payload, extended)
                {
                    let _ = asm.cover(offset, length);
                }
            }
        }
    }
    let _ = asm.finish();
});
