//! HTTP byte ranges (RFC 9110 section 14): the `Range` header a client sends for one range,
//! and the `Content-Range` header of a `206 Partial Content` answer, checked against what
//! was asked.
//!
//! Strict on purpose: one space after the unit, decimal digits only (no sign, no leading
//! `+`), no overflow, `first <= last < complete length`. A server that answers with anything
//! else is not trusted with the disk's bytes.

/// The most digits a position may have (u64::MAX has 20).
const MAX_DIGITS: usize = 20;

/// A `Content-Range: bytes first-last/complete` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub first: u64,
    pub last: u64,
    /// The whole representation's length; `None` for `*` (unknown).
    pub complete: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("Content-Range {0:?} is not `bytes FIRST-LAST/LENGTH`")]
    Malformed(String),
    #[error("Content-Range {0:?}: the range ends before it starts or past the length")]
    Inconsistent(String),
    #[error("Content-Range {got:?} does not match the request for bytes {first}-{last} of {size}")]
    Mismatch {
        got: String,
        first: u64,
        last: u64,
        size: u64,
    },
}

/// The value for quoting in an error: printable ASCII only, at most 64 characters.
fn quoted(value: &[u8]) -> String {
    value
        .iter()
        .take(64)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// A decimal number of 1 to 20 digits that fits in a u64.
pub fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > MAX_DIGITS || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    text.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Parse a `Content-Range` value of a 206 answer. Surrounding spaces and tabs are allowed
/// (header whitespace); the unit is case-insensitive.
pub fn parse_content_range(value: &[u8]) -> Result<ContentRange, RangeError> {
    let malformed = || RangeError::Malformed(quoted(value));
    let trimmed = value.trim_ascii();
    let rest = match trimmed.split_at_checked(6) {
        Some((unit, rest)) if unit.eq_ignore_ascii_case(b"bytes ") => rest,
        _ => return Err(malformed()),
    };
    let slash = rest.iter().position(|&b| b == b'/').ok_or_else(malformed)?;
    let (range, complete) = (&rest[..slash], &rest[slash + 1..]);
    let dash = range
        .iter()
        .position(|&b| b == b'-')
        .ok_or_else(malformed)?;
    let first = decimal(&range[..dash]).ok_or_else(malformed)?;
    let last = decimal(&range[dash + 1..]).ok_or_else(malformed)?;
    let complete = match complete {
        b"*" => None,
        n => Some(decimal(n).ok_or_else(malformed)?),
    };
    if first > last || complete.is_some_and(|c| last >= c) {
        return Err(RangeError::Inconsistent(quoted(value)));
    }
    Ok(ContentRange {
        first,
        last,
        complete,
    })
}

/// Check that a 206's `Content-Range` is exactly the `len` bytes at `offset` of a file of
/// `size` bytes (an unknown length, `*`, is accepted: the size was learnt before).
/// `len` must not be 0.
pub fn check_content_range(
    value: &[u8],
    offset: u64,
    len: u64,
    size: u64,
) -> Result<(), RangeError> {
    let got = parse_content_range(value)?;
    let last = offset.saturating_add(len.max(1) - 1);
    if got.first != offset || got.last != last || got.complete.is_some_and(|c| c != size) {
        return Err(RangeError::Mismatch {
            got: quoted(value),
            first: offset,
            last,
            size,
        });
    }
    Ok(())
}

/// The `Range` header value for `len` (at least 1) bytes at `offset`: `bytes=FIRST-LAST`.
pub fn range_header(offset: u64, len: u64) -> String {
    format!("bytes={offset}-{}", offset.saturating_add(len.max(1) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_of_rfc_9110() {
        let r = parse_content_range(b"bytes 0-65535/1048576").unwrap();
        assert_eq!(
            r,
            ContentRange {
                first: 0,
                last: 65535,
                complete: Some(1 << 20)
            }
        );
        let r = parse_content_range(b" Bytes 7-7/* ").unwrap();
        assert_eq!((r.first, r.last, r.complete), (7, 7, None));
        let max = format!("bytes 0-{}/*", u64::MAX);
        assert_eq!(parse_content_range(max.as_bytes()).unwrap().last, u64::MAX);
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            &b""[..],
            b"bytes",
            b"bytes 0-1",
            b"bytes */100",
            b"items 0-1/2",
            b"bytes  0-1/2",
            b"bytes 0 -1/2",
            b"bytes +0-1/2",
            b"bytes -1/2",
            b"bytes 0-/2",
            b"bytes 0-1/",
            b"bytes 0-1/2/3",
            b"bytes 0-1-2/3",
            b"bytes 0-18446744073709551616/*",
            b"bytes 0-000000000000000000001/*",
            b"bytes 0-1/\xff",
        ] {
            assert!(
                matches!(parse_content_range(bad), Err(RangeError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [&b"bytes 5-4/10"[..], b"bytes 0-10/10"] {
            assert!(matches!(
                parse_content_range(bad),
                Err(RangeError::Inconsistent(_))
            ));
        }
    }

    #[test]
    fn checks_the_answer_against_the_request() {
        assert_eq!(
            check_content_range(b"bytes 4096-8191/65536", 4096, 4096, 65536),
            Ok(())
        );
        assert_eq!(
            check_content_range(b"bytes 4096-8191/*", 4096, 4096, 65536),
            Ok(())
        );
        for wrong in [
            &b"bytes 0-4095/65536"[..],
            b"bytes 4096-8190/65536",
            b"bytes 4096-8191/65537",
        ] {
            let e = check_content_range(wrong, 4096, 4096, 65536).unwrap_err();
            assert!(matches!(
                e,
                RangeError::Mismatch {
                    first: 4096,
                    last: 8191,
                    ..
                }
            ));
            assert!(e.to_string().contains("bytes 4096-8191 of 65536"), "{e}");
        }
    }

    #[test]
    fn quotes_only_printable_text() {
        let e = parse_content_range(b"bytes \x1b[2J\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Content-Range \"bytes ?[2J?\" is not `bytes FIRST-LAST/LENGTH`"
        );
        let long = vec![b'9'; 10_000];
        assert!(parse_content_range(&long).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn range_header_names_the_last_byte() {
        assert_eq!(range_header(0, 65536), "bytes=0-65535");
        assert_eq!(range_header(10, 1), "bytes=10-10");
    }
}
