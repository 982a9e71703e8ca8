//! Drift tracking of one active bundle, the pure core: served requests go in
//! (inputs and outputs), windows close by row count or age, and the latest
//! window with enough rows comes out as a [`DriftReport`]. Time is an argument;
//! no I/O. The shells (the local API, the daemon, `status`) hold one `Tracker`
//! behind a lock and call it.
//!
//! Which values feed which feature: the reference's input features are the
//! columns of the model's first input, a `[rows, features]` tensor (or one row
//! `[features]`); its outputs are named `out` (one value per row) or `out[k]`
//! (column k of a `[rows, width]` output). Requests of another shape are
//! counted as skipped, never guessed at.

use edgefleet_shared::golden::{Tensor, TensorData};
use edgefleet_shared::protocol::{DriftReport, EventKind};
use edgefleet_shared::reference::ReferenceStats;
use edgefleet_shared::{Digest, UnixTime};

use serde::{Deserialize, Serialize};

use super::{Counts, Thresholds, Window};

/// Most drifted feature names carried by one alert event.
pub const MAX_ALERT_FEATURES: usize = 64;

/// Window sizes (from the agent config's `[drift]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSettings {
    /// A window closes at this many rows.
    pub rows: u64,
    /// ... or when this old (seconds) and holding at least `min_rows`.
    pub max_age_s: u64,
    /// Fewest rows before a window is judged.
    pub min_rows: u64,
}

impl From<&crate::config::DriftConfig> for WindowSettings {
    fn from(c: &crate::config::DriftConfig) -> Self {
        WindowSettings {
            rows: c.window_rows,
            max_age_s: c.window_max_s,
            min_rows: c.min_rows,
        }
    }
}

/// Where one output feature's values are: output index and column.
#[derive(Debug, Clone)]
struct OutputSource {
    output: String,
    column: Option<usize>,
}

/// The tracked columns of each model output, grouped by output so a request
/// checks each output tensor once, not once per tracked column.
#[derive(Debug, Clone, Default)]
struct OutputPlan {
    /// The number of outputs the plan was made for (None: not made yet).
    outputs: Option<usize>,
    groups: Vec<OutputGroup>,
}

#[derive(Debug, Clone)]
struct OutputGroup {
    /// Index in the model's outputs.
    index: usize,
    /// Its name (checked in debug builds).
    name: String,
    /// (source, column) pairs read from it.
    columns: Vec<(usize, usize)>,
}

impl OutputPlan {
    fn new(sources: &[OutputSource], outputs: &[Tensor]) -> OutputPlan {
        let mut groups: Vec<OutputGroup> = Vec::new();
        for (k, source) in sources.iter().enumerate() {
            let Some(index) = outputs.iter().position(|o| o.name == source.output) else {
                continue;
            };
            let column = (k, source.column.unwrap_or(0));
            match groups.iter_mut().find(|g| g.index == index) {
                Some(g) => g.columns.push(column),
                None => groups.push(OutputGroup {
                    index,
                    name: source.output.clone(),
                    columns: vec![column],
                }),
            }
        }
        OutputPlan {
            outputs: Some(outputs.len()),
            groups,
        }
    }

    /// Whether the plan is for outputs like these. A tracker belongs to one
    /// bundle, whose model returns the same outputs in the same order on every
    /// request, so the count is what is checked (comparing names cost as much as
    /// the counting itself); names are checked in debug builds.
    fn fits(&self, outputs: &[Tensor]) -> bool {
        let fits = self.outputs == Some(outputs.len());
        debug_assert!(
            !fits
                || self
                    .groups
                    .iter()
                    .all(|g| outputs.get(g.index).is_some_and(|o| o.name == g.name)),
            "outputs of another model fed to a drift tracker"
        );
        fits
    }
}

