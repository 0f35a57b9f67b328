use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;

/// The metadata at the start of a dynamic VHD, to be written by [`Image::bytes`].
#[derive(Clone)]
struct Image {
    virtual_size: u64,
    disk_type: u32,
    header_offset: u64,
    table_offset: u64,
    entries: u32,
    block_size: u32,
    /// Sector numbers, one per entry.
    bat: Vec<u32>,
}

impl Image {
    /// vhd-tool's stream of a `size`-byte disk with `blocks` allocated (docs/XENSERVER.md
    /// section 11): BAT at 2048, blocks in ascending order after it, size rounded up.
    fn vhd_tool(size: u64, blocks: &[u64]) -> Self {
        let entries = size.div_ceil(BLOCK);
        let first = (2048 + (entries * 4).next_multiple_of(512)) / 512;
        let mut bat = vec![UNALLOCATED; entries as usize];
        for (k, &b) in blocks.iter().enumerate() {
            bat[b as usize] = (first + k as u64 * 4097) as u32;
        }
        Image {
            virtual_size: entries * BLOCK,
            disk_type: DISK_DYNAMIC,
            header_offset: 512,
            table_offset: 2048,
            entries: entries as u32,
            block_size: BLOCK as u32,
            bat,
        }
    }

    /// Footer copy, header, the gap, the padded BAT.
    fn bytes(&self) -> Vec<u8> {
        let mut f = [0u8; 512];
        f[0..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&VERSION.to_be_bytes());
        f[16..24].copy_from_slice(&self.header_offset.to_be_bytes());
        f[28..32].copy_from_slice(b"caml");
        f[40..48].copy_from_slice(&self.virtual_size.to_be_bytes());
        f[48..56].copy_from_slice(&self.virtual_size.to_be_bytes());
        f[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        f[68..84].copy_from_slice(&[7; 16]);
        seal(&mut f, 64);
        let mut h = [0u8; 1024];
        h[0..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        h[24..28].copy_from_slice(&VERSION.to_be_bytes());
        h[28..32].copy_from_slice(&self.entries.to_be_bytes());
        h[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        seal(&mut h, 36);
        let mut out = f.to_vec();
        // An offset inside an earlier part leaves the parts in order.
        out.resize(out.len().max(self.header_offset as usize), 0);
        out.extend_from_slice(&h);
        out.resize(out.len().max(self.table_offset as usize), 0);
        for e in &self.bat {
            out.extend_from_slice(&e.to_be_bytes());
        }
        out.resize(out.len().next_multiple_of(512), 0);
        out
    }
}

/// Writes the checksum field at `at`.
fn seal(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let sum = !b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    b[at..at + 4].copy_from_slice(&sum.to_be_bytes());
}

/// Feeds `stream` in pieces of the given sizes (cycled; then the rest at once) and returns
/// the allocation and how many bytes the reader consumed.
fn read(stream: &[u8], pieces: &[usize]) -> Result<(VhdAllocation, u64), VhdError> {
    let mut reader = VhdAllocationReader::new();
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut sizes = pieces.iter().copied().filter(|&n| n > 0).cycle();
    loop {
        match reader.poll(&mut buf)? {
            Step::Done(a) => return Ok((a, (stream.len() - rest.len() - buf.len()) as u64)),
            Step::NeedBytes(n) => {
                assert!(
                    n > 0 && n <= HEADER_LEN.max(SKIP_STEP as usize),
                    "asked for {n}"
                );
                if rest.is_empty() {
                    return Err(reader.end_of_stream());
                }
                let take = sizes.next().unwrap_or(rest.len()).min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
            }
        }
    }
}

fn ranges(a: &VhdAllocation) -> Vec<Range<u64>> {
    a.allocated_ranges().collect()
}

#[test]
fn vhd_tool_stream_of_a_disk_that_is_not_whole_blocks() {
    // 9 MiB + 512 bytes: 5 entries, current_size 10 MiB; blocks 0 and 4 hold data.
    let image = Image::vhd_tool(9 * MIB + 512, &[0, 4]);
    let mut stream = image.bytes();
    assert_eq!(stream.len(), 2560);
    stream.extend_from_slice(&[0xff; 512]); // block 0's sector bitmap follows
    let (a, consumed) = read(&stream, &[]).unwrap();
    assert_eq!(
        (a.virtual_size, a.block_size, a.blocks()),
        (10 * MIB, BLOCK, 5)
    );
    assert_eq!(ranges(&a), [0..BLOCK, 8 * MIB..10 * MIB]);
    assert_eq!(a.allocated_bytes(), 4 * MIB);
    assert!(a.is_allocated(4) && !a.is_allocated(1) && !a.is_allocated(5));
    // The reader stops after the last entry: the padding and the blocks stay unread.
    assert_eq!(consumed, 2048 + 5 * 4);
}

#[test]
fn qemu_layout_clips_to_the_size_and_ignores_entries_past_it() {
    // qemu: BAT at 1536, a size in sectors; here more entries than the size needs (vhd-util
    // sizes the BAT for later growth), one of them allocated.
    let mut image = Image::vhd_tool(0, &[]);
    image.virtual_size = 5 * MIB + 1024;
    image.table_offset = 1536;
    image.entries = 8;
    image.bat = vec![UNALLOCATED; 8];
    image.bat[1] = 4;
    image.bat[2] = 4 + 4097;
    image.bat[7] = 4 + 2 * 4097;
    let (a, _) = read(&image.bytes(), &[]).unwrap();
    assert_eq!(a.blocks(), 3);
    let only: Vec<_> = a.allocated_ranges().map(|r| (r.start, r.end)).collect();
    assert_eq!(only, [(BLOCK, 5 * MIB + 1024)]);
    assert!(!a.is_allocated(7));
}

#[test]
fn neighbours_merge_and_an_empty_disk_has_no_ranges() {
    let image = Image::vhd_tool(12 * MIB, &[1, 2, 3, 5]);
    let (a, _) = read(&image.bytes(), &[]).unwrap();
    assert_eq!(ranges(&a), [BLOCK..4 * BLOCK, 5 * BLOCK..6 * BLOCK]);
    let (a, _) = read(&Image::vhd_tool(12 * MIB, &[]).bytes(), &[]).unwrap();
    assert_eq!((ranges(&a), a.allocated_bytes()), (vec![], 0));
    let (a, _) = read(&Image::vhd_tool(0, &[]).bytes(), &[]).unwrap();
    assert_eq!((a.blocks(), ranges(&a)), (0, vec![]));
}

/// Builds the image after `change`, reads it whole and returns the error.
fn error_of(change: impl FnOnce(&mut Image)) -> String {
    let mut image = Image::vhd_tool(6 * MIB, &[1]);
    change(&mut image);
    read(&image.bytes(), &[]).unwrap_err().to_string()
}

#[test]
fn each_bad_field_is_named() {
    let cases: Vec<(String, &str)> = vec![
        (error_of(|i| i.disk_type = 2), "the VHD is a fixed disk (footer byte 60); only dynamic disks have an allocation table to read"),
        (error_of(|i| i.disk_type = 4), "the VHD is a differencing disk (footer byte 60); only dynamic disks have an allocation table to read"),
        (error_of(|i| i.disk_type = 9), "the VHD is a unknown disk (footer byte 60); only dynamic disks have an allocation table to read"),
        (error_of(|i| i.virtual_size = 6 * MIB - 1), "the VHD's current_size 6291455 (footer byte 48) is not a whole number of 512-byte sectors"),
        (error_of(|i| i.header_offset = 0), "the VHD footer puts the dynamic header at byte 0 (footer byte 16); it must be between 512 and 1 MiB"),
        (error_of(|i| i.header_offset = MIB + 512), "the VHD footer puts the dynamic header at byte 1049088 (footer byte 16); it must be between 512 and 1 MiB"),
        (error_of(|i| i.table_offset = 1024), "the VHD header at byte 512 puts the BAT at byte 1024; it must follow the header and start within the first MiB"),
        (error_of(|i| i.table_offset = 2 * MIB), "the VHD header at byte 512 puts the BAT at byte 2097152; it must follow the header and start within the first MiB"),
        (error_of(|i| i.block_size = 3 * MIB as u32), "the VHD block size 3145728 (header at byte 512) is not a power of two between 512 KiB and 256 MiB"),
        (error_of(|i| i.block_size = 256 << 10), "the VHD block size 262144 (header at byte 512) is not a power of two between 512 KiB and 256 MiB"),
        (error_of(|i| i.block_size = 512 << 20), "the VHD block size 536870912 (header at byte 512) is not a power of two between 512 KiB and 256 MiB"),
        (error_of(|i| i.entries = 2), "the VHD header at byte 512 has 2 BAT entries of 2097152 bytes: too few for the 6291456-byte disk"),
        (error_of(|i| i.entries = (1 << 25) + 1), "the VHD header at byte 512 has 33554433 BAT entries, more than the 33554432 accepted"),
        // A size no table can cover: the header is refused before any entry is read.
        (error_of(|i| { i.virtual_size = 1 << 63; i.entries = 1 << 25 }), "the VHD header at byte 512 has 33554432 BAT entries of 2097152 bytes: too few for the 9223372036854775808-byte disk"),
        (error_of(|i| i.bat[2] = 4), "VHD BAT entry 2 at byte 2056 points at sector 4, inside the VHD's metadata (blocks start at sector 5 or later)"),
        (error_of(|i| i.bat[0] = 0), "VHD BAT entry 0 at byte 2048 points at sector 0, inside the VHD's metadata (blocks start at sector 5 or later)"),
    ];
    for (got, want) in cases {
        assert_eq!(got, want);
    }
}

#[test]
fn cookies_checksums_and_versions() {
    let good = Image::vhd_tool(6 * MIB, &[1]).bytes();
    let broken = |at: usize, value: &[u8], reseal: Option<usize>| {
        let mut s = good.clone();
        s[at..at + value.len()].copy_from_slice(value);
        if let Some(field) = reseal {
            let part = if at < 512 { 0..512 } else { 512..1536 };
            seal(&mut s[part], field);
        }
        read(&s, &[]).unwrap_err().to_string()
    };
    assert_eq!(
        broken(0, b"conectiX", None),
        r#"no VHD footer copy at byte 0: cookie conectiX, expected "conectix""#
    );
    assert!(broken(48, &[1], None).starts_with("bad VHD footer copy checksum at byte 0: stored 0x"));
    assert_eq!(
        broken(12, &[0, 2, 0, 0], Some(64)),
        "unknown VHD footer copy version 0x00020000 at byte 0 (expected 0x00010000)"
    );
    assert_eq!(
        broken(16, &u64::MAX.to_be_bytes(), Some(64)),
        "the VHD footer puts the dynamic header at byte 18446744073709551615 (footer byte 16); it must be between 512 and 1 MiB"
    );
    assert_eq!(
        broken(512 + 16, &u64::MAX.to_be_bytes(), Some(36)),
        "the VHD header at byte 512 puts the BAT at byte 18446744073709551615; it must follow the header and start within the first MiB"
    );
    assert_eq!(
        broken(512, b"\0\x01cxspar", None),
        r#"no VHD dynamic header at byte 512: cookie \x00\x01cxspar, expected "cxsparse""#
    );
    assert!(broken(512 + 100, &[1], None)
        .starts_with("bad VHD dynamic header checksum at byte 512: stored 0x"));
    assert_eq!(
        broken(512 + 24, &[0, 1, 0, 1], Some(36)),
        "unknown VHD dynamic header version 0x00010001 at byte 512 (expected 0x00010000)"
    );
}

#[test]
fn truncation_names_the_part() {
    let stream = Image::vhd_tool(6 * MIB, &[1]).bytes();
    for (len, want) in [
        (
            0,
            "the VHD stream ended before the end of the footer copy that starts at byte 0",
        ),
        (
            511,
            "the VHD stream ended before the end of the footer copy that starts at byte 0",
        ),
        (
            512,
            "the VHD stream ended before the end of the dynamic header that starts at byte 512",
        ),
        (
            1535,
            "the VHD stream ended before the end of the dynamic header that starts at byte 512",
        ),
        (
            1536,
            "the VHD stream ended before the end of the BAT that starts at byte 2048",
        ),
        (
            2048 + 11,
            "the VHD stream ended before the end of the BAT that starts at byte 2048",
        ),
    ] {
        assert_eq!(
            read(&stream[..len], &[7]).unwrap_err().to_string(),
            want,
            "{len}"
        );
    }
    assert!(read(&stream[..2048 + 12], &[7]).is_ok());
}

#[test]
fn errors_are_final_and_done_is_returned_once() {
    let mut bad = Image::vhd_tool(6 * MIB, &[1]).bytes();
    bad[0] = b'x';
    let mut reader = VhdAllocationReader::new();
    let mut buf = BytesMut::from(&bad[..]);
    let first = reader.poll(&mut buf).unwrap_err();
    assert_eq!(reader.poll(&mut buf).unwrap_err(), first);
    assert_eq!(reader.end_of_stream(), first);

    let mut reader = VhdAllocationReader::new();
    let mut buf = BytesMut::from(&Image::vhd_tool(6 * MIB, &[1]).bytes()[..]);
    assert!(matches!(reader.poll(&mut buf), Ok(Step::Done(_))));
    assert_eq!(reader.poll(&mut buf), Err(VhdError::AlreadyDone));
}

#[test]
fn memory_follows_the_entries_read_not_the_header() {
    // 64 TiB announced; only 3 entries arrive. The bitmap holds one word, not 4 MiB.
    let mut image = Image::vhd_tool(0, &[]);
    image.entries = 1 << 25;
    image.virtual_size = (1 << 25) * BLOCK;
    image.bat = vec![1 << 20, UNALLOCATED, (1 << 20) + 4097];
    let stream = image.bytes();
    let mut reader = VhdAllocationReader::new();
    let mut buf = BytesMut::from(&stream[..2048 + 12]);
    assert_eq!(reader.poll(&mut buf), Ok(Step::NeedBytes(4)));
    assert_eq!(reader.allocated, [0b101]);
    assert_eq!(
        reader.end_of_stream().to_string(),
        "the VHD stream ended before the end of the BAT that starts at byte 2048"
    );
}

proptest! {
    #[test]
    fn any_split_gives_the_same_allocation(
        blocks in proptest::collection::btree_set(0u64..40, 0..40),
        tail in 0u64..4096,
        pieces in proptest::collection::vec(1usize..700, 1..8),
    ) {
        let size = 40 * BLOCK - tail * 512;
        let blocks: Vec<u64> = blocks.into_iter().collect();
        let stream = Image::vhd_tool(size, &blocks).bytes();
        let whole = read(&stream, &[]).unwrap();
        prop_assert_eq!(read(&stream, &pieces).unwrap(), whole.clone());
        let expected: Vec<u64> = (0..40).filter(|b| whole.0.is_allocated(*b)).collect();
        prop_assert_eq!(expected, blocks);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..3000),
        pieces in proptest::collection::vec(1usize..600, 1..5),
    ) {
        let _ = read(&bytes, &pieces);
    }

    #[test]
    fn a_valid_start_then_arbitrary_metadata_never_panics(
        header in proptest::collection::vec(any::<u8>(), 40),
        bat in proptest::collection::vec(any::<u8>(), 0..1200),
    ) {
        // Footer and header cookies and checksums right, every other header field random.
        let mut stream = Image::vhd_tool(6 * MIB, &[1]).bytes();
        stream[512 + 8..512 + 48].copy_from_slice(&header);
        seal(&mut stream[512..1536], 36);
        stream.truncate(1536);
        stream.extend_from_slice(&bat);
        if let Ok((a, _)) = read(&stream, &[]) {
            let mut end = 0;
            for r in a.allocated_ranges() {
                prop_assert!(r.start >= end && r.start < r.end && r.end <= a.virtual_size);
                end = r.end;
            }
        }
    }
}

/// The fuzz target's seeds (a control byte, then the stream) are these images; run with
/// `VHD_WRITE_SEEDS=1` to write them again after changing one.
#[test]
fn fuzz_seeds_are_current() {
    let mut qemu_like = Image::vhd_tool(0, &[]);
    qemu_like.virtual_size = 5 * MIB + 1024;
    qemu_like.table_offset = 1536;
    qemu_like.entries = 4;
    qemu_like.bat = vec![UNALLOCATED, 4, UNALLOCATED, 4 + 4097];
    let seeds = [
        (
            "vhd_tool_resealed",
            0x03,
            Image::vhd_tool(9 * MIB + 512, &[0, 4]),
        ),
        (
            "vhd_tool_bytewise",
            0x00,
            Image::vhd_tool(12 * MIB, &[1, 2, 5]),
        ),
        ("bat_at_1536", 0x11, qemu_like),
    ];
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vhd_allocation");
    for (name, control, image) in seeds {
        let mut seed = vec![control];
        seed.extend_from_slice(&image.bytes());
        let path = dir.join(name);
        if std::env::var_os("VHD_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &seed).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(committed == seed, "{name} differs from its image");
        assert!(read(&seed[1..], &[]).is_ok(), "{name}");
    }
    // The start of `qemu-img convert -O vpc -o subformat=dynamic` of a 9 MiB + 1536 byte raw
    // image with data at 3 MiB only (qemu rounds the size up to its CHS geometry).
    let qemu = std::fs::read(dir.join("qemu_img_vpc")).unwrap();
    let (a, _) = read(&qemu[1..], &[]).unwrap();
    assert_eq!((a.virtual_size, a.blocks()), (9469952, 5));
    assert!((0..5)
        .map(|b| a.is_allocated(b))
        .eq([false, true, false, false, false]));
}

#[test]
fn an_allocation_map_from_a_block_bitmap() {
    // Blocks 0, 2 and 9 of a disk of 10 blocks and a half; bit 15 is past the end.
    let a = VhdAllocation::from_block_bitmap(10 * 64 + 32, 64, &[0b1010_0000, 0b0100_0001]);
    assert_eq!(a.blocks(), 11);
    let ranges: Vec<_> = a.allocated_ranges().collect();
    assert_eq!(ranges, vec![0..64, 128..192, 576..640]);
    assert_eq!(
        VhdAllocation::from_block_bitmap(100, 64, &[])
            .allocated_ranges()
            .count(),
        0
    );
}
