//! The local inference API on loopback: Open Inference Protocol v2 over HTTP, as
//! KServe and Triton speak it. Works with no network and no controller.
//!
//! The server takes an already-bound listener and a shutdown future (tests bind
//! port 0). A request expected to take at most [`INLINE_RUN_LIMIT_US`] µs (the
//! model's last run, scaled by the request's size) runs on the request's own
//! task: handing it to another thread costs two thread wake-ups, more than such
//! a model's inference. Anything slower (and the first request after a model
//! swap) runs on the blocking pool, so a slow model never stalls the runtime.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgefleet_shared::golden::Tensor;
use edgefleet_shared::manifest::Dim;
use edgefleet_shared::protocol::BundleRef;
use edgefleet_shared::{Digest, ModelChannel, UnixTime};
use serde_json::json;

use crate::drift::tracker::{DriftStatus, Tracker, WindowSettings};
use crate::metrics::ModelStats;
use crate::model::LoadedModel;
use crate::oip::{
    Decoded, Encoded, HEADER_LEN_HEADER, MAX_REQUEST_LEN, decode_request, encode_response,
};
use crate::samples::{Capture, Reservoir};
use crate::shadow::Shadow;
use crate::store::ActiveModel;

/// One channel's model, if any, swappable while the server runs (after an
/// install, activate or revert), with its counters, drift tracker, shadow and
/// sample capture.
#[derive(Debug, Clone, Default)]
pub struct ModelServed {
    active: Arc<RwLock<Option<(BundleRef, LoadedModel)>>>,
    stats: Arc<ModelStats>,
    drift: Arc<Mutex<Option<Tracker>>>,
    /// Window sizes; `None` turns drift tracking off.
    drift_settings: Option<WindowSettings>,
    shadow: Arc<RwLock<Option<Shadow>>>,
    /// Share of requests also run by the shadow, per mille.
    shadow_permille: Arc<AtomicU16>,
    /// Request counter for the (deterministic, evenly spread) shadow sampling.
    sampled: Arc<AtomicU64>,
    /// Sample capture: settings and the reservoir of the served bundle.
    capture: Arc<Mutex<CaptureState>>,
    /// Whether the latest judged drift window is drifted (for `capture = drift`).
    drifting: Arc<AtomicBool>,
    /// Capture is not off (checked before taking the lock on every request).
    capturing: Arc<AtomicBool>,
}

/// Longest expected inference (µs, [`LoadedModel::estimate`]) for which a
/// request runs on the request's task instead of the blocking pool: the runtime thread (MQTT link, telemetry,
/// other requests) waits at most this long between polls.
pub const INLINE_RUN_LIMIT_US: u64 = 1_000;

/// Sample capture settings and the reservoir of the served bundle's requests.
#[derive(Debug, Clone)]
struct CaptureState {
    settings: crate::config::SamplesConfig,
    /// The mode the config file asked for.
    configured: Capture,
    reservoir: Option<(Digest, Reservoir)>,
}

impl Default for CaptureState {
    fn default() -> Self {
        CaptureState {
            settings: crate::config::SamplesConfig::default(),
            configured: Capture::Off,
            reservoir: None,
        }
    }
}

