//! PyTorch default exports (models/torch: ResNet-18 at quarter width, MobileNet
//! v2 and v3-small, LSTM, GRU, a transformer encoder) run by the agent's runtime
//! against onnxruntime, same model, same input, one thread each, in the same run:
//! load time and the median of many runs. The weights are read from each model's
//! `.onnx.data` file the way `edgefleet bundle build` reads them. Without
//! `EDGEFLEET_ORT_PYTHON` (a Python with onnxruntime and numpy) only tract's
//! figures are printed.
//!
//! `cargo bench -p edgefleet-agent --bench pytorch` (`EDGEFLEET_BENCH_ONLY=lstm`
//! keeps the models whose name contains it).

use std::path::Path;
use std::time::Instant;

use edgefleet_agent::model::external_data::{inline_external_data, read_from_model_dir};
use edgefleet_agent::model::{LoadedModel, MAX_MODEL_LEN};
use edgefleet_shared::golden::{Tensor, TensorData};

mod timing;
use timing::{onnxruntime_us, time_us};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/torch");

/// The first case's input, flattened.
fn input(doc: &serde_json::Value) -> Tensor {
    let (name, v) = doc["cases"][0]["inputs"]
        .as_object()
        .and_then(|o| o.iter().next())
        .expect("one input");
    let mut shape = vec![];
    let mut level = v;
    while let serde_json::Value::Array(a) = level {
        shape.push(a.len() as u64);
        level = &a[0];
    }
    fn leaves(v: &serde_json::Value, out: &mut Vec<f32>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| leaves(x, out)),
            x => out.push(x.as_f64().expect("number") as f32),
        }
    }
    let mut data = vec![];
    leaves(v, &mut data);
    Tensor {
        name: name.clone(),
        shape,
        data: TensorData::F32(data),
    }
}

fn main() {
    let only = std::env::var("EDGEFLEET_BENCH_ONLY").unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir(DIR)
        .expect("models/torch")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".golden.json").map(str::to_owned)
        })
        .filter(|n| n.contains(&only))
        .collect();
    names.sort();
    println!("PyTorch default exports, tract vs onnxruntime (1 thread), batch 1:");
    println!(
        "  {:<20} {:>9} {:>7} {:>11} {:>11} {:>7}",
        "model", "bytes", "load", "tract", "ORT", "ratio"
    );
    let mut worst: Option<(f64, String)> = None;
    for name in names {
        let doc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(format!("{DIR}/{name}.golden.json")).expect("json"),
        )
        .expect("json");
        let path = format!("{DIR}/{name}.onnx");
        let started = Instant::now();
        let file = std::fs::read(&path).expect("model");
        let bytes = inline_external_data(&file, MAX_MODEL_LEN, |at, cap| {
            read_from_model_dir(Path::new(DIR), at, cap)
        })
        .expect("external data")
        .unwrap_or(file);
        let model = LoadedModel::load(&bytes).expect("loads");
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let input = input(&doc);
        // A first run tells how many runs fit in about two seconds.
        let once = time_us(1, || {
            model.run(std::slice::from_ref(&input)).expect("runs");
        });
        let runs = ((2e6 / once) as usize).clamp(20, 2000);
        let tract = time_us(runs, || {
            model.run(std::slice::from_ref(&input)).expect("runs");
        });
        let mut line = format!(
            "  {name:<20} {:>9} {load_ms:>5.0}ms {tract:>9.1}µs",
            bytes.len()
        );
        match onnxruntime_us(&path, std::slice::from_ref(&input), runs) {
            Ok(ort) => {
                let ratio = tract / ort;
                line += &format!(" {ort:>9.1}µs {ratio:>6.2}x");
                if worst.as_ref().is_none_or(|(w, _)| ratio > *w) {
                    worst = Some((ratio, name.clone()));
                }
            }
            Err(why) => line += &format!("  onnxruntime {why}"),
        }
        println!("{line}  ({runs} runs)");
    }
    if let Some((ratio, what)) = worst {
        println!("highest tract/ORT ratio: {ratio:.2}x ({what})");
    }
}
