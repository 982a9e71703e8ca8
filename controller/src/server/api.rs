//! The controller's HTTP API, `/api/v1` (docs/controller.md). Bearer tokens with
//! roles (viewer < operator < admin); every change is written to the audit log;
//! errors are JSON `{"error": {"code", "message"}}` with a stable code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgefleet_shared::{DeviceId, Digest, UnixTime};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

mod dashboard;
mod metrics;

use crate::server::ca::Ca;
use crate::server::db::{Audit, BundleRow, Db, DeviceRow};
use crate::server::engine::{FailurePolicy, Gates, Input, Plan, WaveSize};
use crate::server::fleet::{Fleet, FleetError, now_ms};
use crate::server::tags::Tags;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The fleet (store inside).
    pub fleet: Arc<Fleet>,
    /// The CA, for enrollment.
    pub ca: Arc<Ca>,
    /// Where uploads are verified against.
    pub trust_root: PathBuf,
    /// Upload cap.
    pub max_bundle_bytes: u64,
    /// Where devices reach the broker (for enrollment bundles).
    pub broker_url: String,
    /// Topic prefix.
    pub topic_prefix: String,
    /// QoS of device subscriptions (`[mqtt] subscribe_qos`, for enrollment).
    pub subscribe_qos: u8,
    /// The embedded broker's gate: enrolled certificates (None with an external broker).
    pub gate: Option<crate::server::gate::Identities>,
    /// The gate's counters.
    pub gate_stats: Arc<crate::server::gate::GateStats>,
}

impl AppState {
    fn db(&self) -> &Db {
        self.fleet.db()
    }
}

/// Roles, ordered by power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read only.
    Viewer,
    /// Bundles and rollouts.
    Operator,
    /// Tokens and enrollment too.
    Admin,
}

impl Role {
    /// Parses `viewer`, `operator`, `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: std::borrow::Cow<'static, str>,
    message: String,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// A failure of this server (a disk, a task), logged with its detail;
    /// the caller hears what failed, never a server path.
    fn internal(what: &str, detail: impl std::fmt::Display) -> ApiError {
        tracing::error!("{what}: {detail}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what} (the controller's log has the detail)"),
        )
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

/// A JSON request body: absent (no bytes) or one `T`. A body with bytes must say
/// `Content-Type: application/json` (415 otherwise: a body is never ignored),
/// fit the route's size limit (413) and parse as `T` (422 naming the field).
/// Judged when the handler asks ([`JsonBody::optional`], [`JsonBody::required`]),
/// so a caller without the role hears 403 first. Errors in the API's format.
#[derive(Debug)]
pub struct JsonBody<T>(Result<Option<T>, ApiError>);

impl<T> JsonBody<T> {
    /// The body, if one was sent.
    fn optional(self) -> Result<Option<T>, ApiError> {
        self.0
    }

    /// The body, which this route needs.
    fn required(self) -> Result<T, ApiError> {
        self.0?.ok_or_else(|| {
            ApiError::invalid("a JSON body is required (Content-Type: application/json)")
        })
    }
}

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = std::convert::Infallible;

    async fn from_request(
        req: axum::extract::Request,
        state: &S,
    ) -> Result<Self, std::convert::Infallible> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            });
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Ok(JsonBody(Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "the request body is over this route's size limit",
                ))));
            }
            Err(e) => {
                return Ok(JsonBody(Err(ApiError::new(
                    e.status(),
                    "bad_request",
                    e.body_text(),
                ))));
            }
        };
        if bytes.is_empty() {
            return Ok(JsonBody(Ok(None)));
        }
        if json != Some(true) {
            return Ok(JsonBody(Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body is JSON only with Content-Type: application/json",
            ))));
        }
        // axum's own decoder: its messages name the field that was wrong.
        Ok(JsonBody(
            Json::<T>::from_bytes(&bytes)
                .map(|Json(v)| Some(v))
                .map_err(|e| ApiError::invalid(e.body_text())),
        ))
    }
}

/// Gives the responses the API does not write itself (axum's rejections of a
/// path or query, 404 for an unknown route, 405) the API's error format.
async fn uniform_errors(resp: Response) -> Response {
    // The dashboard's pages say what went wrong in HTML.
    let html = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html {
        return resp;
    }
    let (status, message) = match edgefleet_agent::http::plain_error(resp).await {
        Ok(plain) => plain,
        Err(resp) => return resp,
    };
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    ApiError::new(status, code, message).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<crate::server::db::DbError> for ApiError {
    fn from(e: crate::server::db::DbError) -> Self {
        // SQLite's own text is for the log, not for clients.
        ApiError::internal("the controller's store failed", e)
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::Db(e) => e.into(),
            FleetError::Random(_) => {
                ApiError::internal("the controller could not name a rollout", e)
            }
            FleetError::InvalidDevice(_) | FleetError::Plan(_) => ApiError::invalid(e.to_string()),
            FleetError::UnknownBundle(_) | FleetError::UnknownRollout(_) => {
                ApiError::not_found(e.to_string())
            }
            FleetError::DeviceInRollout { .. }
            | FleetError::RolloutFinished(_)
            | FleetError::NotNow(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            FleetError::OtherReplica { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "other_replica",
                e.to_string(),
            ),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The caller, from its bearer token.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Token name (the audit's actor).
    pub name: String,
    /// Its role.
    pub role: Role,
}

impl Caller {
    /// An audit record of this caller's change to `target`, as of now, to be
    /// stored with the change.
    fn audit(&self, action: &str, target: &str, after: Option<Value>) -> Audit {
        Audit {
            actor: self.name.clone(),
            action: action.into(),
            target: target.into(),
            before: None,
            after,
            at: now_ms(),
        }
    }

    fn require(&self, role: Role) -> ApiResult<()> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this needs the {role:?} role; token {} is {:?}",
                    self.name, self.role
                )
                .to_lowercase(),
            ))
        }
    }
}

/// SHA-256 of a token, hex: what the store keeps.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A device id from the request path, checked before the handler runs
/// (422 naming what is wrong); the caller's token is checked first.
struct DevicePath(DeviceId);

impl FromRequestParts<AppState> for DevicePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<DevicePath> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(format!("device id: {e}")))?;
        DeviceId::new(&raw)
            .map(DevicePath)
            .map_err(|e| ApiError::invalid(format!("device id: {e}")))
    }
}

/// A bundle digest (64 hex digits) from the request path, checked before
/// the handler runs.
struct DigestPath(Digest);

impl FromRequestParts<AppState> for DigestPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<DigestPath> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        parse_digest(&raw).map(DigestPath)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Caller> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or_else(|| unauthorized("Authorization must be `Bearer <token>`"))?;
        let (name, role) = state
            .db()
            .token(&token_hash(token))
            .await?
            .ok_or_else(|| unauthorized("unknown token"))?;
        let role = Role::parse(&role).ok_or_else(|| unauthorized("token has an unknown role"))?;
        Ok(Caller { name, role })
    }
}

