//! The local inference API on loopback: Open Inference Protocol v2 over HTTP, as
//! KServe and Triton speak it. Works with no network and no controller.
//!
//! The server takes an already-bound listener and a shutdown future (tests bind
//! port 0). Inference runs on the blocking pool so a slow model never stalls the
//! runtime.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgefleet_shared::manifest::Dim;
use edgefleet_shared::protocol::BundleRef;
use serde_json::json;

use crate::model::LoadedModel;
use crate::oip::{InferRequest, InferResponse, MAX_REQUEST_LEN, from_tensor, to_tensor};

/// The model being served, if any.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// The active bundle and its loaded model.
    pub active: Option<(BundleRef, LoadedModel)>,
}

type Shared = Arc<Served>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(s): State<Shared>) -> Response {
    match &s.active {
        Some(_) => Json(json!({ "ready": true })).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false })),
        )
            .into_response(),
    }
}

/// The served model called `name`, or the 404 message.
fn find<'a>(s: &'a Served, name: &str) -> Result<&'a (BundleRef, LoadedModel), String> {
    match &s.active {
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
    if let Err(msg) = find(&s, &name) {
        return error(StatusCode::NOT_FOUND, msg);
    }
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
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let served = s.clone();
    let result = tokio::task::spawn_blocking(move || {
        let (bundle, model) = served
            .active
            .as_ref()
            .ok_or(crate::model::InferenceError::Runtime("no model".into()))?;
        model.run(&inputs).map(|out| (bundle.clone(), out))
    })
    .await;
    match result {
        Ok(Ok((bundle, outputs))) => Json(InferResponse {
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
        .with_state(Arc::new(served))
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
