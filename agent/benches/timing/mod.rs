//! Timing shared by the agent's benches: medians of many runs after a warm-up,
//! and onnxruntime's median for the same model and input, from Python.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use edgefleet_shared::golden::{Tensor, TensorData};

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

/// onnxruntime's median time in µs for `inputs` (f32, i64 and string tensors)
/// to `model` over `runs` runs, one thread (`bench/ort_time.py` under
/// `EDGEFLEET_ORT_PYTHON`, which adds its few µs of per-call overhead to
/// onnxruntime's side), or why there is none.
pub fn onnxruntime_us(model: &str, inputs: &[Tensor], runs: usize) -> Result<f64, String> {
    let python = std::env::var_os("EDGEFLEET_ORT_PYTHON").ok_or(
        "not run (set EDGEFLEET_ORT_PYTHON to a python with onnxruntime; see docs/benchmarks.md)",
    )?;
    let mut feed = serde_json::Map::new();
    for t in inputs {
        let (kind, data) = match &t.data {
            TensorData::F32(v) => ("f32", serde_json::json!(v)),
            TensorData::I64(v) => ("i64", serde_json::json!(v)),
            TensorData::String(v) => ("string", serde_json::json!(v)),
            _ => {
                return Err(format!(
                    "not run (input {} is not f32, i64 or string)",
                    t.name
                ));
            }
        };
        feed.insert(
            t.name.clone(),
            serde_json::json!({"shape": t.shape, "type": kind, "data": data}),
        );
    }
    let mut child = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/ort_time.py"))
        .arg(model)
        .arg("--json")
        .arg(runs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::Value::Object(feed).to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| format!("failed: {}", String::from_utf8_lossy(&out.stderr)))
}
