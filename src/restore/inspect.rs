//! `inspect`: read a whole stream and verify everything in it, without an image.

use super::input::{pipelined, Input};
use super::report::{human, utc};
use super::{PayloadDecoder, RestoreError};
use cbtstream_proto::stream::{self, Codec, Header, Item, StreamError, Trailer};
use std::fmt;
use std::path::Path;
use std::time::Instant;

/// What [`inspect`] found in a stream that verified completely.
#[derive(Clone, Debug)]
pub struct InspectReport {
    pub input: String,
    pub header: Header,
    pub trailer: Trailer,
    /// DATA records stored as zstd frames, and stored raw.
    pub zstd_records: u64,
    pub raw_records: u64,
    /// Total stream length, trailer included.
    pub stream_len: u64,
    pub seconds: f64,
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        let t = &self.trailer;
        writeln!(f, "stream:        {}", self.input)?;
        writeln!(f, "format:        cbtstream v{}", stream::FORMAT_VERSION)?;
        writeln!(f, "source id:     {}", h.source_id)?;
        writeln!(f, "point id:      {}", h.point_id)?;
        match (&h.base_id, h.incremental) {
            (Some(b), _) => writeln!(f, "base id:       {b} (incremental)")?,
            (None, true) => writeln!(f, "base id:       none (incremental onto any image)")?,
            (None, false) => writeln!(f, "base id:       none (full export)")?,
        }
        writeln!(
            f,
            "created:       {} ({})",
            utc(h.created_unix_secs),
            h.created_unix_secs
        )?;
        writeln!(
            f,
            "virtual size:  {} ({})",
            h.virtual_size,
            human(h.virtual_size)
        )?;
        writeln!(f, "block size:    {}", h.block_size)?;
        writeln!(f, "codec:         {}", h.codec)?;
        writeln!(
            f,
            "records:       {} ({} data: {} zstd + {} raw; {} zero)",
            t.records, t.data_records, self.zstd_records, self.raw_records, t.zero_records
        )?;
        writeln!(
            f,
            "data bytes:    {} ({}), stored as {} ({})",
            t.data_bytes,
            human(t.data_bytes),
            t.stored_bytes,
            human(t.stored_bytes)
        )?;
        writeln!(
            f,
            "zero bytes:    {} ({})",
            t.zero_bytes,
            human(t.zero_bytes)
        )?;
        if t.stored_bytes > 0 {
            writeln!(
                f,
                "compression:   {:.2}x",
                t.data_bytes as f64 / t.stored_bytes as f64
            )?;
        } else {
            writeln!(f, "compression:   n/a")?;
        }
        writeln!(
            f,
            "stream size:   {} ({})",
            self.stream_len,
            human(self.stream_len)
        )?;
        writeln!(f, "digest:        xxh3-128 {}", t.digest_hex())?;
        write!(
            f,
            "status:        OK (every record checksum, the trailer and the digest verified in {:.2} s)",
            self.seconds
        )
    }
}

/// Reads a whole stream, decompresses every record and checks every checksum, the trailer and
/// the digest. `-` reads standard input.
pub fn inspect(input: &Path) -> Result<InspectReport, RestoreError> {
    inspect_input(Input::open(input)?)
}

fn inspect_input(mut input: Input) -> Result<InspectReport, RestoreError> {
    let started = Instant::now();
    let header = input.read_header()?;
    let mut payloads = PayloadDecoder::new().map_err(|error| RestoreError::Input {
        input: "zstd decompressor".into(),
        error,
    })?;
    let (mut zstd_records, mut raw_records) = (0, 0);
    let mut trailer = None;
    let name = input.name.clone();
    pipelined(&mut input, |item| {
        match item {
            Item::Data {
                index,
                offset,
                length,
                codec,
                checksum,
                payload,
            } => {
                payloads
                    .decode(index, offset, length, codec, checksum, &payload)
                    .map_err(|error| RestoreError::Damaged {
                        input: name.clone(),
                        error,
                    })?;
                match codec {
                    Codec::Zstd => zstd_records += 1,
                    Codec::None => raw_records += 1,
                }
            }
            Item::End(t) => trailer = Some(t),
            Item::Header(_) | Item::Zero { .. } => {}
        }
        Ok(())
    })?;
    let Some(trailer) = trailer else {
        return Err(input.damaged(StreamError::Truncated {
            records: input.decoder.records(),
            at: "without a trailer".into(),
        }));
    };
    Ok(InspectReport {
        input: input.name.clone(),
        header,
        trailer,
        zstd_records,
        raw_records,
        stream_len: input.bytes_read,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::fs;
    use std::io;

    #[test]
    fn every_byte_flip_and_cut_of_a_small_zstd_stream_is_refused() {
        let mut d = vec![0u8; 3 * BLOCK];
        for (i, x) in d[..BLOCK + 100].iter_mut().enumerate() {
            *x = (i % 7) as u8;
        }
        let mut rng = Prng(5);
        d[2 * BLOCK..]
            .iter_mut()
            .for_each(|x| *x = rng.next() as u8);
        let good = export(&d, "p", None, &[0, 1, 2]);
        let check = |bytes: Vec<u8>| {
            inspect_input(Input::from_reader(
                "mem".into(),
                Box::new(io::Cursor::new(bytes)),
            ))
        };
        let r = check(good.clone()).unwrap();
        assert_eq!((r.zstd_records, r.raw_records), (2, 1));
        for pos in 0..good.len() {
            let mut m = good.clone();
            m[pos] ^= 0x10;
            let e = check(m).unwrap_err();
            assert!(is_damaged(&e), "flip at {pos}: {e}");
        }
        for cut in 0..good.len() {
            let e = check(good[..cut].to_vec()).unwrap_err();
            assert!(is_damaged(&e), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn inspect_reports_everything() {
        let c = chain();
        let r = inspect(&c.streams[1]).unwrap();
        assert_eq!(r.header.point_id, "p1");
        assert_eq!(r.trailer.records, 8);
        assert_eq!(r.zstd_records + r.raw_records, r.trailer.data_records);
        assert_eq!(r.stream_len, fs::metadata(&c.streams[1]).unwrap().len());
        let text = r.to_string();
        for want in [
            "point id:      p1",
            "base id:       p0 (incremental)",
            "created:       2023-11-14 22:13:20 UTC",
            "records:       8 (",
            "compression:",
            "status:        OK",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