/// The drift state of one bundle.
#[derive(Debug, Clone)]
pub struct Tracker {
    digest: Digest,
    thresholds: Thresholds,
    settings: WindowSettings,
    width: usize,
    inputs: Window,
    outputs: Window,
    sources: Vec<OutputSource>,
    /// Where the sources are in the model's outputs (found by name once).
    plan: OutputPlan,
    window: u64,
    started: Option<UnixTime>,
    rows: u64,
    skipped: u64,
    /// The last full window, its counts moved aside at close and scored only
    /// when asked (at a telemetry tick), never on the request path.
    closed: Option<Closed>,
    alerted: Vec<String>,
}

/// A closed window: its counts and where it stood.
#[derive(Debug, Clone)]
struct Closed {
    window: u64,
    started: UnixTime,
    rows: u64,
    inputs: Counts,
    outputs: Counts,
}

/// Reads element `i` as a number (booleans as 0/1; text has no value).
fn value_at(data: &TensorData, i: usize) -> Option<f64> {
    Some(match data {
        TensorData::F32(v) => f64::from(*v.get(i)?),
        TensorData::F64(v) => *v.get(i)?,
        TensorData::I8(v) => f64::from(*v.get(i)?),
        TensorData::I32(v) => f64::from(*v.get(i)?),
        TensorData::I64(v) => *v.get(i)? as f64,
        TensorData::U8(v) => f64::from(*v.get(i)?),
        TensorData::Bool(v) => f64::from(u8::from(*v.get(i)?)),
        TensorData::String(_) => return None,
    })
}

/// Splits `probabilities[2]` into (`probabilities`, Some(2)).
fn parse_output_name(name: &str) -> OutputSource {
    if let Some(stem) = name.strip_suffix(']')
        && let Some((output, col)) = stem.rsplit_once('[')
        && let Ok(column) = col.parse::<usize>()
    {
        return OutputSource {
            output: output.to_owned(),
            column: Some(column),
        };
    }
    OutputSource {
        output: name.to_owned(),
        column: None,
    }
}

impl Tracker {
    /// A tracker for bundle `digest` against its `reference`.
    pub fn new(digest: Digest, reference: &ReferenceStats, settings: WindowSettings) -> Tracker {
        Tracker {
            digest,
            thresholds: reference.thresholds(),
            settings,
            width: reference.features.len(),
            inputs: Window::new(&reference.features),
            outputs: Window::for_outputs(&reference.outputs),
            sources: reference
                .outputs
                .iter()
                .map(|f| parse_output_name(&f.name))
                .collect(),
            plan: OutputPlan::default(),
            window: 0,
            started: None,
            rows: 0,
            skipped: 0,
            closed: None,
            alerted: Vec::new(),
        }
    }

    /// The bundle tracked.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Rows in the current window.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Requests whose shape did not match the reference (not counted).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Bytes held (fixed by the reference, not by the traffic).
    pub fn memory_bytes(&self) -> usize {
        let names: usize = self.alerted.iter().map(String::len).sum::<usize>()
            + self
                .sources
                .iter()
                .map(|s| s.output.len() + 24)
                .sum::<usize>();
        std::mem::size_of::<Tracker>()
            + self.inputs.memory_bytes()
            + self.outputs.memory_bytes()
            + names
            // The closed window's counts: allocated at the first close, reused.
            + self.inputs.empty_counts().memory_bytes()
            + self.outputs.empty_counts().memory_bytes()
    }

