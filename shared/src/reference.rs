//! Reference statistics (the `reference.cbor` artifact): what the model's inputs
//! and outputs looked like on the data it was validated on, so the device can
//! measure drift against it. Pure functions; the binning rule is written down in
//! `docs/bundle.md`, "Reference statistics".

use serde::{Deserialize, Serialize};

use crate::cbor::{self, DecodeError};

/// Default number of quantile bins per numeric feature (as Evidently uses).
pub const DEFAULT_BINS: usize = 30;
/// Largest reference artifact accepted.
pub const MAX_REFERENCE_LEN: usize = 4 * 1024 * 1024;
/// Most distinct categories kept per categorical feature.
pub const MAX_CATEGORIES: usize = 1024;

/// Distribution summary of a numeric feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericStats {
    /// Values seen.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Interior bin edges, strictly increasing. Bin 0 is `(-inf, e0]`, bin i is
    /// `(e(i-1), e(i)]`, the last bin is `(e(last), +inf)`.
    pub edges: Vec<f64>,
    /// Share of values per bin (`edges.len() + 1` entries, summing to 1).
    pub frequencies: Vec<f64>,
}

/// Distribution summary of a categorical (integer-coded) feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoricalStats {
    /// Values seen.
    pub count: u64,
    /// Category and its share, sorted by category.
    pub categories: Vec<(i64, f64)>,
}

/// One feature's statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    /// Numeric feature.
    Numeric(NumericStats),
    /// Categorical feature.
    Categorical(CategoricalStats),
}

/// A named feature (input column, or output element such as `probabilities[2]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureStats {
    /// Feature name.
    pub name: String,
    /// Its distribution.
    pub distribution: Distribution,
}

/// The reference artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceStats {
    /// Rows in the reference data.
    pub rows: u64,
    /// Per input feature.
    pub features: Vec<FeatureStats>,
    /// Per model output (element).
    pub outputs: Vec<FeatureStats>,
}

impl ReferenceStats {
    /// Encodes the artifact.
    pub fn to_bytes(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// Decodes the artifact, capped at [`MAX_REFERENCE_LEN`].
    pub fn from_bytes(bytes: &[u8]) -> Result<ReferenceStats, DecodeError> {
        cbor::from_slice("reference statistics", bytes, MAX_REFERENCE_LEN)
    }
}

/// Linear-interpolated quantile of sorted data (numpy's default method).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Index of the bin `value` falls in, for interior `edges` (see [`NumericStats`]).
pub fn bin_of(edges: &[f64], value: f64) -> usize {
    edges.partition_point(|e| *e < value)
}

/// Summarises numeric values into `bins` quantile bins. Non-finite values are
/// ignored; `None` when no finite value remains.
pub fn numeric(values: &[f64], bins: usize) -> Option<NumericStats> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    let std = (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    let bins = bins.max(1);
    let mut edges: Vec<f64> = (1..bins)
        .map(|i| quantile(&sorted, i as f64 / bins as f64))
        .collect();
    edges.dedup_by(|a, b| a == b);
    // An edge equal to the maximum would leave the last bin empty by construction.
    let max = sorted[sorted.len() - 1];
    edges.retain(|e| *e < max);
    let mut counts = vec![0u64; edges.len() + 1];
    for v in &sorted {
        counts[bin_of(&edges, *v)] += 1;
    }
    Some(NumericStats {
        count: sorted.len() as u64,
        mean,
        std,
        min: sorted[0],
        max,
        edges,
        frequencies: counts.iter().map(|c| *c as f64 / n).collect(),
    })
}

/// Summarises integer-coded categories; `None` when there are no values or more
/// than [`MAX_CATEGORIES`] distinct ones.
pub fn categorical(values: &[i64]) -> Option<CategoricalStats> {
    if values.is_empty() {
        return None;
    }
    let mut counts = std::collections::BTreeMap::<i64, u64>::new();
    for v in values {
        *counts.entry(*v).or_default() += 1;
    }
    if counts.len() > MAX_CATEGORIES {
        return None;
    }
    let n = values.len() as f64;
    Some(CategoricalStats {
        count: values.len() as u64,
        categories: counts.into_iter().map(|(k, c)| (k, c as f64 / n)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quartile_bins_of_one_to_eight_are_even() {
        let v: Vec<f64> = (1..=8).map(f64::from).collect();
        let s = numeric(&v, 4).expect("values");
        assert_eq!(s.edges, vec![2.75, 4.5, 6.25]);
        assert_eq!(s.frequencies, vec![0.25, 0.25, 0.25, 0.25]);
        assert_eq!(s.mean, 4.5);
        assert!((s.std - 5.25f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn constant_data_has_one_bin() {
        let s = numeric(&[3.0; 10], 30).expect("values");
        assert!(s.edges.is_empty());
        assert_eq!(s.frequencies, vec![1.0]);
        assert!(numeric(&[f64::NAN], 30).is_none());
    }

    #[test]
    fn categories_are_shares_sorted_by_label() {
        let s = categorical(&[2, 0, 2, 2]).expect("values");
        assert_eq!(s.categories, vec![(0, 0.25), (2, 0.75)]);
    }

    proptest! {
        #[test]
        fn frequencies_sum_to_one_and_edges_increase(v in proptest::collection::vec(-1e6f64..1e6, 1..500), bins in 1usize..40) {
            let s = numeric(&v, bins).expect("finite values");
            prop_assert!((s.frequencies.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            prop_assert!(s.edges.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(s.frequencies.len(), s.edges.len() + 1);
            prop_assert!(s.frequencies.len() <= bins);
        }
    }
}