/// The capture mode when the controller turns capture `on` or off, the config
/// file having asked for `configured`: on is the config's mode, or `drift`
/// when the config says off.
fn capture_for(on: bool, configured: Capture) -> Capture {
    match (on, configured) {
        (false, _) => Capture::Off,
        (true, Capture::Off) => Capture::Drift,
        (true, configured) => configured,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ModelServed {
    /// Serving `active` (or nothing), with drift tracking at the default
    /// window sizes.
    pub fn new(active: Option<ActiveModel>) -> ModelServed {
        ModelServed::with_drift(
            active,
            Some(WindowSettings::from(&crate::config::DriftConfig::default())),
        )
    }

    /// Serving `active`, tracking drift with `settings` (`None`: off).
    pub fn with_drift(
        active: Option<ActiveModel>,
        settings: Option<WindowSettings>,
    ) -> ModelServed {
        let served = ModelServed {
            drift_settings: settings,
            shadow_permille: Arc::new(AtomicU16::new(crate::shadow::DEFAULT_PERMILLE)),
            ..ModelServed::default()
        };
        served.replace(active);
        served
    }

    /// The model now (a cheap clone: the plan is shared).
    pub fn current(&self) -> Option<(BundleRef, LoadedModel)> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The served bundle now.
    pub fn bundle(&self) -> Option<BundleRef> {
        self.current().map(|(b, _)| b)
    }

    /// Serves another model from the next request on; in-flight requests finish
    /// on the old one. Counters and the drift window restart when the bundle
    /// changes.
    pub fn replace(&self, next: Option<ActiveModel>) {
        let changed = self.bundle().map(|b| b.digest) != next.as_ref().map(|a| a.bundle.digest);
        if changed {
            *lock(&self.drift) = next.as_ref().and_then(|a| {
                let reference = a.reference.as_ref()?;
                Some(Tracker::new(
                    a.bundle.digest,
                    reference,
                    self.drift_settings?,
                ))
            });
        }
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = next.map(|a| (a.bundle, a.model));
        if changed {
            self.stats.reset();
            self.drifting.store(false, Ordering::Relaxed);
            lock(&self.capture).reservoir = None;
        }
    }

    /// Sets the sample capture settings (from the agent config).
    pub fn set_samples_config(&self, settings: crate::config::SamplesConfig) {
        let mut c = lock(&self.capture);
        self.capturing
            .store(settings.capture != Capture::Off, Ordering::Relaxed);
        c.configured = settings.capture;
        c.settings = settings;
    }

    /// Turns capture on or off at run time (the controller's `configure
    /// {sample_capture}`): on is the config's mode, or `drift` when the config
    /// says off.
    pub fn set_capture(&self, on: bool) {
        let mut c = lock(&self.capture);
        let capture = capture_for(on, c.configured);
        c.settings.capture = capture;
        self.capturing
            .store(capture != Capture::Off, Ordering::Relaxed);
        if capture == Capture::Off {
            // Off means nothing is kept, also what was kept before.
            c.reservoir = None;
        }
    }

    /// The capture mode now.
    pub fn capture_mode(&self) -> Capture {
        lock(&self.capture).settings.capture
    }

    /// Offers an answered request of `bundle` to the reservoir when the capture
    /// mode says so.
    pub fn capture(&self, bundle: &Digest, inputs: &[Tensor], outputs: &[Tensor]) {
        if !self.capturing.load(Ordering::Relaxed) {
            return;
        }
        let mut c = lock(&self.capture);
        let s = &c.settings;
        let Some(reason) = crate::samples::trigger(
            s.capture,
            self.drifting.load(Ordering::Relaxed),
            s.min_confidence,
            outputs,
        ) else {
            return;
        };
        let (capacity, max_bytes) = (s.capacity, s.max_sample_bytes);
        if c.reservoir.as_ref().is_none_or(|(d, _)| d != bundle) {
            c.reservoir = Some((
                *bundle,
                Reservoir::new(capacity, max_bytes, crate::link::random_u64()),
            ));
        }
        if let Some((_, r)) = c.reservoir.as_mut() {
            r.offer(UnixTime::now(), reason, inputs, outputs);
        }
    }

    /// Takes up to `max` kept samples of the served bundle (they leave the
    /// device's memory).
    pub fn take_samples(
        &self,
        max: usize,
    ) -> Option<(Digest, Vec<edgefleet_shared::protocol::CapturedSample>)> {
        let mut c = lock(&self.capture);
        let (digest, r) = c.reservoir.as_mut()?;
        Some((*digest, r.drain(max)))
    }

    /// The counters.
    pub fn stats(&self) -> &ModelStats {
        &self.stats
    }

    /// Feeds one answered request of `bundle` to the drift window (ignored when
    /// the tracker belongs to another bundle: a swap raced the request).
    pub fn observe(&self, bundle: &Digest, inputs: &[Tensor], outputs: &[Tensor]) {
        if let Some(t) = lock(&self.drift).as_mut()
            && t.digest() == *bundle
        {
            t.observe(inputs, outputs, UnixTime::now);
        }
    }

    /// The periodic drift step (at each telemetry tick): closes a window that
    /// is old enough, and returns the status for `status --json`, the report
    /// for telemetry, and an alert if the drifted features changed.
    pub fn drift_checkpoint(&self, now: UnixTime) -> Option<DriftCheckpoint> {
        self.with_tracker(|t| {
            t.tick(now);
            let report = t.report();
            self.drifting.store(
                report.as_ref().is_some_and(|r| r.drifted),
                Ordering::Relaxed,
            );
            DriftCheckpoint {
                status: t.status(now),
                report,
                alert: t.alert(),
            }
        })
    }

    /// Serves what the slots hold now: the active model and the shadow.
    pub fn replace_all(&self, (active, shadow): crate::store::LoadedSlots) {
        self.replace(active);
        self.set_shadow(shadow);
    }

    /// Runs `next` as the shadow model from the next request on (or none).
    /// Its counters and the sampled share restart when the bundle changes.
    pub fn set_shadow(&self, next: Option<Shadow>) {
        let mut slot = self.shadow.write().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().map(|s| s.bundle.digest) != next.as_ref().map(|s| s.bundle.digest) {
            // A new shadow samples at the default share again (a controller
            // that stopped the previous one set it to 0).
            self.shadow_permille
                .store(crate::shadow::DEFAULT_PERMILLE, Ordering::Relaxed);
            *slot = next;
        }
    }

    /// The shadow model now.
    pub fn shadow(&self) -> Option<Shadow> {
        self.shadow
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the share of requests the shadow runs on (per mille, capped at 1000).
    pub fn set_shadow_permille(&self, permille: u16) {
        self.shadow_permille
            .store(permille.min(1000), Ordering::Relaxed);
    }

    /// The shadow to run this request on, if it is sampled.
    fn shadow_for_request(&self) -> Option<Shadow> {
        let shadow = self.shadow()?;
        let permille = u64::from(self.shadow_permille.load(Ordering::Relaxed));
        let n = self.sampled.fetch_add(1, Ordering::Relaxed);
        // Request n is sampled when the running share crosses a new per mille
        // step: evenly spread, e.g. 250 per mille takes every fourth request.
        ((n + 1) * permille / 1000 > n * permille / 1000).then_some(shadow)
    }

    /// Runs `f` on the drift tracker, if the served bundle has one.
    pub fn with_tracker<R>(&self, f: impl FnOnce(&mut Tracker) -> R) -> Option<R> {
        lock(&self.drift).as_mut().map(f)
    }
}

/// Every channel's [`ModelServed`], by channel name: what the local API serves.
/// Channels come and go with [`Served::replace_all`]; the settings (drift
/// windows, sample capture, shadow share) apply to every channel, also to one
/// added later.
#[derive(Debug, Clone, Default)]
pub struct Served {
    channels: Arc<RwLock<BTreeMap<ModelChannel, ModelServed>>>,
    settings: Arc<Mutex<ServeSettings>>,
}

/// What [`Served`] applies to each channel.
#[derive(Debug, Clone, Default)]
struct ServeSettings {
    drift: Option<WindowSettings>,
    samples: Option<crate::config::SamplesConfig>,
    capture_on: Option<bool>,
}

impl Served {
    /// Serving `active` (or nothing) on its channel, with drift tracking at the
    /// default window sizes.
    pub fn new(active: Option<ActiveModel>) -> Served {
        Served::with_drift(
            active,
            Some(WindowSettings::from(&crate::config::DriftConfig::default())),
        )
    }

    /// Serving `active` (or nothing) on its channel, tracking drift with
    /// `settings` (`None`: off).
    pub fn with_drift(active: Option<ActiveModel>, settings: Option<WindowSettings>) -> Served {
        let served = Served::with_settings(settings);
        if let Some(a) = active {
            served.replace_all(BTreeMap::from([(
                a.bundle.channel.clone(),
                (Some(a), None),
            )]));
        }
        served
    }

    /// Serving nothing yet, tracking drift with `settings` (`None`: off).
    pub fn with_settings(drift: Option<WindowSettings>) -> Served {
        Served {
            channels: Arc::default(),
            settings: Arc::new(Mutex::new(ServeSettings {
                drift,
                ..ServeSettings::default()
            })),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ModelChannel, ModelServed>> {
        self.channels.read().unwrap_or_else(|p| p.into_inner())
    }

    /// One channel's model.
    pub fn channel(&self, channel: &str) -> Option<ModelServed> {
        self.read()
            .iter()
            .find(|(c, _)| c.as_str() == channel)
            .map(|(_, m)| m.clone())
    }

    /// Every channel, in name order.
    pub fn channels(&self) -> Vec<(ModelChannel, ModelServed)> {
        self.read()
            .iter()
            .map(|(c, m)| (c.clone(), m.clone()))
            .collect()
    }

    /// The active bundle of every channel that serves one, in name order.
    pub fn bundles(&self) -> Vec<BundleRef> {
        self.read()
            .values()
            .filter_map(ModelServed::bundle)
            .collect()
    }

    /// Serves what the slots hold now, channel by channel: a channel that kept
    /// its bundle keeps its counters and drift window; a channel no longer
    /// installed stops being served.
    pub fn replace_all(&self, loaded: crate::store::LoadedChannels) {
        let settings = lock(&self.settings).clone();
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        channels.retain(|c, _| loaded.contains_key(c));
        for (channel, slots) in loaded {
            let m = channels.entry(channel).or_insert_with(|| {
                let m = ModelServed::with_drift(None, settings.drift);
                if let Some(s) = &settings.samples {
                    m.set_samples_config(s.clone());
                }
                if let Some(on) = settings.capture_on {
                    m.set_capture(on);
                }
                m
            });
            m.replace_all(slots);
        }
    }

    /// Sets the sample capture settings (from the agent config) of every channel.
    pub fn set_samples_config(&self, samples: crate::config::SamplesConfig) {
        lock(&self.settings).samples = Some(samples.clone());
        for m in self.read().values() {
            m.set_samples_config(samples.clone());
        }
    }

    /// Turns capture on or off at run time on every channel (see
    /// [`ModelServed::set_capture`]).
    pub fn set_capture(&self, on: bool) {
        lock(&self.settings).capture_on = Some(on);
        for m in self.read().values() {
            m.set_capture(on);
        }
    }

    /// The capture mode now (the same on every channel).
    pub fn capture_mode(&self) -> Capture {
        let settings = lock(&self.settings);
        let configured = settings
            .samples
            .as_ref()
            .map_or(Capture::Off, |s| s.capture);
        match settings.capture_on {
            Some(on) => capture_for(on, configured),
            None => configured,
        }
    }

    /// Sets the share of requests every channel's shadow runs on now (per
    /// mille, capped at 1000); a shadow installed later starts at the default.
    pub fn set_shadow_permille(&self, permille: u16) {
        for m in self.read().values() {
            m.set_shadow_permille(permille);
        }
    }
}

/// What [`ModelServed::drift_checkpoint`] returns.
#[derive(Debug, Clone)]
pub struct DriftCheckpoint {
    /// For `drift.json` (see `status --json`).
    pub status: DriftStatus,
    /// For telemetry: the latest window with enough rows.
    pub report: Option<edgefleet_shared::protocol::DriftReport>,
    /// A drift event to send.
    pub alert: Option<edgefleet_shared::protocol::EventKind>,
}

/// Writes every channel's drift status to `drift.json` in `dir`, an object
/// keyed by channel (temp file, fsync, rename).
pub fn save_drift_status(
    dir: &std::path::Path,
    statuses: &BTreeMap<ModelChannel, DriftStatus>,
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(statuses).map_err(std::io::Error::other)?;
    crate::store::write_atomic(&dir.join(crate::drift::tracker::STATUS_FILE), &bytes)
}

type Shared = Served;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

/// Ready when at least one channel is installed and every installed channel
/// serves a model.
async fn ready(State(s): State<Shared>) -> Response {
    let channels = s.channels();
    let ready = !channels.is_empty() && channels.iter().all(|(_, m)| m.bundle().is_some());
    if ready {
        Json(json!({ "ready": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false })),
        )
            .into_response()
    }
}

/// Largest body of a repository index request (`{"ready": true}` and spaces).
const MAX_INDEX_REQUEST_LEN: usize = 4096;

/// The model repository index (`POST /v2/repository/index`, Triton's model
/// repository extension, which tritonclient's `get_model_repository_index()`
/// calls): one entry per installed channel, `READY` when it serves a model.
/// The body may be empty or `{"ready": true}` (only the ready ones).
async fn repository_index(State(s): State<Shared>, body: axum::body::Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct IndexRequest {
        #[serde(default)]
        ready: bool,
    }
    if body.len() > MAX_INDEX_REQUEST_LEN {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a repository index request is at most {MAX_INDEX_REQUEST_LEN} bytes"),
        );
    }
    let only_ready = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        match serde_json::from_slice::<IndexRequest>(&body) {
            Ok(r) => r.ready,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("repository index request: {e}"),
                );
            }
        }
    };
    let entries: Vec<serde_json::Value> = s
        .channels()
        .into_iter()
        .filter_map(|(channel, m)| match m.bundle() {
            Some(b) => Some(json!({ "name": channel, "version": b.version, "state": "READY" })),
            None if only_ready => None,
            None => Some(json!({
                "name": channel,
                "state": "UNAVAILABLE",
                "reason": "no active bundle on this channel (a staged or shadow bundle waits for activate)",
            })),
        })
        .collect();
    Json(entries).into_response()
}

