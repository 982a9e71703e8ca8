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

/// iris 1.0.0 with reference statistics of `models/iris_reference.csv`.
fn iris_with_reference() -> BundleSpec {
    BundleSpec {
        reference: Some(Path::new(MODELS).join("iris_reference.csv")),
        ..BundleSpec::new("iris_logreg.onnx", (1, 0, 0), 1)
    }
}

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
    let digest = h.roll_out_everywhere(&iris_with_reference(), &ids);

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
    // Two of six (33%) is over the fleet-level alert's 30%: raised and audited.
    wait_for("the fleet-level drift alert", || {
        let v = h.api.get("/api/v1/drift").ok()?;
        v["bundles"]
            .as_array()?
            .iter()
            .any(|b| b["bundle"] == Value::String(digest.clone()) && b["alert"] == true)
            .then_some(())
    });
    let audit = h.api.get("/api/v1/audit").expect("audit");
    assert!(
        audit.to_string().contains("drift.alert"),
        "an audited drift.alert: {audit}"
    );
    assert_eq!(h.metric("edgefleet_drift_alerts_total"), 1);
    // Prometheus.
    let metrics = h.api.get_text("/metrics").expect("metrics");
    assert!(
        metrics.contains("edgefleet_drift_drifted_devices{channel=\"model\",version=\"1.0.0\"} 2"),
        "{metrics}"
    );
    // On the device itself, with no controller: the status file `status --json`
    // reads, one entry per channel.
    let status: Value = serde_json::from_slice(
        &std::fs::read(fleet.device("d1").expect("d1").dir().join("drift.json"))
            .expect("drift.json"),
    )
    .expect("json");
    assert_eq!(status["model"]["current"]["drifted"], true, "{status}");
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
    h.roll_out_everywhere(&iris_with_reference(), &ids);
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

#[test]
fn samples_captured_while_drifting_are_uploaded_on_request_and_exported() {
    let h = Harness::start(|_| {});
    let ids = vec!["c0".to_owned(), "c1".to_owned()];
    let fleet = h.fleet(
        ids.iter()
            .map(|id| h.device(id, FaultPlan::default()))
            .collect(),
    );
    let digest = h.roll_out_everywhere(&iris_with_reference(), &ids);
    // Capture is off by default (user data); the operator turns it on for c0 only.
    h.api
        .post(
            "/api/v1/devices/c0/configure",
            &json!({"sample_capture": true}),
        )
        .expect("configure");
    let url = |d: &str| {
        format!(
            "{}/v2/models/model/infer",
            fleet.device(d).expect("d").api_url()
        )
    };
    // Shifted traffic: the window drifts...
    post(&url("c0"), &body(&reference_rows(1.5)));
    wait_for("c0 drifted at the controller", || {
        let v = h.api.get("/api/v1/drift").ok()?;
        let b = v["bundles"].as_array()?.first()?.clone();
        (b["drifted_devices"] == json!(["c0"])).then_some(())
    });
    // ... and requests served while it is drifted are kept.
    let shifted = reference_rows(1.5);
    for r in shifted.iter().take(25) {
        post(&url("c0"), &body(std::slice::from_ref(r)));
    }
    let ask = h
        .api
        .post("/api/v1/devices/c0/samples", &json!({"max_samples": 20}))
        .expect("request samples");
    assert!(ask["command"].as_u64().is_some(), "{ask}");
    let stored = wait_for("c0's samples stored", || {
        let v = h.api.get("/api/v1/samples?device=c0").ok()?;
        let s = v["samples"].as_array()?.clone();
        (s.len() == 20).then_some(s)
    });
    assert!(
        stored
            .iter()
            .all(|s| s["reason"] == "drift" && s["digest"] == json!(digest))
    );
    let csv = h
        .api
        .get_text(&format!(
            "/api/v1/samples?device=c0&bundle={digest}&format=csv"
        ))
        .expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "device,bundle,at,reason,features[0],features[1],features[2],features[3],label,probabilities[0],probabilities[1],probabilities[2]"
    );
    assert_eq!(lines.len(), 21, "{csv}");
    // Every exported row is one of the shifted rows that were sent.
    for l in &lines[1..] {
        let cells: Vec<f64> = l
            .split(',')
            .skip(4)
            .take(4)
            .map(|c| c.parse().expect("n"))
            .collect();
        assert!(
            shifted
                .iter()
                .any(|r| r.iter().zip(&cells).all(|(a, b)| (a - b).abs() < 1e-4)),
            "{l}"
        );
    }
    // c1 never enabled capture: it says so, and nothing is stored for it.
    h.api
        .post("/api/v1/devices/c1/samples", &json!({}))
        .expect("request samples");
    wait_for("c1's refusal", || {
        let v = h.api.get("/api/v1/devices/c1").ok()?;
        v["events"].as_array()?.iter().find(|e| {
            e["kind"] == "command_rejected"
                && e["body"].to_string().contains("sample capture is off")
        })?;
        Some(())
    });
    let none = h.api.get("/api/v1/samples?device=c1").expect("samples");
    assert_eq!(none["samples"], json!([]));
    // Bad requests get a clear error.
    let err = h
        .api
        .post("/api/v1/devices/c0/samples", &json!({"max_samples": 0}))
        .expect_err("0 samples");
    assert!(err.to_string().contains("max_samples"), "{err}");
    let err = h
        .api
        .get_text("/api/v1/samples?format=xml")
        .expect_err("xml");
    assert!(err.to_string().contains("format"), "{err}");
}

