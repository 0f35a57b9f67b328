//! The VHD stream of `GET /export_raw_vdi?format=vhd`, byte for byte as vhd-tool's
//! `vhd_from_raw` writes it (ocaml-vhd `f.ml`): footer copy, dynamic header, 512 zero bytes,
//! BAT at 2048, then each allocated 2 MiB block (a 512-byte all-ones sector bitmap and the
//! data) in ascending order, then the footer. No batmap. And the checks of a VHD that
//! `PUT /import_raw_vdi?format=vhd` reads (vhd-tool's `serve_vhd_to_raw`).

/// VHD block size: 2 MiB.
pub(crate) const BLOCK: u64 = 2 << 20;
/// Where the BAT starts (`table_offset`).
const TABLE_OFFSET: u64 = 2048;
/// xapi's `Constants.max_vhd_size`: 2040 GiB.
pub(crate) const MAX_VHD_SIZE: u64 = 2040 << 30;

/// The parts of one VHD stream for a disk of `size` bytes whose allocated blocks are
/// `blocks` (ascending block numbers).
pub(crate) struct VhdStream {
    /// Footer copy, header, padding and BAT: everything before the first block.
    pub prefix: Vec<u8>,
    /// The footer that ends the stream (identical to the copy at offset 0).
    pub footer: [u8; 512],
}

/// `max_table_entries`: the number of 2 MiB blocks, rounded up.
pub(crate) fn table_entries(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// The sector bitmap in front of every block: all sectors present.
pub(crate) const SECTOR_BITMAP: [u8; 512] = [0xff; 512];

/// Builds the stream's fixed parts. `uid` is the footer's unique id. The caller has bounded
/// `size` to [`MAX_VHD_SIZE`], so the BAT is at most 4 MiB.
pub(crate) fn stream(size: u64, blocks: &[u64], uid: [u8; 16]) -> VhdStream {
    let entries = table_entries(size);
    // vhd_from_raw's current_size: whole blocks.
    let current_size = entries * BLOCK;
    let bat_len = (entries * 4).next_multiple_of(512);
    let footer = footer(current_size, uid);
    let mut prefix = Vec::with_capacity((TABLE_OFFSET + bat_len) as usize);
    prefix.extend_from_slice(&footer);
    prefix.extend_from_slice(&header(entries));
    prefix.resize(TABLE_OFFSET as usize, 0);
    let mut bat = vec![0xffu8; (entries * 4) as usize];
    let first = TABLE_OFFSET + bat_len;
    for (k, &b) in blocks.iter().enumerate() {
        let sector = (first + k as u64 * (512 + BLOCK)) / 512;
        let i = (b * 4) as usize;
        if let Some(slot) = bat.get_mut(i..i + 4) {
            slot.copy_from_slice(&(sector as u32).to_be_bytes());
        }
    }
    prefix.extend_from_slice(&bat);
    prefix.resize((TABLE_OFFSET + bat_len) as usize, 0);
    VhdStream { prefix, footer }
}

/// The hard-disk footer (ocaml-vhd `Footer.create`): dynamic disk, creator `caml`.
fn footer(current_size: u64, uid: [u8; 16]) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: the reserved bit
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&512u64.to_be_bytes()); // data_offset: the header
                                                      // 24..28 timestamp 0
    f[28..32].copy_from_slice(b"caml");
    f[32..36].copy_from_slice(&1u32.to_be_bytes());
    // 36..40 creator host OS 0
    f[40..48].copy_from_slice(&current_size.to_be_bytes()); // original_size
    f[48..56].copy_from_slice(&current_size.to_be_bytes());
    let (c, h, s) = geometry(current_size / 512);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&3u32.to_be_bytes()); // dynamic
    f[68..84].copy_from_slice(&uid);
    let sum = checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The dynamic disk header.
fn header(entries: u64) -> [u8; 1024] {
    let mut h = [0u8; 1024];
    h[0..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&TABLE_OFFSET.to_be_bytes());
    h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    h[32..36].copy_from_slice(&(BLOCK as u32).to_be_bytes());
    let sum = checksum(&h);
    h[36..40].copy_from_slice(&sum.to_be_bytes());
    h
}

/// One's complement of the byte sum (the checksum field itself is still zero).
fn checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)))
}

/// The VHD specification's CHS geometry for `sectors` (cylinders, heads, sectors per track).
fn geometry(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(65535 * 16 * 255);
    let (mut spt, mut heads, mut cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        spt = 17;
        cth = total / spt;
        heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// What an import needs from a VHD's footer and dynamic header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Where the dynamic header starts.
    pub header_offset: u64,
}

/// The dynamic header's fields an import needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Dynamic {
    pub table_offset: u64,
    pub entries: u64,
}

