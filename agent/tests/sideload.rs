//! The agent's local commands as a device operator runs them: the real
//! `edgefleet-agent` binary, real bundles and real ONNX models, a temp data dir.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{bundle, http, http_bytes, wait_for_api, write_root};

struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    fn new() -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        write_root(&dir.path().join("root.cbor"));
        Device { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn agent(&self, args: &[&str]) -> Output {
        self.agent_env(args, None)
    }

    fn agent_env(&self, args: &[&str], crash_at: Option<&str>) -> Output {
        let data = self.path().join("data");
        let root = self.path().join("root.cbor");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
        if let Some(point) = crash_at {
            cmd.env("EDGEFLEET_CRASH_AT", point);
        }
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("--trust")
            .arg(&root)
            .args(args)
            .output()
            .expect("agent runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.agent(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "edgefleet-agent {args:?}:\n{text}");
        text
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.agent(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "edgefleet-agent {args:?} should fail:\n{text}"
        );
        text
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status json")
    }

    fn active_release(&self) -> Option<u64> {
        self.status()["active"]["release"].as_u64()
    }

    /// A signed bundle of the iris model (its own golden outputs) at `release`.
    fn iris(&self, name: &str, release: u64) -> std::path::PathBuf {
        common::iris(self.path(), name, release)
    }

    fn bundle_dirs(&self) -> usize {
        std::fs::read_dir(self.path().join("data/bundles"))
            .expect("ls")
            .count()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn sideloaded_bundles_install_serve_inference_and_revert_without_a_network() {
    let dev = Device::new();
    let v1 = dev.iris("v1.efb", 1);
    let v2 = bundle(
        dev.path(),
        "v2.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        2,
        1,
    );
    assert!(dev.ok(&["status"]).contains("no model installed"));
    let out = dev.ok(&["install", s(&v1)]);
    assert!(out.contains("now active"), "{out}");
    assert_eq!(dev.active_release(), Some(1));

    std::fs::write(
        dev.path().join("req.json"),
        r#"{"inputs":[{"name":"features","shape":[2,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2,6.6,3.0,5.6,2.0]}]}"#,
    )
    .expect("request");
    let resp: serde_json::Value =
        serde_json::from_str(&dev.ok(&["infer", "--input", s(&dev.path().join("req.json"))]))
            .expect("json");
    assert_eq!(resp["model_name"], "iris");
    assert_eq!(resp["outputs"][0]["name"], "label");
    assert_eq!(resp["outputs"][0]["datatype"], "INT64");
    assert_eq!(resp["outputs"][0]["data"], serde_json::json!([0, 2]));

    // `--time N` also measures the model on this machine (stderr); stdout is
    // still the one response. N out of range is refused by name.
    let request_file = dev.path().join("req.json");
    let request = s(&request_file);
    let timed = dev.agent(&["infer", "--input", request, "--time", "20"]);
    let said = String::from_utf8_lossy(&timed.stderr);
    assert!(timed.status.success(), "{said}");
    let number = |label: &str| {
        said.split(label)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert!(number("load ").is_some_and(|ms| ms > 0.0), "{said}");
    assert!(said.contains("over 20 runs"), "{said}");
    assert!(
        number("median ")
            .zip(number("p95 "))
            .is_some_and(|(median, p95)| median > 0.0 && p95 >= median),
        "{said}"
    );
    let again: serde_json::Value = serde_json::from_slice(&timed.stdout).expect("json");
    assert_eq!(again["outputs"][0]["data"], serde_json::json!([0, 2]));
    let refused = dev.agent(&["infer", "--input", request, "--time", "0"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--time"));

    dev.ok(&["install", s(&v2)]);
    assert_eq!(dev.active_release(), Some(2));
    assert_eq!(dev.bundle_dirs(), 2);
    dev.ok(&["revert"]);
    assert_eq!(dev.active_release(), Some(1));
    dev.ok(&["revert"]);
    assert_eq!(dev.active_release(), Some(2));
}

#[test]
fn a_model_failing_its_golden_cases_is_not_activated_and_leaves_nothing_behind() {
    let dev = Device::new();
    let v1 = dev.iris("v1.efb", 1);
    let broken = bundle(
        dev.path(),
        "v2.efb",
        "iris_logreg_v2_broken.onnx",
        "iris_logreg.onnx",
        2,
        0,
    );
    dev.ok(&["install", s(&v1)]);
    let out = dev.fails(&["install", s(&broken)]);
    assert!(
        out.contains("health check failed") && out.contains("active model unchanged"),
        "{out}"
    );
    let st = dev.status();
    assert_eq!(st["active"]["release"], 1);
    assert_eq!(st["last_install"]["failure"]["stage"], "health_check");
    assert_eq!(
        dev.bundle_dirs(),
        1,
        "the broken bundle's directory was left behind"
    );
}

#[test]
fn rollbacks_and_tampered_files_are_refused_with_the_reason_and_change_nothing() {
    let dev = Device::new();
    let v2 = dev.iris("v2.efb", 2);
    let v1 = dev.iris("v1.efb", 1);
    let v2_other = bundle(
        dev.path(),
        "v2b.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        2,
        7,
    );
    dev.ok(&["install", s(&v2)]);
    let out = dev.fails(&["install", s(&v1)]);
    assert!(out.contains("rollback"), "{out}");
    assert_eq!(
        dev.status()["last_install"]["failure"]["refusal"]["code"],
        "rollback"
    );
    let out = dev.fails(&["install", s(&v2_other)]);
    assert!(out.contains("release_reused"), "{out}");

    let v3 = dev.iris("v3.efb", 3);
    let mut bytes = std::fs::read(&v3).expect("read");
    let at = bytes.len() - 30;
    bytes[at] ^= 4;
    let tampered = dev.path().join("tampered.efb");
    std::fs::write(&tampered, bytes).expect("write");
    let out = dev.fails(&["install", s(&tampered)]);
    assert!(
        out.contains("refused (chunk_digest_mismatch)")
            || out.contains("refused (artifact_digest_mismatch)"),
        "{out}"
    );
    assert_eq!(dev.active_release(), Some(2));
    assert_eq!(dev.bundle_dirs(), 1);
    let out = dev.fails(&["install", s(&v2)]);
    assert!(out.contains("already active"), "{out}");
}

#[test]
fn inference_requests_that_do_not_fit_get_errors_naming_the_input() {
    let dev = Device::new();
    std::fs::write(
        dev.path().join("req.json"),
        r#"{"inputs":[{"name":"features","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#,
    )
    .expect("w");
    let out = dev.fails(&["infer", "--input", s(&dev.path().join("req.json"))]);
    assert!(out.contains("no model is installed"), "{out}");
    let v1 = dev.iris("v1.efb", 1);
    dev.ok(&["install", s(&v1)]);
    let out = dev.fails(&["infer", "--input", s(&dev.path().join("req.json"))]);
    assert!(
        out.contains("`features`") && out.contains("[N, 4]"),
        "{out}"
    );
    std::fs::write(
        dev.path().join("req.json"),
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,"x",3,4]}]}"#,
    )
    .expect("w");
    let out = dev.fails(&["infer", "--input", s(&dev.path().join("req.json"))]);
    assert!(out.contains("element 1"), "{out}");
    // `infer` prints JSON: binary outputs are for the HTTP API, and said so.
    std::fs::write(
        dev.path().join("req.json"),
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}],"parameters":{"binary_data_output":true}}"#,
    )
    .expect("w");
    let out = dev.fails(&["infer", "--input", s(&dev.path().join("req.json"))]);
    assert!(out.contains("binary outputs"), "{out}");
    // Requested outputs: only those, in that order.
    std::fs::write(
        dev.path().join("req.json"),
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[[5.0,3.4,1.5,0.2]]}],"outputs":[{"name":"label"}]}"#,
    )
    .expect("w");
    let out: serde_json::Value =
        serde_json::from_str(&dev.ok(&["infer", "--input", s(&dev.path().join("req.json"))]))
            .expect("json");
    assert_eq!(
        out["outputs"],
        serde_json::json!([{"name": "label", "datatype": "INT64", "shape": [1], "data": [0]}])
    );
}