/// The digest each device serves on `channel`.
fn serving_on(
    fleet: &edgefleet_devices::sim::SimFleet,
    ids: &[String],
    channel: &str,
) -> Vec<String> {
    ids.iter()
        .map(|d| {
            fleet
                .device(d)
                .expect("device")
                .serving_all()
                .into_iter()
                .find(|b| b.channel.as_str() == channel)
                .map(|b| format!("{} {}", b.version, b.digest.to_hex()))
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn a_drifting_rollout_on_one_channel_reverts_that_channel_only_and_the_other_keeps_serving() {
    let h = Harness::start(|_| {});
    let ids: Vec<String> = (0..3).map(|i| format!("m{i}")).collect();
    let mut fleet = h.fleet(
        ids.iter()
            .map(|id| h.device(id, FaultPlan::default()))
            .collect(),
    );
    // Two models on every device: iris on `model`, a forest on `tabular`.
    h.roll_out_everywhere(&iris_with_reference(), &ids);
    let tabular = BundleSpec {
        channel: "tabular",
        ..BundleSpec::new("forest_cancer.onnx", (1, 0, 0), 1)
    };
    h.roll_out_everywhere(&tabular, &ids);
    let listed = wait_for("both channels listed for every device", || {
        let v = h.api.get("/api/v1/devices").ok()?;
        let devices = v["devices"].as_array()?.clone();
        devices
            .iter()
            .all(|d| d["channels"].as_array().is_some_and(|c| c.len() == 2))
            .then_some(devices)
    });
    assert_eq!(listed[0]["channels"][1]["channel"], "tabular", "{listed:?}");
    let forest_before = serving_on(&fleet, &ids, "tabular");
    assert!(
        forest_before.iter().all(|s| s.starts_with("1.0.0 ")),
        "{forest_before:?}"
    );
    // `?model=tabular` finds the devices serving it, whatever their first channel.
    let v = h.api.get("/api/v1/devices?model=tabular").expect("devices");
    assert_eq!(v["total"], 3, "{v}");

    // As in the one-model test: field traffic like v1's reference, v2
    // summarised on shifted data, so the canary's drift gate trips.
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
    assert_eq!(r["phase"], "halted", "{r}");
    wait_for("the canary back on iris 1.0.0", || {
        serving_on(&fleet, &ids, "model")
            .iter()
            .all(|s| s.starts_with("1.0.0 "))
            .then_some(())
    });
    fleet.set_traffic(None);
    // The canary was told to revert its `model` channel by name, and its
    // forest never changed, nor anyone else's.
    let canary = wait_for("the canary counted as reverted", || {
        h.rollout_view(&second)["members"]
            .as_object()?
            .iter()
            .find(|(_, m)| m["state"] == "reverted")
            .map(|(d, _)| d.clone())
    });
    assert_eq!(serving_on(&fleet, &ids, "tabular"), forest_before);
    let device = h
        .api
        .get(&format!("/api/v1/devices/{canary}"))
        .expect("device");
    let events = device["events"].to_string();
    assert!(events.contains("reverted"), "{events}");
    // Its telemetry is stored per channel: rows of both models.
    let digests: std::collections::BTreeSet<String> = device["telemetry"]
        .as_array()
        .expect("telemetry")
        .iter()
        .filter_map(|t| t["digest"].as_str().map(str::to_owned))
        .collect();
    assert!(digests.len() >= 2, "{digests:?}");

    // A revert that names no channel is refused for a device serving two;
    // removing one channel leaves the other serving.
    let refused = h
        .api
        .post(&format!("/api/v1/devices/{canary}/revert"), &json!({}));
    let said = format!("{refused:?}");
    assert!(said.contains("name one"), "{said}");
    h.api
        .post(
            &format!("/api/v1/devices/{canary}/remove"),
            &json!({"channel": "tabular"}),
        )
        .expect("remove");
    wait_for("the forest removed from the canary", || {
        let all = fleet.device(&canary)?.serving_all();
        (all.len() == 1 && all[0].channel.as_str() == "model").then_some(())
    });
}