/// Checks a footer as vhd-tool does (cookie, version, checksum; disk type 2, 3 or 4).
pub(crate) fn parse_footer(f: &[u8; 512]) -> Result<Layout, &'static str> {
    if &f[0..8] != b"conectix" {
        return Err("no VHD footer cookie");
    }
    if f[12..16] != 0x0001_0000u32.to_be_bytes() {
        return Err("unknown VHD version");
    }
    if !checksum_ok(f, 64) {
        return Err("bad VHD footer checksum");
    }
    if !matches!(be32(&f[60..64]), 2..=4) {
        return Err("not a fixed, dynamic or differencing VHD");
    }
    Ok(Layout {
        header_offset: be64(&f[16..24]),
    })
}

/// Checks a dynamic header (cookie, checksum, version); only 2 MiB blocks are simulated.
pub(crate) fn parse_header(h: &[u8; 1024]) -> Result<Dynamic, &'static str> {
    if &h[0..8] != b"cxsparse" {
        return Err("no VHD dynamic header cookie");
    }
    if !checksum_ok(h, 36) {
        return Err("bad VHD header checksum");
    }
    if h[24..28] != 0x0001_0000u32.to_be_bytes() {
        return Err("unknown VHD header version");
    }
    if u64::from(be32(&h[32..36])) != BLOCK {
        return Err("a VHD block size other than 2 MiB");
    }
    Ok(Dynamic {
        table_offset: be64(&h[16..24]),
        entries: u64::from(be32(&h[28..32])),
    })
}

fn checksum_ok(b: &[u8], at: usize) -> bool {
    let mut copy = b.to_vec();
    copy[at..at + 4].fill(0);
    checksum(&copy) == be32(&b[at..at + 4])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap_or_default())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap_or_default())
}

/// The BAT's allocated blocks as (byte offset of the block's bitmap, block number), in
/// stream order.
pub(crate) fn allocated(bat: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = bat
        .chunks_exact(4)
        .enumerate()
        .filter_map(|(i, e)| {
            let sector = be32(e);
            (sector != u32::MAX).then_some((u64::from(sector) * 512, i as u64))
        })
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_a_10_gib_disk() {
        let s = stream(10 << 30, &[0, 1, 7], [7; 16]);
        // M = 5120 entries, BAT of 20480 bytes at 2048.
        assert_eq!(s.prefix.len(), 2048 + 20480);
        assert_eq!(&s.prefix[..512], &s.footer[..]);
        assert_eq!(&s.prefix[512..520], b"cxsparse");
        assert_eq!(&s.prefix[512 + 28..512 + 32], &5120u32.to_be_bytes());
        assert!(s.prefix[1536..2048].iter().all(|&b| b == 0));
        let bat =
            |i: usize| u32::from_be_bytes(s.prefix[2048 + 4 * i..2052 + 4 * i].try_into().unwrap());
        assert_eq!((bat(0), bat(1), bat(2), bat(7)), (44, 4141, u32::MAX, 8238));
        assert_eq!(
            checksum(&{
                let mut f = s.footer;
                f[64..68].fill(0);
                f
            }),
            u32::from_be_bytes(s.footer[64..68].try_into().unwrap())
        );
    }

    #[test]
    fn parses_what_it_writes() {
        let s = stream(5 << 20, &[0, 2], [1; 16]);
        assert_eq!(parse_footer(&s.footer), Ok(Layout { header_offset: 512 }));
        let h: &[u8; 1024] = s.prefix[512..1536].try_into().unwrap();
        assert_eq!(
            parse_header(h),
            Ok(Dynamic {
                table_offset: 2048,
                entries: 3
            })
        );
        assert_eq!(
            allocated(&s.prefix[2048..2060]),
            vec![(2560, 0), (2560 + 512 + BLOCK, 2)]
        );
        let mut bad = s.footer;
        bad[40] ^= 1;
        assert_eq!(parse_footer(&bad), Err("bad VHD footer checksum"));
    }

    #[test]
    fn geometry_of_the_spec() {
        assert_eq!(geometry(65535 * 16 * 255 + 5), (65535, 16, 255));
        // 6 MiB: 12288 sectors, 17 sectors per track, 4 heads.
        assert_eq!(geometry(12288), (180, 4, 17));
    }
}
