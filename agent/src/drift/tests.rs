use proptest::prelude::*;
use serde_json::Value;

use super::*;

const CASES: &str = include_str!("../../../models/drift_cases.json");

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn counts(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("count"))
        .collect()
}

/// Relative difference, with an absolute floor for values near zero.
fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got - want).abs() <= abs.max(rel * want.abs())
}

#[test]
fn the_statistics_match_scipy_on_generated_cases() {
    let all: Value = serde_json::from_str(CASES).expect("fixture");
    let cases = all["cases"].as_array().expect("cases");
    assert!(cases.len() >= 9);
    for (i, case) in cases.iter().enumerate() {
        let reference = floats(&case["reference"]);
        let current = counts(&case["current"]);
        let js = jensen_shannon(&reference, &current).expect("js");
        let want = case["jensen_shannon"].as_f64().expect("js");
        assert!(
            close(js, want, 1e-9, 1e-12),
            "case {i}: JS {js} vs scipy {want}"
        );
        match case["kind"].as_str() {
            Some("numeric") => {
                let p = psi(&reference, &current).expect("psi");
                let want = case["psi"].as_f64().expect("psi");
                assert!(close(p, want, 1e-9, 1e-12), "case {i}: PSI {p} vs {want}");
                let n = case["reference_count"].as_u64().expect("n");
                let ks = kolmogorov_smirnov(&reference, n, &current).expect("ks");
                let want = case["ks_statistic"].as_f64().expect("d");
                assert!(
                    close(ks.statistic, want, 1e-9, 1e-12),
                    "case {i}: D {ks:?} vs {want}"
                );
                let want = case["ks_p_value"].as_f64().expect("p");
                assert!(
                    close(ks.p_value, want, 1e-6, 1e-12),
                    "case {i}: p {ks:?} vs {want}"
                );
                let points = bin_points(
                    &floats(&case["edges"]),
                    case["min"].as_f64().expect("min"),
                    case["max"].as_f64().expect("max"),
                );
                let w = wasserstein(&points, &reference, &current).expect("w");
                let want = case["wasserstein"].as_f64().expect("w");
                assert!(close(w, want, 1e-9, 1e-12), "case {i}: W {w} vs {want}");
            }
            Some("categorical") => {
                let chi = chi_square(&reference, &current).expect("chi");
                let want = case["chi_square"].as_f64().expect("chi");
                assert!(
                    close(chi.statistic, want, 1e-9, 1e-12),
                    "case {i}: {chi:?} vs {want}"
                );
                let want = case["chi_square_p_value"].as_f64().expect("p");
                assert!(
                    close(chi.p_value, want, 1e-6, 1e-12),
                    "case {i}: {chi:?} vs p {want}"
                );
            }
            other => panic!("case {i}: kind {other:?}"),
        }
    }
}

#[test]
fn the_special_functions_match_scipy() {
    let all: Value = serde_json::from_str(CASES).expect("fixture");
    for row in all["special"]["kolmogorov_sf"].as_array().expect("rows") {
        let [x, want] = floats(row)[..] else {
            panic!("row {row}")
        };
        let got = kolmogorov_sf(x);
        assert!(
            close(got, want, 1e-7, 1e-12),
            "kstwobign.sf({x}) = {want}, got {got}"
        );
    }
    for row in all["special"]["chi2_sf"].as_array().expect("rows") {
        let [df, x, want] = floats(row)[..] else {
            panic!("row {row}")
        };
        let got = gamma_q(df / 2.0, x / 2.0);
        assert!(
            close(got, want, 1e-7, 1e-14),
            "chi2.sf({x}, {df}) = {want}, got {got}"
        );
    }
}

#[test]
fn a_window_that_looks_like_the_reference_shows_no_drift() {
    let reference = [0.25, 0.25, 0.5];
    let current = [100, 100, 200];
    assert!(psi(&reference, &current).expect("psi").abs() < 1e-12);
    assert!(jensen_shannon(&reference, &current).expect("js") < 1e-9);
    let ks = kolmogorov_smirnov(&reference, 1000, &current).expect("ks");
    assert!(ks.statistic < 1e-12 && ks.p_value > 0.999, "{ks:?}");
    let chi = chi_square(&reference, &current).expect("chi");
    assert!(chi.statistic < 1e-12 && chi.p_value > 0.999, "{chi:?}");
    let w = wasserstein(&[1.0, 2.0, 3.0], &reference, &current).expect("w");
    assert!(w < 1e-12);
}

#[test]
fn empty_windows_and_mismatched_bins_give_no_number() {
    assert_eq!(psi(&[0.5, 0.5], &[0, 0]), None);
    assert_eq!(psi(&[0.5, 0.5], &[1, 2, 3]), None);
    assert_eq!(psi(&[], &[]), None);
    assert_eq!(jensen_shannon(&[0.5, 0.5], &[0, 0]), None);
    assert_eq!(kolmogorov_smirnov(&[0.5, 0.5], 0, &[1, 1]), None);
    assert_eq!(chi_square(&[1.0], &[5]), None);
    assert_eq!(wasserstein(&[1.0], &[0.5, 0.5], &[1, 1]), None);
}

