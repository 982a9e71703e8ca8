//! Inference counters and the latency histogram reported in telemetry, and the
//! percentile estimate read from such a histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (microseconds) of the latency buckets; one more bucket counts
/// everything above the last bound.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000,
];

/// Counters for the served model, shared by the API handlers (lock-free).
#[derive(Debug, Default)]
pub struct ModelStats {
    inferences: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Successful inferences.
    pub inferences: u64,
    /// Failed inferences (bad input or runtime failure).
    pub errors: u64,
    /// Counts per bucket of [`LATENCY_BOUNDS_US`], plus the overflow bucket.
    pub latency_counts: Vec<u64>,
}

/// The bucket a latency falls in.
pub fn bucket_of(latency: Duration) -> usize {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    LATENCY_BOUNDS_US.partition_point(|b| *b < us)
}

impl ModelStats {
    /// Records one successful inference.
    pub fn record(&self, latency: Duration) {
        self.inferences.fetch_add(1, Ordering::Relaxed);
        self.buckets[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one failed inference.
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Zeroes the counters (a new model is being served).
    pub fn reset(&self) {
        self.inferences.store(0, Ordering::Relaxed);
        self.errors.store(0, Ordering::Relaxed);
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            inferences: self.inferences.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// The `q` quantile (0..=1) of a histogram, as the upper bound of the bucket that
/// holds it (the usual conservative estimate); None for an empty histogram. The
/// overflow bucket reports `u64::MAX`.
pub fn quantile_us(bounds: &[u64], counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bounds.get(i).copied().unwrap_or(u64::MAX));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_bucket_of_their_upper_bound() {
        assert_eq!(bucket_of(Duration::from_micros(0)), 0);
        assert_eq!(bucket_of(Duration::from_micros(50)), 0);
        assert_eq!(bucket_of(Duration::from_micros(51)), 1);
        assert_eq!(bucket_of(Duration::from_secs(5)), 15);
        assert_eq!(bucket_of(Duration::from_secs(6)), 16);
    }

    #[test]
    fn quantiles_by_hand() {
        let bounds = [10, 20, 30];
        // 100 samples: 50 in <=10, 45 in <=20, 4 in <=30, 1 above.
        let counts = [50, 45, 4, 1];
        assert_eq!(quantile_us(&bounds, &counts, 0.5), Some(10));
        assert_eq!(quantile_us(&bounds, &counts, 0.51), Some(20));
        assert_eq!(quantile_us(&bounds, &counts, 0.95), Some(20));
        assert_eq!(quantile_us(&bounds, &counts, 0.96), Some(30));
        assert_eq!(quantile_us(&bounds, &counts, 0.99), Some(30));
        assert_eq!(quantile_us(&bounds, &counts, 1.0), Some(u64::MAX));
        assert_eq!(quantile_us(&bounds, &[0, 0, 0, 0], 0.5), None);
    }

    #[test]
    fn stats_count_and_reset() {
        let s = ModelStats::default();
        s.record(Duration::from_micros(70));
        s.record(Duration::from_micros(70));
        s.record_error();
        let snap = s.snapshot();
        assert_eq!((snap.inferences, snap.errors), (2, 1));
        assert_eq!(snap.latency_counts[1], 2);
        assert_eq!(snap.latency_counts.len(), LATENCY_BOUNDS_US.len() + 1);
        s.reset();
        assert_eq!(
            s.snapshot(),
            StatsSnapshot {
                latency_counts: vec![0; 17],
                ..StatsSnapshot::default()
            }
        );
    }
}
