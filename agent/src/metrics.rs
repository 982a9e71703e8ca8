//! Inference counters and the latency histogram reported in telemetry, and the
//! percentile estimate read from such a histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use edgefleet_shared::protocol::{LATENCY_BOUNDS_US, quantile_us};

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