/// The router.
pub fn router(state: AppState) -> axum::Router {
    let upload_limit = usize::try_from(state.max_bundle_bytes).unwrap_or(usize::MAX);
    axum::Router::new()
        .route(
            "/api/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(device_detail))
        .route("/api/v1/devices/{id}/enroll", post(enroll))
        .route("/api/v1/enrollments", post(enroll_batch))
        .route("/api/v1/devices/{id}/revert", post(revert_device))
        .route("/api/v1/devices/{id}/remove", post(remove_channel))
        .route("/api/v1/devices/{id}/revoke", post(revoke_device))
        .route("/api/v1/devices/{id}/drift", get(device_drift))
        .route("/api/v1/devices/{id}/configure", post(configure_device))
        .route("/api/v1/devices/{id}/samples", post(request_samples))
        .route("/api/v1/samples", get(export_samples))
        .route("/api/v1/drift", get(fleet_drift))
        .route(
            "/api/v1/bundles",
            get(list_bundles)
                .post(upload_bundle)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/api/v1/bundles/{digest}", get(show_bundle))
        .route("/api/v1/bundles/{digest}/file", get(download_bundle))
        .merge(
            // Rollout operations are carried out by the replica that runs the
            // rollouts: the others forward them (docs/scale.md, "Replicas").
            axum::Router::new()
                .route("/api/v1/rollouts", get(list_rollouts).post(start_rollout))
                .route("/api/v1/rollouts/{id}/{action}", post(operate_rollout))
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    to_rollout_holder,
                )),
        )
        .route("/api/v1/rollouts/{id}", get(show_rollout))
        .route("/api/v1/telemetry/summary", get(telemetry_summary))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/tokens", post(create_token))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/openapi.json", get(|| async { Json(openapi()) }))
        .merge(dashboard::routes())
        .layer(DefaultBodyLimit::max(256 * 1024))
        .layer(axum::middleware::map_response(uniform_errors))
        .with_state(state)
}

/// Marks a request forwarded by another replica (never forwarded again).
pub const FORWARDED_BY: &str = "x-edgefleet-forwarded-by";

/// Largest rollout request forwarded (the API's own body limit).
const MAX_FORWARDED_BODY: usize = 256 * 1024;