/// Server metadata (OIP `GET /v2`): name, version and the protocol extensions
/// the API speaks.
async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "edgefleet-agent",
        "version": crate::version::version(),
        "extensions": ["binary_tensor_data"],
    }))
}

/// Model readiness (OIP `GET /v2/models/{name}/ready`): 200 when `name` is
/// served, 404 with the reason otherwise.
async fn model_ready(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    match find(&s, &name) {
        Ok(_) => Json(json!({ "name": name, "ready": true })).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

/// Why a model name has no model (a 404).
#[derive(Debug, thiserror::Error)]
enum NoModel {
    #[error("no model `{asked}`; this device serves {serving}")]
    Other { asked: String, serving: String },
    #[error("no model `{0}`: no model is installed")]
    NoneInstalled(String),
    #[error("no model `{0}`: the channel has no active bundle (a staged one waits for activate)")]
    NotActive(String),
}

/// The channel called `name` and its model.
fn find(s: &Served, name: &str) -> Result<(ModelServed, BundleRef, LoadedModel), NoModel> {
    let Some(m) = s.channel(name) else {
        let names: Vec<String> = s.channels().iter().map(|(c, _)| format!("`{c}`")).collect();
        if names.is_empty() {
            return Err(NoModel::NoneInstalled(name.to_owned()));
        }
        return Err(NoModel::Other {
            asked: name.to_owned(),
            serving: names.join(", "),
        });
    };
    match m.current() {
        Some((bundle, model)) => Ok((m, bundle, model)),
        None => Err(NoModel::NotActive(name.to_owned())),
    }
}

fn oip_shape(shape: &[Dim]) -> Vec<i64> {
    shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
            Dim::Symbol(_) => -1,
        })
        .collect()
}

