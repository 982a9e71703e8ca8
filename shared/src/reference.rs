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

/// Most features (inputs plus outputs) in one reference.
pub const MAX_FEATURES: usize = 1024;
/// Longest feature name.
pub const MAX_NAME_LEN: usize = 128;
/// Most bins per numeric feature.
pub const MAX_BINS: usize = 1000;

/// When a feature, and a whole window, counts as drifted. Carried by the bundle
/// (`edgefleet bundle build --drift-psi ...`); the defaults and their sources are
/// in `docs/drift.md`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// PSI at or above this is drift (0.25: the "significant" rule of thumb).
    pub psi: f64,
    /// A KS or chi-square p-value below this is drift.
    pub p_value: f64,
    /// Share of drifted input features at which the whole window counts as drifted.
    pub drifted_share: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            psi: 0.25,
            p_value: 0.05,
            drifted_share: 0.5,
        }
    }
}

/// What is wrong with reference statistics or drift thresholds: the field,
/// and a reason that names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidStats {
    /// The field at fault (`psi`, `features`, `outputs`, ...).
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidStats {
    InvalidStats {
        field,
        reason: reason.into(),
    }
}

impl Thresholds {
    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<(), InvalidStats> {
        if !(self.psi.is_finite() && self.psi > 0.0) {
            return Err(invalid(
                "psi",
                format!("psi must be a positive number, got {}", self.psi),
            ));
        }
        if !(self.p_value > 0.0 && self.p_value < 1.0) {
            return Err(invalid(
                "p_value",
                format!("p_value must be between 0 and 1, got {}", self.p_value),
            ));
        }
        if !(self.drifted_share > 0.0 && self.drifted_share <= 1.0) {
            return Err(invalid(
                "drifted_share",
                format!(
                    "drifted_share must be above 0 and at most 1, got {}",
                    self.drifted_share
                ),
            ));
        }
        Ok(())
    }
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
    /// Drift thresholds for this bundle; the defaults when absent.
    #[serde(default)]
    pub thresholds: Option<Thresholds>,
}

impl ReferenceStats {
    /// Encodes the artifact.
    pub fn to_bytes(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// Decodes the artifact, capped at [`MAX_REFERENCE_LEN`], and checks that
    /// every distribution is usable (see [`ReferenceStats::validate`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<ReferenceStats, DecodeError> {
        let stats: ReferenceStats =
            cbor::from_slice("reference statistics", bytes, MAX_REFERENCE_LEN)?;
        stats
            .validate()
            .map_err(|InvalidStats { field, reason }| DecodeError::Invalid {
                what: "reference statistics",
                field,
                reason,
            })?;
        Ok(stats)
    }

    /// The thresholds in force: the bundle's, or the defaults.
    pub fn thresholds(&self) -> Thresholds {
        self.thresholds.unwrap_or_default()
    }

    /// Checks what the agent relies on: bins and shares that line up, strictly
    /// increasing finite edges, shares that sum to 1, sorted distinct
    /// categories, bounded counts and names. The error names the field and the
    /// feature.
    pub fn validate(&self) -> Result<(), InvalidStats> {
        if self.features.len() + self.outputs.len() > MAX_FEATURES {
            return Err(invalid(
                "features",
                format!("at most {MAX_FEATURES} features and outputs in all"),
            ));
        }
        if let Some(t) = &self.thresholds {
            t.validate().map_err(|e| invalid("thresholds", e.reason))?;
        }
        for (field, list) in [("features", &self.features), ("outputs", &self.outputs)] {
            for f in list {
                f.validate()
                    .map_err(|e| invalid(field, format!("`{}`: {e}", f.name)))?;
            }
        }
        Ok(())
    }
}

