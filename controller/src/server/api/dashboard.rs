//! The dashboard (docs/dashboard.md): server-rendered pages at `/` on the
//! API's port, over the same store, behind a session opened with an API
//! token. Every action is the API's own handler, called with the session's
//! caller, so it is authorised and audited exactly as through the API.

use std::collections::BTreeMap;

use axum::extract::{Form, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use edgefleet_shared::Digest;
use maud::Markup;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

mod chart;
mod pages;

use super::{
    AbortBody, ApiError, AppState, Caller, ChannelBody, ConfigureBody, DevicePath, JsonBody, Role,
    SamplesBody, token_hash,
};
use crate::server::fleet::now_ms;
use pages::{DeviceQuery, Viewer};

/// The session cookie's name.
pub const COOKIE: &str = "edgefleet_session";

/// How long a session lasts (12 h); logging out ends it sooner.
const SESSION_MS: u64 = 12 * 3_600_000;

/// Devices per page of the device list.
const PAGE: usize = 50;

/// The dashboard's routes (merged into the API's router).
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/", get(fleet_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/devices", get(devices_page))
        .route("/devices/{id}", get(device_page))
        .route("/devices/{id}/{action}", post(device_action))
        .route("/rollouts", get(rollouts_page))
        .route("/rollouts/{id}", get(rollout_page))
        .route("/rollouts/{id}/{action}", post(rollout_action))
        .route("/bundles", get(bundles_page))
        .route("/bundles/{digest}", get(bundle_page))
        .route("/audit", get(audit_page))
        .route(
            "/assets/dashboard.css",
            get(|| asset("text/css", pages::CSS)),
        )
        .route(
            "/assets/dashboard.js",
            get(|| asset("text/javascript", pages::JS)),
        )
}

async fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// A page as an HTML response that no cache keeps and no frame shows.
fn html(status: StatusCode, page: Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
            ),
        ],
        page.into_string(),
    )
        .into_response()
}

fn random_hex() -> Result<String, ApiError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| ApiError::internal("no randomness for a session", e))?;
    Ok(hex::encode(b))
}

/// The session id from the request's cookies.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A signed-in viewer: the session's caller and form token. A request
/// without a live session is sent to the login page (a GET) or refused
/// (anything else).
struct Session(Viewer);

impl Session {
    fn caller(&self) -> Caller {
        Caller {
            name: self.0.name.clone(),
            role: self.0.role,
        }
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Session, Response> {
        let now = now_ms();
        let found = match session_cookie(&parts.headers) {
            Some(id) => s
                .db()
                .session(&token_hash(id), now)
                .await
                .map_err(|e| failure(None, ApiError::from(e)))?,
            None => None,
        };
        let Some((name, role, csrf)) = found else {
            return Err(if parts.method == Method::GET {
                Redirect::to("/login").into_response()
            } else {
                html(
                    StatusCode::UNAUTHORIZED,
                    pages::error(None, 401, "log in first", "/login"),
                )
            });
        };
        let role = Role::parse(&role).ok_or_else(|| {
            html(
                StatusCode::UNAUTHORIZED,
                pages::error(None, 401, "this token has an unknown role", "/login"),
            )
        })?;
        Ok(Session(Viewer {
            name,
            role,
            csrf,
            now,
        }))
    }
}

/// An error as a page (the API's status and message).
fn failure(v: Option<&Viewer>, e: ApiError) -> Response {
    html(
        e.status,
        pages::error(v, e.status.as_u16(), &e.message, "/"),
    )
}

/// Refuses a form posted from another site: browsers say where a form came
/// from (`Origin`, `Sec-Fetch-Site`), and an action must come from a page of
/// this dashboard.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site.is_some_and(|s| s != "same-origin" && s != "none") {
        return Err(forged("the form came from another site"));
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let origin_host = origin.split_once("://").map(|(_, h)| h);
        if origin != "null" && origin_host != host {
            return Err(forged("the form came from another origin"));
        }
    }
    Ok(())
}

fn forged(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("refused: {why}"),
    )
}

