//! What one device's chunk fetch requests may cost the controller
//! (docs/controller.md, "Chunk requests"). A fetch request is a few dozen bytes;
//! each chunk it names makes the controller publish up to 4 MiB, so without
//! bounds ten small requests cost hundreds of megabytes. The fleet checks, in
//! order: the device was sent an install command for the bundle; at most
//! [`MAX_CHUNKS_PER_REQUEST`] chunks per request; and a byte budget per device
//! ([`ByteBudget`], a token bucket).
//!
//! Pure: time comes in as an argument.

use std::collections::HashMap;

/// Chunks one request may name; the rest are refused. The agent asks for 16 at
/// a time (its fetch window), so this leaves room for a larger window.
pub const MAX_CHUNKS_PER_REQUEST: u32 = 64;

/// Bytes of chunks a device may have published for it per second, sustained.
pub const BYTES_PER_SECOND: u64 = 16 << 20;

/// Bytes a device may ask for at once after being idle.
pub const BURST_BYTES: u64 = 32 << 20;

/// Why a fetch request, or part of it, was refused (a label of
/// `edgefleet_chunk_requests_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FetchRefusal {
    /// The device was never sent an install command for this bundle.
    NotOffered,
    /// More than [`MAX_CHUNKS_PER_REQUEST`] chunks in one request.
    TooMany,
    /// The device's byte budget is spent.
    Rate,
}

impl FetchRefusal {
    /// Every reason, for the metrics.
    pub const ALL: [FetchRefusal; 3] = [
        FetchRefusal::NotOffered,
        FetchRefusal::TooMany,
        FetchRefusal::Rate,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            FetchRefusal::NotOffered => "not_offered",
            FetchRefusal::TooMany => "too_many",
            FetchRefusal::Rate => "rate",
        }
    }
}

/// A token bucket of bytes per device: `rate` bytes per second, at most `burst`
/// saved up. Devices idle long enough to have a full bucket are forgotten when
/// the table grows past `max_devices`, so its size stays bounded.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    rate: u64,
    burst: u64,
    max_devices: usize,
    /// Device -> (bytes available, as of this ms).
    buckets: HashMap<String, (u64, u64)>,
}

impl ByteBudget {
    /// A budget of `rate` bytes per second and `burst` bytes at most.
    pub fn new(rate: u64, burst: u64, max_devices: usize) -> ByteBudget {
        ByteBudget {
            rate,
            burst,
            max_devices,
            buckets: HashMap::new(),
        }
    }

    /// The defaults: [`BYTES_PER_SECOND`], [`BURST_BYTES`], 100,000 devices.
    pub fn standard() -> ByteBudget {
        ByteBudget::new(BYTES_PER_SECOND, BURST_BYTES, 100_000)
    }

    fn available(&self, tokens: u64, since: u64, now_ms: u64) -> u64 {
        let earned = u128::from(now_ms.saturating_sub(since)) * u128::from(self.rate) / 1000;
        (u128::from(tokens) + earned).min(u128::from(self.burst)) as u64
    }

    /// Takes `bytes` from `device`'s budget at `now_ms` if it has them. A device
    /// not tracked yet while the table is full of devices still spending is
    /// refused (a fresh bucket for it would be a free burst every request).
    pub fn take(&mut self, device: &str, bytes: u64, now_ms: u64) -> bool {
        if !self.buckets.contains_key(device) && self.buckets.len() >= self.max_devices {
            self.forget_full(now_ms);
            if self.buckets.len() >= self.max_devices {
                return false;
            }
        }
        let (tokens, since) = self
            .buckets
            .get(device)
            .copied()
            .unwrap_or((self.burst, now_ms));
        let available = self.available(tokens, since, now_ms);
        let (left, granted) = if bytes <= available {
            (available - bytes, true)
        } else {
            (available, false)
        };
        self.buckets.insert(device.to_owned(), (left, now_ms));
        granted
    }

    /// Drops the devices whose bucket has refilled: they lose nothing.
    fn forget_full(&mut self, now_ms: u64) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, (tokens, since)| {
            let earned = u128::from(now_ms.saturating_sub(*since)) * u128::from(rate) / 1000;
            u128::from(*tokens) + earned < u128::from(burst)
        });
    }

    /// Devices tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no device is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_gets_its_burst_then_the_rate() {
        let mut b = ByteBudget::new(1000, 5000, 10);
        assert!(b.take("pi-01", 5000, 0), "the burst");
        assert!(!b.take("pi-01", 1, 0), "spent");
        assert!(!b.take("pi-01", 1001, 1000), "one second earns 1000");
        assert!(b.take("pi-01", 1000, 1000));
        // Other devices have their own budget.
        assert!(b.take("pi-02", 5000, 1000));
        // Idle for an hour: back to the burst, not more.
        assert!(!b.take("pi-01", 5001, 3_601_000));
        assert!(b.take("pi-01", 5000, 3_601_000));
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_only_full_buckets() {
        let mut b = ByteBudget::new(1000, 5000, 2);
        assert!(b.take("a", 5000, 0));
        assert!(b.take("b", 5000, 0));
        // Nobody's bucket is full yet: "c" is refused, "a" keeps its spent one.
        assert!(!b.take("c", 10, 0));
        assert_eq!(b.len(), 2);
        assert!(!b.take("a", 10, 0));
        // Five seconds on, both are full again and are forgotten for "c".
        assert!(b.take("c", 10, 5000));
        assert!(b.len() <= 2);
        assert!(
            b.take("a", 5000, 5000),
            "a forgotten full bucket starts full"
        );
    }

    proptest::proptest! {
        /// Whatever the requests, a device never gets more than its burst plus
        /// the rate times the time elapsed.
        #[test]
        fn a_device_never_gets_more_than_burst_plus_rate(
            steps in proptest::collection::vec((0u64..2000, 0u64..4000), 1..200)
        ) {
            let mut b = ByteBudget::new(1000, 5000, 10);
            let (mut now, mut granted) = (0u64, 0u64);
            for (dt, bytes) in steps {
                now += dt;
                if b.take("pi-01", bytes, now) {
                    granted += bytes;
                }
                proptest::prop_assert!(granted <= 5000 + now * 1000 / 1000);
            }
        }
    }
}