#[test]
fn a_crash_at_any_point_of_an_install_leaves_a_valid_active_model() {
    for point in [
        "after-unpack",
        "after-health-check",
        "before-state-rename",
        "after-state-save",
    ] {
        let dev = Device::new();
        let v1 = dev.iris("v1.efb", 1);
        let v2 = dev.iris("v2.efb", 2);
        dev.ok(&["install", s(&v1)]);
        let crashed = dev.agent_env(&["install", s(&v2)], Some(point));
        assert!(
            !crashed.status.success(),
            "{point}: the crash hook did not fire: {}",
            String::from_utf8_lossy(&crashed.stdout)
        );
        // Whatever the point, the device serves either release 1 or release 2, whole.
        let release = dev.active_release();
        let expected = if point == "after-state-save" {
            Some(2)
        } else {
            Some(1)
        };
        assert_eq!(release, expected, "{point}");
        std::fs::write(
            dev.path().join("req.json"),
            r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#,
        )
        .expect("request");
        let resp = dev.ok(&["infer", "--input", s(&dev.path().join("req.json"))]);
        assert!(resp.contains("\"label\""), "{point}: {resp}");
        // And the interrupted install can simply be run again.
        if expected == Some(1) {
            dev.ok(&["install", s(&v2)]);
            assert_eq!(dev.active_release(), Some(2), "{point}");
        }
        assert_eq!(dev.bundle_dirs(), 2, "{point}: leftovers in bundles/");
    }
}