/// Checks an action's form token against the session's.
fn check_csrf(v: &Viewer, headers: &HeaderMap, sent: &str) -> Result<(), ApiError> {
    same_origin(headers)?;
    let a = Sha256::digest(sent.as_bytes());
    let b = Sha256::digest(v.csrf.as_bytes());
    if sent.is_empty() || a != b {
        return Err(forged(
            "the form token is missing or stale; reload the page",
        ));
    }
    Ok(())
}

// ----- login ------------------------------------------------------------------

async fn login_page() -> Response {
    html(StatusCode::OK, pages::login(None))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

/// Opens a session for a known token: a random id in an `HttpOnly`,
/// `SameSite=Strict` cookie; the store keeps its hash, never the id.
async fn login(State(s): State<AppState>, headers: HeaderMap, form: Form<LoginForm>) -> Response {
    let refuse = |status: StatusCode, why: &str| html(status, pages::login(Some(why)));
    if let Err(e) = same_origin(&headers) {
        return refuse(StatusCode::FORBIDDEN, &e.message);
    }
    let token = form.token.trim();
    if token.is_empty() || token.len() > 256 {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, "enter an API token");
    }
    let hash = token_hash(token);
    match s.db().token(&hash).await {
        Ok(Some((name, _))) => match open_session(&s, &hash).await {
            Ok(cookie) => {
                tracing::info!(token = %name, "dashboard session opened");
                let mut r = Redirect::to("/").into_response();
                r.headers_mut().insert(header::SET_COOKIE, cookie);
                r
            }
            Err(e) => failure(None, e),
        },
        Ok(None) => refuse(StatusCode::UNAUTHORIZED, "unknown token"),
        Err(e) => failure(None, e.into()),
    }
}

async fn open_session(s: &AppState, token: &str) -> Result<HeaderValue, ApiError> {
    let (id, csrf) = (random_hex()?, random_hex()?);
    let now = now_ms();
    s.db()
        .open_session(&token_hash(&id), token, &csrf, now, now + SESSION_MS)
        .await?;
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_MS / 1000
    );
    HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal("session cookie", e))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ActionForm {
    csrf: String,
    revert: Option<String>,
    channel: Option<String>,
    max_samples: Option<String>,
    telemetry_interval_s: Option<String>,
}

