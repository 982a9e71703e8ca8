//! PyTorch models exactly as `torch.onnx.export` writes them by default (opset 20,
//! weights in a separate `.onnx.data` file; models/torch/generate.py): the real
//! `edgefleet bundle build` copies the weights in and checks the model against
//! onnxruntime's outputs, and a real `edgefleet-agent` installs the bundle (its
//! health check runs the same cases) and answers a request as onnxruntime did.

mod common;

use std::path::Path;
use std::process::Command;

use common::{EDGEFLEET, MODELS, agent_bin, s};
use serde_json::{Value, json};

/// The committed exports: ResNet-18 (quarter width), MobileNet v2 and v3-small,
/// LSTM, GRU, a transformer encoder.
const TORCH_MODELS: [&str; 6] = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "lstm",
    "gru",
    "transformer",
];

/// Runs `program` in `dir`; its exit status and everything it printed.
fn run(program: &Path, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(program: &Path, dir: &Path, args: &[&str]) -> String {
    let (success, text) = run(program, dir, args);
    assert!(success, "{} {args:?} failed:\n{text}", program.display());
    text
}

fn golden(name: &str) -> Value {
    let path = format!("{MODELS}/torch/{name}.golden.json");
    serde_json::from_slice(&std::fs::read(path).expect("golden file")).expect("json")
}

/// A nested JSON array flattened, with its shape.
fn flatten(v: &Value) -> (Vec<u64>, Vec<f64>) {
    let mut shape = vec![];
    let mut level = v;
    while let Value::Array(a) = level {
        shape.push(a.len() as u64);
        level = &a[0];
    }
    fn leaves(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| leaves(x, out)),
            x => out.push(x.as_f64().expect("number")),
        }
    }
    let mut data = vec![];
    leaves(v, &mut data);
    (shape, data)
}

/// Keys and a one-signer trust root in `dir`.
fn trust(dir: &Path) {
    let ef = Path::new(EDGEFLEET);
    ok(
        ef,
        dir,
        &["keys", "generate", "--out", "keys", "--name", "op"],
    );
    let out = ok(
        ef,
        dir,
        &[
            "trust",
            "init",
            "--key",
            "keys/op.key",
            "--threshold",
            "1",
            "--out",
            "root.cbor",
        ],
    );
    assert!(out.contains("complete: devices can pin it"), "{out}");
}

fn build_args<'a>(model: &'a str, golden: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "bundle",
        "build",
        "--model",
        model,
        "--channel",
        "vision",
        "--version",
        "1.0.0",
        "--release",
        "1",
        "--golden",
        golden,
        "--key",
        "keys/op.key",
        "--out",
        out,
    ]
}

#[test]
fn pytorch_default_exports_build_install_and_answer_as_onnxruntime_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    trust(d);
    let ef = Path::new(EDGEFLEET);
    let agent = agent_bin();
    for name in TORCH_MODELS {
        let model = format!("{MODELS}/torch/{name}.onnx");
        let golden_file = format!("{MODELS}/torch/{name}.golden.json");
        let bundle = format!("{name}.efb");
        let out = ok(ef, d, &build_args(&model, &golden_file, &bundle));
        assert!(
            out.contains("golden       2 case(s), outputs checked against the file"),
            "{name}: {out}"
        );
        assert!(
            out.contains("weights      copied in from the model's external data file(s)"),
            "{name}: {out}"
        );

        // A device with only the bundle: no .onnx.data anywhere near it.
        let data = format!("device-{name}");
        let device = |args: &[&str]| {
            let mut all = vec!["--data-dir", &data, "--trust", "root.cbor"];
            all.extend_from_slice(args);
            ok(&agent, d, &all)
        };
        let out = device(&["install", &bundle]);
        assert!(out.contains("now active"), "{name}: {out}");

        let want = golden(name);
        let case = &want["cases"][0];
        let (input_name, input) = case["inputs"]
            .as_object()
            .and_then(|o| o.iter().next())
            .expect("one input");
        let (shape, values) = flatten(input);
        let request = json!({"inputs": [{
            "name": input_name, "shape": shape, "datatype": "FP32", "data": values,
        }]});
        std::fs::write(d.join("request.json"), request.to_string()).expect("request");
        let response: Value =
            serde_json::from_str(&device(&["infer", "--input", "request.json"])).expect("json");
        let (output_name, expected) = case["outputs"]
            .as_object()
            .and_then(|o| o.iter().next())
            .expect("one output");
        let (want_shape, want_values) = flatten(expected);
        let got = &response["outputs"][0];
        assert_eq!(got["name"], output_name.as_str(), "{name}");
        assert_eq!(got["shape"], json!(want_shape), "{name}");
        let got: Vec<f64> = serde_json::from_value(got["data"].clone()).expect("numbers");
        assert_eq!(got.len(), want_values.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want_values).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 + 1e-3 * w.abs(),
                "{name}: element {i} is {g}, onnxruntime says {w}"
            );
        }
    }
}

#[test]
fn a_pytorch_export_without_its_weight_file_is_refused_naming_it_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    trust(d);
    // The model file alone, as when a user copies only `gru.onnx`.
    std::fs::copy(format!("{MODELS}/torch/gru.onnx"), d.join("gru.onnx")).expect("copy");
    let golden_file = format!("{MODELS}/torch/gru.golden.json");
    let (success, out) = run(
        Path::new(EDGEFLEET),
        d,
        &build_args("gru.onnx", &golden_file, "gru.efb"),
    );
    assert!(!success, "{out}");
    assert!(out.contains("external data \"gru.onnx.data\""), "{out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(!d.join("gru.efb").exists());

    // A weight file that is a link out of the model's directory is refused too.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let outside = elsewhere.path().join("gru.onnx.data");
    std::fs::copy(format!("{MODELS}/torch/gru.onnx.data"), &outside).expect("copy");
    std::os::unix::fs::symlink(&outside, d.join("gru.onnx.data")).expect("link");
    let (success, out) = run(
        Path::new(EDGEFLEET),
        d,
        &build_args(s(&d.join("gru.onnx")), &golden_file, "gru.efb"),
    );
    assert!(!success, "{out}");
    assert!(out.contains("outside the model's directory"), "{out}");
    assert!(!d.join("gru.efb").exists());
}
