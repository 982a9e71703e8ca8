//! Charts drawn on the server as inline SVG (no script, no CDN): a line chart
//! of one series over time and a stacked progress bar. Pure functions of
//! their points, tested below.

use maud::{Markup, html};

/// Width and height of a chart's drawing area (SVG user units; the SVG
/// scales to its container).
const W: f64 = 300.0;
const H: f64 = 60.0;

/// A line chart of `points` (time ms, value), with its title, the latest
/// value and the range shown in text beside it. Points that are not finite
/// are left out; with none, the chart says so.
pub fn line(title: &str, unit: &str, points: &[(u64, f64)]) -> Markup {
    let points: Vec<(u64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    let Some(&(_, last)) = points.last() else {
        return html! {
            figure.chart { figcaption { (title) } p.muted { "no data in this range" } }
        };
    };
    let (lo, hi) = bounds(points.iter().map(|p| p.1));
    html! {
        figure.chart {
            figcaption {
                (title) " "
                strong { (format_value(last, unit)) }
                span.muted { " (" (format_value(lo, unit)) " – " (format_value(hi, unit)) ")" }
            }
            svg viewBox=(format!("0 0 {W} {H}")) preserveAspectRatio="none" role="img"
                aria-label=(format!("{title}: latest {}", format_value(last, unit))) {
                polyline points=(polyline(&points, lo, hi)) fill="none"
                    stroke="currentColor" stroke-width="1.5" vector-effect="non-scaling-stroke" {}
            }
        }
    }
}

/// The lowest and highest value, widened so that a flat series has a range
/// and a series of positive values starts at 0.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo >= 0.0 {
        lo = 0.0;
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    (lo, hi)
}

/// The SVG `points` of a series scaled into the chart: time across, value
/// up (SVG's y grows downwards).
fn polyline(points: &[(u64, f64)], lo: f64, hi: f64) -> String {
    let t0 = points.first().map_or(0, |p| p.0);
    let span = points.last().map_or(0, |p| p.0).saturating_sub(t0).max(1) as f64;
    let single = points.len() == 1;
    let mut out = String::with_capacity(points.len() * 12);
    for (i, &(t, v)) in points.iter().enumerate() {
        let x = if single {
            0.0
        } else {
            (t.saturating_sub(t0) as f64 / span) * W
        };
        let y = H - (v - lo) / (hi - lo) * H;
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&format!("{x:.1},{y:.1}"));
    }
    if single {
        // One point: a flat line across, so that it shows.
        let y = H - (points[0].1 - lo) / (hi - lo) * H;
        out.push_str(&format!(" {W:.1},{y:.1}"));
    }
    out
}

/// A value with its unit, rounded for reading.
pub fn format_value(v: f64, unit: &str) -> String {
    match unit {
        "%" => format!("{:.1}%", v),
        "bytes" => format_bytes(v),
        "ms" => format!("{v:.1} ms"),
        "/s" => format!("{v:.2}/s"),
        "°C" => format!("{v:.1} °C"),
        _ if v.abs() >= 100.0 || v == v.trunc() => format!("{v:.0}{unit}"),
        _ => format!("{v:.3}{unit}"),
    }
}

/// Bytes in KiB, MiB or GiB.
pub fn format_bytes(v: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = v;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One part of a stacked bar: its share's CSS class, its count, its label.
pub struct Part<'a> {
    /// CSS class (its colour).
    pub class: &'a str,
    /// How many.
    pub count: usize,
    /// What they are.
    pub label: &'a str,
}

