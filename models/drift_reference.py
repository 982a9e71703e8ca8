"""Writes models/drift_cases.json: drift statistics computed with numpy/scipy on
generated data, for agent/src/drift/tests.rs to compare against (the agent's
numbers must match within the tolerances stated there).

Run: python3 models/drift_reference.py   (needs numpy and scipy)
"""
import json
import pathlib

import numpy as np
from scipy import stats
from scipy.spatial import distance

rng = np.random.default_rng(7)
EPS = 1e-4
cases = []


def bins_of(ref, k):
    edges = np.unique(np.quantile(ref, np.arange(1, k) / k))
    edges = edges[edges < ref.max()]
    return edges


def counts(values, edges):
    # bin i is (e[i-1], e[i]]: the same rule as shared/src/reference.rs
    idx = np.searchsorted(edges, values, side="left")
    return np.bincount(idx, minlength=len(edges) + 1)


for shift, scale, n_ref, n_cur, k in [
    (0.0, 1.0, 2000, 500, 30),
    (0.3, 1.0, 2000, 500, 30),
    (1.0, 1.5, 1000, 300, 10),
    (-0.5, 0.7, 5000, 100, 20),
    (0.0, 1.0, 300, 3000, 5),
]:
    ref = rng.normal(0.0, 1.0, n_ref)
    cur = rng.normal(shift, scale, n_cur)
    edges = bins_of(ref, k)
    ref_freq = counts(ref, edges) / n_ref
    cur_counts = counts(cur, edges)
    cur_freq = cur_counts / cur_counts.sum()
    r = np.maximum(ref_freq, EPS)
    c = np.maximum(cur_freq, EPS)
    psi = float(np.sum((c - r) * np.log(c / r)))
    d = float(np.max(np.abs(np.cumsum(ref_freq) - np.cumsum(cur_freq))))
    en = n_ref * cur_counts.sum() / (n_ref + cur_counts.sum())
    ks_p = float(stats.kstwobign.sf(d * np.sqrt(en)))
    bounds = np.concatenate([[min(ref.min(), edges[0])], edges, [max(ref.max(), edges[-1])]])
    points = (bounds[:-1] + bounds[1:]) / 2
    w = float(stats.wasserstein_distance(points, points, ref_freq, cur_freq))
    js = float(distance.jensenshannon(ref_freq, cur_freq))
    cases.append({
        "kind": "numeric",
        "edges": edges.tolist(), "min": float(ref.min()), "max": float(ref.max()),
        "reference": ref_freq.tolist(), "reference_count": n_ref,
        "current": cur_counts.tolist(),
        "psi": psi, "ks_statistic": d, "ks_p_value": ks_p,
        "wasserstein": w, "jensen_shannon": js,
    })

for probs_ref, probs_cur, n in [
    ([0.5, 0.3, 0.2], [0.5, 0.3, 0.2], 400),
    ([0.5, 0.3, 0.2], [0.3, 0.3, 0.4], 400),
    ([0.25, 0.25, 0.25, 0.25], [0.4, 0.2, 0.2, 0.2], 80),
    ([0.9, 0.1], [0.85, 0.15], 1000),
]:
    cur_counts = rng.multinomial(n, probs_cur)
    ref = np.array(probs_ref)
    chi = stats.chisquare(cur_counts, ref / ref.sum() * cur_counts.sum())
    cases.append({
        "kind": "categorical",
        "reference": ref.tolist(), "current": cur_counts.tolist(),
        "chi_square": float(chi.statistic), "chi_square_p_value": float(chi.pvalue),
        "jensen_shannon": float(distance.jensenshannon(ref, cur_counts / cur_counts.sum())),
    })

# Survival functions on a grid, for the special functions alone.
grid = [0.05, 0.3, 0.6, 1.0, 1.17, 1.19, 1.5, 2.0, 3.0]
special = {
    "kolmogorov_sf": [[x, float(stats.kstwobign.sf(x))] for x in grid],
    "chi2_sf": [[df, x, float(stats.chi2.sf(x, df))]
                for df in [1, 2, 3, 9, 29] for x in [0.1, 1.0, 3.0, 10.0, 40.0]],
}
out = pathlib.Path(__file__).with_name("drift_cases.json")
out.write_text(json.dumps({"scipy": __import__("scipy").__version__,
                           "cases": cases, "special": special}, indent=1) + "\n")
print(f"wrote {out} ({len(cases)} cases)")