async fn logout(
    State(s): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(e) = check_csrf(&session.0, &headers, &form.csrf) {
        return failure(Some(&session.0), e);
    }
    if let Some(id) = session_cookie(&headers)
        && let Err(e) = s.db().close_session(&token_hash(id)).await
    {
        return failure(Some(&session.0), e.into());
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "edgefleet_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

// ----- pages ------------------------------------------------------------------

async fn fleet_page(State(s): State<AppState>, Session(v): Session) -> Response {
    match fleet_view(&s, v.now).await {
        Ok(f) => html(StatusCode::OK, pages::fleet(&v, &f)),
        Err(e) => failure(Some(&v), e),
    }
}

/// How far back the fleet page and the device list look for drift.
const DRIFT_WINDOW_MS: u64 = 3_600_000;

async fn fleet_view(s: &AppState, now: u64) -> Result<pages::FleetView, ApiError> {
    let devices = s.db().devices().await?;
    let mut f = pages::FleetView {
        devices: devices.len(),
        online: devices.iter().filter(|d| d.online).count(),
        ..Default::default()
    };
    for d in &devices {
        let key = (
            d.active_channel.clone().unwrap_or_else(|| "(none)".into()),
            d.active_version.clone().unwrap_or_else(|| "–".into()),
            d.active_digest,
        );
        *f.versions.entry(key).or_default() += 1;
        let agent = d.agent_version.clone().unwrap_or_else(|| "unknown".into());
        *f.agents.entry(agent).or_default() += 1;
    }
    f.drifting = devices
        .iter()
        .filter_map(|d| drifting_now(d, now).map(|x| (d.id.to_string(), x.to_vec())))
        .collect();
    let bundles = super::bundles_by_digest(s).await?;
    f.drift_alerts = s
        .fleet
        .drift_alerting()
        .into_iter()
        .map(|d| {
            let name = bundles
                .get(&d)
                .map(|b| (b.channel.clone(), b.version.clone()));
            (d, name)
        })
        .collect();
    f.rollouts = s
        .fleet
        .rollouts()
        .await?
        .into_iter()
        .filter(|r| !r.state.phase.finished())
        .collect();
    f.failed_installs = s.db().events_of_kind("install_failed", 10).await?;
    f.revoked = s.db().revoked_devices().await?;
    Ok(f)
}

/// The drifted features of a device whose latest drift report, received in
/// the last hour, drifted (kept with the device: no telemetry search).
fn drifting_now(d: &crate::server::db::DeviceRow, now: u64) -> Option<&[String]> {
    d.drift
        .as_ref()
        .filter(|x| x.drifted && now.saturating_sub(x.received_at) <= DRIFT_WINDOW_MS)
        .map(|x| x.features.as_slice())
}

async fn devices_page(
    State(s): State<AppState>,
    Session(v): Session,
    Query(query): Query<DeviceQuery>,
) -> Response {
    match devices_view(&s, query, v.now).await {
        Ok(d) => html(StatusCode::OK, pages::devices(&v, &d)),
        Err(e) => failure(Some(&v), e),
    }
}

async fn devices_view(
    s: &AppState,
    mut q: DeviceQuery,
    now: u64,
) -> Result<pages::DevicesView, ApiError> {
    let tags = super::parse_tags(&q.tag)?;
    let all = s.db().devices().await?;
    let channels: Vec<String> = all
        .iter()
        .filter_map(|d| d.active_channel.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let needle = q.q.to_lowercase();
    let mut rows: Vec<_> = all
        .into_iter()
        .filter(|d| needle.is_empty() || d.id.as_str().to_lowercase().contains(&needle))
        .filter(|d| tags.iter().all(|(k, val)| d.tags.get(k) == Some(val)))
        .filter(|d| match q.state.as_str() {
            "online" => d.online,
            "offline" => !d.online,
            _ => true,
        })
        .filter(|d| q.channel.is_empty() || d.active_channel.as_deref() == Some(&q.channel))
        .filter(|d| q.version.is_empty() || d.active_version.as_deref() == Some(&q.version))
        .map(|d| {
            let drifted = drifting_now(&d, now).is_some();
            (d, drifted)
        })
        .filter(|(_, drifted)| q.drifted != "yes" || *drifted)
        .collect();
    if q.sort == "seen" {
        rows.sort_by_key(|r| std::cmp::Reverse(r.0.last_seen));
    }
    let matching = rows.len();
    let pages = matching.div_ceil(PAGE);
    q.page = q.page.clamp(1, pages.max(1));
    let rows = rows
        .into_iter()
        .skip((q.page - 1) * PAGE)
        .take(PAGE)
        .collect();
    Ok(pages::DevicesView {
        rows,
        matching,
        query: q,
        pages,
        channels,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Done {
    done: Option<String>,
}

async fn device_page(
    State(s): State<AppState>,
    Session(v): Session,
    DevicePath(id): DevicePath,
    Query(done): Query<Done>,
) -> Response {
    match device_view(&s, &id, v.now).await {
        Ok(mut d) => {
            d.flash = done.done.map(|m| m.chars().take(200).collect());
            html(StatusCode::OK, pages::device(&v, &d))
        }
        Err(e) => failure(Some(&v), e),
    }
}

async fn device_view(
    s: &AppState,
    id: &edgefleet_shared::DeviceId,
    now: u64,
) -> Result<pages::DeviceView, ApiError> {
    let device = s
        .db()
        .device(id.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    let hour_ago = now.saturating_sub(3_600_000);
    let state = s
        .db()
        .device_state_json(id)
        .await?
        .and_then(|j| serde_json::from_value(j).ok());
    Ok(pages::DeviceView {
        state,
        events: s.db().events(id, 30).await?,
        telemetry: s.db().telemetry(id, hour_ago, now, 360).await?,
        metrics: s.db().device_metrics(id, hour_ago, now, 360).await?,
        drift: s.db().drift_reports(id, hour_ago, now, 120).await?,
        samples: s.db().samples(Some(id.to_string()), None, 1000).await?,
        revoked: s
            .db()
            .revoked_devices()
            .await?
            .iter()
            .any(|r| r == id.as_str()),
        flash: None,
        device,
    })
}

/// `POST /devices/{id}/{revert|revoke|samples|configure}`: the API's
/// handler for it, as the session's caller.
async fn device_action(
    State(s): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path((raw, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let v = &session.0;
    let outcome = async {
        check_csrf(v, &headers, &form.csrf)?;
        let id = edgefleet_shared::DeviceId::new(&raw)
            .map_err(|e| ApiError::invalid(format!("device id: {e}")))?;
        let (st, caller, path) = (State(s.clone()), session.caller(), DevicePath(id.clone()));
        let done = match action.as_str() {
            "revert" => {
                let body = ChannelBody {
                    channel: form.channel.clone().filter(|c| !c.is_empty()),
                };
                super::revert_device(st, caller, path, JsonBody(Ok(Some(body))))
                    .await
                    .map(|_| "revert sent")?
            }
            "revoke" => super::revoke_device(st, caller, path)
                .await
                .map(|_| "certificate revoked")?,
            "samples" => {
                let body = SamplesBody {
                    max_samples: Some(number(form.max_samples.as_deref(), "max_samples")?),
                    channel: form.channel.clone().filter(|c| !c.is_empty()),
                };
                super::request_samples(st, caller, path, JsonBody(Ok(Some(body))))
                    .await
                    .map(|_| "samples requested")?
            }
            "configure" => {
                let body = ConfigureBody {
                    telemetry_interval_s: Some(number(
                        form.telemetry_interval_s.as_deref(),
                        "telemetry_interval_s",
                    )?),
                    ..ConfigureBody::default()
                };
                super::configure_device(st, caller, path, JsonBody(Ok(Some(body))))
                    .await
                    .map(|_| "configuration sent")?
            }
            other => return Err(ApiError::not_found(format!("no device action {other:?}"))),
        };
        Ok::<_, ApiError>(format!("/devices/{id}?done={}", done.replace(' ', "+")))
    }
    .await;
    match outcome {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(e) => failure(Some(v), e),
    }
}

/// A whole number from a form field, or an error naming the field.
fn number(text: Option<&str>, field: &str) -> Result<u32, ApiError> {
    text.unwrap_or("")
        .trim()
        .parse()
        .map_err(|_| ApiError::invalid(format!("{field}: a whole number is needed")))
}

async fn rollouts_page(State(s): State<AppState>, Session(v): Session) -> Response {
    let view = async {
        let all = s.fleet.rollouts().await?;
        let bundles = super::bundles_by_digest(&s).await?;
        Ok::<_, ApiError>((all, bundles))
    }
    .await;
    match view {
        Ok((all, bundles)) => html(StatusCode::OK, pages::rollouts(&v, &all, &bundles)),
        Err(e) => failure(Some(&v), e),
    }
}

async fn rollout_page(
    State(s): State<AppState>,
    Session(v): Session,
    Path(id): Path<String>,
    Query(done): Query<Done>,
) -> Response {
    match rollout_view(&s, &id, v.now).await {
        Ok(mut p) => {
            p.flash = done.done.map(|m| m.chars().take(200).collect());
            html(StatusCode::OK, pages::rollout(&v, &p))
        }
        Err(e) => failure(Some(&v), e),
    }
}

async fn rollout_view(s: &AppState, id: &str, now: u64) -> Result<pages::RolloutPage, ApiError> {
    let rollout = s
        .fleet
        .rollouts()
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))?;
    use crate::server::engine::Phase;
    let since = match &rollout.state.phase {
        Phase::Installing { since } | Phase::Soaking { since, .. } => *since,
        _ => now.saturating_sub(600_000),
    };
    let latest = s.db().latest_telemetry_between(since, now).await?;
    use crate::server::fleet::Subject;
    let subject = match s.db().bundle(&rollout.bundle).await? {
        Some(b) if b.is_agent_release() => Subject::Agent,
        _ => Subject::Model(rollout.bundle),
    };
    let health = crate::server::fleet::current_wave_health(&rollout.state, subject, &latest);
    let waves = rollout
        .state
        .waves
        .iter()
        .map(|ids| {
            crate::server::fleet::summarise(latest.iter().filter(|t| ids.contains(&t.device)))
        })
        .collect();
    Ok(pages::RolloutPage {
        log: s.db().rollout_log(id).await?,
        bundles: super::bundles_by_digest(s).await?,
        waves,
        health,
        flash: None,
        rollout,
    })
}

/// `POST /rollouts/{id}/{pause|resume|promote|abort}`: the API's handler.
async fn rollout_action(
    State(s): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let v = &session.0;
    let outcome = async {
        check_csrf(v, &headers, &form.csrf)?;
        let body = (action == "abort").then(|| AbortBody {
            revert: form.revert.as_deref() == Some("yes"),
        });
        let answer = super::operate_rollout(
            State(s.clone()),
            session.caller(),
            Path((id.clone(), action.clone())),
            JsonBody(Ok(body)),
        )
        .await?;
        let phase = answer.0["phase"].as_str().unwrap_or("").to_owned();
        Ok::<_, ApiError>(format!("/rollouts/{id}?done={action}+done:+now+{phase}"))
    }
    .await;
    match outcome {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(e) => failure(Some(v), e),
    }
}

async fn bundles_page(State(s): State<AppState>, Session(v): Session) -> Response {
    let view = async {
        let all = s.db().bundles().await?;
        Ok::<_, ApiError>((all, running(&s).await?))
    }
    .await;
    match view {
        Ok((all, running)) => html(StatusCode::OK, pages::bundles(&v, &all, &running)),
        Err(e) => failure(Some(&v), e),
    }
}

/// Devices serving each bundle.
async fn running(s: &AppState) -> Result<BTreeMap<Digest, usize>, ApiError> {
    let mut out = BTreeMap::new();
    for d in s.db().devices().await? {
        if let Some(digest) = d.active_digest {
            *out.entry(digest).or_default() += 1;
        }
    }
    Ok(out)
}

async fn bundle_page(
    State(s): State<AppState>,
    Session(v): Session,
    Path(raw): Path<String>,
) -> Response {
    let view = async {
        let digest = super::parse_digest(&raw)?;
        let b = super::bundles_by_digest(&s)
            .await?
            .remove(&digest)
            .ok_or_else(|| ApiError::not_found(format!("no bundle {raw}")))?;
        let n = running(&s).await?.get(&digest).copied().unwrap_or(0);
        Ok::<_, ApiError>((b, n))
    }
    .await;
    match view {
        Ok((b, n)) => html(StatusCode::OK, pages::bundle(&v, &b, n)),
        Err(e) => failure(Some(&v), e),
    }
}

async fn audit_page(State(s): State<AppState>, Session(v): Session) -> Response {
    match s.db().audit_log(200).await {
        Ok(rows) => html(StatusCode::OK, pages::audit(&v, &rows)),
        Err(e) => failure(Some(&v), e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_id_is_read_from_its_cookie_only_when_well_formed() {
        let id = "ab".repeat(32);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {COOKIE}={id}")).expect("header"),
        );
        assert_eq!(session_cookie(&h), Some(id.as_str()));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("edgefleet_session=../../etc"),
        );
        assert_eq!(session_cookie(&h), None);
        assert_eq!(session_cookie(&HeaderMap::new()), None);
    }

    #[test]
    fn forms_from_another_site_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(same_origin(&h).is_err());
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&h).is_err());
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h).is_ok());
    }

    #[test]
    fn an_action_needs_the_sessions_form_token() {
        let v = Viewer {
            name: "ops".into(),
            role: Role::Operator,
            csrf: "c".repeat(64),
            now: 0,
        };
        let h = HeaderMap::new();
        assert!(check_csrf(&v, &h, &"c".repeat(64)).is_ok());
        assert!(check_csrf(&v, &h, "").is_err());
        assert!(check_csrf(&v, &h, &"d".repeat(64)).is_err());
    }
}
