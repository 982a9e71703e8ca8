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

/// The single f32 input of a case, if that is what it has.
fn f32_input(doc: &serde_json::Value) -> Option<Tensor> {
    let inputs = doc["inputs"].as_object()?;
    let (name, v) = inputs.iter().next().filter(|_| inputs.len() == 1)?;
    if v["type"] != "f32" {
        return None;
    }
    let shape: Vec<u64> = serde_json::from_value(v["shape"].clone()).ok()?;
    let data = v["data"]
        .as_array()?
        .iter()
        .map(|x| x.as_f64().map_or(f32::NAN, |f| f as f32))
        .collect();
    Some(Tensor {
        name: name.clone(),
        shape,
        data: TensorData::F32(data),
    })
}

/// The first row alone.
fn first_row(t: &Tensor) -> Tensor {
    let TensorData::F32(v) = &t.data else {
        unreachable!("f32 inputs only")
    };
    let width = t.shape[1..].iter().product::<u64>() as usize;
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Tensor {
        name: t.name.clone(),
        shape,
        data: TensorData::F32(v[..width].to_vec()),
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
        let Some(rows) = f32_input(&doc) else {
            println!("  {name:<28} (input is not one f32 tensor: skipped)");
            continue;
        };
        let path = format!("{DIR}/{name}.onnx");
        let model = LoadedModel::load(&std::fs::read(&path).expect("model")).expect("loads");
        let one = first_row(&rows);
        let mut line = format!("  {name:<28}");
        for input in [&rows, &one] {
            let tract = time_us(RUNS, || {
                model.run(std::slice::from_ref(input)).expect("runs");
            });
            match onnxruntime_us(&path, input, RUNS) {
                Ok(ort) => {
                    let ratio = tract / ort;
                    line += &format!(" {tract:>8.1}µs {ort:>8.1}µs {ratio:>6.2}x  ");
                    if worst.as_ref().is_none_or(|(w, _)| ratio > *w) {
                        worst = Some((ratio, format!("{name} ({} rows)", input.shape[0])));
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
