//! Which points `prune` keeps: a pure decision over the points' ids and times, as restic's
//! `forget` makes it. Walking from the newest point back, each rule keeps a point when the
//! point opens a bucket the rule has not seen yet (keep-last: every point is its own
//! bucket; daily: the UTC day; weekly: the ISO week, Monday to Sunday; monthly: the
//! calendar month) and the rule has buckets left to fill. On top of the rules, the newest
//! point and the pinned ones (the chain state's point) are always kept.

/// The `--keep-*` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

/// One point as the policy sees it; `time` is point.json's (RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dated<'a> {
    pub id: &'a str,
    pub time: &'a str,
}

/// Why a point is kept (the first reason found).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Newest,
    Pinned,
    Last,
    Daily,
    Weekly,
    Monthly,
    /// Its time is not one this policy can read: never delete what is not understood.
    UnknownTime,
}

impl Keep {
    pub fn as_str(self) -> &'static str {
        match self {
            Keep::Newest => "newest",
            Keep::Pinned => "chain state",
            Keep::Last => "last",
            Keep::Daily => "daily",
            Keep::Weekly => "weekly",
            Keep::Monthly => "monthly",
            Keep::UnknownTime => "unreadable time",
        }
    }
}

/// For each of `points` (oldest first, as [`super::Points`] lists them), `Some(reason)` when
/// it is kept, `None` when it may go.
pub fn decide(points: &[Dated<'_>], policy: Policy, pinned: &[&str]) -> Vec<Option<Keep>> {
    let mut rules = [
        (Keep::Last, policy.last, None),
        (Keep::Daily, policy.daily, None),
        (Keep::Weekly, policy.weekly, None),
        (Keep::Monthly, policy.monthly, None),
    ];
    let mut out = vec![None; points.len()];
    for (i, p) in points.iter().enumerate().rev() {
        let days = days_since_epoch(p.time);
        let mut keep = None;
        for (n, (reason, left, last_bucket)) in rules.iter_mut().enumerate() {
            let bucket = match (n, days) {
                (0, _) => Some(i as i64),
                (_, None) => None,
                (1, Some(d)) => Some(d),
                (2, Some(d)) => Some(iso_week(d)),
                (_, Some(d)) => Some(month(d)),
            };
            if *left > 0 && bucket.is_some() && bucket != *last_bucket {
                *left -= 1;
                *last_bucket = bucket;
                keep = keep.or(Some(*reason));
            }
        }
        if days.is_none() {
            keep = Some(Keep::UnknownTime);
        }
        if pinned.contains(&p.id) {
            keep = Some(Keep::Pinned);
        }
        if i + 1 == points.len() {
            keep = Some(Keep::Newest);
        }
        out[i] = keep;
    }
    out
}

/// Days from 1970-01-01 to the date of `YYYY-MM-DDTHH:MM:SS[.frac]Z`, or `None` when the
/// text is not such a UTC time.
pub fn days_since_epoch(time: &str) -> Option<i64> {
    let b = time.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = b.get(r)?;
        if !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let separators = b.get(4) == Some(&b'-')
        && b.get(7) == Some(&b'-')
        && b.get(10) == Some(&b'T')
        && b.get(13) == Some(&b':')
        && b.get(16) == Some(&b':');
    let tail = &b[19..];
    let fraction_then_z = match tail.split_last() {
        Some((b'Z', rest)) => {
            rest.is_empty()
                || (rest[0] == b'.' && rest.len() > 1 && rest[1..].iter().all(u8::is_ascii_digit))
        }
        _ => false,
    };
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    if !separators
        || !fraction_then_z
        || !(1..=days_in_month).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day))
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The ISO week (Monday to Sunday) holding day `days`, as a number that grows by one each
/// week: 1970-01-01 was a Thursday, so Mondays are the days with `(days + 3) % 7 == 0`.
fn iso_week(days: i64) -> i64 {
    (days + 3).div_euclid(7)
}