/// Sends a rollout operation (a POST) to the replica holding the rollout
/// lease when it is not this one, with the caller's token, and relays the
/// answer; the holder authenticates, authorises and audits it. Where the
/// holder cannot be reached, the handler answers (503 `other_replica`, naming
/// it).
async fn to_rollout_holder(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let forwardable = req.method() == axum::http::Method::POST
        && !req.headers().contains_key(FORWARDED_BY)
        && !s.fleet.runs_rollouts();
    let Some(address) = s
        .fleet
        .rollout_holder()
        .and_then(|(_, a)| a)
        .filter(|_| forwardable)
    else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORWARDED_BODY).await else {
        return ApiError::invalid(format!("request body over {MAX_FORWARDED_BODY} bytes"))
            .into_response();
    };
    let url = format!(
        "{}{}",
        address.trim_end_matches('/'),
        parts.uri.path_and_query().map_or("", |p| p.as_str())
    );
    let auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let me = s.fleet.replica_name().to_owned();
    let body = bytes.clone();
    let answer = tokio::task::spawn_blocking(move || -> Result<(u16, Vec<u8>), ureq::Error> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        let mut r = agent
            .post(&url)
            .header(FORWARDED_BY, &me)
            .header(header::CONTENT_TYPE.as_str(), "application/json");
        if let Some(a) = auth {
            r = r.header(header::AUTHORIZATION.as_str(), a);
        }
        let mut answer = r.send(&body[..])?;
        let status = answer.status().as_u16();
        let body = answer
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_vec()?;
        Ok((status, body))
    })
    .await;
    match answer {
        Ok(Ok((status, body))) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::warn!(holder = %address, error = %e, "rollout operation not forwarded to the holder");
            next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(_) => {
            next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

// ----- devices ------------------------------------------------------------

/// Filters of `GET /api/v1/devices`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeviceFilter {
    /// `key=value`; all must match (repeat as `tag=a=1,b=2`).
    tag: Option<String>,
    /// `online` or `offline`.
    state: Option<String>,
    /// Model channel of the active bundle.
    model: Option<String>,
    /// Seen within this many seconds.
    seen_within_s: Option<u64>,
    /// At most this many devices (1 to 10,000; default: every match). With
    /// it, the answer's `next` is the `after` of the next page.
    limit: Option<usize>,
    /// Only devices whose id sorts after this one (the previous page's `next`).
    after: Option<String>,
}

fn parse_tags(text: &str) -> ApiResult<Tags> {
    crate::server::tags::parse(text).map_err(|e| ApiError::invalid(e.to_string()))
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(DeviceFilter),
    responses((status = 200, description = "devices", body = DeviceList), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_devices(
    State(s): State<AppState>,
    caller: Caller,
    Query(f): Query<DeviceFilter>,
) -> ApiResult<Json<DeviceList>> {
    caller.require(Role::Viewer)?;
    let tags = parse_tags(f.tag.as_deref().unwrap_or(""))?;
    let online = match f.state.as_deref() {
        None => None,
        Some("online") => Some(true),
        Some("offline") => Some(false),
        Some(o) => {
            return Err(ApiError::invalid(format!(
                "state {o:?}: expected online or offline"
            )));
        }
    };
    let now = now_ms();
    let devices: Vec<_> = s
        .db()
        .devices()
        .await?
        .into_iter()
        .filter(|d| tags.iter().all(|(k, v)| d.tags.get(k) == Some(v)))
        .filter(|d| online.is_none_or(|o| d.online == o))
        .filter(|d| {
            f.model
                .as_ref()
                .is_none_or(|m| d.channels.iter().any(|c| c.channel == *m))
        })
        .filter(|d| {
            f.seen_within_s.is_none_or(|w| {
                d.last_seen
                    .is_some_and(|l| now.saturating_sub(l) <= w.saturating_mul(1000))
            })
        })
        .collect();
    let total = devices.len();
    let (page, next) = page_after(devices, f.after.as_deref(), f.limit, |d| d.id.as_str())?;
    // Written straight from the rows: through a `Value` tree, 10,000 devices
    // were built twice.
    Ok(Json(DeviceList {
        devices: page,
        total,
        next,
    }))
}

/// A page of `rows` (sorted by `key`): those after `after`, at most `limit`,
/// and the key to ask for the next page with (None on the last).
fn page_after<T>(
    rows: Vec<T>,
    after: Option<&str>,
    limit: Option<usize>,
    key: impl Fn(&T) -> &str,
) -> ApiResult<(Vec<T>, Option<String>)> {
    if limit.is_some_and(|l| !(1..=10_000).contains(&l)) {
        return Err(ApiError::invalid("limit: 1 to 10000"));
    }
    let mut page: Vec<T> = rows
        .into_iter()
        .filter(|r| after.is_none_or(|a| key(r) > a))
        .collect();
    let more = limit.is_some_and(|l| page.len() > l);
    if let Some(l) = limit {
        page.truncate(l);
    }
    let next = more
        .then(|| page.last().map(|r| key(r).to_owned()))
        .flatten();
    Ok((page, next))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "device id")),
    responses((status = 200, description = "device, retained state, recent events and telemetry, commands", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn device_detail(
    State(s): State<AppState>,
    caller: Caller,
    DevicePath(id): DevicePath,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let device = s
        .db()
        .device(id.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    let state = s.db().device_state_json(&id).await?;
    let events = s.db().events(&id, 50).await?;
    let now = now_ms();
    let telemetry = s
        .db()
        .telemetry(&id, now.saturating_sub(3_600_000), now, 120)
        .await?;
    let commands = s.db().command_counts(&id).await?;
    Ok(Json(json!({
        "device": device,
        "state": state,
        "events": events,
        "telemetry": telemetry,
        "commands": commands,
    })))
}

/// The stored bundles by digest (hex), to name versions in drift views.
async fn bundles_by_digest(s: &AppState) -> ApiResult<BTreeMap<Digest, BundleRow>> {
    Ok(s.db()
        .bundles()
        .await?
        .into_iter()
        .map(|b| (b.digest, b))
        .collect())
}

/// Query of the drift views.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DriftQuery {
    /// Start of the range, ms since the epoch (default: an hour ago).
    from_ms: Option<u64>,
    /// End of the range (default: now).
    to_ms: Option<u64>,
    /// Most reports returned, newest kept (default 100, at most 1000).
    limit: Option<u32>,
}

impl DriftQuery {
    fn range(&self) -> ApiResult<(u64, u64)> {
        let to = self.to_ms.unwrap_or_else(now_ms);
        let from = self.from_ms.unwrap_or(to.saturating_sub(3_600_000));
        if from > to {
            return Err(ApiError::invalid("from_ms: must not be after to_ms"));
        }
        Ok((from, to))
    }
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/drift", tag = "drift", params(("id" = String, Path, description = "device id"), DriftQuery),
    responses((status = 200, description = "the device's drift reports over time (each: device time `at`, `received_at` ms, and the whole report: window, rows, per-feature and per-output scores)", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn device_drift(
    State(s): State<AppState>,
    caller: Caller,
    DevicePath(id): DevicePath,
    Query(q): Query<DriftQuery>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let (from, to) = q.range()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit: must be between 1 and 1000"));
    }
    if s.db().device(id.as_str()).await?.is_none() {
        return Err(ApiError::not_found(format!("no device {id}")));
    }
    let reports: Vec<Value> = s
        .db()
        .drift_reports(&id, from, to, limit)
        .await?
        .into_iter()
        .map(|(at, received_at, report)| json!({"at": at, "received_at": received_at, "report": report}))
        .collect();
    Ok(Json(json!({ "device": id, "reports": reports })))
}

#[utoipa::path(get, path = "/api/v1/drift", tag = "drift", params(DriftQuery),
    responses((status = 200, description = "per bundle, from each device's latest report in the range: devices reporting, the drifted ones by id, and drifted features with how many devices flag each", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn fleet_drift(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<DriftQuery>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let (from, to) = q.range()?;
    let bundles = bundles_by_digest(&s).await?;
    let mut by: BTreeMap<Digest, Vec<crate::server::db::TelemetryRow>> = BTreeMap::new();
    for r in s.db().latest_telemetry_between(from, to).await? {
        if let (Some(d), Some(_)) = (r.digest, &r.drift) {
            by.entry(d).or_default().push(r);
        }
    }
    let alerting = s.fleet.drift_alerting();
    let groups: Vec<Value> = by
        .into_iter()
        .map(|(digest, rows)| {
            let summary = crate::server::fleet::summarise(&rows);
            let mut drifted: Vec<&str> = rows
                .iter()
                .filter(|r| r.drift.as_ref().is_some_and(|d| d.drifted))
                .map(|r| r.device.as_str())
                .collect();
            drifted.sort_unstable();
            let b = bundles.get(&digest);
            json!({
                "bundle": digest,
                "channel": b.map(|b| &b.channel),
                "version": b.map(|b| &b.version),
                "devices": summary.drift_devices,
                "drifted_devices": drifted,
                "drifted_share": summary.drifted_devices as f64 / summary.drift_devices.max(1) as f64,
                "drifted_features": summary.drifted_features,
                "alert": alerting.contains(&digest),
            })
        })
        .collect();
    Ok(Json(
        json!({ "from_ms": from, "to_ms": to, "bundles": groups }),
    ))
}

/// Body of `POST /api/v1/devices/{id}/enroll`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
struct EnrollBody {
    tags: Tags,
}

/// Most devices one `POST /api/v1/enrollments` enrolls.
const MAX_ENROLL_BATCH: usize = 1000;

/// Body of `POST /api/v1/enrollments`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EnrollBatchBody {
    /// 1 to 1,000 devices.
    devices: Vec<EnrollItem>,
}

/// One device of a batch enrollment.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EnrollItem {
    /// Device id (the certificate's common name).
    id: String,
    #[serde(default)]
    tags: Tags,
}

/// Tags as enrollment accepts them.
/// Tags past what an enrollment accepts.
#[derive(Debug, thiserror::Error)]
#[error("tags: at most 32, keys 1-64 characters without '=' or ',', values up to 128")]
struct BadTags;

fn check_tags(tags: &Tags) -> Result<(), BadTags> {
    if tags.len() > 32
        || tags
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 128 || k.contains(['=', ',']))
    {
        return Err(BadTags);
    }
    Ok(())
}

/// A device certificate issued for enrollment: (id, certificate PEM, key PEM,
/// fingerprint).
type Issued = (DeviceId, String, String, String);

/// Issues, stores (with an audit record each, in one transaction) and admits
/// at the gate the certificates of `devices`. Key generation runs off the
/// async threads.
async fn enroll_devices(
    s: &AppState,
    caller: &Caller,
    devices: Vec<(DeviceId, Tags)>,
) -> ApiResult<Vec<Issued>> {
    let ca = s.ca.clone();
    let ids: Vec<DeviceId> = devices.iter().map(|(id, _)| id.clone()).collect();
    let issued = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .map(|id| {
                let (cert, key) = ca.issue_pem(id.as_str(), None)?;
                let fp = cert_fingerprint(&cert);
                Ok((id, cert, key, fp))
            })
            .collect::<Result<Vec<Issued>, crate::server::ca::CaError>>()
    })
    .await
    .map_err(|e| ApiError::internal("cannot issue the device's certificate", &e))?
    .map_err(|e| ApiError::internal("cannot issue the device's certificate", &e))?;
    let now = now_ms();
    let rows = devices
        .into_iter()
        .zip(&issued)
        .map(|((id, tags), (_, _, _, fp))| {
            let audit = caller.audit(
                "device.enroll",
                id.as_str(),
                Some(json!({"tags": tags, "cert_sha256": fp})),
            );
            (id, tags, fp.clone(), audit)
        })
        .collect();
    s.db().enroll(rows, now).await?;
    if let Some(gate) = &s.gate {
        // Re-enrolling replaces the device's certificate: the old one stops working.
        let mut map = gate.write().unwrap_or_else(|p| p.into_inner());
        let names: std::collections::HashSet<&str> =
            issued.iter().map(|(id, ..)| id.as_str()).collect();
        map.retain(|_, who| {
            !matches!(who, crate::server::gate::Identity::Device(d) if names.contains(d.as_str()))
        });
        for (id, _, _, fp) in &issued {
            map.insert(
                fp.clone(),
                crate::server::gate::Identity::Device(id.to_string()),
            );
        }
        drop(map);
        s.gate_stats.identities_changed();
    }
    Ok(issued)
}

/// What every enrolled device of this controller shares.
fn enrollment_common(s: &AppState) -> Value {
    let trust = std::fs::read(&s.trust_root).ok().map(hex::encode);
    json!({
        "ca_pem": s.ca.cert_pem(),
        "controller_key_pem": s.ca.command_public_pem(),
        "broker_url": s.broker_url,
        "topic_prefix": s.topic_prefix,
        "subscribe_qos": s.subscribe_qos,
        "trust_root_hex": trust,
    })
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/enroll", tag = "devices", params(("id" = String, Path, description = "device id")),
    request_body(content = EnrollBody, content_type = "application/json"),
    responses((status = 200, description = "certificate, key, CA, trust root (hex), broker URL", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn enroll(
    State(s): State<AppState>,
    caller: Caller,
    DevicePath(id): DevicePath,
    body: JsonBody<EnrollBody>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Admin)?;
    let body = body.optional()?.unwrap_or_default();
    check_tags(&body.tags).map_err(|e| ApiError::invalid(e.to_string()))?;
    let mut issued = enroll_devices(&s, &caller, vec![(id, body.tags)]).await?;
    let (id, cert, key, _) = issued.pop().expect("one device issued");
    let mut v = enrollment_common(&s);
    v["device"] = json!(id);
    v["cert_pem"] = json!(cert);
    v["key_pem"] = json!(key);
    Ok(Json(v))
}

#[utoipa::path(post, path = "/api/v1/enrollments", tag = "devices",
    request_body(content = EnrollBatchBody, content_type = "application/json"),
    responses((status = 200, description = "what every device shares (CA, controller key, trust root (hex), broker URL, topic prefix) and `devices`: each one's id, certificate and key", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn enroll_batch(
    State(s): State<AppState>,
    caller: Caller,
    body: JsonBody<EnrollBatchBody>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Admin)?;
    let body = body.required()?;
    if body.devices.is_empty() || body.devices.len() > MAX_ENROLL_BATCH {
        return Err(ApiError::invalid(format!(
            "devices: 1 to {MAX_ENROLL_BATCH} per request, got {}",
            body.devices.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut devices = Vec::with_capacity(body.devices.len());
    for (n, d) in body.devices.into_iter().enumerate() {
        let id =
            DeviceId::new(&d.id).map_err(|e| ApiError::invalid(format!("devices[{n}].id: {e}")))?;
        if !seen.insert(id.clone()) {
            return Err(ApiError::invalid(format!(
                "devices[{n}].id: {id} appears twice"
            )));
        }
        check_tags(&d.tags).map_err(|e| ApiError::invalid(format!("devices[{n}].{e}")))?;
        devices.push((id, d.tags));
    }
    let issued = enroll_devices(&s, &caller, devices).await?;
    let mut v = enrollment_common(&s);
    v["devices"] = issued
        .into_iter()
        .map(|(id, cert, key, _)| json!({"device": id, "cert_pem": cert, "key_pem": key}))
        .collect();
    Ok(Json(v))
}

/// SHA-256 of the DER of a PEM certificate, hex (what the gate and revocation use).
pub fn cert_fingerprint(pem: &str) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| crate::server::gate::fingerprint(der.as_ref()))
        .unwrap_or_default()
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "devices", params(("id" = String, Path, description = "device id")),
    responses((status = 200, description = "the certificate is no longer admitted", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn revoke_device(
    State(s): State<AppState>,
    caller: Caller,
    DevicePath(id): DevicePath,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Admin)?;
    let audit = caller.audit("device.revoke", &id, None);
    if !s.db().revoke(&id, Some(audit)).await? {
        return Err(ApiError::not_found(format!(
            "device {id} has no enrolled certificate"
        )));
    }
    if let Some(gate) = &s.gate {
        gate.write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, who| *who != crate::server::gate::Identity::Device(id.to_string()));
        s.gate_stats.identities_changed();
    }
    Ok(Json(json!({"device": id, "revoked": true})))
}

/// Body of `POST /api/v1/devices/{id}/revert` and `/remove`: the channel.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
struct ChannelBody {
    /// The channel (model name); may be left out of a revert when the device
    /// serves one.
    channel: Option<String>,
}

impl ChannelBody {
    /// The channel, checked as a name.
    fn channel(&self) -> ApiResult<Option<edgefleet_shared::ModelChannel>> {
        self.channel
            .as_deref()
            .map(|c| {
                edgefleet_shared::ModelChannel::new(c)
                    .map_err(|e| ApiError::invalid(format!("channel: {e}")))
            })
            .transpose()
    }
}

/// The channel a device action means: the one `named` (which `id` must serve),
/// or the only one it serves; None when it serves none that the controller
/// knows of and none is named.
fn pick_channel(
    id: &DeviceId,
    served: &[String],
    named: Option<edgefleet_shared::ModelChannel>,
) -> ApiResult<Option<edgefleet_shared::ModelChannel>> {
    match (named, served) {
        (Some(c), served) if served.iter().any(|s| s == c.as_str()) => Ok(Some(c)),
        (Some(c), []) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("{id} serves no model, so not `{c}`"),
        )),
        (Some(c), served) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "{id} does not serve `{c}` (it serves {})",
                served.join(", ")
            ),
        )),
        (None, []) => Ok(None),
        (None, [one]) => edgefleet_shared::ModelChannel::new(one)
            .map(Some)
            .map_err(|e| ApiError::invalid(format!("channel {one:?}: {e}"))),
        (None, several) => Err(ApiError::invalid(format!(
            "channel: {id} serves several ({}): name one",
            several.join(", ")
        ))),
    }
}

/// The channels `id` serves, by name.
async fn served_channels(s: &AppState, id: &DeviceId) -> ApiResult<Vec<String>> {
    Ok(s.db()
        .device_channels(id.as_str())
        .await?
        .into_iter()
        .map(|c| c.channel)
        .collect())
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/revert", tag = "devices", params(("id" = String, Path, description = "device id")),
    request_body(content = ChannelBody, content_type = "application/json", description = "optional: the channel, needed when the device serves several"),
    responses((status = 200, description = "the command id", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn revert_device(
    State(s): State<AppState>,
    caller: Caller,
    DevicePath(id): DevicePath,
    body: JsonBody<ChannelBody>,
) -> ApiResult<Json<Value>> {
    use edgefleet_shared::protocol::Action;
    caller.require(Role::Operator)?;
    let named = body.optional()?.unwrap_or_default().channel()?;
    let served = served_channels(&s, &id).await?;
    // `revert` to a device serving one channel (every agent reads it), or whose
    // channels the controller does not know yet.
    let action = match pick_channel(&id, &served, named)? {
        Some(channel) if served.len() > 1 => Action::RevertChannel { channel },
        _ => Action::Revert,
    };
    let audit = caller.audit("device.revert", &id, None);
    let command = s.fleet.command(&id, action, Some(audit)).await?;
    Ok(Json(json!({"command": command})))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/remove", tag = "devices", params(("id" = String, Path, description = "device id")),
    request_body(content = ChannelBody, content_type = "application/json", description = "the channel to uninstall"),
    responses((status = 200, description = "the command id", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn remove_channel(
    State(s): State<AppState>,
    caller: Caller,
    DevicePath(id): DevicePath,
    body: JsonBody<ChannelBody>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Operator)?;
    let Some(channel) = body.optional()?.unwrap_or_default().channel()? else {
        return Err(ApiError::invalid(
            "channel: required (the channel to uninstall)",
        ));
    };
    let served = served_channels(&s, &id).await?;
    pick_channel(&id, &served, Some(channel.clone()))?;
    let audit = caller.audit("device.remove", &id, Some(json!({"channel": channel})));
    let action = edgefleet_shared::protocol::Action::Remove { channel };
    let command = s.fleet.command(&id, action, Some(audit)).await?;
    Ok(Json(json!({"command": command})))
}

/// Body of `POST /api/v1/devices/{id}/configure`: the settings to change.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
struct ConfigureBody {
    /// Telemetry period, s (1-86400).
    telemetry_interval_s: Option<u32>,
    /// Share of requests the shadow model runs on, per mille (0-1000).
    shadow_sample_permille: Option<u16>,
    /// Sample capture on (the device config's mode, or `drift`) or off.
    sample_capture: Option<bool>,
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/configure", tag = "devices", params(("id" = String, Path, description = "device id")),
    request_body(content = ConfigureBody, content_type = "application/json"),
    responses((status = 200, description = "the command id", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn configure_device(
    State(s): State<AppState>,
    caller: Caller,
    DevicePath(id): DevicePath,
    body: JsonBody<ConfigureBody>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Operator)?;
    let body = body.required()?;
    if body
        .telemetry_interval_s
        .is_some_and(|t| !(1..=86_400).contains(&t))
    {
        return Err(ApiError::invalid(
            "telemetry_interval_s: must be between 1 and 86400",
        ));
    }
    if body.shadow_sample_permille.is_some_and(|p| p > 1000) {
        return Err(ApiError::invalid(
            "shadow_sample_permille: must be between 0 and 1000",
        ));
    }
    if s.db().device(id.as_str()).await?.is_none() {
        return Err(ApiError::not_found(format!("no device {id}")));
    }
    let settings = edgefleet_shared::protocol::Settings {
        telemetry_interval_s: body.telemetry_interval_s,
        shadow_sample_permille: body.shadow_sample_permille,
        sample_capture: body.sample_capture,
    };
    let after = serde_json::to_value(&settings).unwrap_or_default();
    let audit = caller.audit("device.configure", &id, Some(json!({"settings": after})));
    let command = s
        .fleet
        .command(
            &id,
            edgefleet_shared::protocol::Action::Configure(settings),
            Some(audit),
        )
        .await?;
    Ok(Json(json!({"command": command})))
}

/// Body of `POST /api/v1/devices/{id}/samples`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
struct SamplesBody {
    /// Most samples to upload (default 1000, at most 100000).
    max_samples: Option<u32>,
    /// The channel whose samples to upload; may be left out when the device
    /// serves one.
    channel: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/samples", tag = "samples", params(("id" = String, Path, description = "device id")),
    request_body(content = SamplesBody, content_type = "application/json"),
    responses((status = 200, description = "the command id; the device uploads its captured samples of the model it serves", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "the device serves no model", body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn request_samples(
    State(s): State<AppState>,
    caller: Caller,
    DevicePath(id): DevicePath,
    body: JsonBody<SamplesBody>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Operator)?;
    let body = body.required()?;
    let max_samples = body.max_samples.unwrap_or(1000);
    if !(1..=100_000).contains(&max_samples) {
        return Err(ApiError::invalid(
            "max_samples: must be between 1 and 100000",
        ));
    }
    let device = s
        .db()
        .device(id.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    let served: Vec<String> = device.channels.iter().map(|c| c.channel.clone()).collect();
    let named = ChannelBody {
        channel: body.channel.clone(),
    }
    .channel()?;
    let Some(channel) = pick_channel(&id, &served, named)? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("{id} serves no model: no samples to ask for"),
        ));
    };
    let audit = caller.audit(
        "device.request_samples",
        &id,
        Some(json!({"max_samples": max_samples})),
    );
    let command = s
        .fleet
        .command(
            &id,
            edgefleet_shared::protocol::Action::RequestSamples {
                channel,
                max_samples,
            },
            Some(audit),
        )
        .await?;
    Ok(Json(json!({"command": command})))
}

/// Query of `GET /api/v1/samples`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct SamplesQuery {
    /// Only this device's samples.
    device: Option<String>,
    /// Only samples answered by this bundle (digest, hex).
    bundle: Option<String>,
    /// `json` (default: the stored samples), `csv` (one row per input row, inputs
    /// and outputs) or `npy` (the input rows as a float64 array).
    format: Option<String>,
    /// Most samples read (default 10000, at most 100000).
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/samples", tag = "samples", params(SamplesQuery),
    responses((status = 200, description = "the samples as JSON, CSV or NPY (header `x-edgefleet-skipped`: samples of another layout left out of CSV/NPY)", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn export_samples(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<SamplesQuery>,
) -> ApiResult<Response> {
    // Captured requests are user data: operators only.
    caller.require(Role::Operator)?;
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=100_000).contains(&limit) {
        return Err(ApiError::invalid("limit: must be between 1 and 100000"));
    }
    let rows = s
        .db()
        .samples(q.device.clone(), q.bundle.clone(), limit)
        .await?;
    let format = q.format.as_deref().unwrap_or("json");
    if format == "json" {
        return Ok(Json(json!({ "samples": rows })).into_response());
    }
    let t = crate::server::samples::table(&rows);
    let (content_type, body) = match format {
        "csv" => ("text/csv", crate::server::samples::to_csv(&t).into_bytes()),
        "npy" => (
            "application/octet-stream",
            crate::server::samples::inputs_to_npy(&t),
        ),
        other => {
            return Err(ApiError::invalid(format!(
                "format: `{other}` is not json, csv or npy"
            )));
        }
    };
    let skipped = t.skipped.to_string();
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (
                header::HeaderName::from_static("x-edgefleet-skipped"),
                skipped,
            ),
        ],
        body,
    )
        .into_response())
}

// ----- bundles ------------------------------------------------------------

#[utoipa::path(get, path = "/api/v1/bundles", tag = "bundles",
    responses((status = 200, description = "bundles", body = BundleList), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_bundles(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    Ok(Json(json!({"bundles": s.db().bundles().await?})))
}

fn parse_digest(text: &str) -> ApiResult<Digest> {
    text.parse()
        .map_err(|_| ApiError::invalid(format!("{text:?} is not a bundle digest (64 hex digits)")))
}

#[utoipa::path(get, path = "/api/v1/bundles/{digest}", tag = "bundles", params(("digest" = String, Path, description = "manifest digest, 64 hex digits")),
    responses((status = 200, body = BundleRow), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn show_bundle(
    State(s): State<AppState>,
    caller: Caller,
    DigestPath(digest): DigestPath,
) -> ApiResult<Json<BundleRow>> {
    caller.require(Role::Viewer)?;
    s.db()
        .bundle(&digest)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no bundle {digest}")))
}

#[utoipa::path(get, path = "/api/v1/bundles/{digest}/file", tag = "bundles", params(("digest" = String, Path, description = "manifest digest")),
    responses((status = 200, description = "the bundle file", content_type = "application/octet-stream", body = Vec<u8>), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn download_bundle(
    State(s): State<AppState>,
    caller: Caller,
    DigestPath(digest): DigestPath,
) -> ApiResult<Response> {
    caller.require(Role::Viewer)?;
    let hex = digest.to_hex();
    if s.db().bundle(&digest).await?.is_none() {
        return Err(ApiError::not_found(format!("no bundle {hex}")));
    }
    let file = tokio::fs::File::open(s.fleet.bundle_path(&digest))
        .await
        .map_err(|e| ApiError::not_found(format!("bundle file: {e}")))?;
    let stream = tokio_util_stream(file);
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A file as a stream of 256 KiB pieces.
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

#[utoipa::path(post, path = "/api/v1/bundles", tag = "bundles",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "a signed bundle file"),
    responses((status = 201, description = "stored", body = Object), (status = 200, description = "already stored", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, description = "refused, with the reason", body = ErrorBody), (status = 503, description = "no trust root", body = ErrorBody)),
    security(("bearer" = [])))]
async fn upload_bundle(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::Operator)?;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > s.max_bundle_bytes
    {
        return Err(too_large_bundle(Some(len), s.max_bundle_bytes));
    }
    let trust = upload_trust_root(&s).await?;
    let dir = s
        .fleet
        .bundle_path(&Digest::of(b""))
        .parent()
        .map(ToOwned::to_owned)
        .unwrap_or_default();
    let (tmp, total) = receive_upload(body, dir, s.max_bundle_bytes).await?;
    let path = tmp.path().to_owned();
    // A model bundle or an agent release, each checked against the role its
    // manifest's type needs (docs/agent-update.md).
    let verified =
        blocking(move || crate::ops::operator::verify_bundle(&path, &trust, UnixTime::now(), None))
            .await?
            .map_err(upload_refused)?;
    let row = bundle_row(&verified, total, &caller.name);
    let signed_by = row.summary["signed_by"].clone();
    // One upload at a time from here: the check for a stored copy, the file's
    // rename and the row are one step.
    static COMMIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _commit = COMMIT.lock().await;
    if let Some(existing) = s.db().bundle(&row.digest).await? {
        same_signatures(&existing, &row)?;
        return Ok((
            StatusCode::OK,
            Json(json!({"bundle": existing, "new": false})),
        ));
    }
    let dest = s.fleet.bundle_path(&verified.digest);
    blocking(move || tmp.persist(&dest).map_err(|e| e.error))
        .await?
        .map_err(|e| ApiError::internal("cannot store the upload", e))?;
    let audit = caller.audit(
        "bundle.upload",
        &row.digest.to_hex(),
        Some(json!({"channel": row.channel, "version": row.version, "release": row.release, "signed_by": signed_by})),
    );
    if !s.db().insert_bundle(&row, Some(audit)).await? {
        let existing = s.db().bundle(&row.digest).await?;
        return Ok((
            StatusCode::OK,
            Json(json!({"bundle": existing, "new": false})),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({"bundle": row, "new": true})),
    ))
}

/// 413 for a bundle of `len` bytes (when known) over `max`.
fn too_large_bundle(len: Option<u64>, max: u64) -> ApiError {
    let size = len.map(|n| format!("{n} bytes, ")).unwrap_or_default();
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("bundle is {size}over http.max_bundle_bytes {max}"),
    )
}

/// The trust root uploads are verified against (503 without one).
async fn upload_trust_root(s: &AppState) -> ApiResult<edgefleet_shared::TrustRoot> {
    let root = s.trust_root.clone();
    blocking(move || crate::ops::operator::load_trust_root(&root, UnixTime::now()))
        .await?
        .map_err(|e| {
            tracing::error!("cannot verify uploads: {e}");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_trust_root",
                format!(
                    "cannot verify uploads: the controller has no valid trust root ({}; its log names the file: copy the fleet's trust root there, or set trust_root)",
                    trust_problem(&e)
                ),
            )
        })
}

/// Streams an upload into a temp file in `dir` (at most `max` bytes), its
/// file I/O on the blocking pool; returns the file and its size.
async fn receive_upload(
    body: Body,
    dir: std::path::PathBuf,
    max: u64,
) -> ApiResult<(tempfile::NamedTempFile, u64)> {
    use futures_util::StreamExt;
    use std::io::Write;
    let store_err = |e: std::io::Error| ApiError::internal("cannot store the upload", e);
    let mut tmp = blocking(move || {
        std::fs::create_dir_all(&dir)?;
        tempfile::Builder::new()
            .prefix(".upload-")
            .tempfile_in(&dir)
    })
    .await?
    .map_err(store_err)?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| ApiError::invalid(format!("upload interrupted: {e}")))?;
        total += piece.len() as u64;
        if total > max {
            return Err(too_large_bundle(None, max));
        }
        tmp = blocking(move || tmp.write_all(&piece).map(|()| tmp))
            .await?
            .map_err(store_err)?;
    }
    Ok((tmp, total))
}

/// The registry row of a verified upload of `size` bytes by `who`.
fn bundle_row(
    verified: &edgefleet_shared::bundle::VerifiedHeader,
    size: u64,
    who: &str,
) -> BundleRow {
    let m = &verified.manifest;
    let mut summary = serde_json::to_value(m).unwrap_or_default();
    if let Some(p) = summary.get_mut("payload").and_then(Value::as_object_mut) {
        p.remove("chunks");
    }
    let signed_by: Vec<String> = verified.signed_by.iter().map(ToString::to_string).collect();
    summary["signed_by"] = json!(signed_by);
    BundleRow {
        digest: verified.digest,
        channel: m.channel.to_string(),
        version: m.version.clone(),
        release: m.release,
        size,
        chunks: m.payload.chunks.len() as u32,
        created_at: u64::try_from(m.created_at.0).unwrap_or(0),
        expires_at: u64::try_from(m.expires_at.0).unwrap_or(0),
        uploaded_at: now_ms(),
        uploaded_by: who.to_owned(),
        summary,
    }
}

/// A stored bundle is never replaced (devices may be fetching its chunks): an
/// upload of it with the same signatures is the same upload; with others, 409.
fn same_signatures(stored: &BundleRow, upload: &BundleRow) -> ApiResult<()> {
    let keys = |row: &BundleRow| -> Vec<String> {
        let mut keys: Vec<String> = row.summary["signed_by"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    };
    let (stored_keys, uploaded) = (keys(stored), keys(upload));
    if stored_keys == uploaded {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        format!(
            "bundle {} is stored signed by [{}]; this upload of it is signed by [{}]. A stored bundle is not replaced: build a new release to change its signatures",
            stored.digest,
            stored_keys.join(", "),
            uploaded.join(", ")
        ),
    ))
}

/// Runs `f` on the blocking pool (file I/O in a handler).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("a file task failed", e))
}

/// What is wrong with the trust root, without its path.
fn trust_problem(e: &crate::ops::operator::OperatorError) -> String {
    use crate::ops::operator::OperatorError;
    match e {
        OperatorError::Io { source, .. } => source.to_string(),
        OperatorError::Trust { source, .. } => source.to_string(),
        OperatorError::TooLarge { size, limit, .. } => {
            format!("{size} bytes, over the limit of {limit}")
        }
        _ => "unreadable".to_owned(),
    }
}

/// An upload that failed verification: 422 with the refusal's own code
/// (`bad_magic`, `signature_threshold`, `expired`, ...) and its reason, without
/// the path of the server's temp file.
fn upload_refused(e: crate::ops::operator::OperatorError) -> ApiError {
    use edgefleet_shared::bundle::BundleError;
    match e {
        crate::ops::operator::OperatorError::Bundle {
            source: BundleError::Refused(refusal),
            ..
        } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            refusal.code(),
            format!("bundle refused: {refusal}"),
        ),
        other => ApiError::internal("cannot read the stored upload", other),
    }
}

// ----- rollouts -------------------------------------------------------------

/// Body of `POST /api/v1/rollouts`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RolloutBody {
    /// Bundle digest.
    bundle: String,
    /// Which devices.
    selector: Selector,
    /// Cumulative wave sizes, e.g. ["1", "10%", "50%", "100%"].
    #[serde(default)]
    waves: Option<Vec<String>>,
    /// Gate bounds (absent fields take the defaults).
    #[serde(default)]
    gates: Option<Gates>,
    /// `pause` or `halt_and_revert`.
    #[serde(default)]
    policy: Option<FailurePolicy>,
    /// Install commands per minute.
    #[serde(default)]
    rate_per_minute: Option<u32>,
    /// The first this many waves run the bundle in shadow (beside the active
    /// model, gated on agreement) before activating it.
    #[serde(default)]
    shadow_waves: Option<u32>,
    /// A command the device has not answered is sent again after this many ms
    /// (default 60000, at least 1000): a device offline when asked gets it
    /// once it is back, until `gates.install_timeout_ms`.
    #[serde(default)]
    resend_after_ms: Option<u64>,
}

/// Which devices a rollout targets: devices matching all `tags`, plus `devices`
/// by id; `all: true` for the whole registry. `agent_version_below` keeps
/// only devices whose agent reported a version below it (a device that never
/// reported one is left out).
#[derive(Debug, Default, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
struct Selector {
    tags: Tags,
    devices: Vec<String>,
    all: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_version_below: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts",
    request_body(content = RolloutBody, content_type = "application/json"),
    responses((status = 201, description = "the rollout", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn start_rollout(
    State(s): State<AppState>,
    caller: Caller,
    body: JsonBody<RolloutBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::Operator)?;
    let body = body.required()?;
    let digest = parse_digest(&body.bundle).map_err(|_| {
        ApiError::invalid(format!(
            "bundle: {:?} is not a digest (64 hex digits)",
            body.bundle
        ))
    })?;
    let plan = rollout_plan(&body)?;
    let registry = s.db().devices().await?;
    let selected = select_devices(&body.selector, &registry)?;
    if let Some(bundle) = s.db().bundle(&digest).await?
        && bundle.is_agent_release()
    {
        check_agent_rollout(&bundle, &plan, &selected)?;
    }
    let targets: Vec<DeviceId> = selected.iter().map(|d| d.id.clone()).collect();
    let selector = serde_json::to_string(&body.selector).unwrap_or_default();
    let view = s
        .fleet
        .start_rollout(digest, targets, plan, selector, &caller.name)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"rollout": rollout_json(&view)})),
    ))
}

