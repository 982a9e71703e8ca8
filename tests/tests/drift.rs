//! Drift end to end: simulated devices (real agents) serve a bundle with
//! reference statistics; the ones fed shifted inputs, and only those, show up
//! as drifted at the controller (API, events, metrics); and a rollout whose new
//! bundle drifts where the old one does not is halted and reverted by the drift
//! gate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgefleet_devices::sim::{FaultPlan, Traffic};
use edgefleet_tests::{BundleSpec, Harness, MODELS, wait_for};
use serde_json::{Value, json};

/// The iris reference rows (header dropped), each shifted by `shift`.
fn reference_rows(shift: f64) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(Path::new(MODELS).join("iris_reference.csv")).expect("csv");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(',')
                .map(|v| v.trim().parse::<f64>().expect("number") + shift)
                .collect()
        })
        .collect()
}

/// One OIP request carrying all `rows`.
fn body(rows: &[Vec<f64>]) -> String {
    let data: Vec<f64> = rows.concat();
    json!({"inputs": [{"name": "features", "shape": [rows.len(), 4], "datatype": "FP32", "data": data}]})
        .to_string()
}

fn post(url: &str, body: &str) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let r = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.as_bytes())
        .expect("request");
    assert_eq!(r.status().as_u16(), 200, "{url}");
}

