//! Encode: turn a fetched range into records. All-zero 64 KiB blocks become ZERO records
//! without touching the compressor; data zstd cannot shrink is stored raw. With zstd this
//! runs on compression threads; without compression the fetch workers call [`encode`]
//! themselves (see `Batch`), which saves a hand-off between threads per record.

use super::pool::Pools;
use super::{Encoded, Fetched, Payload, Record, ToSink};
use cbtstream_proto::stream::{checksum, Codec};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy)]
pub struct EncodeConfig {
    pub level: i32,
    /// Zero detection granularity (the CBT block, 64 KiB).
    pub block: u64,
    /// zstd window: large enough for the largest record, so the end of a record can refer
    /// to its start (level 1's window is 512 KiB).
    pub window_log: u32,
}

/// zstd's level 1 hash table for 1 MiB inputs has 2^14 entries. Compressing each record on
/// its own, with no history from the one before, that made the stream 0.1% larger than
/// `zstd -1` of the whole disk; 2^15 entries make it 2.6% smaller (text: 477 against
/// 513 MB/s a core). Other levels are left as zstd sets them.
const LEVEL1_HASH_LOG: u32 = 15;

impl EncodeConfig {
    /// The window for records of at most `largest` bytes, within zstd's default decoder
    /// limit (2^27), so any zstd can decode a record.
    pub fn window_for(largest: u64) -> u32 {
        (u64::BITS - largest.max(1).saturating_sub(1).leading_zeros()).clamp(10, 27)
    }
}

/// True when every byte is zero. Compares 64-byte chunks, which compiles to wide loads; the
/// first chunk alone settles it for almost all data blocks.
pub fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.split_at(buf.len() - buf.len() % 64);
    rest.iter().all(|&b| b == 0) && chunks.chunks_exact(64).all(|c| c == [0u8; 64])
}

/// Run one compression worker until the input closes.
pub fn worker(
    input: Arc<Mutex<Receiver<Fetched>>>,
    output: Sender<ToSink>,
    pools: Arc<Pools>,
    cfg: EncodeConfig,
) -> std::io::Result<()> {
    let mut compressor = zstd::bulk::Compressor::new(cfg.level)?;
    compressor.set_parameter(zstd::zstd_safe::CParameter::WindowLog(cfg.window_log))?;
    if cfg.level == 1 {
        compressor.set_parameter(zstd::zstd_safe::CParameter::HashLog(LEVEL1_HASH_LOG))?;
    }
    loop {
        let next = match input.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return Ok(()),
        };
        let Ok(f) = next else { return Ok(()) };
        let encoded = encode(f, Some(&mut compressor), &pools, &cfg)?;
        if output.send(ToSink::Encoded(encoded)).is_err() {
            return Ok(());
        }
    }
}

/// Split a fetched range into ZERO and DATA records, compressing DATA when `compressor` is
/// given. Zero detection works on blocks aligned to the disk, not to the read, so whether a
/// block is zero does not depend on the request size (a DATA record never spans two reads).
pub fn encode(
    f: Fetched,
    mut compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    pools: &Pools,
    cfg: &EncodeConfig,
) -> std::io::Result<Encoded> {
    let data = f.data;
    let mut records = Vec::new();
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = f.offset + pos as u64;
        let next_boundary = (abs / cfg.block + 1) * cfg.block;
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
                let mut out = pools.out.get();
                out.reserve(zstd::zstd_safe::compress_bound(bytes.len()));
                c.compress_to_buffer(bytes, &mut out)?;
                if out.len() < bytes.len() {
                    Some(out)
                } else {
                    pools.out.put(out);
                    None
                }
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
    // The raw buffer goes on to the sink only if a record points into it.
    let raw = if keep_raw {
        Some(data)
    } else {
        pools.read.put(data);
        None
    };
    Ok(Encoded {
        id: f.id,
        records,
        raw,
        permit: f.permit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_covers_the_largest_record() {
        assert_eq!(EncodeConfig::window_for(0), 10);
        assert_eq!(EncodeConfig::window_for(64 << 10), 16);
        assert_eq!(EncodeConfig::window_for((2 << 20) - 1), 21);
        assert_eq!(EncodeConfig::window_for(2 << 20), 21);
        assert_eq!(EncodeConfig::window_for((2 << 20) + 1), 22);
        assert_eq!(EncodeConfig::window_for(u64::MAX), 27);
    }

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

    #[test]
    fn records_follow_disk_blocks() {
        let pools = Pools::default();
        let cfg = EncodeConfig {
            level: 1,
            block: 4096,
            window_log: 17,
        };
        // 3 blocks at offset 4096: data, zero, data (the last one partial).
        let mut data = bytes::BytesMut::zeroed(2 * 4096 + 512);
        data[0] = 1;
        data[8192] = 1;
        let f = Fetched {
            id: 0,
            offset: 4096,
            len: data.len() as u64,
            data,
            permit: None,
        };
        let e = encode(f, None, &pools, &cfg).unwrap();
        let kinds: Vec<_> = e
            .records
            .iter()
            .map(|r| match r {
                Record::Zero { offset, len } => ('Z', *offset, *len),
                Record::Data { offset, len, .. } => ('D', *offset, *len),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![('D', 4096, 4096), ('Z', 8192, 4096), ('D', 12288, 512)]
        );
    }
}
