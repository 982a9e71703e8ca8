//! Sample capture, the pure core: which served requests are kept (the trigger),
//! and a bounded reservoir that keeps a uniform sample of them (Algorithm R) in
//! fixed memory, drained when the controller asks for an upload. Off unless the
//! device config enables it (privacy). Samples live in memory only: a restart
//! loses them, which is also the privacy-friendly default.

use edgefleet_shared::golden::{Tensor, TensorData};
use edgefleet_shared::protocol::{CaptureReason, CapturedSample};
use serde::{Deserialize, Serialize};

/// When requests are kept (agent config `[samples] capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capture {
    /// Nothing is kept (the default).
    Off,
    /// Requests served while the drift window is drifted.
    Drift,
    /// Requests whose top class probability is below `min_confidence`.
    LowConfidence,
    /// Every request (a uniform sample is kept).
    Always,
}

/// Bytes of tensor data in `tensors`.
fn data_bytes(tensors: &[Tensor]) -> usize {
    tensors
        .iter()
        .map(|t| {
            t.data.len()
                * match &t.data {
                    TensorData::F32(_) | TensorData::I32(_) => 4,
                    TensorData::F64(_) | TensorData::I64(_) => 8,
                    TensorData::I8(_) | TensorData::U8(_) | TensorData::Bool(_) => 1,
                    // Text and its length prefix, as the binary protocol carries it.
                    TensorData::String(v) => {
                        return v.iter().map(|s| s.len() + 4).sum::<usize>();
                    }
                }
        })
        .sum()
}

/// The lowest top-class probability over the rows of the first float output
/// shaped `[rows, classes]` with at least two classes; `None` without one.
pub fn lowest_confidence(outputs: &[Tensor]) -> Option<f64> {
    let out = outputs.iter().find(|t| {
        t.shape.len() == 2
            && t.shape[1] >= 2
            && matches!(t.data, TensorData::F32(_) | TensorData::F64(_))
    })?;
    let width = out.shape[1] as usize;
    let values = out.data.to_f64();
    values
        .chunks(width)
        .map(|row| row.iter().copied().fold(f64::MIN, f64::max))
        .reduce(f64::min)
}

/// Why this request should be kept under `capture`, if it should.
pub fn trigger(
    capture: Capture,
    drifting: bool,
    min_confidence: f64,
    outputs: &[Tensor],
) -> Option<CaptureReason> {
    match capture {
        Capture::Off => None,
        Capture::Always => Some(CaptureReason::Always),
        Capture::Drift => drifting.then_some(CaptureReason::Drift),
        Capture::LowConfidence => lowest_confidence(outputs)
            .filter(|c| *c < min_confidence)
            .map(|_| CaptureReason::LowConfidence),
    }
}

/// A uniform random sample of at most `capacity` requests of the ones offered.
#[derive(Debug, Clone)]
pub struct Reservoir {
    capacity: usize,
    max_sample_bytes: usize,
    seen: u64,
    too_large: u64,
    items: Vec<CapturedSample>,
    rng: u64,
}

