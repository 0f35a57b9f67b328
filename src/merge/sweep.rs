//! The range arithmetic of a merge: which stream's record wins where.
//!
//! The merge sweeps the disk from offset 0 up. Each input has a *current* record: its first
//! record that ends after the sweep position (inputs are in offset order, so only that one
//! can cover the position or be the next to start). Inputs are given oldest first; the
//! newest one whose current record covers the position wins, up to where its record ends or
//! a newer input's record starts, whichever comes first.

/// A record's disk range, `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

/// What to do at the sweep position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Input `input`'s current record holds `[position, end)`.
    Take { input: usize, end: u64 },
    /// No record covers `[position, until)`: it reads as zeroes.
    Gap { until: u64 },
}

/// The step at `position`, given each input's current record (oldest input first), with
/// nothing at or past `limit` (the output's virtual size). `None` once nothing is left
/// below `limit`. Every current record must end after `position`.
pub fn next_step(position: u64, limit: u64, current: &[Option<Span>]) -> Option<Step> {
    if position >= limit {
        return None;
    }
    let winner = current
        .iter()
        .rposition(|s| matches!(s, Some(s) if s.start <= position && position < s.end));
    match winner {
        Some(input) => {
            let own_end = current[input].map_or(limit, |s| s.end);
            let newer_start = current[input + 1..]
                .iter()
                .flatten()
                .map(|s| s.start)
                .min()
                .unwrap_or(u64::MAX);
            Some(Step::Take {
                input,
                end: own_end.min(newer_start).min(limit),
            })
        }
        None => {
            let next = current.iter().flatten().map(|s| s.start).min()?;
            (next < limit).then_some(Step::Gap { until: next })
        }
    }
}

/// How far each input's records can show, oldest input first: a disk that shrank at some
/// point lost what lay past its new end, so an input's records show only below the smallest
/// size of it and every newer input (restore truncates the image the same way).
pub fn visible_bounds(sizes: &[u64]) -> Vec<u64> {
    let mut bounds = sizes.to_vec();
    for i in (0..bounds.len().saturating_sub(1)).rev() {
        bounds[i] = bounds[i].min(bounds[i + 1]);
    }
    bounds
}

/// The part of `span` below `bound` still ahead of `position`, as [`next_step`] takes it:
/// `None` when nothing of it is left to show.
pub fn clip(span: Span, bound: u64, position: u64) -> Option<Span> {
    let end = span.end.min(bound);
    (end > position && end > span.start).then_some(Span {
        start: span.start,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: u64, end: u64) -> Option<Span> {
        Some(Span { start, end })
    }

    #[test]
    fn the_newest_covering_record_wins_until_a_newer_one_starts() {
        // Oldest [0, 100), newer [10, 20), newest [50, 60).
        let cur = [span(0, 100), span(10, 20), span(50, 60)];
        assert_eq!(
            next_step(0, 100, &cur),
            Some(Step::Take { input: 0, end: 10 })
        );
        assert_eq!(
            next_step(10, 100, &cur),
            Some(Step::Take { input: 1, end: 20 })
        );
        // Input 1 moved past its record; input 0 resumes until input 2 starts.
        let cur = [span(0, 100), None, span(50, 60)];
        assert_eq!(
            next_step(20, 100, &cur),
            Some(Step::Take { input: 0, end: 50 })
        );
        assert_eq!(
            next_step(50, 100, &cur),
            Some(Step::Take { input: 2, end: 60 })
        );
        let cur = [span(0, 100), None, None];
        assert_eq!(
            next_step(60, 100, &cur),
            Some(Step::Take { input: 0, end: 100 })
        );
    }

    #[test]
    fn a_newer_record_that_covers_an_older_one_whole_hides_it() {
        let cur = [span(10, 20), span(0, 30)];
        assert_eq!(
            next_step(0, 30, &cur),
            Some(Step::Take { input: 1, end: 30 })
        );
    }

    #[test]
    fn a_record_no_newer_one_overlaps_is_taken_whole() {
        let cur = [span(0, 10), span(10, 20)];
        assert_eq!(
            next_step(0, 20, &cur),
            Some(Step::Take { input: 0, end: 10 })
        );
    }

    #[test]
    fn a_shrink_hides_older_records_past_it_even_after_the_disk_grew_again() {
        assert_eq!(visible_bounds(&[100, 50, 80, 120]), [50, 50, 80, 120]);
        assert_eq!(visible_bounds(&[]), Vec::<u64>::new());
        let s = Span { start: 40, end: 70 };
        assert_eq!(clip(s, 50, 40), Some(Span { start: 40, end: 50 }));
        // Its visible part was taken: the rest no longer takes part in the sweep.
        assert_eq!(clip(s, 50, 50), None);
        assert_eq!(clip(Span { start: 60, end: 70 }, 50, 0), None);
        assert_eq!(clip(s, 100, 45), Some(s));
    }

    #[test]
    fn gaps_run_to_the_next_record_and_nothing_passes_the_limit() {
        let cur = [span(40, 50), span(30, 35)];
        assert_eq!(next_step(0, 100, &cur), Some(Step::Gap { until: 30 }));
        // The disk shrank to 45 bytes: the record is cut there, and a gap past it is nothing.
        let cur = [span(40, 50), None];
        assert_eq!(
            next_step(40, 45, &cur),
            Some(Step::Take { input: 0, end: 45 })
        );
        assert_eq!(next_step(45, 45, &cur), None);
        let cur = [span(60, 70)];
        assert_eq!(next_step(0, 50, &cur), None);
        assert_eq!(next_step(0, 50, &[None, None]), None);
    }
}