async fn metadata(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    let (_, bundle, model) = match find(&s, &name) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
    };
    let spec = |t: &edgefleet_shared::manifest::TensorSpec| {
        let mut v =
            json!({ "name": t.name, "datatype": t.dtype.oip_name(), "shape": oip_shape(&t.shape) });
        // A ZipMap's probabilities: which class each column is (docs/agent.md).
        if let Some(labels) = model.class_labels().get(&t.name) {
            v["parameters"] = json!({ "class_labels": labels });
        }
        v
    };
    Json(json!({
        "name": bundle.channel,
        "versions": [bundle.version],
        "platform": "tract_onnx",
        "inputs": model.schema().inputs.iter().map(spec).collect::<Vec<_>>(),
        "outputs": model.schema().outputs.iter().map(spec).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// An `Inference-Header-Content-Length` that is not a byte count (a 400).
#[derive(Debug, thiserror::Error)]
#[error("Inference-Header-Content-Length {0:?} is not a byte count")]
struct BadHeaderLen(axum::http::HeaderValue);

/// The binary extension's `Inference-Header-Content-Length`, when present.
fn binary_header_len(headers: &axum::http::HeaderMap) -> Result<Option<usize>, BadHeaderLen> {
    headers
        .get(HEADER_LEN_HEADER)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|t| t.trim().parse::<usize>().ok())
                .ok_or_else(|| BadHeaderLen(v.clone()))
        })
        .transpose()
}