/// The plan a rollout request asks for: the defaults with what it names.
fn rollout_plan(body: &RolloutBody) -> ApiResult<Plan> {
    let mut plan = Plan::default();
    if let Some(w) = &body.waves {
        plan.waves = w
            .iter()
            .map(|x| WaveSize::parse(x))
            .collect::<Result<_, _>>()
            .map_err(|e| ApiError::invalid(format!("waves: {e}")))?;
    }
    if let Some(g) = body.gates.clone() {
        plan.gates = g;
    }
    if let Some(p) = body.policy {
        plan.policy = p;
    }
    if let Some(n) = body.shadow_waves {
        plan.shadow_waves = n;
    }
    if let Some(r) = body.rate_per_minute {
        plan.rate_per_minute = r;
    }
    if let Some(ms) = body.resend_after_ms {
        plan.resend_after_ms = ms;
    }
    plan.validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(plan)
}

/// The devices of `registry` that `sel` names.
fn select_devices<'r>(sel: &Selector, registry: &'r [DeviceRow]) -> ApiResult<Vec<&'r DeviceRow>> {
    if !sel.all && sel.tags.is_empty() && sel.devices.is_empty() {
        return Err(ApiError::invalid(
            "selector: name tags, devices, or set all: true",
        ));
    }
    for d in &sel.devices {
        if !registry.iter().any(|r| r.id.as_str() == d) {
            return Err(ApiError::invalid(format!(
                "selector.devices: no device {d}"
            )));
        }
    }
    let below = match &sel.agent_version_below {
        Some(v) => Some(semver::Version::parse(v).map_err(|e| {
            ApiError::invalid(format!(
                "selector.agent_version_below: {v:?} is not a version (X.Y.Z): {e}"
            ))
        })?),
        None => None,
    };
    Ok(registry
        .iter()
        .filter(|d| {
            sel.all
                || sel.devices.iter().any(|id| id == d.id.as_str())
                || (!sel.tags.is_empty() && sel.tags.iter().all(|(k, v)| d.tags.get(k) == Some(v)))
        })
        .filter(|d| below.as_ref().is_none_or(|b| agent_below(d, b)))
        .collect())
}

