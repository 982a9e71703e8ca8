//! The local API against Triton's own Python client (`tritonclient.http`), the
//! most common OIP v2 client: health, metadata, JSON and binary tensors, errors.
//! Needs a Python with `tritonclient[http]` and numpy: `EDGEFLEET_TRITON_PYTHON`,
//! or `/var/tmp/edgefleet-pyenv/bin/python`, which `.ci/run` creates.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{bundle, features, wait_for_api, write_root};
use edgefleet_agent::model::LoadedModel;
use edgefleet_shared::golden::TensorData;

const DEFAULT_PYTHON: &str = "/var/tmp/edgefleet-pyenv/bin/python";

/// The Python with Triton's client; fails (never skips) when there is none.
fn python() -> PathBuf {
    let python = std::env::var_os("EDGEFLEET_TRITON_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_PYTHON.into());
    let ok = Command::new(&python)
        .args(["-c", "import tritonclient.http, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} has no tritonclient: python3 -m venv /var/tmp/edgefleet-pyenv && /var/tmp/edgefleet-pyenv/bin/pip install 'tritonclient[http]' numpy (.ci/run does this), or set EDGEFLEET_TRITON_PYTHON",
        python.display()
    );
    python
}

#[test]
fn tritons_python_client_reads_health_metadata_and_answers_in_json_and_binary() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    let trust = dir.path().join("root.cbor");
    write_root(&trust);
    let data = dir.path().join("data");
    let agent = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
        c.arg("--data-dir").arg(&data).arg("--trust").arg(&trust);
        c.args(args);
        c
    };
    let v1 = bundle(
        dir.path(),
        "v1.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        1,
        0,
    );
    // A second channel: the client lists both in the repository index.
    let flowers = common::bundle_on(dir.path(), "flowers.efb", "flowers", "iris_zipmap.onnx", 1);
    for file in [&v1, &flowers] {
        let out = agent(&["install", file.to_str().expect("utf-8")])
            .output()
            .expect("install runs");
        assert!(out.status.success(), "{out:?}");
    }
    let mut child = agent(&["run", "--http", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent starts");
    let addr = wait_for_api(&mut child);
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/triton_client.py"
        ))
        .args([&addr, "iris", "flowers"])
        .output()
        .expect("python runs");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client's JSON");

    assert_eq!(seen["live"], true);
    assert_eq!(seen["ready"], true);
    assert_eq!(seen["model_ready"], true);
    assert_eq!(seen["second_ready"], true);
    assert_eq!(
        seen["index"],
        serde_json::json!([
            {"name": "flowers", "version": "1.1.0", "state": "READY"},
            {"name": "iris", "version": "1.1.0", "state": "READY"},
        ])
    );
    assert_eq!(seen["other_model_ready"], false);
    assert_eq!(
        seen["server"]["extensions"],
        serde_json::json!(["binary_tensor_data"])
    );
    assert_eq!(
        seen["metadata"]["inputs"][0],
        serde_json::json!({"name": "features", "datatype": "FP32", "shape": [-1, 4]})
    );
    // The answers equal the model run in this process, in JSON and in binary,
    // with the outputs in the requested order and the request id echoed.
    let model = LoadedModel::load(
        &std::fs::read(format!("{}/iris_logreg.onnx", common::MODELS)).expect("model"),
    )
    .expect("loads");
    let want = model.run(&[features()]).expect("runs");
    let TensorData::F32(probabilities) = &want[1].data else {
        panic!("probabilities are FP32: {want:?}")
    };
    for form in ["json", "binary"] {
        let got = &seen[form];
        assert_eq!(got["label"], serde_json::json!([0, 2]), "{form}");
        assert_eq!(got["id"], "req-1", "{form}");
        assert_eq!(
            got["outputs"],
            serde_json::json!(["probabilities", "label"]),
            "{form}"
        );
        let rows: Vec<Vec<f32>> =
            serde_json::from_value(got["probabilities"].clone()).expect("rows");
        assert_eq!(
            rows.concat(),
            *probabilities,
            "{form}: the same floats as in-process"
        );
    }
    assert_eq!(seen["narrow"]["status"], "400", "{seen}");
    let message = seen["narrow"]["message"].as_str().expect("message");
    assert!(
        message.contains("`features`") && message.contains("[N, 4]"),
        "{message}"
    );
}