/// The response to a request the model answered: JSON, or the binary
/// extension's header and tensors when the request asked for binary outputs.
fn respond(
    s: &ModelServed,
    bundle: &BundleRef,
    request: &crate::oip::InferRequest,
    outputs: &[edgefleet_shared::golden::Tensor],
) -> Response {
    match encode_response(bundle.channel.as_str(), &bundle.version, request, outputs) {
        Ok(Encoded {
            body,
            header_len: None,
        }) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Ok(Encoded {
            body,
            header_len: Some(n),
        }) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (
                    header::HeaderName::from_static(HEADER_LEN_HEADER),
                    n.to_string(),
                ),
            ],
            body,
        )
            .into_response(),
        Err(e @ crate::oip::RequestError::NotFinite { .. }) => {
            // The model answered, but not in a form the client can read.
            s.stats().record_error();
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn infer(
    State(s): State<Shared>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    admitted: Admitted,
    body: axum::body::Body,
) -> Response {
    let (s, bundle, model) = match find(&s, &name) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
    };
    let body = match admitted.read(body).await {
        Ok(body) => body,
        Err(resp) => {
            s.stats().record_error();
            return resp;
        }
    };
    let header_len = match binary_header_len(&headers) {
        Ok(n) => n,
        Err(e) => {
            s.stats().record_error();
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let decoded = decode_request(&body, header_len).and_then(|d| {
        let outputs = model.schema().outputs.iter().map(|o| o.name.as_str());
        d.request.check_outputs(outputs).map(|()| d)
    });
    let Decoded { request, inputs } = match decoded {
        Ok(d) => d,
        Err(e) => {
            s.stats().record_error();
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let tracked = s.clone();
    let shadow = s.shadow_for_request();
    let inline = model
        .estimate(&inputs)
        .is_some_and(|t| t <= Duration::from_micros(INLINE_RUN_LIMIT_US));
    let result = if inline {
        Ok(answer(&tracked, shadow, bundle, &model, inputs))
    } else {
        tokio::task::spawn_blocking(move || answer(&tracked, shadow, bundle, &model, inputs)).await
    };
    match &result {
        Ok(Ok((_, _, took))) => s.stats().record(*took),
        _ => s.stats().record_error(),
    }
    match result {
        Ok(Ok((bundle, outputs, _))) => respond(&s, &bundle, &request, &outputs),
        Ok(Err(e @ crate::model::InferenceError::Runtime(_))) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("inference task failed: {e}"),
        ),
    }
}

/// Runs one request on `model` and feeds its answer to the drift window, the
/// sample reservoir and (sampled) the shadow.
fn answer(
    tracked: &ModelServed,
    shadow: Option<Shadow>,
    bundle: BundleRef,
    model: &LoadedModel,
    inputs: Vec<Tensor>,
) -> Result<(BundleRef, Vec<Tensor>, Duration), crate::model::InferenceError> {
    let started = Instant::now();
    let out = model.run(&inputs)?;
    let took = started.elapsed();
    // Counted after the answer is computed (not in its latency), before it is
    // sent: a few counter increments per row (docs/benchmarks.md).
    tracked.observe(&bundle.digest, &inputs, &out);
    tracked.capture(&bundle.digest, &inputs, &out);
    // The shadow runs on its own blocking task, after this one returned the
    // answer; one at a time, else the request is skipped.
    if let Some(shadow) = shadow {
        if shadow.busy.swap(true, Ordering::AcqRel) {
            shadow.stats.record_skipped();
        } else {
            let answer = out.clone();
            tokio::task::spawn_blocking(move || {
                shadow.run(&inputs, &answer, took);
                shadow.busy.store(false, Ordering::Release);
            });
        }
    }
    Ok((bundle, out, took))
}

/// How much of the device's memory and CPU the local API's requests may hold
/// at once (`limits.api_*` in the config): a memory budget and a number of
/// inference requests. A request takes its share before its body is read and
/// keeps it until it is answered: its `Content-Length` (or the 16 MiB maximum
/// when it has none) times [`JSON_COST`] or [`BINARY_COST`], at most the whole
/// budget (so a request larger than the budget runs alone). One that cannot get
/// its share within [`ADMISSION_WAIT`] is answered 503 with `Retry-After: 1`,
/// its body unread.
#[derive(Debug)]
pub struct Admission {
    /// The memory budget in KiB units (tokio's semaphores count in u32).
    memory: Arc<tokio::sync::Semaphore>,
    memory_kib: u32,
    requests: Arc<tokio::sync::Semaphore>,
    request_limit: u32,
    body_timeout: Duration,
}

/// Memory a JSON request holds per byte of its body while it is handled: the
/// body, its elements as parsed (16 bytes each), the input tensors, the
/// model's own working memory, the outputs and the encoded answer. Measured
/// (`EDGEFLEET_BENCH_ONLY=load`, docs/benchmarks.md): one 15 MiB request to the
/// tabular model raised the agent's RSS by 10.8 times its body; rounded up.
/// The model's share grows with its size: a larger model needs a larger
/// `limits.api_memory_bytes`, not a larger factor.
pub const JSON_COST: u64 = 12;

/// The same for a request with binary tensor data: measured 8.2 times its
/// body (the body, the tensors, the model's working memory, the outputs).
pub const BINARY_COST: u64 = 9;

/// Longest a request waits for its share of the [`Admission`] budget.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(1);

impl Admission {
    /// The budget of `limits`.
    pub fn new(limits: &crate::config::LimitsConfig) -> Admission {
        let memory_kib =
            u32::try_from(limits.api_memory_bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let request_limit = limits.api_requests_in_flight.max(1);
        Admission {
            memory: Arc::new(tokio::sync::Semaphore::new(memory_kib as usize)),
            memory_kib,
            requests: Arc::new(tokio::sync::Semaphore::new(request_limit as usize)),
            request_limit,
            body_timeout: Duration::from_millis(limits.api_body_timeout_ms),
        }
    }

    /// Waits up to [`ADMISSION_WAIT`] for one request's share of the budget:
    /// `cost` bytes (a request costing more than the budget takes all of it).
    async fn admit(&self, cost: u64) -> Result<Admitted, Response> {
        let kib = u32::try_from(cost.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.memory_kib);
        let take = async {
            let request = self.requests.clone().acquire_owned().await.ok()?;
            let body = self.memory.clone().acquire_many_owned(kib).await.ok()?;
            Some(Admitted {
                _request: request,
                _body: body,
                body_timeout: self.body_timeout,
                declared_len: None,
            })
        };
        match tokio::time::timeout(ADMISSION_WAIT, take).await {
            Ok(Some(admitted)) => Ok(admitted),
            _ => {
                let message = format!(
                    "busy: this device handles at most {} requests and {} KiB of request memory at once (limits.api_requests_in_flight, limits.api_memory_bytes); retry",
                    self.request_limit, self.memory_kib
                );
                let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, message);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                Err(resp)
            }
        }
    }
}

/// A request's share of the [`Admission`] budget, given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    _request: tokio::sync::OwnedSemaphorePermit,
    _body: tokio::sync::OwnedSemaphorePermit,
    body_timeout: Duration,
    declared_len: Option<usize>,
}

impl Admitted {
    /// Reads an admitted request's body: at most [`MAX_REQUEST_LEN`] bytes
    /// (413), within the body timeout (408).
    async fn read(&self, body: axum::body::Body) -> Result<Vec<u8>, Response> {
        use futures_util::StreamExt as _;
        let read = async {
            let mut stream = body.into_data_stream();
            let mut bytes = Vec::with_capacity(self.declared_len.unwrap_or(0));
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the request body: {e}"),
                    )
                })?;
                if bytes.len() + chunk.len() > MAX_REQUEST_LEN {
                    return Err(too_large(bytes.len() + chunk.len()));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(bytes)
        };
        match tokio::time::timeout(self.body_timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms (limits.api_body_timeout_ms)",
                    self.body_timeout.as_millis()
                ),
            )),
        }
    }
}