/// Whether `d`'s agent reported a version below `below`.
fn agent_below(d: &DeviceRow, below: &semver::Version) -> bool {
    d.agent_version
        .as_deref()
        .and_then(|v| semver::Version::parse(v).ok())
        .is_some_and(|v| v < *below)
}

/// What a rollout of an agent release must satisfy: no shadow stage (an agent
/// has none), and a binary in the release for every target's architecture.
fn check_agent_rollout(bundle: &BundleRow, plan: &Plan, targets: &[&DeviceRow]) -> ApiResult<()> {
    if plan.shadow_waves > 0 {
        return Err(ApiError::invalid(
            "shadow_waves: an agent release has no shadow stage",
        ));
    }
    let arches: Vec<&str> = bundle.summary["constraints"]["architectures"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let missing: Vec<String> = targets
        .iter()
        .filter(|d| d.arch.as_deref().is_none_or(|a| !arches.contains(&a)))
        .take(5)
        .map(|d| {
            format!(
                "{} ({})",
                d.id,
                d.arch.as_deref().unwrap_or("architecture unknown")
            )
        })
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::invalid(format!(
            "selector: no binary in this release ({}) for {}; narrow the selector (tags, agent_version_below)",
            arches.join(", "),
            missing.join(", ")
        )));
    }
    Ok(())
}

