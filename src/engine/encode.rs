//! Compress: worker threads turn fetched buffers into records. All-zero blocks become ZERO
//! records without touching the compressor; data that zstd cannot shrink is stored raw.

use super::fetch::BufPool;
use super::{Encoded, Fetched, Payload, Record};
use cbtstream_proto::stream::{checksum, Codec};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy)]
pub struct EncodeConfig {
    pub codec: Codec,
    pub level: i32,
    /// Zero detection granularity (the CBT block, 64 KiB).
    pub block: u64,
}

/// True when every byte is zero. Compares 64-byte chunks, which compiles to wide loads.
pub fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.split_at(buf.len() - buf.len() % 64);
    rest.iter().all(|&b| b == 0) && chunks.chunks_exact(64).all(|c| c == [0u8; 64])
}

/// Run one compression worker until the input closes.
pub fn worker(
    input: Arc<Mutex<Receiver<Fetched>>>,
    output: Sender<Encoded>,
    pool: Arc<BufPool>,
    cfg: EncodeConfig,
) -> std::io::Result<()> {
    let mut compressor = match cfg.codec {
        Codec::Zstd => Some(zstd::bulk::Compressor::new(cfg.level)?),
        Codec::None => None,
    };
    loop {
        let next = match input.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return Ok(()),
        };
        let Ok(f) = next else { return Ok(()) };
        let encoded = encode(f, compressor.as_mut(), &pool, &cfg)?;
        if output.send(encoded).is_err() {
            return Ok(());
        }
    }
}

fn encode(
    f: Fetched,
    mut compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    pool: &BufPool,
    cfg: &EncodeConfig,
) -> std::io::Result<Encoded> {
    let Some(data) = f.data else {
        return Ok(Encoded {
            id: f.id,
            records: vec![Record::Zero {
                offset: f.offset,
                len: f.len,
            }],
            raw: None,
            permit: f.permit,
        });
    };
    let mut records = Vec::new();
    // Split into runs of all-zero and not-all-zero blocks (aligned to the disk, so the
    // same disk gives the same records whatever the request size).
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = f.offset + pos as u64;
        let next_boundary = ((abs / cfg.block) + 1) * cfg.block;
        let end = ((next_boundary - f.offset) as usize).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => runs.push((pos, end, zero)),
        }
        pos = end;
    }
    let mut keep_raw = false;
    for (start, end, zero) in runs {
        let offset = f.offset + start as u64;
        let len = (end - start) as u64;
        if zero {
            records.push(Record::Zero { offset, len });
            continue;
        }
        let bytes = &data[start..end];
        let sum = checksum(bytes);
        let compressed = match compressor.as_deref_mut() {
            Some(c) => {
                let out = c.compress(bytes)?;
                (out.len() < bytes.len()).then_some(out)
            }
            None => None,
        };
        let (codec, payload) = match compressed {
            Some(out) => (Codec::Zstd, Payload::Compressed(out)),
            None => {
                keep_raw = true;
                (Codec::None, Payload::Raw(start..end))
            }
        };
        records.push(Record::Data {
            offset,
            len,
            codec,
            checksum: sum,
            payload,
        });
    }
    Ok(Encoded {
        id: f.id,
        records,
        // The raw buffer goes on to the sink only if a record points into it.
        raw: if keep_raw {
            Some(data)
        } else {
            pool.put(data);
            None
        },
        permit: f.permit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 100]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
