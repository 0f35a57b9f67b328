//! Test data for the restore unit tests: a PRNG, disks, and streams made with the encoder.

use super::RestoreError;
use cbtstream_proto::stream::{checksum, Codec, Encoder, Header};
use std::fs;
use std::path::PathBuf;

/// xorshift64*: a tiny deterministic PRNG for test data.
pub(super) struct Prng(pub(super) u64);

impl Prng {
    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(super) const BLOCK: usize = 4096;

/// A disk of `blocks` blocks: random, compressible text, or zero blocks.
pub(super) fn disk(rng: &mut Prng, blocks: usize) -> Vec<u8> {
    let mut d = vec![0u8; blocks * BLOCK];
    for b in 0..blocks {
        fill_block(rng, &mut d[b * BLOCK..(b + 1) * BLOCK]);
    }
    d
}

pub(super) fn fill_block(rng: &mut Prng, block: &mut [u8]) {
    match rng.below(3) {
        0 => block.fill(0),
        1 => block.iter_mut().for_each(|x| *x = rng.next() as u8),
        _ => {
            let word = rng.next().to_le_bytes();
            for (i, x) in block.iter_mut().enumerate() {
                *x = word[i % 8] ^ (i / 512) as u8;
            }
        }
    }
}

/// Exports `extents` (block indexes, each run of blocks one record or ZERO) of `disk`.
pub(super) fn export(disk: &[u8], point: &str, base: Option<&str>, blocks: &[usize]) -> Vec<u8> {
    let h = Header {
        virtual_size: disk.len() as u64,
        block_size: BLOCK as u32,
        source_id: "vdi-a".into(),
        point_id: point.into(),
        incremental: base.is_some(),
        base_id: base.map(str::to_owned),
        created_unix_secs: 1_700_000_000,
        codec: Codec::Zstd,
    };
    let (mut enc, mut out) = Encoder::new(&h).unwrap();
    for &b in blocks {
        let off = (b * BLOCK) as u64;
        let data = &disk[b * BLOCK..((b + 1) * BLOCK).min(disk.len())];
        if data.iter().all(|&x| x == 0) {
            out.extend_from_slice(&enc.zero(off, data.len() as u64).unwrap());
            continue;
        }
        let packed = zstd::bulk::compress(data, 3).unwrap();
        let (codec, payload) = if packed.len() < data.len() {
            (Codec::Zstd, &packed[..])
        } else {
            (Codec::None, data)
        };
        let hdr = enc
            .data(off, data.len() as u64, codec, checksum(data), payload)
            .unwrap();
        out.extend_from_slice(&hdr);
        out.extend_from_slice(payload);
    }
    out.extend_from_slice(&enc.finish());
    out
}

pub(super) struct Chain {
    pub(super) dir: tempfile::TempDir,
    pub(super) disks: Vec<Vec<u8>>,
    pub(super) streams: Vec<PathBuf>,
}

/// A full export and two incrementals; the second grows the disk.
pub(super) fn chain() -> Chain {
    let mut rng = Prng(0x1234_5678_9abc_def1);
    let dir = tempfile::tempdir().unwrap();
    let d0 = disk(&mut rng, 64);
    let all: Vec<usize> = (0..64).collect();
    let mut d1 = d0.clone();
    let changed1: Vec<usize> = vec![0, 1, 5, 17, 18, 19, 40, 63];
    for &b in &changed1 {
        fill_block(&mut rng, &mut d1[b * BLOCK..(b + 1) * BLOCK]);
    }
    d1[40 * BLOCK..41 * BLOCK].fill(0); // a block that becomes zero
    let mut d2 = d1.clone();
    d2.resize(80 * BLOCK, 0);
    let mut changed2: Vec<usize> = vec![2, 17, 33];
    for &b in &changed2 {
        fill_block(&mut rng, &mut d2[b * BLOCK..(b + 1) * BLOCK]);
    }
    for b in 70..80 {
        fill_block(&mut rng, &mut d2[b * BLOCK..(b + 1) * BLOCK]);
        changed2.push(b);
    }
    let s = [
        export(&d0, "p0", None, &all),
        export(&d1, "p1", Some("p0"), &changed1),
        export(&d2, "p2", Some("p1"), &changed2),
    ];
    let mut streams = Vec::new();
    for (i, bytes) in s.iter().enumerate() {
        let p = dir.path().join(format!("s{i}.cbt"));
        fs::write(&p, bytes).unwrap();
        streams.push(p);
    }
    Chain {
        dir,
        disks: vec![d0, d1, d2],
        streams,
    }
}

/// True if `e` says a stream is damaged (corrupt, altered or truncated).
pub(super) fn is_damaged(e: &RestoreError) -> bool {
    matches!(e, RestoreError::Damaged { .. })
}
