//! What the test servers parse from clients: options and requests.
#![no_main]
use cbtstream_proto::nbd::server::parse_client_option;
use cbtstream_proto::nbd::transmission::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((_, n))) = parse_client_option(rest) {
        rest = &rest[n..];
    }
    for ext in [false, true] {
        let mut r = data;
        while let Ok(Some((_, n))) = parse_request(r, ext) {
            r = &r[n..];
        }
    }
});
