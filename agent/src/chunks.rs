//! Which chunks of a bundle download are on disk: a bitmap with the requests to
//! make next. Pure (no I/O); the download shell persists [`ChunkTracker::to_bytes`].

use edgefleet_shared::protocol::ChunkRange;

/// Largest number of chunks a bundle can have (2 GiB at the smallest chunk size).
pub const MAX_CHUNKS: u32 = 1 << 20;

/// A bitmap of received chunks, and the chunks wanted: all of them, or, for a
/// device that needs one artifact of the bundle, the run that holds it
/// ([`ChunkTracker::only`]). Counts, completion and requests are of the
/// wanted chunks; other chunks are never recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkTracker {
    total: u32,
    done: u32,
    bits: Vec<u8>,
    wanted: std::ops::Range<u32>,
}

/// A persisted bitmap that does not fit the bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk record: {0}")]
pub struct BadRecord(&'static str);

impl ChunkTracker {
    /// Nothing received yet, `total` chunks expected (at most [`MAX_CHUNKS`]).
    pub fn new(total: u32) -> ChunkTracker {
        let total = total.min(MAX_CHUNKS);
        ChunkTracker {
            total,
            done: 0,
            bits: vec![0; total.div_ceil(8) as usize],
            wanted: 0..total,
        }
    }

    /// The same tracker wanting only the chunks of `wanted` (clipped to the
    /// bundle); chunks recorded outside it are forgotten.
    pub fn only(mut self, wanted: std::ops::Range<u32>) -> ChunkTracker {
        let end = wanted.end.min(self.total);
        self.wanted = wanted.start.min(end)..end;
        for index in 0..self.total {
            if !self.wanted.contains(&index) {
                self.bits[(index / 8) as usize] &= !(1 << (index % 8));
            }
        }
        self.done = self.bits.iter().map(|b| b.count_ones()).sum();
        self
    }

    /// The chunks wanted.
    pub fn wanted(&self) -> std::ops::Range<u32> {
        self.wanted.clone()
    }

    /// Restores a tracker from [`ChunkTracker::to_bytes`]; refuses a record of
    /// another length or with bits set past the end.
    pub fn from_bytes(total: u32, bytes: &[u8]) -> Result<ChunkTracker, BadRecord> {
        let mut t = ChunkTracker::new(total);
        if bytes.len() != t.bits.len() {
            return Err(BadRecord("length does not match the chunk count"));
        }
        if !total.is_multiple_of(8) && bytes.last().is_some_and(|b| b >> (total % 8) != 0) {
            return Err(BadRecord("marks chunks past the end"));
        }
        t.bits.copy_from_slice(bytes);
        t.done = t.bits.iter().map(|b| b.count_ones()).sum();
        Ok(t)
    }

    /// The persisted form: one bit per chunk, chunk 0 in the lowest bit.
    pub fn to_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Number of chunks wanted (all of the bundle's, unless [`ChunkTracker::only`]).
    pub fn total(&self) -> u32 {
        self.wanted.len() as u32
    }

    /// Number of wanted chunks received.
    pub fn done(&self) -> u32 {
        self.done
    }

    /// Whether every wanted chunk is here.
    pub fn complete(&self) -> bool {
        self.done == self.total()
    }

    /// Whether chunk `index` is here.
    pub fn has(&self, index: u32) -> bool {
        index < self.total && self.bits[(index / 8) as usize] & (1 << (index % 8)) != 0
    }

    /// Records chunk `index`; returns false if it was already here or is not wanted.
    pub fn mark(&mut self, index: u32) -> bool {
        if !self.wanted.contains(&index) || self.has(index) {
            return false;
        }
        self.bits[(index / 8) as usize] |= 1 << (index % 8);
        self.done += 1;
        true
    }

    /// The first wanted chunk not received, if any.
    pub fn first_missing(&self) -> Option<u32> {
        let from = (self.wanted.start / 8) as usize;
        let mut index = self.wanted.start;
        for (i, b) in self.bits.iter().enumerate().skip(from) {
            if *b == 0xff {
                continue;
            }
            // The first zero bit of this byte at or after `index`.
            let base = i as u32 * 8;
            let skip = index.saturating_sub(base);
            let rest = (*b >> skip) | !(0xffu8 >> skip);
            let found = base + skip + rest.trailing_ones();
            if found < base + 8 {
                index = found;
                return (index < self.wanted.end).then_some(index);
            }
        }
        None
    }

    /// The next missing chunks to ask for, in order from the first missing one:
    /// at most `max_chunks` chunks in at most `max_ranges` ranges.
    pub fn missing_ranges(&self, max_chunks: u32, max_ranges: usize) -> Vec<ChunkRange> {
        self.missing_ranges_from(0, max_chunks, max_ranges)
    }

    /// The same, starting at chunk `from` (chunks before it are already asked for).
    pub fn missing_ranges_from(
        &self,
        from: u32,
        max_chunks: u32,
        max_ranges: usize,
    ) -> Vec<ChunkRange> {
        let mut out: Vec<ChunkRange> = Vec::new();
        let mut budget = max_chunks;
        let Some(first) = self.first_missing() else {
            return out;
        };
        let mut index = first.max(from);
        while index < self.wanted.end && budget > 0 {
            if self.has(index) {
                index += 1;
                continue;
            }
            let extends = out.last().is_some_and(|r| r.start + r.count == index);
            if extends {
                if let Some(r) = out.last_mut() {
                    r.count += 1;
                }
            } else if out.len() == max_ranges {
                break;
            } else {
                out.push(ChunkRange {
                    start: index,
                    count: 1,
                });
            }
            budget -= 1;
            index += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start: u32, count: u32) -> ChunkRange {
        ChunkRange { start, count }
    }

    #[test]
    fn a_new_download_asks_from_chunk_zero_within_the_window() {
        let t = ChunkTracker::new(10);
        assert_eq!(t.missing_ranges(4, 8), vec![r(0, 4)]);
        assert_eq!(t.missing_ranges(100, 8), vec![r(0, 10)]);
        assert_eq!(t.first_missing(), Some(0));
        assert!(!t.complete());
    }

    #[test]
    fn holes_become_separate_ranges_and_the_range_limit_holds() {
        let mut t = ChunkTracker::new(12);
        for i in [0, 2, 3, 6] {
            assert!(t.mark(i));
        }
        assert!(!t.mark(2), "a second copy is not counted");
        assert!(!t.mark(12), "out of range");
        assert_eq!(t.done(), 4);
        assert_eq!(t.missing_ranges(100, 8), vec![r(1, 1), r(4, 2), r(7, 5)]);
        assert_eq!(t.missing_ranges(100, 2), vec![r(1, 1), r(4, 2)]);
        assert_eq!(t.missing_ranges(3, 8), vec![r(1, 1), r(4, 2)]);
        assert_eq!(t.missing_ranges_from(5, 3, 8), vec![r(5, 1), r(7, 2)]);
        assert!(t.missing_ranges_from(12, 3, 8).is_empty());
    }

    #[test]
    fn complete_means_nothing_to_ask() {
        let mut t = ChunkTracker::new(9);
        for i in 0..9 {
            t.mark(i);
        }
        assert!(t.complete());
        assert_eq!(t.first_missing(), None);
        assert!(t.missing_ranges(10, 10).is_empty());
        let empty = ChunkTracker::new(0);
        assert!(empty.complete());
    }

    #[test]
    fn records_of_the_wrong_shape_are_refused() {
        assert!(ChunkTracker::from_bytes(9, &[0]).is_err());
        assert!(ChunkTracker::from_bytes(9, &[0, 0b10]).is_err());
        assert!(ChunkTracker::from_bytes(9, &[0xff, 0b1]).is_ok());
    }

    proptest! {
        #[test]
        fn the_record_round_trips_and_ranges_cover_exactly_the_missing_chunks(
            total in 0u32..200,
            marks in proptest::collection::vec(0u32..220, 0..200),
        ) {
            let mut t = ChunkTracker::new(total);
            for m in &marks {
                t.mark(*m);
            }
            let back = ChunkTracker::from_bytes(total, t.to_bytes());
            prop_assert_eq!(back.as_ref(), Ok(&t));
            let ranges = t.missing_ranges(u32::MAX, usize::MAX);
            let asked: Vec<u32> = ranges.iter().flat_map(|r| r.start..r.start + r.count).collect();
            let missing: Vec<u32> = (0..total).filter(|i| !t.has(*i)).collect();
            prop_assert_eq!(&asked, &missing);
            prop_assert_eq!(t.done() as usize, (0..total).filter(|i| t.has(*i)).count());
            prop_assert!(ranges.iter().all(|r| r.count >= 1));
        }

        #[test]
        fn a_tracker_limited_to_a_run_asks_for_and_counts_only_that_run(
            total in 0u32..200,
            start in 0u32..220,
            len in 0u32..220,
            before in proptest::collection::vec(0u32..220, 0..100),
            after in proptest::collection::vec(0u32..220, 0..100),
        ) {
            // Marks from before the limit (a record read back) and after it.
            let mut t = ChunkTracker::new(total);
            for m in &before {
                t.mark(*m);
            }
            let mut t = t.only(start..start.saturating_add(len));
            let wanted = t.wanted();
            for m in &after {
                let new = wanted.contains(m) && !t.has(*m);
                prop_assert_eq!(t.mark(*m), new);
            }
            let marked: Vec<u32> = (0..total).filter(|i| t.has(*i)).collect();
            prop_assert!(marked.iter().all(|i| wanted.contains(i)), "nothing outside the run is kept");
            prop_assert_eq!(t.done() as usize, marked.len());
            prop_assert_eq!(t.total(), wanted.len() as u32);
            let missing: Vec<u32> = wanted.clone().filter(|i| !t.has(*i)).collect();
            prop_assert_eq!(t.first_missing(), missing.first().copied());
            let asked: Vec<u32> = t
                .missing_ranges(u32::MAX, usize::MAX)
                .iter()
                .flat_map(|r| r.start..r.start + r.count)
                .collect();
            prop_assert_eq!(&asked, &missing);
            prop_assert_eq!(t.complete(), missing.is_empty());
        }
    }
}