#[test]
fn a_shift_to_one_bin_is_significant_drift() {
    let reference = [0.1; 10];
    let mut current = [0u64; 10];
    current[9] = 500;
    assert!(psi(&reference, &current).expect("psi") > 0.25);
    let ks = kolmogorov_smirnov(&reference, 1000, &current).expect("ks");
    assert!(ks.p_value < 0.05, "{ks:?}");
    let chi = chi_square(&reference, &current).expect("chi");
    assert!(chi.p_value < 0.05, "{chi:?}");
}

fn normal_like(seed: u64, n: usize, shift: f64) -> Vec<f64> {
    // A deterministic bell-shaped sample (sum of uniforms), no RNG crate needed.
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            let mut s = 0.0;
            for _ in 0..12 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s += (x >> 11) as f64 / (1u64 << 53) as f64;
            }
            s - 6.0 + shift
        })
        .collect()
}

fn reference_of(features: &[(&str, Vec<f64>)]) -> Vec<edgefleet_shared::reference::FeatureStats> {
    features
        .iter()
        .map(|(name, values)| edgefleet_shared::reference::FeatureStats {
            name: (*name).to_owned(),
            distribution: edgefleet_shared::reference::Distribution::Numeric(
                edgefleet_shared::reference::numeric(values, 30).expect("stats"),
            ),
        })
        .collect()
}

#[test]
fn a_window_flags_exactly_the_shifted_features() {
    let reference = reference_of(&[
        ("steady", normal_like(1, 5000, 0.0)),
        ("moved", normal_like(2, 5000, 0.0)),
        ("also_steady", normal_like(3, 5000, 0.0)),
    ]);
    let mut w = Window::new(&reference);
    for (i, shift) in [(0, 0.0), (1, 1.0), (2, 0.0)] {
        for v in normal_like(10 + i as u64, 1000, shift) {
            w.add(i, v);
        }
    }
    let (scores, dataset) = w.scores(&Thresholds::default());
    let flagged: Vec<&str> = scores
        .iter()
        .filter(|f| f.drifted)
        .map(|f| f.feature.as_str())
        .collect();
    assert_eq!(flagged, ["moved"], "{scores:?}");
    assert!(!dataset, "one feature of three is under the 50% share");
    let moved = &scores[1];
    assert!(moved.psi > 0.25 && moved.p_value < 1e-6, "{moved:?}");
    assert!(moved.wasserstein.expect("w") > 0.5, "{moved:?}");
    // Memory is one counter per bin, however many values came.
    assert_eq!(w.count(1), 1000);
    w.clear();
    assert_eq!(w.count(1), 0);
    assert!(w.scores(&Thresholds::default()).0.is_empty());
}

#[test]
fn new_categories_count_as_drift_and_odd_values_are_ignored() {
    let reference = vec![edgefleet_shared::reference::FeatureStats {
        name: "class".into(),
        distribution: edgefleet_shared::reference::Distribution::Categorical(
            edgefleet_shared::reference::categorical(&[0, 0, 1, 1, 2, 2]).expect("stats"),
        ),
    }];
    let mut w = Window::new(&reference);
    for v in [0.0, 1.0, 2.0, 0.0, 1.0, 2.0] {
        w.add(0, v);
    }
    w.add(0, f64::NAN);
    w.add(7, 1.0);
    assert_eq!(w.count(0), 6);
    let (scores, _) = w.scores(&Thresholds::default());
    assert!(!scores[0].drifted, "{scores:?}");
    for _ in 0..20 {
        w.add(0, 9.0);
    }
    let (scores, dataset) = w.scores(&Thresholds::default());
    assert!(scores[0].drifted && dataset, "{scores:?}");
}

fn distribution() -> impl Strategy<Value = (Vec<f64>, Vec<u64>)> {
    (2usize..40).prop_flat_map(|k| {
        (
            proptest::collection::vec(0.0f64..1.0, k),
            proptest::collection::vec(0u64..1000, k),
        )
            .prop_filter_map("non-empty", |(r, c)| {
                let total: f64 = r.iter().sum();
                (total > 0.0 && c.iter().sum::<u64>() > 0)
                    .then(|| (r.iter().map(|x| x / total).collect(), c))
            })
    })
}

