//! The local inference API on loopback: Open Inference Protocol v2 over HTTP, as
//! KServe and Triton speak it. Works with no network and no controller.
//!
//! The server takes an already-bound listener and a shutdown future (tests bind
//! port 0). Inference runs on the blocking pool so a slow model never stalls the
//! runtime.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgefleet_shared::manifest::Dim;
use edgefleet_shared::protocol::BundleRef;
use serde_json::json;

use crate::metrics::ModelStats;
use crate::model::LoadedModel;
use crate::oip::{InferRequest, InferResponse, MAX_REQUEST_LEN, from_tensor, to_tensor};

/// The model being served, if any, swappable while the server runs (after an
/// install, activate or revert), with its counters.
#[derive(Debug, Clone, Default)]
pub struct Served {
    active: Arc<RwLock<Option<(BundleRef, LoadedModel)>>>,
    stats: Arc<ModelStats>,
}

impl Served {
    /// Serving `active` (or nothing).
    pub fn new(active: Option<(BundleRef, LoadedModel)>) -> Served {
        Served {
            active: Arc::new(RwLock::new(active)),
            stats: Arc::new(ModelStats::default()),
        }
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
    /// on the old one. Counters restart when the bundle changes.
    pub fn replace(&self, next: Option<(BundleRef, LoadedModel)>) {
        let changed = self.bundle().map(|b| b.digest) != next.as_ref().map(|(b, _)| b.digest);
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = next;
        if changed {
            self.stats.reset();
        }
    }

    /// The counters.
    pub fn stats(&self) -> &ModelStats {
        &self.stats
    }
}

type Shared = Served;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(s): State<Shared>) -> Response {
    match s.current() {
        Some(_) => Json(json!({ "ready": true })).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false })),
        )
            .into_response(),
    }
}

/// The served model called `name`, or the 404 message.
fn find(s: &Served, name: &str) -> Result<(BundleRef, LoadedModel), String> {
    match s.current() {
        Some(m) if m.0.channel.as_str() == name => Ok(m),
        Some(m) => Err(format!(
            "no model `{name}`; this device serves `{}`",
            m.0.channel
        )),
        None => Err(format!("no model `{name}`: no model is installed")),
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
    let (bundle, model) = match find(&s, &name) {
        Ok(m) => m,
        Err(msg) => return error(StatusCode::NOT_FOUND, msg),
    };
    let spec = |t: &edgefleet_shared::manifest::TensorSpec| json!({ "name": t.name, "datatype": t.dtype.oip_name(), "shape": oip_shape(&t.shape) });
    Json(json!({
        "name": bundle.channel,
        "versions": [bundle.version],
        "platform": "tract_onnx",
        "inputs": model.schema().inputs.iter().map(spec).collect::<Vec<_>>(),
        "outputs": model.schema().outputs.iter().map(spec).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn infer(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let (bundle, model) = match find(&s, &name) {
        Ok(m) => m,
        Err(msg) => return error(StatusCode::NOT_FOUND, msg),
    };
    let request: InferRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not an OIP v2 inference request: {e}"),
            );
        }
    };
    let inputs = match request
        .inputs
        .iter()
        .map(to_tensor)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(i) => i,
        Err(e) => {
            s.stats().record_error();
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let result = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        model
            .run(&inputs)
            .map(|out| (bundle, out, started.elapsed()))
    })
    .await;
    match &result {
        Ok(Ok((_, _, took))) => s.stats().record(*took),
        _ => s.stats().record_error(),
    }
    match result {
        Ok(Ok((bundle, outputs, _))) => Json(InferResponse {
            model_name: bundle.channel.to_string(),
            model_version: bundle.version,
            outputs: outputs.iter().map(from_tensor).collect(),
        })
        .into_response(),
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

/// The API's routes.
pub fn router(served: Served) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(metadata))
        .route("/v2/models/{name}/infer", post(infer))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_LEN))
        .with_state(served)
}

/// Serves until `shutdown` completes, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    served: Served,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(served))
        .with_graceful_shutdown(shutdown)
        .await
}