    /// Counts one answered request. Rows are the first dimension of the first
    /// input; the request is skipped (and counted as such) when that input is not
    /// `[rows, features]` or `[features]` for the reference's features. `now` is
    /// asked only when a window starts: reading the clock costs more than the
    /// whole update on some virtual machines.
    pub fn observe(
        &mut self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        now: impl FnOnce() -> UnixTime,
    ) {
        let Some(input) = inputs.first() else {
            self.skipped += 1;
            return;
        };
        let rows = match input.shape.as_slice() {
            [n, w] if *w as usize == self.width => *n as usize,
            [w] if *w as usize == self.width => 1,
            _ => {
                self.skipped += 1;
                return;
            }
        };
        if rows == 0 || input.data.len() != rows * self.width {
            self.skipped += 1;
            return;
        }
        if self.started.is_none() {
            self.started = Some(now());
        }
        if let TensorData::F32(x) = &input.data {
            // The common case, without a match per value.
            for row in x.chunks_exact(self.width) {
                self.inputs.add_f32_row(row);
            }
        } else {
            for r in 0..rows {
                for f in 0..self.width {
                    if let Some(v) = value_at(&input.data, r * self.width + f) {
                        self.inputs.add(f, v);
                    }
                }
            }
        }
        // A bundle's model returns its outputs in the same order every time:
        // find the tracked outputs by name once (again if their number changes).
        if !self.plan.fits(outputs) {
            self.plan = OutputPlan::new(&self.sources, outputs);
        }
        for g in &self.plan.groups {
            let Some(out) = outputs.get(g.index) else {
                continue;
            };
            let (n, width) = match out.shape.as_slice() {
                [n] => (*n as usize, 1),
                [n, w] => (*n as usize, *w as usize),
                _ => continue,
            };
            if n != rows || out.data.len() != n * width {
                continue;
            }
            // One match per output, not per value.
            for &(k, column) in g.columns.iter().filter(|(_, c)| *c < width) {
                match &out.data {
                    TensorData::F32(v) => {
                        for r in 0..rows {
                            self.outputs.add(k, f64::from(v[r * width + column]));
                        }
                    }
                    TensorData::I64(v) => {
                        for r in 0..rows {
                            self.outputs.add(k, v[r * width + column] as f64);
                        }
                    }
                    other => {
                        for r in 0..rows {
                            if let Some(v) = value_at(other, r * width + column) {
                                self.outputs.add(k, v);
                            }
                        }
                    }
                }
            }
        }
        self.rows += rows as u64;
        if self.rows >= self.settings.rows {
            self.close();
        }
    }

    /// Closes the window when it is older than `max_age_s` and has enough rows.
    pub fn tick(&mut self, now: UnixTime) {
        if let Some(started) = self.started
            && now.0.saturating_sub(started.0) >= self.settings.max_age_s as i64
            && self.rows >= self.settings.min_rows
        {
            self.close();
        }
    }

    /// Moves the window's counts aside (no scoring here: this runs on the
    /// request that fills the window) and starts the next one.
    fn close(&mut self) {
        let mut closed = self.closed.take().unwrap_or_else(|| Closed {
            window: 0,
            started: UnixTime(0),
            rows: 0,
            inputs: self.inputs.empty_counts(),
            outputs: self.outputs.empty_counts(),
        });
        self.inputs.swap_counts(&mut closed.inputs);
        self.outputs.swap_counts(&mut closed.outputs);
        closed.window = self.window;
        closed.started = self.started.unwrap_or(UnixTime(0));
        closed.rows = self.rows;
        self.closed = Some(closed);
        // The current counts are the previous closed window's now: zero them.
        self.inputs.clear();
        self.outputs.clear();
        self.window += 1;
        self.rows = 0;
        self.started = None;
    }

    fn current_report(&self) -> DriftReport {
        let (inputs, _) = self.inputs.scores(&self.thresholds);
        let (outputs, _) = self.outputs.scores(&self.thresholds);
        self.judge(
            inputs,
            outputs,
            self.window,
            self.started.unwrap_or(UnixTime(0)),
            self.rows,
            false,
        )
    }

    /// The report of the last closed window (scored now).
    fn closed_report(&self) -> Option<DriftReport> {
        let c = self.closed.as_ref()?;
        let (inputs, _) = self.inputs.scores_of(&c.inputs, &self.thresholds);
        let (outputs, _) = self.outputs.scores_of(&c.outputs, &self.thresholds);
        Some(self.judge(inputs, outputs, c.window, c.started, c.rows, true))
    }

    fn judge(
        &self,
        inputs: Vec<Score>,
        outputs: Vec<Score>,
        window: u64,
        started: UnixTime,
        rows: u64,
        closed: bool,
    ) -> DriftReport {
        let drifted_inputs = inputs.iter().filter(|s| s.drifted).count();
        let drifted_share = if inputs.is_empty() {
            0.0
        } else {
            drifted_inputs as f64 / inputs.len() as f64
        };
        let drifted_outputs = outputs.iter().filter(|s| s.drifted).count();
        // The same share rule for outputs: one output of several crossing p < 0.05
        // happens by chance too often to call a window drifted.
        let drifted = (!inputs.is_empty() && drifted_share >= self.thresholds.drifted_share)
            || (!outputs.is_empty()
                && drifted_outputs as f64 / outputs.len() as f64 >= self.thresholds.drifted_share);
        DriftReport {
            digest: self.digest,
            window,
            started,
            rows,
            closed,
            inputs,
            outputs,
            drifted_share,
            drifted,
        }
    }