proptest! {
    #[test]
    fn the_statistics_stay_in_their_ranges((reference, current) in distribution(), n in 1u64..100_000) {
        let p = psi(&reference, &current).expect("psi");
        prop_assert!(p >= -1e-12 && p.is_finite());
        let js = jensen_shannon(&reference, &current).expect("js");
        prop_assert!((0.0..=std::f64::consts::LN_2.sqrt() + 1e-12).contains(&js));
        let ks = kolmogorov_smirnov(&reference, n, &current).expect("ks");
        prop_assert!((0.0..=1.0 + 1e-12).contains(&ks.statistic));
        prop_assert!((0.0..=1.0).contains(&ks.p_value));
        let chi = chi_square(&reference, &current).expect("chi");
        prop_assert!(chi.statistic >= 0.0 && (0.0..=1.0).contains(&chi.p_value));
        let points: Vec<f64> = (0..reference.len()).map(|i| i as f64).collect();
        let w = wasserstein(&points, &reference, &current).expect("w");
        prop_assert!(w >= 0.0 && w <= (reference.len() - 1) as f64 + 1e-9);
    }

    #[test]
    fn the_distances_are_symmetric_in_shape((reference, current) in distribution()) {
        // JS is symmetric: swapping the roles (with the counts scaled to shares)
        // gives the same distance.
        let total: u64 = current.iter().sum();
        let as_shares: Vec<f64> = current.iter().map(|c| *c as f64 / total as f64).collect();
        let scaled: Vec<u64> = reference.iter().map(|r| (r * 1e9).round() as u64).collect();
        prop_assume!(scaled.iter().sum::<u64>() > 0);
        let a = jensen_shannon(&reference, &current).expect("a");
        let b = jensen_shannon(&as_shares, &scaled).expect("b");
        prop_assert!((a - b).abs() < 1e-6, "{} vs {}", a, b);
    }
}

#[test]
fn reference_columns_named_categorical_are_summarised_by_category() {
    let model = crate::model::LoadedModel::load(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/iris_logreg.onnx"
        ))
        .expect("model"),
    )
    .expect("loads");
    let headers: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
    let rows: Vec<Vec<f64>> = (0..60)
        .map(|i| vec![f64::from(i % 3), 3.0 + f64::from(i % 7) / 10.0, 1.5, 0.2])
        .collect();
    let stats = crate::reference_stats::summarise(&model, &headers, &rows, &["a".to_owned()])
        .expect("summarised");
    match &stats.features[0].distribution {
        edgefleet_shared::reference::Distribution::Categorical(c) => {
            assert_eq!(c.categories.len(), 3);
            assert!(
                c.categories
                    .iter()
                    .all(|(_, share)| (*share - 1.0 / 3.0).abs() < 1e-12)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        stats.features[1].distribution,
        edgefleet_shared::reference::Distribution::Numeric(_)
    ));
    // A live window on that column counts categories, and a new one is drift.
    let mut w = Window::new(&stats.features);
    for i in 0..60 {
        w.add(0, f64::from(i % 3));
    }
    assert!(!w.scores(&Thresholds::default()).0[0].drifted);
    for _ in 0..30 {
        w.add(0, 7.0);
    }
    assert!(w.scores(&Thresholds::default()).0[0].drifted);
    // Codes must be integers, and the column must exist.
    let mut odd = rows.clone();
    odd[5][0] = 1.5;
    let err = crate::reference_stats::summarise(&model, &headers, &odd, &["a".to_owned()])
        .expect_err("1.5")
        .to_string();
    assert!(err.contains("`a`") && err.contains("1.5"), "{err}");
    let err = crate::reference_stats::summarise(&model, &headers, &rows, &["zz".to_owned()])
        .expect_err("no zz")
        .to_string();
    assert!(err.contains("`zz`"), "{err}");
}

/// The bin index finds, for `values` and for the edges at `pick` and just
/// beside them (the hard cases), the bin the binary search finds.
fn same_bins(
    mut edges: Vec<f64>,
    mut values: Vec<f64>,
    pick: &[usize],
) -> Result<(), proptest::test_runner::TestCaseError> {
    edges.sort_by(f64::total_cmp);
    edges.dedup();
    let index = BinIndex::new(&edges);
    for i in pick {
        if let Some(e) = edges.get(*i) {
            values.extend([*e, e.next_up(), e.next_down()]);
        }
    }
    for v in values {
        prop_assert_eq!(
            index.bin(&edges, v),
            edgefleet_shared::reference::bin_of(&edges, v),
            "value {} edges {:?}",
            v,
            edges
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn the_bin_index_finds_the_same_bin_as_the_binary_search(
        edges in proptest::collection::vec(-1e3f64..1e3, 0..40),
        values in proptest::collection::vec(-1.2e3f64..1.2e3, 1..50),
        pick in proptest::collection::vec(0usize..40, 0..10),
    ) {
        same_bins(edges, values, &pick)?;
    }

    /// Skewed data (class probabilities near 0 and 1) crowds many edges into
    /// one cell of the index, where it searches instead of stepping.
    #[test]
    fn the_bin_index_is_exact_on_crowded_edges(
        exponents in proptest::collection::vec(1i32..30, 1..40),
        values in proptest::collection::vec(0f64..1.0, 1..50),
        pick in proptest::collection::vec(0usize..80, 0..10),
    ) {
        let edges: Vec<f64> = exponents
            .iter()
            .flat_map(|k| [10f64.powi(-k), 1.0 - 10f64.powi(-k)])
            .collect();
        same_bins(edges, values, &pick)?;
    }
}