impl FeatureStats {
    fn validate(&self) -> Result<(), InvalidStats> {
        let bad = |reason: String| Err(invalid("distribution", reason));
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return Err(invalid(
                "name",
                format!("name must have 1 to {MAX_NAME_LEN} bytes"),
            ));
        }
        let shares_ok = |shares: &mut dyn Iterator<Item = f64>| {
            let mut sum = 0.0;
            for s in shares {
                if !(0.0..=1.0).contains(&s) {
                    return false;
                }
                sum += s;
            }
            (sum - 1.0).abs() < 1e-6
        };
        match &self.distribution {
            Distribution::Numeric(n) => {
                if n.count == 0 {
                    return bad("count is 0".into());
                }
                if n.edges.len() + 1 != n.frequencies.len() || n.frequencies.len() > MAX_BINS {
                    return bad(format!(
                        "needs one frequency per bin (edges + 1, at most {MAX_BINS}): {} edges, {} frequencies",
                        n.edges.len(),
                        n.frequencies.len()
                    ));
                }
                if !n.edges.iter().all(|e| e.is_finite())
                    || !n.edges.windows(2).all(|w| w[0] < w[1])
                {
                    return bad("edges must be finite and strictly increasing".into());
                }
                if ![n.mean, n.std, n.min, n.max].iter().all(|v| v.is_finite())
                    || n.std < 0.0
                    || n.min > n.max
                {
                    return bad(
                        "mean, std, min and max must be finite, std >= 0, min <= max".into(),
                    );
                }
                if !shares_ok(&mut n.frequencies.iter().copied()) {
                    return bad("frequencies must be shares in [0, 1] summing to 1".into());
                }
            }
            Distribution::Categorical(c) => {
                if c.count == 0 || c.categories.is_empty() {
                    return bad("no categories".into());
                }
                if c.categories.len() > MAX_CATEGORIES {
                    return bad(format!("more than {MAX_CATEGORIES} categories"));
                }
                if !c.categories.windows(2).all(|w| w[0].0 < w[1].0) {
                    return bad("categories must be sorted and distinct".into());
                }
                if !shares_ok(&mut c.categories.iter().map(|(_, s)| *s)) {
                    return bad("category shares must be in [0, 1] summing to 1".into());
                }
            }
        }
        Ok(())
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

    fn sample() -> ReferenceStats {
        ReferenceStats {
            rows: 8,
            features: vec![FeatureStats {
                name: "x".into(),
                distribution: Distribution::Numeric(
                    numeric(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 4).expect("values"),
                ),
            }],
            outputs: vec![FeatureStats {
                name: "label".into(),
                distribution: Distribution::Categorical(categorical(&[0, 1]).expect("values")),
            }],
            thresholds: Some(Thresholds::default()),
        }
    }

    #[test]
    fn a_reference_round_trips_and_broken_ones_are_refused_with_the_field() {
        let good = sample();
        assert_eq!(
            ReferenceStats::from_bytes(&good.to_bytes()),
            Ok(good.clone())
        );
        let numeric_of = |r: &mut ReferenceStats| match &mut r.features[0].distribution {
            Distribution::Numeric(n) => n.clone(),
            Distribution::Categorical(_) => unreachable!("numeric"),
        };
        let mut cases: Vec<(ReferenceStats, &str)> = Vec::new();
        let mut r = good.clone();
        let mut n = numeric_of(&mut r);
        n.frequencies.pop();
        r.features[0].distribution = Distribution::Numeric(n);
        cases.push((r, "one frequency per bin"));
        let mut r = good.clone();
        let mut n = numeric_of(&mut r);
        n.edges.reverse();
        r.features[0].distribution = Distribution::Numeric(n);
        cases.push((r, "strictly increasing"));
        let mut r = good.clone();
        let mut n = numeric_of(&mut r);
        n.frequencies[0] = 0.9;
        r.features[0].distribution = Distribution::Numeric(n);
        cases.push((r, "summing to 1"));
        let mut r = good.clone();
        r.outputs[0].distribution = Distribution::Categorical(CategoricalStats {
            count: 2,
            categories: vec![(1, 0.5), (0, 0.5)],
        });
        cases.push((r, "sorted and distinct"));
        let mut r = good.clone();
        r.thresholds = Some(Thresholds {
            p_value: 1.5,
            ..Thresholds::default()
        });
        cases.push((r, "p_value"));
        let mut r = good.clone();
        r.features[0].name = String::new();
        cases.push((r, "name"));
        for (r, expect) in cases {
            let err = ReferenceStats::from_bytes(&r.to_bytes())
                .expect_err(expect)
                .to_string();
            assert!(err.contains(expect), "{expect}: {err}");
        }
        // An artifact from before thresholds existed still decodes (defaults).
        #[derive(Serialize)]
        struct Old {
            rows: u64,
            features: Vec<FeatureStats>,
            outputs: Vec<FeatureStats>,
        }
        let old = cbor::to_vec(&Old {
            rows: 8,
            features: good.features.clone(),
            outputs: vec![],
        });
        let decoded = ReferenceStats::from_bytes(&old).expect("old artifact");
        assert_eq!(decoded.thresholds(), Thresholds::default());
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
