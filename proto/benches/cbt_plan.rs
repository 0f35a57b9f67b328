//! Planning a 16 TiB disk's changed-block bitmap (32 MiB, 2^28 blocks): decode the base64 and
//! turn the bits into coalesced extents. `cargo bench -p cbtstream-proto --bench cbt_plan`
use cbtstream_proto::cbt;
use std::time::Instant;

fn main() {
    let size: u64 = 16 << 40;
    let blocks = cbt::blocks_for(size) as usize;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![0u8; blocks / 8]),
        ("all set", vec![0xffu8; blocks / 8]),
    ];
    // 1 block in 1000, spread by a fixed LCG.
    let mut sparse = vec![0u8; blocks / 8];
    let mut x: u64 = 12345;
    for _ in 0..blocks / 1000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = (x >> 20) as usize % blocks;
        sparse[b / 8] |= 0x80 >> (b % 8);
    }
    cases.push(("0.1% set", sparse));
    for (name, bm) in cases {
        let text = cbt::encode_base64(&bm);
        let mut times = Vec::new();
        let mut n = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let decoded = cbt::decode_base64(text.as_bytes()).unwrap();
            let extents: Vec<_> = cbt::extents(&decoded, size, 32 << 20).unwrap().collect();
            n = extents.len();
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "16 TiB bitmap, {name}: decode + plan {:?} (median of 5), {n} extents of up to 32 MiB",
            times[2]
        );
    }
}