impl Reservoir {
    /// An empty reservoir; `seed` drives the (non-cryptographic) sampling.
    pub fn new(capacity: usize, max_sample_bytes: usize, seed: u64) -> Reservoir {
        Reservoir {
            capacity,
            max_sample_bytes,
            seen: 0,
            too_large: 0,
            items: Vec::new(),
            rng: seed | 1,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Offers one request (Algorithm R: the n-th offer is kept with probability
    /// capacity / n, replacing a random kept one). The tensors are copied only
    /// when the request is kept. Requests over `max_sample_bytes` are counted
    /// and not kept.
    pub fn offer(
        &mut self,
        at: edgefleet_shared::UnixTime,
        reason: CaptureReason,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) {
        if self.capacity == 0 {
            return;
        }
        if data_bytes(inputs) + data_bytes(outputs) > self.max_sample_bytes {
            self.too_large += 1;
            return;
        }
        self.seen += 1;
        let sample = || CapturedSample {
            at,
            reason,
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
        };
        if self.items.len() < self.capacity {
            self.items.push(sample());
            return;
        }
        let j = self.next() % self.seen;
        if (j as usize) < self.capacity {
            self.items[j as usize] = sample();
        }
    }

    /// Requests offered (and small enough) since the last drain.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Requests not kept because they were over the size cap.
    pub fn too_large(&self) -> u64 {
        self.too_large
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Takes up to `max` samples, oldest first, and starts a new sample.
    pub fn drain(&mut self, max: usize) -> Vec<CapturedSample> {
        let mut items = std::mem::take(&mut self.items);
        items.sort_by_key(|s| s.at);
        items.truncate(max);
        self.seen = 0;
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::UnixTime;

    fn row(v: f32) -> Vec<Tensor> {
        vec![Tensor {
            name: "x".into(),
            shape: vec![1, 2],
            data: TensorData::F32(vec![v, v]),
        }]
    }

    fn probs(p: &[f32], width: u64) -> Vec<Tensor> {
        vec![
            Tensor {
                name: "label".into(),
                shape: vec![p.len() as u64 / width],
                data: TensorData::I64(vec![0; p.len() / width as usize]),
            },
            Tensor {
                name: "probabilities".into(),
                shape: vec![p.len() as u64 / width, width],
                data: TensorData::F32(p.to_vec()),
            },
        ]
    }

    #[test]
    fn the_reservoir_holds_at_most_its_capacity_and_samples_uniformly() {
        // 10,000 offers into 100 places, 200 times: each offer's chance to be kept
        // is 1%, so the kept values' mean is near the offers' mean (4999.5).
        let mut means = Vec::new();
        for seed in 0..200 {
            let mut r = Reservoir::new(100, 1024, seed * 7919 + 1);
            for i in 0..10_000 {
                r.offer(UnixTime(i), CaptureReason::Always, &row(i as f32), &[]);
            }
            assert_eq!(r.len(), 100);
            assert_eq!(r.seen(), 10_000);
            let kept = r.drain(1000);
            assert!(kept.windows(2).all(|w| w[0].at <= w[1].at), "oldest first");
            means.push(kept.iter().map(|s| s.at.0 as f64).sum::<f64>() / 100.0);
            assert!(r.is_empty() && r.seen() == 0);
        }
        let mean = means.iter().sum::<f64>() / means.len() as f64;
        // Standard error of the mean of 20,000 uniform draws on [0, 10000): ~20.
        assert!((mean - 4999.5).abs() < 100.0, "{mean}");
        // Early and late offers are both represented.
        assert!(means.iter().any(|m| *m < 4999.5) && means.iter().any(|m| *m > 4999.5));
    }

    #[test]
    fn large_requests_are_counted_not_kept_and_drain_caps() {
        let mut r = Reservoir::new(10, 16, 1);
        r.offer(UnixTime(0), CaptureReason::Always, &row(1.0), &[]);
        let big = vec![Tensor {
            name: "x".into(),
            shape: vec![1, 8],
            data: TensorData::F32(vec![0.0; 8]),
        }];
        r.offer(UnixTime(1), CaptureReason::Always, &big, &[]);
        assert_eq!((r.len(), r.too_large()), (1, 1));
        r.offer(UnixTime(2), CaptureReason::Always, &row(2.0), &[]);
        assert_eq!(r.drain(1).len(), 1);
        assert!(r.is_empty(), "a drain starts a new sample");
        let mut none = Reservoir::new(0, 16, 1);
        none.offer(UnixTime(0), CaptureReason::Always, &row(1.0), &[]);
        assert!(none.is_empty());
    }

    #[test]
    fn triggers_follow_the_mode() {
        let sure = probs(&[0.9, 0.1, 0.05, 0.95], 2);
        let unsure = probs(&[0.9, 0.1, 0.55, 0.45], 2);
        assert_eq!(lowest_confidence(&unsure), Some(0.55_f32 as f64));
        assert_eq!(trigger(Capture::Off, true, 0.6, &unsure), None);
        assert_eq!(
            trigger(Capture::Always, false, 0.6, &sure),
            Some(CaptureReason::Always)
        );
        assert_eq!(trigger(Capture::Drift, false, 0.6, &sure), None);
        assert_eq!(
            trigger(Capture::Drift, true, 0.6, &sure),
            Some(CaptureReason::Drift)
        );
        assert_eq!(trigger(Capture::LowConfidence, false, 0.6, &sure), None);
        assert_eq!(
            trigger(Capture::LowConfidence, false, 0.6, &unsure),
            Some(CaptureReason::LowConfidence)
        );
        // No probability output: nothing to judge confidence by.
        assert_eq!(trigger(Capture::LowConfidence, false, 0.6, &row(1.0)), None);
    }
}