fn rollout_json(v: &crate::server::fleet::RolloutView) -> Value {
    let e = &v.state;
    let waves: Vec<Value> = (0..e.waves.len())
        .map(|w| json!({"devices": e.waves[w].len(), "counts": e.counts(Some(w))}))
        .collect();
    let members: BTreeMap<&DeviceId, Value> = e
        .members
        .iter()
        .map(|(d, m)| (d, serde_json::to_value(m).unwrap_or_default()))
        .collect();
    json!({
        "id": v.id,
        "bundle": v.bundle,
        "phase": e.phase.name(),
        "phase_detail": e.phase,
        "wave": e.wave + 1,
        "waves": waves,
        "counts": e.counts(None),
        "plan": e.plan,
        "members": members,
    })
}

#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts",
    responses((status = 200, description = "rollouts with waves, counts and members", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_rollouts(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let all = s.fleet.rollouts().await?;
    Ok(Json(
        json!({"rollouts": all.iter().map(rollout_json).collect::<Vec<_>>()}),
    ))
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts", params(("id" = String, Path, description = "rollout id")),
    responses((status = 200, description = "the rollout and its log", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn show_rollout(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let all = s.fleet.rollouts().await?;
    let v = all
        .iter()
        .find(|r| r.id == id)
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))?;
    let log: Vec<Value> = s
        .db()
        .rollout_log(&id)
        .await?
        .into_iter()
        .map(|(at, note)| json!({"at": at, "note": note}))
        .collect();
    let mut out = rollout_json(v);
    out["log"] = json!(log);
    Ok(Json(json!({"rollout": out})))
}

/// Body of abort.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
struct AbortBody {
    revert: bool,
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts",
    params(("id" = String, Path, description = "rollout id"), ("action" = String, Path, description = "pause, resume, promote or abort")),
    request_body(content = AbortBody, content_type = "application/json", description = "abort only"),
    responses((status = 200, description = "phase and wave after", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn operate_rollout(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
    body: JsonBody<AbortBody>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Operator)?;
    let body = body.optional()?;
    let input = match action.as_str() {
        "pause" => Input::Pause,
        "resume" => Input::Resume,
        "promote" => Input::Promote,
        "abort" => Input::Abort {
            revert: body.is_some_and(|b| b.revert),
        },
        other => {
            return Err(ApiError::not_found(format!(
                "no action {other:?}: pause, resume, abort or promote"
            )));
        }
    };
    let (_, after) = s.fleet.operate(&id, input, &caller.name, &action).await?;
    Ok(Json(
        json!({"phase": after.phase.name(), "wave": after.wave + 1}),
    ))
}

// ----- telemetry ------------------------------------------------------------

/// Query of `GET /api/v1/telemetry/summary`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct SummaryQuery {
    /// `version` (default: per bundle digest, over the whole fleet) or `wave`
    /// (per wave of `rollout`).
    group: Option<String>,
    /// The rollout, for `group=wave` (and to restrict `group=version` to its devices).
    rollout: Option<String>,
    /// Start of the range, ms since the epoch (default: an hour ago).
    from_ms: Option<u64>,
    /// End of the range (default: now).
    to_ms: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/telemetry/summary", tag = "telemetry", params(SummaryQuery),
    responses((status = 200, description = "groups with a TelemetrySummary each", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn telemetry_summary(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<SummaryQuery>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    let now = now_ms();
    let to = q.to_ms.unwrap_or(now);
    let from = q.from_ms.unwrap_or(to.saturating_sub(3_600_000));
    if from > to {
        return Err(ApiError::invalid("from_ms: must not be after to_ms"));
    }
    let rollout = match &q.rollout {
        Some(id) => Some(
            s.fleet
                .rollouts()
                .await?
                .into_iter()
                .find(|r| &r.id == id)
                .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))?,
        ),
        None => None,
    };
    let rows = s.db().latest_telemetry_between(from, to).await?;
    let in_rollout = |d: &str| {
        rollout
            .as_ref()
            .is_none_or(|r| r.state.members.contains_key(d))
    };
    let groups: Vec<Value> = match q.group.as_deref().unwrap_or("version") {
        "version" => {
            let mut by: BTreeMap<String, Vec<&crate::server::db::TelemetryRow>> = BTreeMap::new();
            for r in rows.iter().filter(|r| in_rollout(&r.device)) {
                by.entry(r.digest.map_or_else(|| "none".into(), |d| d.to_hex()))
                    .or_default()
                    .push(r);
            }
            by.into_iter()
                .map(|(digest, rs)| json!({"bundle": digest, "summary": crate::server::fleet::summarise(rs)}))
                .collect()
        }
        "wave" => {
            let r = rollout
                .as_ref()
                .ok_or_else(|| ApiError::invalid("rollout: group=wave needs a rollout"))?;
            r.state
                .waves
                .iter()
                .enumerate()
                .map(|(w, ids)| {
                    let rs = rows.iter().filter(|t| ids.contains(&t.device));
                    json!({"wave": w + 1, "devices": ids.len(), "summary": crate::server::fleet::summarise(rs)})
                })
                .collect()
        }
        other => {
            return Err(ApiError::invalid(format!(
                "group: {other:?} is not version or wave"
            )));
        }
    };
    Ok(Json(
        json!({"from_ms": from, "to_ms": to, "groups": groups}),
    ))
}

// ----- audit, tokens, metrics -------------------------------------------------

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    responses((status = 200, description = "latest 500 changes, newest first", body = AuditList), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody)),
    security(("bearer" = [])))]
async fn audit_log(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require(Role::Viewer)?;
    Ok(Json(json!({"audit": s.db().audit_log(500).await?})))
}

/// Body of `POST /api/v1/tokens`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    role: String,
}

/// A new random token: 32 bytes, hex.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)?;
    Ok(format!("eft_{}", hex::encode(b)))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens",
    request_body(content = TokenBody, content_type = "application/json"),
    responses((status = 201, description = "the token, shown once", body = Object), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "role too low", body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_token(
    State(s): State<AppState>,
    caller: Caller,
    body: JsonBody<TokenBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::Admin)?;
    let body = body.required()?;
    if Role::parse(&body.role).is_none() {
        return Err(ApiError::invalid(
            "role: expected viewer, operator or admin",
        ));
    }
    if body.name.is_empty()
        || body.name.len() > 64
        || !body
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError::invalid("name: 1-64 letters, digits, '-' or '_'"));
    }
    let token = new_token().map_err(|e| ApiError::internal("no randomness for a token", e))?;
    let audit = caller.audit("token.create", &body.name, Some(json!({"role": body.role})));
    s.db()
        .insert_token(
            &token_hash(&token),
            &body.name,
            &body.role,
            now_ms(),
            Some(audit),
        )
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("a token named {} exists", body.name),
            )
        })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": body.name, "role": body.role, "token": token})),
    ))
}