fn too_large(len: impl std::fmt::Display) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body of {len} bytes is over the limit of {MAX_REQUEST_LEN}"),
    )
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Admitted {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let Some(admission) = parts.extensions.get::<Arc<Admission>>().cloned() else {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the local API was started without its admission budget",
            ));
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body_len = match declared {
            Some(n) if n > MAX_REQUEST_LEN as u64 => return Err(too_large(n)),
            Some(n) => Some(n as usize),
            None => None,
        };
        // Chunked: charged at the largest body it may turn out to be.
        let cost = if parts.headers.contains_key(HEADER_LEN_HEADER) {
            BINARY_COST
        } else {
            JSON_COST
        };
        let len = body_len.unwrap_or(MAX_REQUEST_LEN) as u64;
        let mut admitted = admission.admit(len.saturating_mul(cost)).await?;
        admitted.declared_len = body_len;
        Ok(admitted)
    }
}

/// The API's routes, with the default [`Admission`] budget.
pub fn router(served: Served) -> Router {
    router_within(served, &crate::config::LimitsConfig::default())
}

/// The API's routes, within the admission budget of `limits`.
pub fn router_within(served: Served, limits: &crate::config::LimitsConfig) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/models/{name}", get(metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_LEN))
        .layer(axum::Extension(Arc::new(Admission::new(limits))))
        .layer(axum::middleware::map_response(oip_errors))
        .with_state(served)
}

