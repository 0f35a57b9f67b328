//! `cbtstream_proto::vhd` against real VHD streams: the simulator's
//! `GET /export_raw_vdi?format=vhd` (vhd-tool's layout) and a dynamic VHD written by
//! `qemu-img convert -O vpc`. The allocation the reader finds must be exactly the 2 MiB blocks
//! that hold non-zero data.

mod common;

use std::ops::Range;

use bytes::BytesMut;
use cbtstream_proto::vhd::{Step, VhdAllocation, VhdAllocationReader};
use common::*;

const MIB: u64 = 1 << 20;
const VHD_BLOCK: u64 = 2 * MIB;

/// Feeds `stream` to the reader `piece` bytes at a time, as a client reading the socket
/// would; returns the allocation and how many bytes it took from the stream.
fn read_allocation(stream: &[u8], piece: usize) -> (VhdAllocation, usize) {
    let mut reader = VhdAllocationReader::new();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    loop {
        match reader.poll(&mut buf).unwrap() {
            Step::Done(a) => return (a, fed - buf.len()),
            Step::NeedBytes(_) => {
                assert!(fed < stream.len(), "{}", reader.end_of_stream());
                let end = (fed + piece).min(stream.len());
                buf.extend_from_slice(&stream[fed..end]);
                fed = end;
            }
        }
    }
}

/// The 2 MiB blocks of `disk` with a non-zero byte, as ranges clipped to `size` (merged).
fn non_zero_blocks(disk: &[u8], size: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, block) in disk.chunks(VHD_BLOCK as usize).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let start = i as u64 * VHD_BLOCK;
        let end = (start + VHD_BLOCK).min(size);
        match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_export_gives_the_blocks_with_data() {
    bounded(async {
        // 13 MiB + 1536: seven blocks, the last one partial. Data in blocks 0, 1 (their
        // shared edge), 3 and the last sector of block 6; block 5 was written with zeros.
        let size = 13 * MIB + 1536;
        let env = Env::start(|c| c.disk_size = size).await;
        env.write(2 * MIB - 2, b"edge").await;
        env.write(7 * MIB, b"middle").await;
        env.write(10 * MIB, &[0; 4096]).await;
        env.write(size - 512, &[0xcd; 512]).await;
        let r = env
            .http(
                "GET",
                &format!(
                    "/export_raw_vdi?session_id={}&vdi={}&format=vhd",
                    env.session, env.vdi
                ),
                b"",
            )
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        let disk = std::fs::read(env.sim.vdi_path(env.sim.vdi_uuid()).unwrap()).unwrap();
        assert_eq!(disk.len() as u64, size);

        for piece in [1, 333, 4096, r.body.len()] {
            let (a, used) = read_allocation(&r.body, piece);
            // vhd-tool rounds current_size up to whole blocks; the reader reports it as is.
            assert_eq!((a.virtual_size, a.block_size), (14 * MIB, VHD_BLOCK));
            let ranges: Vec<Range<u64>> = a.allocated_ranges().collect();
            assert_eq!(ranges, [0..4 * MIB, 6 * MIB..8 * MIB, 12 * MIB..14 * MIB]);
            assert_eq!(ranges, non_zero_blocks(&disk, a.virtual_size));
            assert_eq!(a.allocated_bytes(), 8 * MIB);
            // It stops after the 7 BAT entries at 2048: the blocks are never read.
            assert_eq!(used, 2048 + 7 * 4);
        }
    })
    .await;
}

#[test]
fn qemu_img_dynamic_vhd_gives_the_blocks_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let vhd = dir.path().join("disk.vhd");
    // 11 MiB + 3 sectors, data in blocks 1, 2 and 5 (the partial last one), the rest zero.
    let size = 11 * MIB + 1536;
    let mut disk = vec![0u8; size as usize];
    disk[(3 * MIB) as usize..][..5].copy_from_slice(b"hello");
    disk[(4 * MIB) as usize] = 1;
    disk[(size - 1) as usize] = 0xee;
    std::fs::write(&raw, &disk).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic",
        ])
        .arg(&raw)
        .arg(&vhd)
        .output()
        .expect("qemu-img is needed (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stream = std::fs::read(&vhd).unwrap();
    let (a, used) = read_allocation(&stream, 100);
    // qemu rounds the size up to its CHS geometry, still within the six blocks.
    assert!(
        a.virtual_size >= size && a.virtual_size <= 12 * MIB,
        "{}",
        a.virtual_size
    );
    assert_eq!(a.block_size, VHD_BLOCK);
    let ranges: Vec<Range<u64>> = a.allocated_ranges().collect();
    assert_eq!(ranges, [2 * MIB..6 * MIB, 10 * MIB..a.virtual_size]);
    assert_eq!(ranges, non_zero_blocks(&disk, a.virtual_size));
    // qemu's BAT is at 1536, one entry per block.
    assert_eq!(used, 1536 + 6 * 4);
}