// ----- the OpenAPI document -------------------------------------------------------

/// Error body of every 4xx/5xx.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// `{"code": stable code, "message": what was wrong}`.
    pub error: ErrorDetail,
}

/// The error itself.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable code: unauthorized, forbidden, invalid, not_found, conflict, too_large,
    /// unsupported_media_type, method_not_allowed, bad_request, no_trust_root,
    /// internal, or a refused upload's refusal code (`bad_magic`, `expired`, ...).
    pub code: String,
    /// For people; names the field when a body fails validation.
    pub message: String,
}

/// `{"devices": [...], "total": N, "next": ID}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeviceList {
    /// Devices (sorted by id).
    pub devices: Vec<crate::server::db::DeviceRow>,
    /// Devices matching the filters, over every page.
    pub total: usize,
    /// With `limit`: the `after` of the next page; null on the last.
    pub next: Option<String>,
}

/// `{"bundles": [...]}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct BundleList {
    /// Bundles.
    pub bundles: Vec<BundleRow>,
}

/// `{"audit": [...]}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AuditList {
    /// Records, newest first.
    pub audit: Vec<crate::server::db::AuditRow>,
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "edgefleet controller API", description = "Devices, bundles, staged rollouts, telemetry, audit. See docs/controller.md."),
    paths(
        list_devices, device_detail, enroll, enroll_batch, revert_device, remove_channel, revoke_device, device_drift, fleet_drift,
        configure_device, request_samples, export_samples,
        list_bundles, upload_bundle, show_bundle, download_bundle,
        list_rollouts, start_rollout, show_rollout, operate_rollout,
        telemetry_summary, audit_log, create_token, metrics::metrics
    ),
    components(schemas(
        ErrorBody, ErrorDetail, DeviceList, BundleList, AuditList,
        crate::server::db::DeviceRow, BundleRow, crate::server::db::EventRow, crate::server::db::TelemetryRow, crate::server::db::AuditRow,
        crate::server::fleet::TelemetrySummary, RolloutBody, Selector, EnrollBody, EnrollBatchBody, EnrollItem, AbortBody, TokenBody,
        ConfigureBody, SamplesBody,
        Gates, FailurePolicy
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// The OpenAPI 3.1 document of this API, generated from the handlers' annotations
/// and the types they take and return (served at `/api/v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = <ApiDoc as utoipa::OpenApi>::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_action_means_the_named_channel_or_the_only_one() {
        let id = DeviceId::new("cam-1").expect("id");
        let c = |n: &str| edgefleet_shared::ModelChannel::new(n).expect("channel");
        let two = ["iris".to_owned(), "vision".to_owned()];
        let one = ["iris".to_owned()];
        assert_eq!(
            pick_channel(&id, &two, Some(c("vision"))).ok(),
            Some(Some(c("vision")))
        );
        assert_eq!(pick_channel(&id, &one, None).ok(), Some(Some(c("iris"))));
        assert_eq!(pick_channel(&id, &[], None).ok(), Some(None));
        let said = |r: ApiResult<Option<edgefleet_shared::ModelChannel>>| match r {
            Err(e) => format!("{} {}", e.status.as_u16(), e.message),
            Ok(c) => format!("{c:?}"),
        };
        assert_eq!(
            said(pick_channel(&id, &two, None)),
            "422 channel: cam-1 serves several (iris, vision): name one"
        );
        assert_eq!(
            said(pick_channel(&id, &one, Some(c("audio")))),
            "409 cam-1 does not serve `audio` (it serves iris)"
        );
        assert_eq!(
            said(pick_channel(&id, &[], Some(c("audio")))),
            "409 cam-1 serves no model, so not `audio`"
        );
    }
}
