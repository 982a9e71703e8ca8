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
