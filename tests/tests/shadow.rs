//! Shadow mode end to end: simulated devices (real agents) on 1.0.0 get a
//! rollout whose first wave runs the new bundle in shadow beside the active
//! model on live requests. A model that disagrees is stopped at the canary
//! without anyone switching; one that agrees is activated from its shadow slot
//! and rolled out.

use std::path::Path;
use std::time::Duration;

use edgefleet_devices::sim::{FaultPlan, Traffic};
use edgefleet_tests::{BundleSpec, Harness, MODELS, wait_for};
use serde_json::{Value, json};

/// Requests of one reference row each, the rows taken 7 apart (mixed classes).
fn traffic() -> Traffic {
    let text = std::fs::read_to_string(Path::new(MODELS).join("iris_reference.csv")).expect("csv");
    let rows: Vec<Vec<f64>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.trim().parse().expect("n")).collect())
        .collect();
    let n = rows.len();
    Traffic {
        model: "model".into(),
        bodies: (0..n)
            .map(|i| {
                json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": rows[(i * 7) % n]}]})
                    .to_string()
            })
            .collect(),
        every: Duration::from_millis(100),
    }
}

/// A rollout whose first wave runs in shadow. Latency is not what these tests
/// are about: on a shared 2-core machine the shadow's own timing (it runs beside
/// the next request) can land one 2x histogram bucket above the active model's,
/// so the latency bound is opened.
fn shadow_rollout(h: &Harness, bundle: &str, ids: &[String]) -> String {
    h.rollout(&json!({
        "bundle": bundle,
        "selector": {"devices": ids},
        "waves": ["1", "100%"],
        "shadow_waves": 1,
        "gates": {"soak_ms": 6000, "max_p95_latency_ratio": 100.0},
    }))
}

fn canary(r: &Value) -> String {
    r["members"]
        .as_object()
        .expect("members")
        .iter()
        .find(|(_, m)| m["state"] != "pending")
        .map(|(d, _)| d.clone())
        .expect("a canary")
}

#[test]
fn a_disagreeing_model_in_shadow_halts_at_the_canary_and_nobody_switches() {
    let h = Harness::start(|_| {});
    let ids: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    let mut fleet = h.fleet(
        ids.iter()
            .map(|id| h.device(id, FaultPlan::default()))
            .collect(),
    );
    h.roll_out_everywhere(&BundleSpec::new("iris_logreg.onnx", (1, 0, 0), 1), &ids);
    let _enter = h.runtime.enter();
    fleet.set_traffic(Some(traffic()));

    // 2.0.0's class weights are rotated: it passes its own health check, and
    // disagrees with 1.0.0 on most live requests.
    let v2 = h.upload(&h.build(&BundleSpec::new("iris_logreg_v2_broken.onnx", (2, 0, 0), 2)));
    let id = shadow_rollout(&h, &v2, &ids);
    let r = h.wait_phase(&id, &["halted", "completed"]);
    let reason = r["phase_detail"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("(shadow)") && reason.contains("min_shadow_agreement"),
        "{r}"
    );
    let canary = canary(&r);
    assert_eq!(r["members"][&canary]["state"], "reverted", "{r}");
    for d in &ids {
        if *d != canary {
            assert_eq!(
                r["members"][d]["state"], "pending",
                "{d} was never asked: {r}"
            );
        }
        let serving = fleet.device(d).expect("device").serving().expect("a model");
        assert_eq!(serving.version.to_string(), "1.0.0", "{d} never switched");
    }
    // The canary reported its shadow's record; its agreement is what tripped.
    let t = h
        .api
        .get(&format!("/api/v1/devices/{canary}"))
        .expect("device");
    let shadow = t["telemetry"]
        .as_array()
        .and_then(|t| {
            t.iter()
                .rev()
                .find_map(|s| s["shadow"].as_object().cloned())
        })
        .expect("shadow telemetry");
    let (runs, agreed) = (
        shadow["runs"].as_u64().unwrap_or(0),
        shadow["agreed"].as_u64().unwrap_or(0),
    );
    assert!(
        runs >= 20 && (agreed as f64) < 0.9 * runs as f64,
        "{shadow:?}"
    );
    let metrics = h.api.get_text("/metrics").expect("metrics");
    assert!(
        metrics.contains("edgefleet_shadow_runs{channel=\"model\",version=\"2.0.0\"}"),
        "{metrics}"
    );
    // Told to stop: its shadow runs no more requests (traffic goes on).
    let shadow_runs = || -> Option<u64> {
        h.api.get(&format!("/api/v1/devices/{canary}")).ok()?["telemetry"]
            .as_array()?
            .last()?["shadow"]["runs"]
            .as_u64()
    };
    let before = wait_for("the shadow to stop", || {
        let a = shadow_runs()?;
        std::thread::sleep(Duration::from_millis(2500));
        let b = shadow_runs()?;
        (a == b).then_some(b)
    });
    assert!(before >= runs);
    fleet.set_traffic(None);
}

#[test]
fn an_agreeing_model_passes_its_shadow_stage_and_is_activated_from_the_shadow_slot() {
    let h = Harness::start(|_| {});
    let ids: Vec<String> = (0..3).map(|i| format!("a{i}")).collect();
    let mut fleet = h.fleet(
        ids.iter()
            .map(|id| h.device(id, FaultPlan::default()))
            .collect(),
    );
    h.roll_out_everywhere(&BundleSpec::new("iris_logreg.onnx", (1, 0, 0), 1), &ids);
    let _enter = h.runtime.enter();
    fleet.set_traffic(Some(traffic()));
    // The same weights as 2.0.0: a retrain that changed nothing agrees everywhere.
    let v2 = h.upload(&h.build(&BundleSpec::new("iris_logreg.onnx", (2, 0, 0), 2)));
    let sent_before = h.metric("edgefleet_chunk_bytes_sent_total");
    let id = shadow_rollout(&h, &v2, &ids);
    let r = h.wait_phase(&id, &["halted", "completed"]);
    assert_eq!(r["phase"], "completed", "{r}");
    let log: Vec<&str> = r["log"]
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|l| l["note"].as_str())
        .collect();
    assert!(
        log.iter().any(|n| n.contains("installed in shadow"))
            && log
                .iter()
                .any(|n| n.contains("shadow stage passed; activating")),
        "{log:?}"
    );
    wait_for("every device on 2.0.0", || {
        (fleet.versions().get("2.0.0") == Some(&3)).then_some(())
    });
    // Activation needed no second download: at most one copy per device went out.
    let bundle_len = std::fs::metadata(h.stored_bundle(&v2))
        .expect("bundle")
        .len();
    let sent = h.metric("edgefleet_chunk_bytes_sent_total") - sent_before;
    assert!(
        sent <= 3 * bundle_len,
        "{sent} bytes for 3 devices of {bundle_len}"
    );
    fleet.set_traffic(None);
}
