//! scikit-learn default exports (models/sklearn: pipelines and single-operator
//! cases) run by the agent's runtime against onnxruntime, same model, same rows,
//! one thread each, in the same run: `tract/ORT` per model, for 16 rows and for
//! one row. onnxruntime is timed from Python (`bench/ort_time.py`), which adds
//! its per-call overhead (a few µs) to its side: ratios on the smallest models
//! flatter us. Without `EDGEFLEET_ORT_PYTHON` (a Python with onnxruntime and
//! numpy) only tract's times are printed.
//!
//! `cargo bench -p edgefleet-agent --bench sklearn` (`EDGEFLEET_BENCH_ONLY=svm`
//! keeps the models whose name contains `svm`/`svc`/`svr`... : any substring).

use edgefleet_agent::model::LoadedModel;
use edgefleet_shared::golden::{Tensor, TensorData};

mod timing;
use timing::{onnxruntime_us, time_us};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/sklearn");
const RUNS: usize = 400;

/// A case's inputs: f32, i64 or string tensors (NaN written as null).
fn inputs(doc: &serde_json::Value) -> Vec<Tensor> {
    let inputs = doc["inputs"].as_object().expect("inputs");
    inputs
        .iter()
        .map(|(name, v)| {
            let shape: Vec<u64> = serde_json::from_value(v["shape"].clone()).expect("shape");
            let data = v["data"].as_array().expect("data");
            let data = match v["type"].as_str() {
                Some("f32") => TensorData::F32(
                    data.iter()
                        .map(|x| x.as_f64().map_or(f32::NAN, |f| f as f32))
                        .collect(),
                ),
                Some("i64") => {
                    TensorData::I64(data.iter().map(|x| x.as_i64().expect("i64")).collect())
                }
                Some("string") => TensorData::String(
                    data.iter()
                        .map(|x| x.as_str().expect("string").to_owned())
                        .collect(),
                ),
                other => panic!("{name}: type {other:?}"),
            };
            Tensor {
                name: name.clone(),
                shape,
                data,
            }
        })
        .collect()
}

/// The first row of each input alone.
fn first_row(t: &Tensor) -> Tensor {
    let width = t.shape[1..].iter().product::<u64>() as usize;
    let mut shape = t.shape.clone();
    shape[0] = 1;
    let data = match &t.data {
        TensorData::F32(v) => TensorData::F32(v[..width].to_vec()),
        TensorData::I64(v) => TensorData::I64(v[..width].to_vec()),
        TensorData::String(v) => TensorData::String(v[..width].to_vec()),
        _ => unreachable!("f32, i64 and string inputs only"),
    };
    Tensor {
        name: t.name.clone(),
        shape,
        data,
    }
}

fn main() {
    let only = std::env::var("EDGEFLEET_BENCH_ONLY").unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir(DIR)
        .expect("models/sklearn")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".expected.json").map(str::to_owned)
        })
        .filter(|n| n.contains(&only))
        .collect();
    names.sort();
    println!("scikit-learn exports, tract vs onnxruntime (1 thread), medians of {RUNS} runs:");
    println!(
        "  {:<28} {:>10} {:>10} {:>7}   {:>9} {:>9} {:>7}",
        "model", "16 rows", "ORT", "ratio", "1 row", "ORT", "ratio"
    );
    let mut worst: Option<(f64, String)> = None;
    for name in names {
        let doc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(format!("{DIR}/{name}.expected.json")).expect("json"),
        )
        .expect("json");
        let rows = inputs(&doc);
        let path = format!("{DIR}/{name}.onnx");
        let model = match LoadedModel::load(&std::fs::read(&path).expect("model")) {
            Ok(m) => m,
            Err(e) => {
                println!("  {name:<28} does not load: {e}");
                continue;
            }
        };
        let one: Vec<Tensor> = rows.iter().map(first_row).collect();
        let mut line = format!("  {name:<28}");
        for input in [&rows, &one] {
            let tract = time_us(RUNS, || {
                model.run(input).expect("runs");
            });
            match onnxruntime_us(&path, input, RUNS) {
                Ok(ort) => {
                    let ratio = tract / ort;
                    line += &format!(" {tract:>8.1}µs {ort:>8.1}µs {ratio:>6.2}x  ");
                    if worst.as_ref().is_none_or(|(w, _)| ratio > *w) {
                        worst = Some((ratio, format!("{name} ({} rows)", input[0].shape[0])));
                    }
                }
                Err(why) => line += &format!(" {tract:>8.1}µs  onnxruntime {why}  "),
            }
        }
        println!("{line}");
    }
    if let Some((ratio, what)) = worst {
        println!("highest tract/ORT ratio: {ratio:.2}x ({what}); target: within 2x");
    }
}
