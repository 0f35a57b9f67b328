//! The stream decoder fed arbitrary bytes in arbitrary pieces. Seeds are valid streams, so
//! the fuzzer mostly explores mutations of real ones.
#![no_main]
use bytes::BytesMut;
use cbtstream_proto::stream::{verify_data, Codec, Decoder, Item};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, rest)) = data.split_first() else { return };
    let piece = usize::from(piece) + 1;
    let mut dec = Decoder::new();
    let mut buf = BytesMut::new();
    let mut input = rest.chunks(piece);
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(Item::Data { index, offset, length, codec: Codec::None, checksum, payload })) => {
                let _ = verify_data(index, offset, length, checksum, &payload);
            }
            Ok(Some(Item::End(_))) => {
                let _ = dec.finish(buf.len());
                return;
            }
            Ok(Some(_)) => {}
            Ok(None) => match input.next() {
                Some(c) => buf.extend_from_slice(c),
                None => {
                    let _ = dec.finish(buf.len());
                    return;
                }
            },
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        }
    }
});