    /// The window being filled, whatever its size (for `status`).
    pub fn current(&self) -> DriftReport {
        self.current_report()
    }

    /// The latest window with enough rows to judge: the current one once it has
    /// `min_rows`, else the last closed one.
    pub fn report(&self) -> Option<DriftReport> {
        if self.rows >= self.settings.min_rows {
            Some(self.current_report())
        } else {
            self.closed_report()
        }
    }

    /// An alert when the set of drifted features of [`Tracker::report`] differs
    /// from the one last alerted (a feature crossed its threshold, either way).
    pub fn alert(&mut self) -> Option<EventKind> {
        let report = self.report()?;
        let drifted: Vec<String> = report
            .inputs
            .iter()
            .chain(&report.outputs)
            .filter(|s| s.drifted)
            .map(|s| s.feature.clone())
            .collect();
        if drifted == self.alerted {
            return None;
        }
        self.alerted = drifted.clone();
        let mut features = drifted;
        features.truncate(MAX_ALERT_FEATURES);
        Some(EventKind::DriftAlert {
            digest: self.digest,
            rows: report.rows,
            features,
            drifted_share: report.drifted_share,
            drifted: report.drifted,
        })
    }
}

type Score = edgefleet_shared::protocol::DriftScore;

/// What `edgefleet-agent status --json` shows of drift (written to
/// `drift.json` in the data directory by the running agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftStatus {
    /// When it was written (device time).
    pub at: UnixTime,
    /// The bundle tracked.
    pub digest: Digest,
    /// Thresholds in force.
    pub thresholds: Thresholds,
    /// Window sizes: rows, seconds, fewest rows judged.
    pub window_rows: u64,
    /// Seconds after which a window with enough rows closes.
    pub window_max_s: u64,
    /// Fewest rows before a window is judged.
    pub min_rows: u64,
    /// Bytes the tracker holds (fixed by the reference).
    pub memory_bytes: usize,
    /// Requests whose shape did not match the reference.
    pub skipped: u64,
    /// The window being filled.
    pub current: DriftReport,
    /// The last complete window.
    pub last_closed: Option<DriftReport>,
}

/// File name of the drift status in the data directory.
pub const STATUS_FILE: &str = "drift.json";