/// A CSV of the iris reference shifted by `shift` (a model "trained" elsewhere).
fn shifted_csv(dir: &Path, shift: f64) -> PathBuf {
    let mut text = String::from("sepal_length,sepal_width,petal_length,petal_width\n");
    for r in reference_rows(shift) {
        let cells: Vec<String> = r.iter().map(|v| format!("{v:.3}")).collect();
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    let path = dir.join(format!("reference-{shift}.csv"));
    std::fs::write(&path, text).expect("csv");
    path
}

#[test]
fn devices_fed_shifted_inputs_and_only_those_are_reported_drifted() {
    let h = Harness::start(|_| {});
    let ids: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
    let fleet = h.fleet(
        ids.iter()
            .map(|id| h.device(id, FaultPlan::default()))
            .collect(),
    );
    let bundle = h.build(&BundleSpec {
        reference: Some(Path::new(MODELS).join("iris_reference.csv")),
        ..BundleSpec::new("iris_logreg.onnx", (1, 0, 0), 1)
    });
    let digest = h.upload(&bundle);
    let id = h.rollout(&json!({
        "bundle": digest,
        "selector": {"devices": ids},
        "waves": ["100%"],
        "gates": {"soak_ms": 0},
    }));
    h.wait_phase(&id, &["completed"]);

    let shifted = ["d1", "d4"];
    let (steady, moved) = (body(&reference_rows(0.0)), body(&reference_rows(1.5)));
    for d in fleet.devices() {
        let url = format!("{}/v2/models/model/infer", d.api_url());
        post(
            &url,
            if shifted.contains(&d.id()) {
                &moved
            } else {
                &steady
            },
        );
    }

    // The controller's fleet view: every device reports, exactly the shifted ones drift.
    let view = wait_for("drift reports from all six devices", || {
        let v = h.api.get("/api/v1/drift").ok()?;
        let b = v["bundles"]
            .as_array()?
            .iter()
            .find(|b| b["bundle"] == Value::String(digest.clone()))?
            .clone();
        (b["devices"] == 6).then_some(b)
    });
    assert_eq!(view["drifted_devices"], json!(["d1", "d4"]), "{view}");
    assert_eq!(view["version"], "1.0.0");
    let features = view["drifted_features"].as_object().expect("features");
    for f in ["sepal_length", "sepal_width", "petal_length", "petal_width"] {
        assert_eq!(
            features[f], 2,
            "{f} flagged by both shifted devices: {view}"
        );
    }

    // Per device: the full report, and a drift event on the drifted ones only.
    let d1 = h.api.get("/api/v1/devices/d1/drift").expect("drift of d1");
    let last = d1["reports"]
        .as_array()
        .and_then(|r| r.last())
        .expect("a report");
    assert_eq!(last["report"]["drifted"], true, "{last}");
    assert_eq!(last["report"]["rows"], 300);
    let psi = last["report"]["inputs"][2]["psi"].as_f64().expect("psi");
    assert!(psi > 0.25, "petal_length psi {psi}");
    let d0 = h.api.get("/api/v1/devices/d0/drift").expect("drift of d0");
    let clean = d0["reports"]
        .as_array()
        .and_then(|r| r.last())
        .expect("a report");
    assert_eq!(clean["report"]["drifted"], false, "{clean}");
    let alerts = |device: &str| {
        let v = h
            .api
            .get(&format!("/api/v1/devices/{device}"))
            .expect("device");
        v["events"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter(|e| e["kind"] == "drift_alert")
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let a = wait_for("d4's drift event", || {
        let a = alerts("d4");
        (!a.is_empty()).then_some(a)
    });
    assert!(
        a[0]["body"]["kind"]["drift_alert"]["drifted"] == true,
        "{}",
        a[0]
    );
    assert!(alerts("d0").is_empty() && alerts("d2").is_empty());
    // Prometheus.
    let metrics = h.api.get_text("/metrics").expect("metrics");
    assert!(
        metrics.contains("edgefleet_drift_drifted_devices{channel=\"model\",version=\"1.0.0\"} 2"),
        "{metrics}"
    );
    // On the device itself, with no controller: the status file `status --json` reads.
    let status: Value = serde_json::from_slice(
        &std::fs::read(fleet.device("d1").expect("d1").dir().join("drift.json"))
            .expect("drift.json"),
    )
    .expect("json");
    assert_eq!(status["current"]["drifted"], true, "{status}");
    drop(fleet);
}

#[test]
fn a_rollout_whose_new_bundle_drifts_where_the_old_one_does_not_is_halted_and_reverted() {
    let h = Harness::start(|_| {});
    let ids: Vec<String> = (0..4).map(|i| format!("g{i}")).collect();
    let mut fleet = h.fleet(
        ids.iter()
            .map(|id| h.device(id, FaultPlan::default()))
            .collect(),
    );
    let v1 = h.upload(&h.build(&BundleSpec {
        reference: Some(Path::new(MODELS).join("iris_reference.csv")),
        ..BundleSpec::new("iris_logreg.onnx", (1, 0, 0), 1)
    }));
    let first = h.rollout(&json!({
        "bundle": v1, "selector": {"devices": ids}, "waves": ["100%"], "gates": {"soak_ms": 0},
    }));
    h.wait_phase(&first, &["completed"]);
    // Field traffic looks like v1's reference; v2 was summarised on other data.
    let _enter = h.runtime.enter();
    fleet.set_traffic(Some(Traffic {
        model: "model".into(),
        bodies: vec![body(&reference_rows(0.0))],
        every: Duration::from_millis(500),
    }));
    let v2 = h.upload(&h.build(&BundleSpec {
        reference: Some(shifted_csv(h.dir(), 2.0)),
        ..BundleSpec::new("iris_logreg.onnx", (2, 0, 0), 2)
    }));
    let second = h.rollout(&json!({
        "bundle": v2,
        "selector": {"devices": ids},
        "waves": ["1", "100%"],
        "gates": {"soak_ms": 8000, "max_error_rate": 1.0, "max_p95_latency_ratio": 100.0},
    }));
    let r = h.wait_phase(&second, &["halted", "completed"]);
    let reason = r["phase_detail"]["reason"].as_str().unwrap_or("");
    assert_eq!(r["phase"], "halted", "{r}");
    assert!(
        reason.contains("report drift") && reason.contains("max_drift_increase"),
        "{r}"
    );
    // The canary goes back to 1.0.0; the others never left it.
    wait_for("the canary back on 1.0.0", || {
        (fleet.versions().get("1.0.0") == Some(&4)).then_some(())
    });
    fleet.set_traffic(None);
}
