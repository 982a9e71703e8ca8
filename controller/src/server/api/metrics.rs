//! `GET /metrics`: the controller's Prometheus text exposition (fleet,
//! model quality per version, rollouts, and the service's counters).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use edgefleet_shared::Digest;

use super::{ApiResult, AppState, bundles_by_digest};
use crate::server::db::{BundleRow, DeviceRow, TelemetryRow};
use crate::server::fetch_limits::FetchRefusal;
use crate::server::fleet::{FleetStats, RolloutView, now_ms};
use crate::server::gate::GateStats;

/// The exposition being written: one family at a time.
#[derive(Debug, Default)]
struct Exposition(String);

impl Exposition {
    /// One metric family: its help, its type, and a sample per label set
    /// (`""` for none, otherwise `{k="v",...}`).
    fn family(&mut self, name: &str, help: &str, kind: &str, samples: Vec<(String, f64)>) {
        self.0
            .push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            self.0.push_str(&format!("{name}{labels} {v}\n"));
        }
    }

    fn gauge(&mut self, name: &str, help: &str, samples: Vec<(String, f64)>) {
        self.family(name, help, "gauge", samples);
    }

    fn counter(&mut self, name: &str, help: &str, value: &AtomicU64) {
        let v = value.load(Ordering::Relaxed) as f64;
        self.family(name, help, "counter", vec![(String::new(), v)]);
    }
}

/// A model version's labels.
fn version_labels((channel, version): &(String, String)) -> String {
    format!("{{channel=\"{channel}\",version=\"{version}\"}}")
}

#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)))]
pub(super) async fn metrics(State(s): State<AppState>) -> ApiResult<Response> {
    let devices = s.db().devices().await?;
    let rollouts = s.fleet.rollouts().await?;
    let bundles = bundles_by_digest(&s).await?;
    let latest = s
        .db()
        .latest_telemetry(now_ms().saturating_sub(3_600_000))
        .await?;
    let mut out = Exposition::default();
    fleet_families(&mut out, &devices);
    quality_families(&mut out, &latest, &bundles);
    rollout_families(&mut out, &rollouts);
    counter_families(&mut out, &s);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out.0).into_response())
}

/// Devices: registered, online, per active model version.
fn fleet_families(out: &mut Exposition, devices: &[DeviceRow]) {
    out.gauge(
        "edgefleet_devices",
        "Devices in the registry.",
        vec![(String::new(), devices.len() as f64)],
    );
    out.gauge(
        "edgefleet_devices_online",
        "Devices whose retained state says online.",
        vec![(
            String::new(),
            devices.iter().filter(|d| d.online).count() as f64,
        )],
    );
    let mut per_version: BTreeMap<(String, String), u64> = BTreeMap::new();
    for d in devices {
        if let (Some(c), Some(v)) = (&d.active_channel, &d.active_version) {
            *per_version.entry((c.clone(), v.clone())).or_default() += 1;
        }
    }
    out.gauge(
        "edgefleet_devices_by_version",
        "Devices per active model version.",
        per_version
            .iter()
            .map(|(k, n)| (version_labels(k), *n as f64))
            .collect(),
    );
}

/// Drift and shadow agreement per model version, from each device's latest
/// report of the last hour.
fn quality_families(
    out: &mut Exposition,
    latest: &[TelemetryRow],
    bundles: &BTreeMap<Digest, BundleRow>,
) {
    let version = |b: &BundleRow| (b.channel.clone(), b.version.clone());
    let mut drift: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut shadow: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for t in latest {
        if let Some(sh) = &t.shadow
            && let Some(b) = bundles.get(&sh.digest)
        {
            let e = shadow.entry(version(b)).or_default();
            e.0 += sh.runs;
            e.1 += sh.agreed;
        }
        if let (Some(d), Some(b)) = (&t.drift, t.digest.as_ref().and_then(|d| bundles.get(d))) {
            let e = drift.entry(version(b)).or_default();
            e.0 += 1;
            e.1 += u64::from(d.drifted);
        }
    }
    let first = |m: &BTreeMap<(String, String), (u64, u64)>| {
        m.iter()
            .map(|(k, (n, _))| (version_labels(k), *n as f64))
            .collect()
    };
    let second = |m: &BTreeMap<(String, String), (u64, u64)>| {
        m.iter()
            .map(|(k, (_, n))| (version_labels(k), *n as f64))
            .collect()
    };
    out.gauge(
        "edgefleet_drift_devices",
        "Devices reporting drift windows per model version (latest report of the last hour).",
        first(&drift),
    );
    out.gauge(
        "edgefleet_drift_drifted_devices",
        "Of those, devices whose latest window is drifted.",
        second(&drift),
    );
    out.gauge(
        "edgefleet_shadow_runs",
        "Requests run by shadow models per shadow model version (latest counters of each device of the last hour).",
        first(&shadow),
    );
    out.gauge(
        "edgefleet_shadow_agreed",
        "Of those, answers that agreed with the active model (agreement = agreed / runs).",
        second(&shadow),
    );
}

