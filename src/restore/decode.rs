//! Decompressing and checking the payload of one DATA record.

use cbtstream_proto::stream::{self, Codec, StreamError, MAX_RECORD_LEN};
use std::io;

/// Decompresses (if needed) and verifies one DATA record; returns the bytes to write.
pub(super) struct PayloadDecoder {
    dctx: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
}

impl PayloadDecoder {
    pub(super) fn new() -> io::Result<Self> {
        Ok(PayloadDecoder {
            dctx: zstd::bulk::Decompressor::new()?,
            scratch: Vec::new(),
        })
    }

    pub(super) fn decode<'a>(
        &'a mut self,
        index: u64,
        offset: u64,
        length: u64,
        codec: Codec,
        checksum: u64,
        payload: &'a [u8],
    ) -> Result<&'a [u8], StreamError> {
        let problem = |problem: String| StreamError::Record {
            index,
            offset,
            problem,
        };
        let data: &[u8] = match codec {
            Codec::None => payload,
            Codec::Zstd => {
                // The decoder bounds length by MAX_RECORD_LEN; check again before allocating.
                if length > MAX_RECORD_LEN {
                    return Err(problem(format!("length {length} is too large")));
                }
                let len = length as usize;
                match zstd::zstd_safe::find_frame_compressed_size(payload) {
                    Ok(n) if n == payload.len() => {}
                    Ok(n) => {
                        let all = payload.len();
                        return Err(problem(format!(
                            "payload is not exactly one zstd frame (the first is {n} of {all} bytes)"
                        )));
                    }
                    Err(code) => {
                        return Err(problem(format!(
                            "payload is not a valid zstd frame: {}",
                            zstd::zstd_safe::get_error_name(code)
                        )))
                    }
                }
                if self.scratch.len() < len {
                    self.scratch = vec![0; len];
                }
                // Decompressing into exactly `len` bytes: a frame that expands to more fails.
                let n = self
                    .dctx
                    .decompress_to_buffer(payload, &mut self.scratch[..len])
                    .map_err(|e| {
                        problem(format!(
                            "zstd frame does not decompress to {len} bytes: {e}"
                        ))
                    })?;
                &self.scratch[..n]
            }
        };
        stream::verify_data(index, offset, length, checksum, data)?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbtstream_proto::stream::{checksum, max_stored_len};

    #[test]
    fn zstd_payload_problems_name_the_record() {
        let mut p = PayloadDecoder::new().unwrap();
        let data = vec![7u8; 10_000];
        let frame = zstd::bulk::compress(&data, 3).unwrap();
        let sum = checksum(&data);
        assert_eq!(
            p.decode(3, 0x3000, 10_000, Codec::Zstd, sum, &frame)
                .unwrap(),
            &data[..]
        );
        // Expands to more than the record says.
        let e = p
            .decode(3, 0x3000, 9_999, Codec::Zstd, sum, &frame)
            .unwrap_err();
        assert!(
            e.to_string().starts_with("record 3 (offset 0x3000): "),
            "{e}"
        );
        // Expands to less.
        let e = p
            .decode(3, 0x3000, 10_001, Codec::Zstd, sum, &frame)
            .unwrap_err();
        assert!(e.to_string().contains("decodes to 10000 bytes"), "{e}");
        // Two frames.
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        let e = p
            .decode(3, 0x3000, 20_000, Codec::Zstd, sum, &two)
            .unwrap_err();
        assert!(e.to_string().contains("exactly one zstd frame"), "{e}");
        // Not zstd.
        let e = p
            .decode(3, 0x3000, 10_000, Codec::Zstd, sum, b"hello")
            .unwrap_err();
        assert!(e.to_string().contains("not a valid zstd frame"), "{e}");
        // Wrong checksum.
        let e = p
            .decode(3, 0x3000, 10_000, Codec::Zstd, sum ^ 1, &frame)
            .unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn stored_bound_matches_zstd() {
        for len in [
            0u64,
            1,
            100,
            4096,
            131_071,
            131_072,
            1 << 20,
            MAX_RECORD_LEN,
        ] {
            assert_eq!(
                max_stored_len(len),
                zstd::zstd_safe::compress_bound(len as usize) as u64,
                "length {len}"
            );
        }
    }
}
