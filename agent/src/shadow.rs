//! Shadow mode: a bundle installed in shadow runs beside the active model on a
//! sampled share of live requests, after the active model answered (never
//! delaying the answer), and the agent counts how often the two agree and how
//! fast each was. The comparison is pure ([`agrees`]); the counters are atomics
//! the local API updates and telemetry reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use edgefleet_shared::Digest;
use edgefleet_shared::golden::{Tensor, TensorData, within_tolerance};
use edgefleet_shared::manifest::HealthPolicy;
use edgefleet_shared::protocol::{BundleRef, ShadowMetrics};

use crate::metrics::{LATENCY_BOUNDS_US, bucket_of};
use crate::model::LoadedModel;

/// Default share of requests also run by the shadow model, per mille.
pub const DEFAULT_PERMILLE: u16 = 1000;

fn is_integer(t: &TensorData) -> bool {
    matches!(
        t,
        TensorData::I8(_) | TensorData::I32(_) | TensorData::I64(_) | TensorData::U8(_)
    )
}

/// Whether the shadow model's answer agrees with the active model's: when the
/// active model has integer outputs (class labels), every one of them must be
/// equal in the shadow's answer (same class); otherwise every output must be
/// within `policy`'s tolerance. An output missing from the shadow's answer, or
/// of another shape, disagrees.
pub fn agrees(active: &[Tensor], shadow: &[Tensor], policy: &HealthPolicy) -> bool {
    let labels: Vec<&Tensor> = active.iter().filter(|t| is_integer(&t.data)).collect();
    let compared: Vec<&Tensor> = if labels.is_empty() {
        active.iter().collect()
    } else {
        labels
    };
    !compared.is_empty()
        && compared.iter().all(|want| {
            shadow
                .iter()
                .find(|t| t.name == want.name)
                .is_some_and(|got| {
                    got.shape == want.shape
                        && if is_integer(&want.data) {
                            got.data == want.data
                        } else {
                            within_tolerance(&got.data, &want.data, policy).is_ok()
                        }
                })
        })
}

/// Counters of one shadow model, shared by the API handlers (lock-free).
#[derive(Debug, Default)]
pub struct ShadowStats {
    runs: AtomicU64,
    agreed: AtomicU64,
    errors: AtomicU64,
    skipped: AtomicU64,
    shadow: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    active: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
}

impl ShadowStats {
    /// Records one shadow run: agreement, its latency and the active model's.
    pub fn record(&self, agreed: bool, shadow: Duration, active: Duration) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        if agreed {
            self.agreed.fetch_add(1, Ordering::Relaxed);
        }
        self.shadow[bucket_of(shadow)].fetch_add(1, Ordering::Relaxed);
        self.active[bucket_of(active)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records a shadow run that failed (counts as a run that disagreed).
    pub fn record_error(&self) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a sampled request not run because a run was still busy.
    pub fn record_skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, for telemetry.
    pub fn snapshot(&self, digest: Digest) -> ShadowMetrics {
        let load = |b: &[AtomicU64]| b.iter().map(|x| x.load(Ordering::Relaxed)).collect();
        ShadowMetrics {
            digest,
            runs: self.runs.load(Ordering::Relaxed),
            agreed: self.agreed.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            latency_counts: load(&self.shadow),
            active_latency_counts: load(&self.active),
        }
    }
}

/// A loaded shadow model with its counters.
#[derive(Debug, Clone)]
pub struct Shadow {
    /// The bundle.
    pub bundle: BundleRef,
    /// Its model.
    pub model: LoadedModel,
    /// Tolerance of the comparison (the bundle's health-check policy).
    pub policy: HealthPolicy,
    /// Its counters.
    pub stats: Arc<ShadowStats>,
    /// One shadow run at a time: a sampled request that finds it busy is
    /// skipped (and counted), so shadowing never queues work behind the answers.
    pub busy: Arc<AtomicBool>,
}

impl Shadow {
    /// A shadow of `bundle`.
    pub fn new(bundle: BundleRef, model: LoadedModel, policy: HealthPolicy) -> Shadow {
        Shadow {
            bundle,
            model,
            policy,
            stats: Arc::default(),
            busy: Arc::default(),
        }
    }

    /// Runs the shadow model on `inputs` and records the comparison with the
    /// active model's `answer` (which took `active_took`). Blocking: call it on
    /// the blocking pool, after the answer went out.
    pub fn run(&self, inputs: &[Tensor], answer: &[Tensor], active_took: Duration) {
        let started = std::time::Instant::now();
        match self.model.run(inputs) {
            Ok(out) => {
                let took = started.elapsed();
                self.stats
                    .record(agrees(answer, &out, &self.policy), took, active_took);
            }
            Err(_) => self.stats.record_error(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: Vec<u64>, data: TensorData) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            data,
        }
    }

    #[test]
    fn classifiers_agree_on_the_label_and_regressors_within_tolerance() {
        let policy = HealthPolicy::default();
        let active = vec![
            t("label", vec![2], TensorData::I64(vec![0, 2])),
            t(
                "probabilities",
                vec![2, 2],
                TensorData::F32(vec![0.9, 0.1, 0.2, 0.8]),
            ),
        ];
        // Same labels, different probabilities: same class, agrees.
        let same_class = vec![
            t("label", vec![2], TensorData::I64(vec![0, 2])),
            t(
                "probabilities",
                vec![2, 2],
                TensorData::F32(vec![0.6, 0.4, 0.4, 0.6]),
            ),
        ];
        assert!(agrees(&active, &same_class, &policy));
        let other_class = vec![t("label", vec![2], TensorData::I64(vec![0, 1]))];
        assert!(!agrees(&active, &other_class, &policy));
        let missing = vec![t("scores", vec![2], TensorData::I64(vec![0, 2]))];
        assert!(!agrees(&active, &missing, &policy));
        let reshaped = vec![t("label", vec![1, 2], TensorData::I64(vec![0, 2]))];
        assert!(!agrees(&active, &reshaped, &policy));
        // Float outputs only: compared within the tolerance.
        let y = vec![t("y", vec![2], TensorData::F32(vec![1.0, 2.0]))];
        let close = vec![t("y", vec![2], TensorData::F32(vec![1.00001, 2.0]))];
        let far = vec![t("y", vec![2], TensorData::F32(vec![1.1, 2.0]))];
        assert!(agrees(&y, &close, &policy));
        assert!(!agrees(&y, &far, &policy));
        assert!(
            !agrees(&[], &[], &policy),
            "nothing to compare is no agreement"
        );
    }

    #[test]
    fn counters_add_up() {
        let s = ShadowStats::default();
        s.record(true, Duration::from_micros(70), Duration::from_micros(40));
        s.record(false, Duration::from_micros(70), Duration::from_micros(40));
        s.record_error();
        s.record_skipped();
        let m = s.snapshot(Digest::of(b"x"));
        assert_eq!((m.runs, m.agreed, m.errors, m.skipped), (3, 1, 1, 1));
        assert_eq!(m.latency_counts[1], 2);
        assert_eq!(m.active_latency_counts[0], 2);
    }
}
