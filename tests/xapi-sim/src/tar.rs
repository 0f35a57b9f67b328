//! The one-file tar of `/export_metadata` (ustar header, data padded to 512 bytes, two zero
//! blocks) and a reader of an archive's first member.

/// A tar archive holding one regular file.
pub(crate) fn single_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    let n = name.len().min(99);
    h[..n].copy_from_slice(&name.as_bytes()[..n]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512) + 1024, 0);
    out
}

/// The name and data of the archive's first member; `None` if the archive ends early or
/// its header is not a tar header.
pub(crate) fn first_file(archive: &[u8]) -> Option<(String, &[u8])> {
    let h = archive.get(..512)?;
    let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let name = String::from_utf8_lossy(&h[..name_end]).into_owned();
    let size_field = std::str::from_utf8(&h[124..136]).ok()?;
    let size = usize::from_str_radix(size_field.trim_matches(|c| c == '\0' || c == ' '), 8).ok()?;
    let data = archive.get(512..512usize.checked_add(size)?)?;
    Some((name, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let a = single_file("ova.xml", b"<value/>");
        assert_eq!(a.len(), 512 * 4);
        assert_eq!(first_file(&a), Some(("ova.xml".into(), &b"<value/>"[..])));
        assert_eq!(first_file(&a[..515]), None);
        assert_eq!(first_file(&a[..100]), None);
        let mut bad = a.clone();
        bad[124..136].copy_from_slice(b"99999999999\0");
        assert_eq!(first_file(&bad), None);
    }
}
