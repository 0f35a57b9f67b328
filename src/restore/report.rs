//! What a restore did, and the formatting helpers its reports share.

use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// What [`restore`] did.
#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub image: PathBuf,
    /// Streams applied, and how many of them were full.
    pub streams: u64,
    pub full_streams: u64,
    /// Records read (DATA + ZERO).
    pub records: u64,
    pub data_records: u64,
    pub zero_records: u64,
    /// Bytes of data written to the image.
    pub bytes_written: u64,
    /// Bytes zeroed in the image (punched or written); ranges already known to be zero are
    /// skipped and not counted.
    pub bytes_zeroed: u64,
    /// Stream bytes read.
    pub input_bytes: u64,
    /// The point in time the image is at now.
    pub point_id: String,
    pub virtual_size: u64,
    pub seconds: f64,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let incr = self.streams - self.full_streams;
        write!(
            f,
            "restored {} to point {} ({}) from {} stream{} ({} full, {} incremental): {} records, \
             {} written, {} zeroed, {} read in {:.2} s ({}/s)",
            self.image.display(),
            self.point_id,
            human(self.virtual_size),
            self.streams,
            if self.streams == 1 { "" } else { "s" },
            self.full_streams,
            incr,
            self.records,
            human(self.bytes_written),
            human(self.bytes_zeroed),
            human(self.input_bytes),
            self.seconds,
            human(rate(self.bytes_written + self.bytes_zeroed, self.seconds)),
        )
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rate(bytes: u64, seconds: f64) -> u64 {
    if seconds > 0.0 {
        (bytes as f64 / seconds) as u64
    } else {
        0
    }
}

/// `1536` → `1.5 KiB`.
pub(super) fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Seconds since the epoch as RFC 3339 in UTC: `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339(secs: u64) -> String {
    let text = utc(secs.min(253_402_300_799));
    let (date, rest) = text.split_once(' ').unwrap_or((&text, ""));
    format!("{date}T{}Z", rest.trim_end_matches(" UTC"))
}

/// The proleptic Gregorian (year, month, day) of day `days` after 1970-01-01 (H. Hinnant's
/// civil_from_days).
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub(super) fn utc(secs: u64) -> String {
    // Beyond year 9999 a date is meaningless; show the number.
    if secs > 253_402_300_799 {
        return format!("{secs} s after the epoch");
    }
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_helpers() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(rfc3339(951_782_461), "2000-02-29T00:01:01Z");
        assert_eq!(utc(253_402_300_799), "9999-12-31 23:59:59 UTC");
        assert!(utc(u64::MAX).contains("after the epoch"));
    }
}