/// The month holding day `days`, as `year * 12 + month - 1`.
fn month(days: i64) -> i64 {
    let (year, month, _) = crate::restore::report::civil_from_days(days);
    year * 12 + month - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::report::rfc3339;
    use proptest::prelude::*;

    fn kept(times: &[&str], policy: Policy, pinned: &[&str]) -> Vec<usize> {
        let ids: Vec<String> = (0..times.len()).map(|i| format!("p{i}")).collect();
        let points: Vec<Dated> = ids
            .iter()
            .zip(times)
            .map(|(id, time)| Dated { id, time })
            .collect();
        decide(&points, policy, pinned)
            .iter()
            .enumerate()
            .filter_map(|(i, k)| k.map(|_| i))
            .collect()
    }

    #[test]
    fn reads_utc_times() {
        assert_eq!(days_since_epoch("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(days_since_epoch("2000-02-29T23:59:59Z"), Some(11_016));
        assert_eq!(days_since_epoch("2026-11-30T02:04:25.123Z"), Some(20_787));
        for bad in [
            "",
            "2026-11-30",
            "2026-11-30T02:04:25",
            "2026-11-30T02:04:25+01:00",
            "2026-11-30 02:04:25Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T02:04:25.Z",
            "+026-11-30T02:04:25Z",
            "２026-11-30T02:04:25Z",
        ] {
            assert_eq!(days_since_epoch(bad), None, "{bad}");
        }
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let d = |t: &str| days_since_epoch(t).unwrap();
        // 2026-11-29 is a Sunday, 2026-11-30 a Monday.
        assert_eq!(
            iso_week(d("2026-11-23T00:00:00Z")),
            iso_week(d("2026-11-29T23:59:59Z"))
        );
        assert_ne!(
            iso_week(d("2026-11-29T00:00:00Z")),
            iso_week(d("2026-11-30T00:00:00Z"))
        );
        // ISO week 1 of 2021 starts on Monday 2021-01-04; 2021-01-03 is in 2020's week 53.
        assert_ne!(
            iso_week(d("2021-01-03T00:00:00Z")),
            iso_week(d("2021-01-04T00:00:00Z"))
        );
        assert_eq!(
            iso_week(d("2020-12-28T00:00:00Z")),
            iso_week(d("2021-01-03T00:00:00Z"))
        );
        assert_eq!(month(d("2024-02-29T00:00:00Z")), 2024 * 12 + 1);
        assert_ne!(
            month(d("2024-02-29T00:00:00Z")),
            month(d("2024-03-01T00:00:00Z"))
        );
    }

    #[test]
    fn daily_weekly_monthly_keep_the_newest_point_of_each_bucket() {
        let times = [
            "2026-09-15T10:00:00Z", // 0: September
            "2026-10-20T10:00:00Z", // 1: October, a Tuesday
            "2026-10-31T10:00:00Z", // 2: October, Saturday of the week of 10-26
            "2026-11-02T01:00:00Z", // 3: Monday
            "2026-11-02T23:00:00Z", // 4: the same Monday, later
            "2026-11-03T01:00:00Z", // 5: Tuesday
            "2026-11-04T01:00:00Z", // 6: Wednesday
        ];
        let policy = |last, daily, weekly, monthly| Policy {
            last,
            daily,
            weekly,
            monthly,
        };
        assert_eq!(kept(&times, policy(2, 0, 0, 0), &[]), [5, 6]);
        assert_eq!(kept(&times, policy(0, 3, 0, 0), &[]), [4, 5, 6]);
        assert_eq!(kept(&times, policy(0, 0, 3, 0), &[]), [1, 2, 6]);
        assert_eq!(kept(&times, policy(0, 0, 0, 3), &[]), [0, 2, 6]);
        assert_eq!(kept(&times, policy(1, 0, 2, 0), &[]), [2, 6]);
        // The newest is kept even by an empty policy; the pinned point too.
        assert_eq!(kept(&times, policy(0, 0, 0, 0), &["p1"]), [1, 6]);
        // A point whose time is unreadable is kept, and takes no bucket.
        let odd = ["2026-11-01T00:00:00Z", "yesterday", "2026-11-02T00:00:00Z"];
        assert_eq!(kept(&odd, policy(0, 2, 0, 0), &[]), [0, 1, 2]);
    }

    fn times() -> impl Strategy<Value = Vec<String>> {
        // Sorted times across a few months, several a day at times.
        proptest::collection::vec(1_780_000_000u64..1_790_000_000, 1..40).prop_map(|mut v| {
            v.sort_unstable();
            v.into_iter().map(rfc3339).collect()
        })
    }

    proptest! {
        #[test]
        fn the_policy_keeps_what_it_promises(
            times in times(),
            last in 0u32..6, daily in 0u32..6, weekly in 0u32..4, monthly in 0u32..3,
            pin in proptest::option::of(0usize..40),
        ) {
            let refs: Vec<&str> = times.iter().map(String::as_str).collect();
            let pinned_id = pin.filter(|&i| i < times.len()).map(|i| format!("p{i}"));
            let pinned: Vec<&str> = pinned_id.iter().map(String::as_str).collect();
            let policy = Policy { last, daily, weekly, monthly };
            let keep = kept(&refs, policy, &pinned);
            let n = times.len();
            // The newest point, the pinned one, and the `last` newest are kept.
            prop_assert!(keep.contains(&(n - 1)));
            if let Some(i) = pin.filter(|&i| i < n) {
                prop_assert!(keep.contains(&i));
            }
            for i in n.saturating_sub(last as usize)..n {
                prop_assert!(keep.contains(&i));
            }
            // Daily: the newest point of each of the `daily` newest days that have points.
            let day = |i: usize| days_since_epoch(&times[i]).unwrap();
            let mut days: Vec<i64> = (0..n).map(day).collect();
            days.dedup();
            for &d in days.iter().rev().take(daily as usize) {
                let newest = (0..n).rev().find(|&i| day(i) == d).unwrap();
                prop_assert!(keep.contains(&newest));
            }
            let mut weeks: Vec<i64> = (0..n).map(|i| iso_week(day(i))).collect();
            weeks.dedup();
            for &w in weeks.iter().rev().take(weekly as usize) {
                let newest = (0..n).rev().find(|&i| iso_week(day(i)) == w).unwrap();
                prop_assert!(keep.contains(&newest));
            }
            let mut months: Vec<i64> = (0..n).map(|i| month(day(i))).collect();
            months.dedup();
            for &m in months.iter().rev().take(monthly as usize) {
                let newest = (0..n).rev().find(|&i| month(day(i)) == m).unwrap();
                prop_assert!(keep.contains(&newest));
            }
            // Nothing else: at most one point per rule and bucket, the newest and the pinned.
            let most = 1 + pinned.len() + (last + daily + weekly + monthly) as usize;
            prop_assert!(keep.len() <= most);
            for &i in &keep {
                let newest_of_day = (i + 1..n).all(|j| day(j) != day(i));
                let by_rule = n - i <= last as usize
                    || (newest_of_day && days.iter().rev().take(daily as usize).any(|&d| d == day(i)))
                    || ((i + 1..n).all(|j| iso_week(day(j)) != iso_week(day(i)))
                        && weeks.iter().rev().take(weekly as usize).any(|&w| w == iso_week(day(i))))
                    || ((i + 1..n).all(|j| month(day(j)) != month(day(i)))
                        && months.iter().rev().take(monthly as usize).any(|&m| m == month(day(i))));
                prop_assert!(by_rule || i == n - 1 || pin == Some(i), "point {i} kept for no reason");
            }
        }

        #[test]
        fn any_text_is_a_time_or_none(s in "\\PC{0,30}") {
            let _ = days_since_epoch(&s);
        }

        #[test]
        fn times_read_back_as_their_day(secs in 0u64..253_402_300_799) {
            prop_assert_eq!(days_since_epoch(&rfc3339(secs)), Some((secs / 86_400) as i64));
        }
    }
}