/// Runs `edgefleet-agent run` (with `extra` arguments) and waits for its
/// readiness line.
fn start_api(dev: &Device, extra: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("--data-dir")
        .arg(dev.path().join("data"))
        .arg("--trust")
        .arg(dev.path().join("root.cbor"))
        .args(["run", "--http", "127.0.0.1:0"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("agent starts");
    let addr = wait_for_api(&mut child);
    (child, addr)
}

#[test]
fn a_zipmap_models_metadata_names_the_class_of_each_probability_column() {
    let dev = Device::new();
    let b = bundle(
        dev.path(),
        "zipmap.efb",
        "iris_zipmap.onnx",
        "iris_zipmap.onnx",
        1,
        0,
    );
    dev.ok(&["install", s(&b)]);
    let (mut child, addr) = start_api(&dev, &[]);
    let (code, body) = http(&addr, "GET", "/v2/models/iris", "");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(code, 200, "{body}");
    let meta: serde_json::Value = serde_json::from_str(&body).expect("json");
    let probs = meta["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .find(|o| o["name"] == "output_probability")
        .expect("the ZipMap output")
        .clone();
    assert_eq!(
        probs,
        serde_json::json!({"name": "output_probability", "datatype": "FP32", "shape": [-1, 3],
            "parameters": {"class_labels": ["0", "1", "2"]}})
    );
    let label = meta["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .find(|o| o["name"] == "output_label")
        .expect("the label output");
    assert!(label.get("parameters").is_none(), "{label}");
}

#[test]
fn the_local_api_speaks_oip_v2_and_rejects_bad_inputs_with_400_naming_the_input() {
    let dev = Device::new();
    // No model yet: live but not ready.
    let (mut child, addr) = start_api(&dev, &[]);
    assert_eq!(http(&addr, "GET", "/v2/health/live", "").0, 200);
    assert_eq!(http(&addr, "GET", "/v2/health/ready", "").0, 503);
    child.kill().expect("kill");
    let _ = child.wait();

    let v1 = dev.iris("v1.efb", 1);
    dev.ok(&["install", s(&v1)]);
    let (child, addr) = start_api(&dev, &[]);
    assert_eq!(http(&addr, "GET", "/v2/health/ready", "").0, 200);
    let (code, body) = http(&addr, "GET", "/v2/models/iris", "");
    assert_eq!(code, 200, "{body}");
    let meta: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        meta["inputs"][0],
        serde_json::json!({"name": "features", "datatype": "FP32", "shape": [-1, 4]})
    );
    assert_eq!(http(&addr, "GET", "/v2/models/other", "").0, 404);
    assert_eq!(
        http(&addr, "GET", "/v2/models/iris/ready", ""),
        (200, r#"{"name":"iris","ready":true}"#.to_string())
    );
    let (code, body) = http(&addr, "GET", "/v2/models/other/ready", "");
    assert_eq!(code, 404);
    assert!(body.contains("this device serves `iris`"), "{body}");
    let (code, body) = http(&addr, "GET", "/v2", "");
    assert_eq!(code, 200);
    let server: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(server["name"], "edgefleet-agent");
    assert_eq!(
        server["extensions"],
        serde_json::json!(["binary_tensor_data"])
    );

    let good = r#"{"inputs":[{"name":"features","shape":[2,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2,6.6,3.0,5.6,2.0]}]}"#;
    let (code, body) = http(&addr, "POST", "/v2/models/iris/infer", good);
    assert_eq!(code, 200, "{body}");
    let resp: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(resp["outputs"][0]["data"], serde_json::json!([0, 2]));
    assert_eq!(resp["outputs"][1]["shape"], serde_json::json!([2, 3]));
    // The first request ran on the blocking pool; iris is fast, so the next ones
    // run on the request's task (api::INLINE_RUN_LIMIT_US): same answers.
    for _ in 0..3 {
        assert_eq!(
            http(&addr, "POST", "/v2/models/iris/infer", good),
            (200, body.clone())
        );
    }

    // The same rows nested, and as binary tensor data (OIP's binary extension,
    // as Triton's clients send it) with the probabilities asked back as binary:
    // the same answer.
    let nested = r#"{"inputs":[{"name":"features","shape":[2,4],"datatype":"FP32","data":[[5.0,3.4,1.5,0.2],[6.6,3.0,5.6,2.0]]}]}"#;
    assert_eq!(
        http(&addr, "POST", "/v2/models/iris/infer", nested),
        (200, body.clone())
    );
    let json_answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    let rows: [f32; 8] = [5.0, 3.4, 1.5, 0.2, 6.6, 3.0, 5.6, 2.0];
    let header = serde_json::json!({
        "id": "req-7",
        "inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
                    "parameters": {"binary_data_size": 32}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}, {"name": "label"}],
    })
    .to_string();
    let mut request = header.clone().into_bytes();
    request.extend(rows.iter().flat_map(|x| x.to_le_bytes()));
    let (code, headers, answer) = http_bytes(
        &addr,
        "POST",
        "/v2/models/iris/infer",
        &[
            ("Content-Type", "application/octet-stream".into()),
            ("Inference-Header-Content-Length", header.len().to_string()),
        ],
        &request,
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&answer));
    let json_len: usize = headers
        .iter()
        .find(|(k, _)| k == "inference-header-content-length")
        .expect("binary response header")
        .1
        .parse()
        .expect("length");
    let meta: serde_json::Value = serde_json::from_slice(&answer[..json_len]).expect("json");
    assert_eq!(meta["id"], "req-7");
    assert_eq!(meta["outputs"][0]["name"], "probabilities");
    assert_eq!(meta["outputs"][0]["parameters"]["binary_data_size"], 24);
    assert_eq!(meta["outputs"][1]["data"], serde_json::json!([0, 2]));
    let probabilities: Vec<f32> = answer[json_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let want: Vec<f32> =
        serde_json::from_value(json_answer["outputs"][1]["data"].clone()).expect("floats");
    assert_eq!(probabilities, want);
    // An output the model does not have: refused before it runs.
    let (code, body) = http(
        &addr,
        "POST",
        "/v2/models/iris/infer",
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}],"outputs":[{"name":"score"}]}"#,
    );
    assert_eq!(code, 400);
    assert!(
        body.contains("requested output `score` is not an output of the model (outputs: `label`, `probabilities`)"),
        "{body}"
    );
    // Binary data that does not add up: a 400 that says so.
    let (code, _, answer) = http_bytes(
        &addr,
        "POST",
        "/v2/models/iris/infer",
        &[("Inference-Header-Content-Length", header.len().to_string())],
        &request[..request.len() - 4],
    );
    assert_eq!(code, 400);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains("binary_data_size 32 goes past the end of the body"),
        "{answer}"
    );

    let narrow =
        r#"{"inputs":[{"name":"features","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#;
    let (code, body) = http(&addr, "POST", "/v2/models/iris/infer", narrow);
    assert_eq!(code, 400);
    assert!(
        body.contains("`features`") && body.contains("[N, 4]"),
        "{body}"
    );
    let (code, body) = http(&addr, "POST", "/v2/models/iris/infer", "{not json");
    assert_eq!(code, 400);
    assert!(body.contains("not an OIP v2 inference request"), "{body}");
    let (code, body) = http(
        &addr,
        "POST",
        "/v2/models/iris/infer",
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"STRING","data":[1,2,3,4]}]}"#,
    );
    assert_eq!(code, 400);
    assert!(body.contains("datatype"), "{body}");
    // A number past FP32's range (was taken as infinity), and an input given twice
    // (was accepted).
    let (code, body) = http(
        &addr,
        "POST",
        "/v2/models/iris/infer",
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,1e39,4]}]}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("input `features`: element 2 (") && body.contains(") is not a valid FP32"),
        "{body}"
    );
    let (code, body) = http(
        &addr,
        "POST",
        "/v2/models/iris/infer",
        r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]},{"name":"features","shape":[1,4],"datatype":"FP32","data":[5,6,7,8]}]}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("input `features` is given more than once"),
        "{body}"
    );
    stop_gracefully(child);
}

