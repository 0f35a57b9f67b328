//! The `Content-Range` of a 206 answer, parsed and checked against a request.
//!
//! Input: 24 bytes of offset, length and size (little-endian), then the header value.
//! Besides "no panic", the target checks the parser's promises: a parsed range is ordered
//! and inside its length, the check accepts exactly the range asked for, and the value the
//! client would have expected round-trips.
#![no_main]
use cbtstream_proto::http_range::{check_content_range, parse_content_range, range_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 24 {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap_or([0; 8]));
    let (offset, len, size) = (word(0), word(8).max(1), word(16));
    let value = &data[24..];
    if let Ok(r) = parse_content_range(value) {
        assert!(r.first <= r.last);
        assert!(r.complete.is_none_or(|c| r.last < c));
    }
    if check_content_range(value, offset, len, size).is_ok() {
        let r = parse_content_range(value).expect("checked but not parsed");
        assert_eq!((r.first, r.last), (offset, offset.saturating_add(len - 1)));
        assert!(r.complete.is_none_or(|c| c == size));
    }
    // What a faithful server answers is accepted.
    if let Some(last) = offset.checked_add(len - 1) {
        if last < size {
            let header = range_header(offset, len);
            let answer = format!("bytes {}/{size}", &header["bytes=".len()..]);
            assert_eq!(check_content_range(answer.as_bytes(), offset, len, size), Ok(()));
        }
    }
});