/// Rollouts per phase.
fn rollout_families(out: &mut Exposition, rollouts: &[RolloutView]) {
    let mut per_phase: BTreeMap<&str, u64> = BTreeMap::new();
    for r in rollouts {
        *per_phase.entry(r.state.phase.name()).or_default() += 1;
    }
    out.gauge(
        "edgefleet_rollouts",
        "Rollouts per phase.",
        per_phase
            .into_iter()
            .map(|(p, n)| (format!("{{phase=\"{p}\"}}"), n as f64))
            .collect(),
    );
}

/// The service's counters: messages, commands, chunks, the gate.
fn counter_families(out: &mut Exposition, s: &AppState) {
    let st = &s.fleet.stats;
    let counters = fleet_counters(st).into_iter();
    for (name, help, v) in counters.chain(gate_counters(&s.gate_stats)) {
        out.counter(name, help, v);
    }
    out.family(
        "edgefleet_chunk_requests_refused_total",
        "Device chunk fetch requests refused or cut short (docs/controller.md, \"Chunk requests\"): not_offered = a bundle the device was never told to install; too_many = over 64 chunks in one request; rate = over the device's byte budget.",
        "counter",
        FetchRefusal::ALL
            .iter()
            .map(|why| {
                let n = match why {
                    FetchRefusal::NotOffered => &st.fetch_refused_not_offered,
                    FetchRefusal::TooMany => &st.fetch_refused_too_many,
                    FetchRefusal::Rate => &st.fetch_refused_rate,
                };
                (
                    format!("{{reason=\"{}\"}}", why.label()),
                    n.load(Ordering::Relaxed) as f64,
                )
            })
            .collect(),
    );
}

/// The fleet's counters: name, help, value.
fn fleet_counters(st: &FleetStats) -> [(&'static str, &'static str, &AtomicU64); 9] {
    [
        (
            "edgefleet_install_failures_total",
            "Install failures reported by devices.",
            &st.install_failures,
        ),
        (
            "edgefleet_messages_total",
            "Messages received from devices.",
            &st.messages_in,
        ),
        (
            "edgefleet_messages_refused_total",
            "Device messages refused.",
            &st.messages_refused,
        ),
        (
            "edgefleet_telemetry_stored_total",
            "Telemetry samples stored (ingest rate: rate() of this).",
            &st.telemetry_stored,
        ),
        (
            "edgefleet_chunk_bytes_sent_total",
            "Bundle chunk bytes published.",
            &st.chunk_bytes_sent,
        ),
        (
            "edgefleet_commands_sent_total",
            "Commands published.",
            &st.commands_sent,
        ),
        (
            "edgefleet_commands_resent_total",
            "Unanswered commands published again, as the same command (its id).",
            &st.commands_resent,
        ),
        (
            "edgefleet_events_claimed_total",
            "Events another replica stored that this one applied from the store (it had not heard them).",
            &st.events_claimed,
        ),
        (
            "edgefleet_drift_alerts_total",
            "Fleet-level drift alerts raised (a model version with [drift] alert_percent of its devices drifted).",
            &st.drift_alerts,
        ),
    ]
}

/// The embedded broker's gate's counters: name, help, value.
fn gate_counters(g: &GateStats) -> [(&'static str, &'static str, &AtomicU64); 3] {
    [
        (
            "edgefleet_gate_connections_total",
            "Device connections relayed by the embedded broker's gate.",
            &g.connections,
        ),
        (
            "edgefleet_gate_refused_total",
            "Connections the gate closed (unknown certificate, or a topic outside the device's own).",
            &g.refused,
        ),
        (
            "edgefleet_gate_revoked_total",
            "Open connections the gate closed because their certificate was revoked or replaced.",
            &g.revoked,
        ),
    ]
}