impl Tracker {
    /// The state for `status`.
    pub fn status(&self, now: UnixTime) -> DriftStatus {
        DriftStatus {
            at: now,
            digest: self.digest,
            thresholds: self.thresholds,
            window_rows: self.settings.rows,
            window_max_s: self.settings.max_age_s,
            min_rows: self.settings.min_rows,
            memory_bytes: self.memory_bytes(),
            skipped: self.skipped,
            current: self.current(),
            last_closed: self.closed_report(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::reference::{Distribution, FeatureStats};

    fn tensor(name: &str, shape: Vec<u64>, data: TensorData) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            data,
        }
    }

    /// Deterministic values spread over [0, 1).
    fn spread(seed: u64, n: usize) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    fn reference() -> ReferenceStats {
        let numeric = |name: &str, seed| FeatureStats {
            name: name.into(),
            distribution: Distribution::Numeric(
                edgefleet_shared::reference::numeric(&spread(seed, 4000), 30).expect("values"),
            ),
        };
        let labels: Vec<i64> = (0..3000).map(|i| i % 3).collect();
        ReferenceStats {
            rows: 4000,
            features: vec![numeric("a", 1), numeric("b", 2)],
            outputs: vec![
                FeatureStats {
                    name: "label".into(),
                    distribution: Distribution::Categorical(
                        edgefleet_shared::reference::categorical(&labels).expect("labels"),
                    ),
                },
                numeric("scores[1]", 3),
            ],
            thresholds: None,
        }
    }

    const SETTINGS: WindowSettings = WindowSettings {
        rows: 1000,
        max_age_s: 600,
        min_rows: 200,
    };

    /// One request of `rows` rows; feature `b` shifted by `shift`; labels
    /// cycling or stuck on `stuck`.
    fn request(
        seed: u64,
        rows: usize,
        shift: f64,
        stuck: Option<i64>,
    ) -> (Vec<Tensor>, Vec<Tensor>) {
        let a = spread(seed, rows);
        let b = spread(seed + 1, rows);
        let mut x = Vec::new();
        for r in 0..rows {
            x.push(a[r] as f32);
            x.push((b[r] + shift) as f32);
        }
        let labels: Vec<i64> = (0..rows as i64).map(|i| stuck.unwrap_or(i % 3)).collect();
        let s = spread(seed + 2, rows);
        let scores: Vec<f32> = s
            .iter()
            .flat_map(|v| [1.0 - *v as f32, *v as f32])
            .collect();
        (
            vec![tensor("x", vec![rows as u64, 2], TensorData::F32(x))],
            vec![
                tensor("label", vec![rows as u64], TensorData::I64(labels)),
                tensor("scores", vec![rows as u64, 2], TensorData::F32(scores)),
            ],
        )
    }

    #[test]
    fn a_steady_stream_shows_no_drift_and_windows_close_by_rows() {
        let mut t = Tracker::new(Digest::of(b"m"), &reference(), SETTINGS);
        assert!(t.report().is_none(), "nothing to judge yet");
        for i in 0..9 {
            let (x, y) = request(100 + i, 100, 0.0, None);
            t.observe(&x, &y, || UnixTime(1000 + i as i64));
        }
        assert_eq!(t.rows(), 900);
        let r = t.report().expect("900 rows >= min_rows");
        assert!(!r.closed && !r.drifted, "{r:?}");
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.outputs.len(), 2, "label and scores[1] both fed");
        assert!(r.outputs[0].jensen_shannon.is_some() && r.inputs[0].jensen_shannon.is_none());
        let (x, y) = request(200, 100, 0.0, None);
        t.observe(&x, &y, || UnixTime(2000));
        assert_eq!(t.rows(), 0, "the window closed at 1000 rows");
        let r = t.report().expect("the closed window");
        assert!(r.closed && r.rows == 1000 && r.window == 0 && r.started == UnixTime(1000));
        assert_eq!(t.alert(), None, "nothing drifted, nothing to say");
    }