/// Every error in the Open Inference Protocol's form, `{"error": "message"}`,
/// including axum's own (an unknown route, a wrong method, a body over the
/// limit), which are plain text.
async fn oip_errors(resp: Response) -> Response {
    match crate::http::plain_error(resp).await {
        Ok((status, message)) => error(status, message),
        Err(resp) => resp,
    }
}

/// Serves within `limits` (admission budget, connection bounds) until
/// `shutdown` completes, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    served: Served,
    limits: &crate::config::LimitsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use axum::serve::ListenerExt;
    // Answers go out at once rather than waiting on Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("local API: TCP_NODELAY not set: {e}");
        }
    });
    let router = router_within(served, limits);
    crate::http::serve(listener, router, limits.api_connection_limits(), shutdown).await
}

/// The mode of the local API's Unix socket: its owner and group may call the
/// model (connecting needs write permission), nobody else.
pub const SOCKET_MODE: u32 = 0o660;

/// Binds the local API's Unix socket at `path` with [`SOCKET_MODE`]. A socket
/// file left by an agent that is gone is replaced; a socket another process
/// serves on, or a file that is not a socket, is left alone and refused.
pub fn bind_unix(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, SocketError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |what: &'static str| {
        move |source: std::io::Error| SocketError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::Busy(path.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(fail("cannot remove the stale socket"))?;
                }
                Err(e) => return Err(fail("cannot check the existing socket")(e)),
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("cannot read")(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(fail("cannot listen"))?;
    // Bound with the mode the umask leaves (0700 under the systemd unit's
    // UMask=0077), then set to SOCKET_MODE; the directory's own mode (the unit's
    // /run/edgefleet is 0750) is what keeps others out at every instant.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(fail("cannot set its mode"))?;
    listener
        .set_nonblocking(true)
        .map_err(fail("cannot make it non-blocking"))?;
    Ok(listener)
}

/// Why the local API's Unix socket cannot be bound; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process serves on it.
    #[error("{}: another process is serving on this socket", .0.display())]
    Busy(std::path::PathBuf),
    /// A file that is not a socket: left alone.
    #[error("{} exists and is not a socket: not replaced", .0.display())]
    NotASocket(std::path::PathBuf),
    /// The system refused a step.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The socket path.
        path: std::path::PathBuf,
        /// The step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Serves the same API on a Unix socket (see [`bind_unix`]) until `shutdown`
/// completes. Clients that can speak HTTP over a Unix socket (`curl
/// --unix-socket`, most HTTP libraries) skip the TCP stack, and the socket's
/// file permissions decide who may call the model.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    served: Served,
    limits: &crate::config::LimitsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let router = router_within(served, limits);
    crate::http::serve(listener, router, limits.api_connection_limits(), shutdown).await
}
