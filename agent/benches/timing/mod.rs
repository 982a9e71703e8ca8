//! Timing shared by the agent's benches: medians of many runs after a warm-up.

use std::time::Instant;

/// The median of `v` (the upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median time of `f` over `runs` runs, in µs, after a tenth as many to warm up.
pub fn time_us(runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..runs.div_ceil(10) {
        f();
    }
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    )
}