/// Sends SIGTERM and checks the agent exits with success.
fn stop_gracefully(mut child: std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let exit = child.wait().expect("agent exits");
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn leftovers_of_a_killed_install_are_removed_when_the_agent_starts() {
    let dev = Device::new();
    let v1 = dev.iris("v1.efb", 1);
    dev.ok(&["install", s(&v1)]);
    assert_eq!(dev.bundle_dirs(), 1);
    // What a SIGKILL in the middle of unpacking leaves, and a whole bundle
    // directory that a killed install moved into place but never recorded.
    let bundles = dev.path().join("data/bundles");
    let staging = bundles.join(format!(".{}.staging-4242", "cd".repeat(32)));
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::write(staging.join("model.onnx"), vec![0u8; 1 << 20]).expect("partial artifact");
    let orphan = bundles.join("ef".repeat(32));
    std::fs::create_dir_all(&orphan).expect("orphan");
    std::fs::write(orphan.join("model.onnx"), b"unreferenced").expect("orphan artifact");
    assert_eq!(dev.bundle_dirs(), 3);

    let (child, api) = start_api(&dev, &[]);
    assert_eq!(dev.bundle_dirs(), 1, "leftovers kept after the start");
    assert!(!staging.exists() && !orphan.exists());
    // The active bundle is untouched and serves.
    let body = r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#;
    let (status, text) = http(&api, "POST", "/v2/models/iris/infer", body);
    assert_eq!(status, 200, "{text}");
    stop_gracefully(child);
    assert_eq!(dev.active_release(), Some(1));
}

#[test]
fn with_no_controller_drift_of_served_requests_shows_in_status() {
    let dev = Device::new();
    let v1 = dev.iris("v1-with-reference.efb", 1);
    dev.ok(&["install", s(&v1)]);
    // No broker configured: the link is off, drift is still tracked each second.
    let config = dev.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\ntrust_root = {:?}\n[telemetry]\ninterval_s = 1\n",
            dev.path().join("data"),
            dev.path().join("root.cbor")
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("--config")
        .arg(&config)
        .args(["run", "--http", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("agent starts");
    let addr = wait_for_api(&mut child);
    // 300 rows, petal length moved by +3 cm.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/iris_reference.csv"
    ))
    .expect("csv");
    let mut data = Vec::new();
    for l in text.lines().skip(1) {
        let mut row: Vec<f64> = l.split(',').map(|v| v.parse().expect("n")).collect();
        row[2] += 3.0;
        data.extend(row);
    }
    let body = serde_json::json!({"inputs": [{"name": "features", "shape": [data.len() / 4, 4], "datatype": "FP32", "data": data}]});
    let (code, answer) = http(&addr, "POST", "/v2/models/iris/infer", &body.to_string());
    assert_eq!(code, 200, "{answer}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let drift = loop {
        let status = dev.status();
        if status["drift"]["current"]["rows"] == 300 {
            break status["drift"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drift in status: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let petal = &drift["current"]["inputs"][2];
    assert_eq!(petal["feature"], "petal_length");
    assert_eq!(petal["drifted"], true, "{drift}");
    assert_eq!(drift["current"]["inputs"][1]["drifted"], false, "{drift}");
    assert!(drift["memory_bytes"].as_u64().expect("memory") < 64 * 1024);
    let text = dev.ok(&["status"]);
    assert!(
        text.contains("petal_length") && text.contains("over threshold"),
        "{text}"
    );
    child.kill().expect("kill");
    let _ = child.wait();
}

#[test]
fn the_local_api_also_serves_on_a_unix_socket_only_its_owner_and_group_may_use() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dev = Device::new();
    let v1 = dev.iris("v1.efb", 1);
    dev.ok(&["install", s(&v1)]);
    let socket = dev.path().join("api.sock");
    // A socket file left by an agent that is gone (nobody listens on it) is
    // replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    assert!(socket.exists());
    let (child, addr) = start_api(&dev, &["--socket", s(&socket)]);
    let meta = std::fs::symlink_metadata(&socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    // The same API on both: the same answer to the same request.
    let unix = format!("unix:{}", socket.display());
    let good = r#"{"inputs":[{"name":"features","shape":[2,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2,6.6,3.0,5.6,2.0]}]}"#;
    let over_tcp = http(&addr, "POST", "/v2/models/iris/infer", good);
    assert_eq!(over_tcp.0, 200, "{}", over_tcp.1);
    for _ in 0..3 {
        assert_eq!(http(&unix, "POST", "/v2/models/iris/infer", good), over_tcp);
    }
    let (code, body) = http(&unix, "POST", "/v2/models/iris/infer", r#"{"inputs":[]}"#);
    assert_eq!(code, 400, "{body}");
    assert_eq!(http(&unix, "GET", "/v2/health/ready", "").0, 200);

    // A second agent cannot take the socket while the first serves on it, and
    // leaves it alone.
    let out = dev.fails(&["run", "--http", "127.0.0.1:0", "--socket", s(&socket)]);
    assert!(
        out.contains("another process is serving on this socket"),
        "{out}"
    );
    assert_eq!(http(&unix, "GET", "/v2/health/live", "").0, 200);

    // A file that is not a socket is never replaced.
    let file = dev.path().join("not-a-socket");
    std::fs::write(&file, "keep me").expect("write");
    let out = dev.fails(&["run", "--http", "127.0.0.1:0", "--socket", s(&file)]);
    assert!(out.contains("is not a socket"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
    let out = dev.fails(&["run", "--http", "127.0.0.1:0", "--socket", "api.sock"]);
    assert!(out.contains("absolute"), "{out}");

    // A graceful stop takes the socket file with it.
    stop_gracefully(child);
    assert!(!socket.exists(), "the socket file is removed on stop");
}

#[test]
fn the_local_api_refuses_to_bind_outside_loopback() {
    let dev = Device::new();
    let out = dev.fails(&["run", "--http", "0.0.0.0:0"]);
    assert!(out.contains("loopback"), "{out}");
}

#[test]
fn config_check_accepts_the_printed_default_and_names_a_bad_field() {
    let dev = Device::new();
    let default = dev.ok(&["config", "print-default"]);
    let path = dev.path().join("agent.toml");
    // Point the data dir at the test's directory, then use the file for a command.
    let custom = default.replace("/var/lib/edgefleet", s(&dev.path().join("from-config")));
    std::fs::write(&path, custom).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .args(["--config", s(&path), "config", "check"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .args(["--config", s(&path), "status"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(
        dev.path().join("from-config/bundles").is_dir(),
        "data_dir from the config was not used"
    );

    std::fs::write(&path, "device_id = \"pi 4\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .args(["--config", s(&path), "config", "check"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`device_id`"), "{err}");
}

#[test]
fn under_systemd_the_agent_reports_ready_and_pets_the_watchdog() {
    let dev = Device::new();
    let socket_path = dev.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("--data-dir")
        .arg(dev.path().join("data"))
        .arg("--trust")
        .arg(dev.path().join("root.cbor"))
        .args(["run", "--http", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent starts");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !(got.contains(&"READY=1".to_string())
        && got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2)
    {
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got[0], "READY=1", "{got:?}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let dev = Device::new();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/edgefleet-agent.service"
    ))
    .expect("unit file");
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    let unit = unit.replace(
        "/usr/local/bin/edgefleet-agent",
        env!("CARGO_BIN_EXE_edgefleet-agent"),
    );
    let path = dev.path().join("edgefleet-agent.service");
    std::fs::write(&path, unit).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (.ci/run installs systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}

/// Connects to `addr` and sends `bytes`, leaving the connection open.
fn open_with(addr: &str, bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(bytes).expect("send");
    s
}

/// Whether the server closed `s` (EOF or reset) within `within`; false when
/// it is still open then, or when it answered something.
fn closed_by_server(s: &mut std::net::TcpStream, within: std::time::Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Reads one whole response (the request asked `Connection: close`).
fn response_of(mut s: std::net::TcpStream) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_local_api_closes_slow_clients_and_bounds_the_requests_it_holds() {
    use std::time::{Duration, Instant};
    let dev = Device::new();
    let v1 = dev.iris("v1.efb", 1);
    dev.ok(&["install", s(&v1)]);
    let config = dev.path().join("agent.toml");
    std::fs::write(
        &config,
        "[limits]\n\
         api_memory_bytes = 1048576\n\
         api_requests_in_flight = 4\n\
         api_connections = 8\n\
         api_header_timeout_ms = 500\n\
         api_body_timeout_ms = 1500\n",
    )
    .expect("config");
    let (child, addr) = start_api(&dev, &["--config", s(&config)]);

    // 1. Slow headers: 24 clients (three times the connection cap) each send
    // half a request line and stop. The agent closes each one after 500 ms
    // without its headers; the ones past the cap wait unaccepted until then.
    let started = Instant::now();
    let mut slow: Vec<_> = (0..24)
        .map(|_| open_with(&addr, b"POST /v2/models/iris/in"))
        .collect();
    for (i, conn) in slow.iter_mut().enumerate() {
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        assert!(
            closed_by_server(conn, left.max(Duration::from_millis(1))),
            "slow client {i} still open after {:?}",
            started.elapsed()
        );
    }
    // Three rounds of the cap, each closed at 500 ms.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // An idle kept-alive connection is closed the same way.
    let mut idle = open_with(&addr, b"");
    assert!(closed_by_server(&mut idle, Duration::from_secs(5)));
    // Served normally afterwards.
    let good = r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#;
    assert_eq!(http(&addr, "POST", "/v2/models/iris/infer", good).0, 200);

    // 2. The body budget: a valid request padded with spaces to exactly the
    // 1 MiB budget sends its headers and a little of its body, then waits.
    let budget = 1 << 20;
    let mut padded = good.as_bytes().to_vec();
    padded.resize(budget, b' ');
    let head = format!(
        "POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {budget}\r\nConnection: close\r\n\r\n"
    );
    let mut holder = open_with(&addr, head.as_bytes());
    {
        use std::io::Write;
        holder.write_all(&padded[..1000]).expect("part of the body");
    }
    std::thread::sleep(Duration::from_millis(200));
    // A second request cannot get its share: 503 after about a second, with
    // Retry-After, in the OIP error form, its body never read.
    let waited = Instant::now();
    let (code, headers, body) = http_bytes(
        &addr,
        "POST",
        "/v2/models/iris/infer",
        &[("Content-Type", "application/json".into())],
        good.as_bytes(),
    );
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 503, "{body}");
    assert!(
        waited.elapsed() >= Duration::from_millis(900),
        "{:?}",
        waited.elapsed()
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("retry-after") && v == "1"),
        "{headers:?}"
    );
    let err: serde_json::Value = serde_json::from_str(&body).expect("json error");
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|m| m.contains("limits.api_memory_bytes")),
        "{body}"
    );
    // The held request completes normally once its body arrives.
    {
        use std::io::Write;
        holder.write_all(&padded[1000..]).expect("rest of the body");
    }
    let answer = response_of(holder);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(http(&addr, "POST", "/v2/models/iris/infer", good).0, 200);

    // 3. A body that stops arriving: 408 after the body timeout, and its
    // share of the budget comes back.
    let mut stalled = open_with(&addr, head.as_bytes());
    {
        use std::io::Write;
        stalled
            .write_all(&padded[..1000])
            .expect("part of the body");
    }
    let answer = response_of(stalled);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("limits.api_body_timeout_ms"), "{answer}");
    assert_eq!(http(&addr, "POST", "/v2/models/iris/infer", good).0, 200);

    // 4. Over the size limit: 413 in the OIP error form, before any wait.
    let too_big = format!(
        "POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        32 << 20
    );
    let answer = response_of(open_with(&addr, too_big.as_bytes()));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains(r#"{"error":"request body of 33554432 bytes"#),
        "{answer}"
    );
    // Inputs at the edge of f32 overflow the logistic regression's logits:
    // its probabilities are NaN, which JSON cannot carry: a 500 naming the
    // output (never `null` read as a value); as binary data they go through.
    let huge = r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[3e38,-3e38,3e38,-3e38]}]}"#;
    let (code, body) = http(&addr, "POST", "/v2/models/iris/infer", huge);
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("output `probabilities` holds NaN"), "{body}");
    let huge_binary = r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[3e38,-3e38,3e38,-3e38]}],"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}"#;
    let (code, _, body) = http_bytes(
        &addr,
        "POST",
        "/v2/models/iris/infer",
        &[("Content-Type", "application/json".into())],
        huge_binary.as_bytes(),
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // axum's own refusals come in the same form.
    let (code, body) = http(&addr, "GET", "/v2/models/iris/infer", "");
    assert_eq!(code, 405);
    let err: serde_json::Value = serde_json::from_str(&body).expect("json error");
    assert!(err["error"].is_string(), "{body}");
    stop_gracefully(child);
}

#[test]
fn the_state_file_is_renamed_into_place_and_its_directory_synced() {
    // strace shows the system calls as they reach the kernel: the state's
    // temp file is fsynced, renamed over state.json, and then the data
    // directory itself is fsynced (without which the rename may be lost).
    let dev = Device::new();
    let v1 = dev.iris("v1.efb", 1);
    let log = dev.path().join("strace.log");
    let data = dev.path().join("data");
    let out = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-e",
            "trace=rename,renameat,renameat2,fsync,fdatasync",
            "-o",
        ])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--trust")
        .arg(dev.path().join("root.cbor"))
        .arg("install")
        .arg(&v1)
        .output()
        .expect("strace runs (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = std::fs::read_to_string(&log).expect("strace log");
    let data = std::fs::canonicalize(&data).expect("data dir");
    let state = data.join("state.json");
    let lines: Vec<&str> = calls.lines().collect();
    let renamed = lines
        .iter()
        .rposition(|l| l.contains("rename") && l.contains(&format!("\"{}\"", state.display())))
        .unwrap_or_else(|| panic!("no rename onto {}:\n{calls}", state.display()));
    let temp_synced = lines[..renamed]
        .iter()
        .any(|l| l.contains("fsync(") && l.contains(".state.json.tmp-"));
    assert!(
        temp_synced,
        "the temp file is fsynced before the rename:\n{calls}"
    );
    let dir_synced = lines[renamed..]
        .iter()
        .any(|l| l.contains("fsync(") && l.contains(&format!("<{}>", data.display())));
    assert!(
        dir_synced,
        "the directory is fsynced after the rename:\n{calls}"
    );
}

/// A second channel beside `iris`: the ZipMap export of the iris classifier,
/// published as `flowers`.
fn flowers(dev: &Device, name: &str, release: u64) -> std::path::PathBuf {
    common::bundle_on(dev.path(), name, "flowers", "iris_zipmap.onnx", release)
}

/// A channel's active bundle in `status --json`.
fn channel_active(status: &serde_json::Value, channel: &str) -> serde_json::Value {
    status["channels"][channel]["active"].clone()
}

const ONE_ROW: &str =
    r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#;

/// The same row for the `flowers` model (skl2onnx's input name).
const FLOWERS_ROW: &str = r#"{"inputs":[{"name":"float_input","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#;

/// A request file for `channel`'s model.
fn request_for(dev: &Device, channel: &str) -> std::path::PathBuf {
    let path = dev.path().join(format!("{channel}.json"));
    let body = if channel == "flowers" {
        FLOWERS_ROW
    } else {
        ONE_ROW
    };
    std::fs::write(&path, body).expect("request");
    path
}

#[test]
fn two_channels_install_serve_revert_and_remove_without_touching_each_other() {
    let dev = Device::new();
    let (iris1, iris2) = (dev.iris("iris1.efb", 1), dev.iris("iris2.efb", 2));
    let flowers1 = flowers(&dev, "flowers1.efb", 1);
    dev.ok(&["install", s(&iris1)]);
    dev.ok(&["install", s(&flowers1)]);
    dev.ok(&["install", s(&iris2)]);
    let st = dev.status();
    assert_eq!(channel_active(&st, "iris")["release"], 2, "{st}");
    assert_eq!(channel_active(&st, "flowers")["release"], 1, "{st}");
    assert_eq!(
        st["channels"]["iris"]["slots"].as_array().map(Vec::len),
        Some(2)
    );
    // With several channels the one-model field is empty: read `channels`.
    assert!(st["active"].is_null(), "{st}");
    let flowers_digest = channel_active(&st, "flowers")["digest"].clone();
    let text = dev.ok(&["status"]);
    assert!(
        text.contains("active    iris 1.2.0") && text.contains("active    flowers 1.1.0"),
        "{text}"
    );

    // `infer` needs the channel once there are two, and names them.
    let req = dev.path().join("req.json");
    std::fs::write(&req, ONE_ROW).expect("request");
    let out = dev.agent(&["infer", "--input", s(&req)]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("flowers, iris"),
        "{said}"
    );
    let flowers_req = request_for(&dev, "flowers");
    let resp: serde_json::Value = serde_json::from_str(&dev.ok(&[
        "infer",
        "--channel",
        "flowers",
        "--input",
        s(&flowers_req),
    ]))
    .expect("json");
    assert_eq!(resp["model_name"], "flowers", "{resp}");

    // The local API serves both, lists both in the repository index, and names
    // the channels for an unknown one.
    let (mut child, addr) = start_api(&dev, &[]);
    let answers: Vec<(u16, String)> = vec![
        http(&addr, "GET", "/v2/health/ready", ""),
        http(&addr, "POST", "/v2/models/iris/infer", ONE_ROW),
        http(&addr, "POST", "/v2/models/flowers/infer", FLOWERS_ROW),
        http(&addr, "GET", "/v2/models/flowers", ""),
        http(&addr, "GET", "/v2/models/audio/ready", ""),
        http(&addr, "POST", "/v2/repository/index", ""),
        http(&addr, "POST", "/v2/repository/index", r#"{"ready": true}"#),
        http(&addr, "POST", "/v2/repository/index", r#"{"ready": "yes"}"#),
    ];
    let _ = child.kill();
    let _ = child.wait();
    let [ready, iris, flowers, meta, unknown, index, index_ready, bad] =
        <[(u16, String); 8]>::try_from(answers).expect("eight answers");
    assert_eq!(ready.0, 200, "{ready:?}");
    assert_eq!(iris.0, 200, "{iris:?}");
    assert!(iris.1.contains(r#""model_name":"iris""#), "{iris:?}");
    assert!(iris.1.contains(r#""model_version":"1.2.0""#), "{iris:?}");
    assert_eq!(flowers.0, 200, "{flowers:?}");
    assert!(
        flowers.1.contains(r#""model_name":"flowers""#),
        "{flowers:?}"
    );
    assert_eq!(meta.0, 200, "{meta:?}");
    assert_eq!(unknown.0, 404, "{unknown:?}");
    assert!(unknown.1.contains("`flowers`, `iris`"), "{unknown:?}");
    assert_eq!(index.0, 200, "{index:?}");
    let listed: serde_json::Value = serde_json::from_str(&index.1).expect("json");
    assert_eq!(
        listed,
        serde_json::json!([
            {"name": "flowers", "version": "1.1.0", "state": "READY"},
            {"name": "iris", "version": "1.2.0", "state": "READY"},
        ])
    );
    assert_eq!(index_ready.1, index.1);
    assert_eq!(bad.0, 400, "{bad:?}");

    // Reverting iris leaves flowers as it was.
    let out = dev.agent(&["revert"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("name one"),
        "{out:?}"
    );
    dev.ok(&["revert", "--channel", "iris"]);
    let st = dev.status();
    assert_eq!(channel_active(&st, "iris")["release"], 1, "{st}");
    assert_eq!(
        channel_active(&st, "flowers")["digest"],
        flowers_digest,
        "{st}"
    );
    let out = dev.agent(&["revert", "--channel", "flowers"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no previous bundle"),
        "{out:?}"
    );

    // Removing flowers: iris still serves, the flowers bundle is gone, and its
    // release floor stays.
    dev.ok(&["remove", "flowers"]);
    let st = dev.status();
    assert!(st["channels"]["flowers"].is_null(), "{st}");
    assert_eq!(channel_active(&st, "iris")["release"], 1, "{st}");
    assert_eq!(st["active"]["release"], 1, "one channel again: {st}");
    assert_eq!(st["releases"]["flowers"]["release"], 1, "{st}");
    assert_eq!(dev.bundle_dirs(), 2, "iris's two bundles only");
    let resp = dev.ok(&["infer", "--input", s(&req)]);
    assert!(resp.contains(r#""model_name":"iris""#), "{resp}");
    let out = dev.agent(&["remove", "flowers"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no channel `flowers` is installed"),
        "{out:?}"
    );
    // And it can come back.
    dev.ok(&["install", s(&flowers1)]);
    assert_eq!(channel_active(&dev.status(), "flowers")["release"], 1);
}

#[test]
fn a_crash_at_any_point_of_one_channels_install_leaves_both_channels_whole() {
    for point in [
        "after-unpack",
        "after-health-check",
        "before-state-rename",
        "after-state-save",
    ] {
        let dev = Device::new();
        let (iris1, iris2) = (dev.iris("iris1.efb", 1), dev.iris("iris2.efb", 2));
        dev.ok(&["install", s(&iris1)]);
        dev.ok(&["install", s(&flowers(&dev, "flowers1.efb", 1))]);
        let before = channel_active(&dev.status(), "flowers");
        let crashed = dev.agent_env(&["install", s(&iris2)], Some(point));
        assert!(
            !crashed.status.success(),
            "{point}: the crash hook did not fire"
        );
        let st = dev.status();
        let expected = if point == "after-state-save" { 2 } else { 1 };
        assert_eq!(
            channel_active(&st, "iris")["release"],
            expected,
            "{point}: {st}"
        );
        assert_eq!(channel_active(&st, "flowers"), before, "{point}: {st}");
        for channel in ["iris", "flowers"] {
            let req = request_for(&dev, channel);
            let resp = dev.ok(&["infer", "--channel", channel, "--input", s(&req)]);
            assert!(
                resp.contains(&format!(r#""model_name":"{channel}""#)),
                "{point}: {resp}"
            );
        }
        // Bundles: iris 1 (+2 when it landed) and flowers 1; the next start
        // collects a leftover of the interrupted one.
        let (mut child, _) = start_api(&dev, &[]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            dev.bundle_dirs(),
            expected as usize + 1,
            "{point}: leftovers in bundles/"
        );
    }
}

#[test]
fn a_state_file_of_format_1_is_read_as_one_channel_and_written_back_as_format_2() {
    let dev = Device::new();
    dev.ok(&["install", s(&dev.iris("iris1.efb", 1))]);
    dev.ok(&["install", s(&dev.iris("iris2.efb", 2))]);
    // The state as an agent before channels wrote it.
    let path = dev.path().join("data/state.json");
    let v2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state")).expect("json");
    let pair = &v2["channels"]["iris"];
    let v1 = serde_json::json!({
        "format": 1,
        "active": pair["active"],
        "a": pair["a"],
        "b": pair["b"],
        "releases": v2["releases"],
        "last_install": v2["last_install"],
    });
    std::fs::write(&path, serde_json::to_vec(&v1).expect("json")).expect("write");
    assert_eq!(dev.active_release(), Some(2));
    dev.ok(&["revert"]);
    assert_eq!(dev.active_release(), Some(1));
    let now: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state")).expect("json");
    assert_eq!(now["format"], 2, "{now}");
    assert_eq!(
        now["channels"]["iris"]["a"]["bundle"], pair["a"]["bundle"],
        "{now}"
    );
    assert_eq!(now["channels"]["iris"]["active"], "A", "{now}");
    // A format this agent does not know is refused by name, not reset.
    std::fs::write(&path, br#"{"format": 7}"#).expect("write");
    let out = dev.agent(&["status"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("format 7 is not supported"),
        "{said}"
    );
}

#[test]
fn a_model_past_the_channels_memory_budget_is_refused_with_the_figures_and_nothing_changes() {
    let dev = Device::new();
    // Every test bundle declares 1 MiB; the budget holds one and a half.
    let config = dev.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\ntrust_root = \"{}\"\n[limits]\nmodels_memory_bytes = {}\n",
            s(&dev.path().join("data")),
            s(&dev.path().join("root.cbor")),
            3 << 19
        ),
    )
    .expect("config");
    let agent = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("agent runs")
    };
    let (iris1, iris2) = (dev.iris("iris1.efb", 1), dev.iris("iris2.efb", 2));
    assert!(agent(&["install", s(&iris1)]).status.success());
    let refused = agent(&["install", s(&flowers(&dev, "flowers1.efb", 1))]);
    let said = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(
        said.contains("needs 1048576 bytes")
            && said.contains("channels iris (1048576)")
            && said.contains("budget of 1572864 bytes (limits.models_memory_bytes)"),
        "{said}"
    );
    let st = dev.status();
    assert!(st["channels"]["flowers"].is_null(), "{st}");
    assert_eq!(
        dev.bundle_dirs(),
        1,
        "nothing unpacked for the refused bundle"
    );
    // Replacing the model on its own channel fits: the old one is let go.
    let out = agent(&["install", s(&iris2)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(dev.active_release(), Some(2));
}