    #[test]
    fn a_shifted_feature_and_stuck_predictions_drift_and_alert_once() {
        let mut t = Tracker::new(Digest::of(b"m"), &reference(), SETTINGS);
        let (x, y) = request(7, 300, 0.5, Some(2));
        t.observe(&x, &y, || UnixTime(50));
        let r = t.report().expect("300 rows");
        let drifted: Vec<&str> = r
            .inputs
            .iter()
            .chain(&r.outputs)
            .filter(|s| s.drifted)
            .map(|s| s.feature.as_str())
            .collect();
        assert_eq!(drifted, ["b", "label"], "{r:?}");
        assert_eq!(r.drifted_share, 0.5);
        assert!(r.drifted, "an output drifted, and half of the inputs");
        match t.alert() {
            Some(EventKind::DriftAlert {
                features, drifted, ..
            }) => {
                assert_eq!(features, ["b", "label"]);
                assert!(drifted);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.alert(), None, "same set: no second alert");
        // Time closes the window; a clean window after it clears the alert.
        t.tick(UnixTime(50 + 600));
        assert_eq!(t.rows(), 0);
        let (x, y) = request(8, 400, 0.0, None);
        t.observe(&x, &y, || UnixTime(700));
        match t.alert() {
            Some(EventKind::DriftAlert {
                features, drifted, ..
            }) => assert!(features.is_empty() && !drifted),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_closed_window_scores_as_it_stood_and_the_next_starts_empty() {
        let mut t = Tracker::new(Digest::of(b"m"), &reference(), SETTINGS);
        // Window 0: shifted, closed by time; window 1: clean, closed by size
        // (the counts' buffers swap back and forth).
        let (x, y) = request(3, 400, 0.5, Some(1));
        t.observe(&x, &y, || UnixTime(10));
        let shifted = t.current();
        t.tick(UnixTime(10 + 600));
        let closed = t.report().expect("the closed window");
        assert!(closed.closed && shifted.drifted);
        assert_eq!(
            (closed.window, closed.rows, closed.started),
            (0, 400, UnixTime(10))
        );
        assert_eq!(closed.inputs, shifted.inputs);
        assert_eq!(closed.outputs, shifted.outputs);
        assert_eq!(t.current().inputs, Vec::new(), "the new window is empty");
        let (x, y) = request(4, 999, 0.0, None);
        t.observe(&x, &y, || UnixTime(700));
        let clean = t.current();
        let (x, y) = request(5, 1, 0.0, None);
        t.observe(&x, &y, || UnixTime(701));
        assert_eq!(t.rows(), 0, "1000 rows close the window");
        let closed = t.report().expect("the closed window");
        assert_eq!((closed.window, closed.rows), (1, 1000));
        assert!(!closed.drifted, "{closed:?}");
        assert_eq!(
            closed.inputs.iter().map(|s| s.count).collect::<Vec<_>>(),
            clean.inputs.iter().map(|s| s.count + 1).collect::<Vec<_>>()
        );
        // Another shifted window replaces it.
        let (x, y) = request(6, 1000, 0.5, Some(1));
        t.observe(&x, &y, || UnixTime(800));
        let closed = t.report().expect("the closed window");
        assert_eq!(closed.window, 2);
        assert!(closed.drifted);
    }

    #[test]
    fn requests_of_another_shape_are_skipped_not_guessed() {
        let mut t = Tracker::new(Digest::of(b"m"), &reference(), SETTINGS);
        let wrong = vec![tensor("x", vec![2, 3], TensorData::F32(vec![0.0; 6]))];
        t.observe(&wrong, &[], || UnixTime(1));
        let short = vec![tensor("x", vec![4, 2], TensorData::F32(vec![0.0; 6]))];
        t.observe(&short, &[], || UnixTime(1));
        t.observe(&[], &[], || UnixTime(1));
        assert_eq!((t.skipped(), t.rows()), (3, 0));
        // One row as [features] counts; outputs missing just leave outputs unfed.
        let one = vec![tensor("x", vec![2], TensorData::F64(vec![0.5, 0.5]))];
        t.observe(&one, &[], || UnixTime(1));
        assert_eq!(t.rows(), 1);
        // Young windows are not closed by time, nor small ones.
        t.tick(UnixTime(10_000));
        assert_eq!(t.rows(), 1, "under min_rows: kept filling");
    }

    #[test]
    fn memory_does_not_grow_with_traffic() {
        let mut t = Tracker::new(Digest::of(b"m"), &reference(), SETTINGS);
        let (x, y) = request(1, 100, 0.0, None);
        t.observe(&x, &y, || UnixTime(0));
        let (_, _) = (t.alert(), t.report());
        let before = t.memory_bytes();
        for i in 0..50 {
            let (x, y) = request(i, 100, 0.3, None);
            t.observe(&x, &y, || UnixTime(i as i64));
        }
        let _ = t.alert();
        assert!(
            t.memory_bytes() <= before + 4096,
            "{} vs {before}",
            t.memory_bytes()
        );
        assert!(t.memory_bytes() < 64 * 1024, "{}", t.memory_bytes());
    }

    #[test]
    fn output_names_with_a_column_are_split() {
        let s = parse_output_name("probabilities[12]");
        assert_eq!((s.output.as_str(), s.column), ("probabilities", Some(12)));
        let s = parse_output_name("label");
        assert_eq!((s.output.as_str(), s.column), ("label", None));
        let s = parse_output_name("odd[x]");
        assert_eq!((s.output.as_str(), s.column), ("odd[x]", None));
    }
}
