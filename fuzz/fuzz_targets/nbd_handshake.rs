//! The client handshake state machine fed arbitrary server bytes, in arbitrary pieces.
#![no_main]
use bytes::BytesMut;
use cbtstream_proto::nbd::{ClientHandshake, HandshakeConfig, Step};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut cfg = HandshakeConfig::new("disk", flags & 1 != 0);
    cfg.extended_headers = flags & 2 != 0;
    cfg.structured_replies = flags & 4 != 0;
    cfg.meta_context = flags & 8 != 0;
    let Ok(mut hs) = ClientHandshake::new(cfg) else { return };
    let piece = usize::from(flags >> 4) + 1;
    let mut buf = BytesMut::new();
    let mut input = rest.chunks(piece);
    for _ in 0..10_000 {
        match hs.step(&mut buf) {
            Ok(Step::Send(_)) => {}
            Ok(Step::StartTls) => hs.tls_established(),
            Ok(Step::NeedBytes) => match input.next() {
                Some(c) => buf.extend_from_slice(c),
                None => {
                    let _ = hs.eof();
                    return;
                }
            },
            Ok(Step::Done(n)) => {
                let _ = (n.alignment(), n.max_request());
                return;
            }
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        }
    }
});