/// A horizontal bar split in proportion to the parts' counts, with the
/// counts written out under it for those who do not read colours.
pub fn stacked_bar(parts: &[Part<'_>]) -> Markup {
    let total: usize = parts.iter().map(|p| p.count).sum();
    html! {
        div.bar role="img" aria-label=(legend(parts)) {
            @for p in parts.iter().filter(|p| p.count > 0) {
                span class=(p.class) style=(format!("width:{:.2}%", share(p.count, total))) {}
            }
        }
        p.legend { (legend(parts)) }
    }
}

fn legend(parts: &[Part<'_>]) -> String {
    let text: Vec<String> = parts
        .iter()
        .filter(|p| p.count > 0)
        .map(|p| format!("{} {}", p.count, p.label))
        .collect();
    if text.is_empty() {
        "none".into()
    } else {
        text.join(" · ")
    }
}

/// `count` of `total` in percent (0 for an empty total).
pub fn share(count: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        count as f64 * 100.0 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coords(s: &str) -> Vec<(f64, f64)> {
        s.split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').expect("x,y");
                (x.parse().expect("x"), y.parse().expect("y"))
            })
            .collect()
    }

    #[test]
    fn a_series_fills_the_chart_from_left_to_right_and_bottom_to_top() {
        let pts = [(1_000, 0.0), (2_000, 5.0), (3_000, 10.0)];
        let (lo, hi) = bounds(pts.iter().map(|p| p.1));
        assert_eq!((lo, hi), (0.0, 10.0));
        let c = coords(&polyline(&pts, lo, hi));
        assert_eq!(c, vec![(0.0, H), (W / 2.0, H / 2.0), (W, 0.0)]);
    }

    #[test]
    fn negative_values_keep_their_range_and_a_flat_series_gets_one() {
        assert_eq!(bounds([-2.0, 3.0].into_iter()), (-2.0, 3.0));
        assert_eq!(bounds([4.0, 4.0].into_iter()), (0.0, 4.0));
        assert_eq!(bounds([0.0, 0.0].into_iter()), (0.0, 1.0));
        assert_eq!(bounds([-1.0].into_iter()), (-1.0, 0.0));
    }

    #[test]
    fn every_point_stays_inside_the_drawing_for_any_series() {
        let mut seed = 7u64;
        for n in 1..40 {
            let pts: Vec<(u64, f64)> = (0..n)
                .map(|i| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (
                        i * 10_000,
                        (seed >> 11) as f64 / (1u64 << 53) as f64 * 200.0 - 100.0,
                    )
                })
                .collect();
            let (lo, hi) = bounds(pts.iter().map(|p| p.1));
            for (x, y) in coords(&polyline(&pts, lo, hi)) {
                assert!((0.0..=W).contains(&x) && (0.0..=H).contains(&y), "{x},{y}");
            }
        }
    }

    #[test]
    fn a_single_point_is_drawn_as_a_line_and_no_point_says_so() {
        let c = coords(&polyline(&[(5, 2.0)], 0.0, 2.0));
        assert_eq!(c, vec![(0.0, 0.0), (W, 0.0)]);
        let empty = line("CPU", "%", &[(1, f64::NAN)]).into_string();
        assert!(empty.contains("no data"), "{empty}");
        let drawn = line("CPU", "%", &[(1, 12.5), (2, 50.0)]).into_string();
        assert!(
            drawn.contains("<polyline") && drawn.contains("50.0%"),
            "{drawn}"
        );
    }

    #[test]
    fn bars_split_in_proportion_and_name_their_counts() {
        let html = stacked_bar(&[
            Part {
                class: "ok",
                count: 3,
                label: "installed",
            },
            Part {
                class: "bad",
                count: 1,
                label: "failed",
            },
            Part {
                class: "todo",
                count: 0,
                label: "pending",
            },
        ])
        .into_string();
        assert!(
            html.contains("width:75.00%") && html.contains("width:25.00%"),
            "{html}"
        );
        assert!(
            html.contains("3 installed · 1 failed") && !html.contains("pending"),
            "{html}"
        );
        assert_eq!(share(1, 0), 0.0);
    }

    #[test]
    fn values_read_with_their_units() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(3.5 * 1024.0 * 1024.0), "3.5 MiB");
        assert_eq!(format_value(12.345, "%"), "12.3%");
        assert_eq!(format_value(0.25, ""), "0.250");
        assert_eq!(format_value(3.0, ""), "3");
    }
}
