//! The API on its router, without a socket: authentication and roles, JSON
//! errors with stable codes that name the field, uploads refused with the reason.
//! The store is a real SQLite file; the broker is absent (the fleet keeps trying
//! to connect in the background, which these requests do not need).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use edgefleet::server::api::{self, AppState};
use edgefleet::server::ca::Ca;
use edgefleet::server::db::Db;
use edgefleet::server::fleet::{BrokerLink, Fleet, FleetOptions, Replica};
use edgefleet_shared::protocol::Topics;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Api {
    router: axum::Router,
    db: Db,
    gate: edgefleet::server::gate::Identities,
    _dir: tempfile::TempDir,
}

const ADMIN: &str = "admin-secret";

async fn api() -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(&dir.path().join("c.db")).await.expect("db");
    db.insert_token(&api::token_hash(ADMIN), "admin", "admin", 1, None)
        .await
        .expect("token");
    // A port nothing listens on: the fleet's broker link just retries.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let ca = Arc::new(Ca::open_or_create(&dir.path().join("ca")).expect("ca"));
    let fleet = Fleet::start(
        db.clone(),
        Topics::default(),
        BrokerLink {
            endpoints: vec![edgefleet_agent::link::Endpoint {
                host: "127.0.0.1".into(),
                port,
                tls: false,
            }],
            tls: None,
            command_key: ca.command_key().expect("command key"),
            subscribe_qos: rumqttc::QoS::AtLeastOnce,
        },
        FleetOptions {
            bundles_dir: dir.path().join("bundles"),
            tick: Duration::from_secs(1),
            coalesce: Duration::from_millis(10),
            telemetry: (100, Duration::from_millis(50)),
            replica: Replica::default(),
        },
    )
    .await
    .expect("fleet");
    let gate: edgefleet::server::gate::Identities = Default::default();
    let router = api::router(AppState {
        fleet,
        ca,
        trust_root: dir.path().join("trust-root.cbor"),
        max_bundle_bytes: 1 << 20,
        broker_url: "mqtts://localhost:8883".into(),
        topic_prefix: "edgefleet/v1".into(),
        subscribe_qos: 1,
        gate: Some(gate.clone()),
        gate_stats: Default::default(),
    });
    Api {
        router,
        db,
        gate,
        _dir: dir,
    }
}

impl Api {
    /// A new API token with `role`, made by the admin.
    async fn new_token(&self, name: &str, role: &str) -> String {
        let (s, v) = self
            .json(
                "POST",
                "/api/v1/tokens",
                Some(ADMIN),
                json!({"name": name, "role": role}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().expect("token").to_string()
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Body,
    ) -> (StatusCode, Value) {
        self.call_as(method, path, token, Some("application/json"), body)
            .await
    }

    /// With this Content-Type (or none).
    async fn call_as(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Body,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(c) = content_type {
            req = req.header("Content-Type", c);
        }
        let req = req.body(body).expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("answer");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn json(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        self.call(method, path, token, Body::from(body.to_string()))
            .await
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn every_route_but_health_and_metrics_needs_a_known_token() {
    let a = api().await;
    let (s, _) = a.call("GET", "/api/v1/health", None, Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    for path in [
        "/api/v1/devices",
        "/api/v1/bundles",
        "/api/v1/rollouts",
        "/api/v1/audit",
    ] {
        let (s, v) = a.call("GET", path, None, Body::empty()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(code(&v), "unauthorized");
        let (s, v) = a.call("GET", path, Some("wrong"), Body::empty()).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
        assert_eq!(message(&v), "unknown token");
        let (s, _) = a.call("GET", path, Some(ADMIN), Body::empty()).await;
        assert_eq!(s, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn roles_limit_what_a_token_may_change_and_changes_are_audited() {
    let a = api().await;
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/tokens",
            Some(ADMIN),
            json!({"name": "dash", "role": "viewer"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let viewer = v["token"].as_str().expect("token").to_string();
    assert!(viewer.starts_with("eft_"));
    // The store keeps only the hash.
    assert_eq!(
        a.db.token(&api::token_hash(&viewer)).await.expect("db"),
        Some(("dash".into(), "viewer".into()))
    );
    let (s, _) = a
        .call("GET", "/api/v1/devices", Some(&viewer), Body::empty())
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = a
        .json("POST", "/api/v1/rollouts", Some(&viewer), json!({}))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    assert!(message(&v).contains("operator"), "{v}");
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/tokens",
            Some(&viewer),
            json!({"name": "x", "role": "admin"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    // Names are unique; roles are checked.
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/tokens",
            Some(ADMIN),
            json!({"name": "dash", "role": "viewer"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "conflict"));
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/tokens",
            Some(ADMIN),
            json!({"name": "ops", "role": "root"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message(&v).starts_with("role"), "{v}");
    let (_, v) = a
        .call("GET", "/api/v1/audit", Some(ADMIN), Body::empty())
        .await;
    let audit = v["audit"].as_array().expect("audit");
    assert_eq!(audit.len(), 1, "one change so far: {v}");
    assert_eq!(audit[0]["action"], "token.create");
    assert_eq!(audit[0]["actor"], "admin");
    assert_eq!(audit[0]["after"]["role"], "viewer");
}

#[tokio::test]
async fn a_json_body_is_never_ignored_and_every_error_has_the_apis_format() {
    let a = api().await;
    // Enrollment with tags but no Content-Type: refused (was: enrolled without
    // the tags), and nothing enrolled.
    let tags = r#"{"tags": {"site": "lab"}}"#;
    for content_type in [None, Some("text/plain")] {
        let (s, v) = a
            .call_as(
                "POST",
                "/api/v1/devices/pi-09/enroll",
                Some(ADMIN),
                content_type,
                Body::from(tags),
            )
            .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            "{content_type:?}: {v}"
        );
    }
    let (_, v) = a
        .call("GET", "/api/v1/devices/pi-09", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(code(&v), "not_found", "{v}");
    // An abort with {"revert": true} and no Content-Type: refused, not an abort
    // without revert (the rollout does not exist: the body is judged first).
    let (s, v) = a
        .call_as(
            "POST",
            "/api/v1/rollouts/r-1/abort",
            Some(ADMIN),
            None,
            Body::from(r#"{"revert": true}"#),
        )
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    // No body at all is fine where the body is optional, with the right type.
    let (s, v) = a
        .call_as(
            "POST",
            "/api/v1/devices/pi-10/enroll",
            Some(ADMIN),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = a
        .call_as(
            "POST",
            "/api/v1/devices/pi-11/enroll",
            Some(ADMIN),
            Some("application/json; charset=utf-8"),
            Body::from(tags),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // A required body missing, malformed JSON, an over-size body: JSON errors.
    let (s, v) = a
        .call("POST", "/api/v1/tokens", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        "{v}"
    );
    let (s, v) = a
        .call(
            "POST",
            "/api/v1/rollouts",
            Some(ADMIN),
            Body::from("{\"bundle\":"),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        "{v}"
    );
    let big = format!(r#"{{"tags": {{"k": "{}"}}}}"#, "x".repeat(300 * 1024));
    let (s, v) = a
        .call(
            "POST",
            "/api/v1/devices/pi-12/enroll",
            Some(ADMIN),
            Body::from(big),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        "{v}"
    );
    // axum's own answers: an unknown route, a wrong method, a bad query.
    for (method, path, status) in [
        ("GET", "/api/v1/nothing-here", StatusCode::NOT_FOUND),
        ("DELETE", "/api/v1/devices", StatusCode::METHOD_NOT_ALLOWED),
        (
            "GET",
            "/api/v1/devices?seen_within_s=many",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, v) = a.call(method, path, Some(ADMIN), Body::empty()).await;
        assert_eq!(s, status, "{method} {path}: {v}");
        assert!(
            !code(&v).is_empty() && !message(&v).is_empty(),
            "{method} {path}: {v}"
        );
    }
}

#[tokio::test]
async fn bad_rollout_bodies_get_a_4xx_naming_the_field() {
    let a = api().await;
    let digest = "ab".repeat(32);
    for (body, field) in [
        (
            json!({"bundle": "xyz", "selector": {"all": true}}),
            "bundle",
        ),
        (json!({"bundle": digest, "selector": {}}), "selector"),
        (
            json!({"bundle": digest, "selector": {"all": true}, "waves": ["0"]}),
            "waves",
        ),
        (
            json!({"bundle": digest, "selector": {"all": true}, "waves": ["150%"]}),
            "waves",
        ),
        (
            json!({"bundle": digest, "selector": {"all": true}, "gates": {"min_success_ratio": 2.0}}),
            "gates.min_success_ratio",
        ),
        (
            json!({"bundle": digest, "selector": {"all": true}, "rate_per_minute": 0}),
            "rate_per_minute",
        ),
        (
            json!({"bundle": digest, "selector": {"devices": ["ghost"]}}),
            "selector.devices",
        ),
        (
            json!({"bundle": digest, "selector": {"all": true}, "colour": 1}),
            "colour",
        ),
        (
            json!({"bundle": digest, "selector": {"all": true}, "policy": "explode"}),
            "policy",
        ),
    ] {
        let (s, v) = a
            .json("POST", "/api/v1/rollouts", Some(ADMIN), body.clone())
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(code(&v), "invalid");
        assert!(message(&v).contains(field), "{body}: {}", message(&v));
    }
    // A valid body for a bundle the controller does not hold: 404 that says so.
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/rollouts",
            Some(ADMIN),
            json!({"bundle": digest, "selector": {"all": true}}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"), "{v}");
    assert!(message(&v).contains("upload it first"), "{v}");
    // Unknown devices, on each route that looks one up.
    for (method, path, body) in [
        ("GET", "/api/v1/devices/pi-99", None),
        ("GET", "/api/v1/devices/pi-99/drift", None),
        (
            "POST",
            "/api/v1/devices/pi-99/configure",
            Some(json!({"telemetry_interval_s": 30})),
        ),
        ("POST", "/api/v1/devices/pi-99/samples", Some(json!({}))),
    ] {
        let (s, v) = match body {
            Some(body) => a.json(method, path, Some(ADMIN), body).await,
            None => a.call(method, path, Some(ADMIN), Body::empty()).await,
        };
        assert_eq!(
            (s, code(&v)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}: {v}"
        );
        assert!(message(&v).contains("no device pi-99"), "{path}: {v}");
    }
    // Unknown rollouts and actions.
    let (s, _) = a
        .call("GET", "/api/v1/rollouts/nope", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/rollouts/nope/explode",
            Some(ADMIN),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        message(&v).contains("pause, resume, abort or promote"),
        "{v}"
    );
}

#[tokio::test]
async fn uploads_are_verified_and_refused_with_the_reason() {
    let a = api().await;
    // No trust root configured: the controller cannot check, so it refuses.
    let (s, v) = a
        .call(
            "POST",
            "/api/v1/bundles",
            Some(ADMIN),
            Body::from(vec![1u8; 100]),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "no_trust_root"),
        "{v}"
    );
    // With a trust root: garbage is refused with the reason, and so is too much.
    let key = edgefleet_shared::SecretKey::from_seed([9; 32]);
    let mut root = edgefleet_shared::TrustRoot::new(
        1,
        edgefleet_shared::UnixTime::now().plus_days(30),
        1,
        vec![key.public()],
    )
    .to_unsigned();
    root.sign(&key);
    std::fs::write(a._dir.path().join("trust-root.cbor"), root.to_bytes()).expect("root");
    let (s, v) = a
        .call(
            "POST",
            "/api/v1/bundles",
            Some(ADMIN),
            Body::from(vec![1u8; 100]),
        )
        .await;
    // The refusal's own code, and no server path in the message.
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "bad_magic"),
        "{v}"
    );
    assert!(message(&v).starts_with("bundle refused: "), "{v}");
    assert!(
        !message(&v).contains('/') && !message(&v).contains(".upload-"),
        "{v}"
    );
    let (s, v) = a
        .call(
            "POST",
            "/api/v1/bundles",
            Some(ADMIN),
            Body::from(vec![0u8; (1 << 20) + 1]),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        "{v}"
    );
    let (_, v) = a
        .call("GET", "/api/v1/bundles", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(v["bundles"], json!([]), "nothing stored");
    let leftovers = std::fs::read_dir(a._dir.path().join("bundles"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "refused uploads leave no file behind");
    // Enrollment validates the id and the tags.
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/devices/..%2Fetc/enroll",
            Some(ADMIN),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(message(&v).contains("device id"), "{v}");
    // Every device route checks the id in its path before it does anything
    // (after the token), and every bundle route the digest.
    for (method, path) in [
        ("GET", "/api/v1/devices/a%20b"),
        ("GET", "/api/v1/devices/a%20b/drift"),
        ("POST", "/api/v1/devices/..%2Fetc/revert"),
        ("POST", "/api/v1/devices/..%2Fetc/revoke"),
        ("POST", "/api/v1/devices/..%2Fetc/configure"),
        ("POST", "/api/v1/devices/..%2Fetc/samples"),
    ] {
        let (s, v) = a.json(method, path, Some(ADMIN), json!({})).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{method} {path}: {v}");
        assert!(message(&v).contains("device id"), "{method} {path}: {v}");
        let (s, _) = a.json(method, path, None, json!({})).await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a token"
        );
    }
    for path in ["/api/v1/bundles/abc", "/api/v1/bundles/abc/file"] {
        let (s, v) = a.json("GET", path, Some(ADMIN), json!({})).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {v}");
        assert!(message(&v).contains("not a bundle digest"), "{path}: {v}");
    }
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/devices/pi-01/enroll",
            Some(ADMIN),
            json!({"tags": {"a=b": "c"}}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(message(&v).contains("tags"), "{v}");
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/devices/pi-01/enroll",
            Some(ADMIN),
            json!({"tags": {"site": "north"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["cert_pem"]
            .as_str()
            .is_some_and(|c| c.contains("BEGIN CERTIFICATE"))
    );
    assert!(
        v["key_pem"]
            .as_str()
            .is_some_and(|c| c.contains("PRIVATE KEY"))
    );
    let (_, v) = a
        .call(
            "GET",
            "/api/v1/devices?tag=site=north",
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(v["devices"][0]["id"], "pi-01");
    let (s, v) = a
        .call(
            "GET",
            "/api/v1/devices?state=sideways",
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message(&v).contains("state"), "{v}");
}

#[tokio::test]
async fn the_openapi_document_is_generated_and_lists_every_route() {
    let a = api().await;
    let (s, doc) = a
        .call("GET", "/api/v1/openapi.json", None, Body::empty())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/api/v1/devices", "get"),
        ("/api/v1/devices/{id}", "get"),
        ("/api/v1/devices/{id}/enroll", "post"),
        ("/api/v1/enrollments", "post"),
        ("/api/v1/devices/{id}/revert", "post"),
        ("/api/v1/devices/{id}/revoke", "post"),
        ("/api/v1/bundles", "get"),
        ("/api/v1/bundles", "post"),
        ("/api/v1/bundles/{digest}", "get"),
        ("/api/v1/bundles/{digest}/file", "get"),
        ("/api/v1/rollouts", "get"),
        ("/api/v1/rollouts", "post"),
        ("/api/v1/rollouts/{id}", "get"),
        ("/api/v1/rollouts/{id}/{action}", "post"),
        ("/api/v1/telemetry/summary", "get"),
        ("/api/v1/audit", "get"),
        ("/api/v1/tokens", "post"),
        ("/metrics", "get"),
    ] {
        let op = &paths.get(path).unwrap_or_else(|| panic!("{path} missing"))[method];
        assert!(op.is_object(), "{method} {path} missing");
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
    }
    // Every documented path answers on the router (not 404 for a missing route).
    for path in paths.keys() {
        let concrete = path
            .replace("{id}", "x")
            .replace("{digest}", &"ab".repeat(32))
            .replace("{action}", "pause");
        let (s, v) = a.call("GET", &concrete, Some(ADMIN), Body::empty()).await;
        assert!(
            s != StatusCode::NOT_FOUND || code(&v) == "not_found",
            "{path}: the router has no such route ({s})"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "RolloutBody",
        "Gates",
        "DeviceRow",
        "BundleRow",
        "ErrorBody",
        "TelemetrySummary",
    ] {
        assert!(schemas.contains_key(name), "{name} missing");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // Field docs come from the code: the gate's doc comment is the description.
    assert!(
        schemas["Gates"]["properties"]["max_failure_ratio"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("failure")),
        "{}",
        schemas["Gates"]
    );
}

#[tokio::test]
async fn enrollment_admits_a_certificate_to_the_gate_and_revocation_removes_it() {
    let a = api().await;
    let device = edgefleet::server::gate::Identity::Device("pi-07".into());
    let admitted = |a: &Api| {
        a.gate
            .read()
            .map(|m| m.values().filter(|w| **w == device).count())
            .unwrap_or(0)
    };
    let (s, first) = a
        .json(
            "POST",
            "/api/v1/devices/pi-07/enroll",
            Some(ADMIN),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(admitted(&a), 1);
    // QoS 1 subscriptions unless `[mqtt] subscribe_qos` says otherwise.
    assert_eq!(first["subscribe_qos"], 1, "{first}");
    // Re-enrolling replaces the certificate: still one admitted, a different one.
    let (_, second) = a
        .json(
            "POST",
            "/api/v1/devices/pi-07/enroll",
            Some(ADMIN),
            json!({}),
        )
        .await;
    assert_ne!(first["cert_pem"], second["cert_pem"]);
    assert_eq!(admitted(&a), 1);
    let fp = api::cert_fingerprint(second["cert_pem"].as_str().expect("pem"));
    assert!(a.gate.read().map(|m| m.contains_key(&fp)).unwrap_or(false));
    // Operators cannot revoke; admins can, once.
    let ops = a.new_token("ops", "operator").await;
    let (s, _) = a
        .json(
            "POST",
            "/api/v1/devices/pi-07/revoke",
            Some(&ops),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = a
        .json(
            "POST",
            "/api/v1/devices/pi-07/revoke",
            Some(ADMIN),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(admitted(&a), 0);
    assert!(a.db.enrolled_fingerprints().await.expect("db").is_empty());
    let (s, _) = a
        .json(
            "POST",
            "/api/v1/devices/pi-07/revoke",
            Some(ADMIN),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, v) = a
        .call("GET", "/api/v1/audit", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(v["audit"][0]["action"], "device.revoke");
}

#[tokio::test]
async fn batch_enrollment_issues_every_certificate_in_one_call_or_refuses_the_whole_batch() {
    let a = api().await;
    let refused = [
        (json!({"devices": []}), "1 to 1000"),
        (
            json!({"devices": (0..1001).map(|i| json!({"id": format!("d-{i}")})).collect::<Vec<_>>()}),
            "got 1001",
        ),
        (
            json!({"devices": [{"id": "ok-1"}, {"id": "../etc"}]}),
            "devices[1].id",
        ),
        (
            json!({"devices": [{"id": "ok-1"}, {"id": "ok-1"}]}),
            "appears twice",
        ),
        (
            json!({"devices": [{"id": "ok-1", "tags": {"": "x"}}]}),
            "devices[0].tags",
        ),
        (
            json!({"devices": [{"id": "ok-1", "role": "admin"}]}),
            "role",
        ),
    ];
    for (body, says) in refused {
        let (s, v) = a
            .json("POST", "/api/v1/enrollments", Some(ADMIN), body)
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(v.to_string().contains(says), "{says}: {v}");
    }
    assert!(a.db.enrolled_fingerprints().await.expect("db").is_empty());
    assert!(a.gate.read().map(|m| m.is_empty()).unwrap_or(false));

    let body = json!({"devices": (0..300).map(|i| json!({"id": format!("cam-{i:03}"), "tags": {"site": "north"}})).collect::<Vec<_>>()});
    let (s, v) = a
        .json("POST", "/api/v1/enrollments", Some(ADMIN), body)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let devices = v["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 300);
    assert!(
        v["ca_pem"]
            .as_str()
            .is_some_and(|p| p.contains("CERTIFICATE"))
    );
    assert!(v["controller_key_pem"].is_string() && v["broker_url"].is_string());
    let fingerprints: std::collections::HashSet<String> = devices
        .iter()
        .map(|d| api::cert_fingerprint(d["cert_pem"].as_str().expect("pem")))
        .collect();
    assert_eq!(fingerprints.len(), 300, "a certificate of its own each");
    assert_eq!(devices[7]["device"], "cam-007");
    assert!(
        devices[7]["key_pem"]
            .as_str()
            .is_some_and(|k| k.contains("PRIVATE KEY"))
    );
    // Every one admitted at the gate and stored with its tags and an audit record.
    let admitted = a.gate.read().map(|m| m.len()).unwrap_or(0);
    assert_eq!(admitted, 300);
    let (_, list) = a
        .call(
            "GET",
            "/api/v1/devices?tag=site=north",
            Some(ADMIN),
            Body::empty(),
        )
        .await;
    assert_eq!(
        list["devices"].as_array().map(Vec::len),
        Some(300),
        "{list}"
    );
    assert_eq!(
        (list["total"].as_u64(), &list["next"]),
        (Some(300), &Value::Null)
    );
    // Paged: 100 at a time, each page after the last id of the previous one.
    let mut after = String::new();
    let mut seen = Vec::new();
    for page in 0..3 {
        let q = if after.is_empty() {
            String::new()
        } else {
            format!("&after={after}")
        };
        let (s, v) = a
            .call(
                "GET",
                &format!("/api/v1/devices?tag=site=north&limit=100{q}"),
                Some(ADMIN),
                Body::empty(),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["total"], 300);
        let ids: Vec<String> = v["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| d["id"].as_str().expect("id").to_owned())
            .collect();
        assert_eq!(ids.len(), 100);
        if page < 2 {
            assert_eq!(v["next"].as_str(), ids.last().map(String::as_str));
            after = v["next"].as_str().expect("next").to_owned();
        } else {
            assert_eq!(v["next"], Value::Null, "the last page");
        }
        seen.extend(ids);
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen.len(), 300);
    assert_eq!(sorted, seen, "every device once, in order");
    for (bad, status) in [
        ("limit=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=10001", StatusCode::UNPROCESSABLE_ENTITY),
        // Not a number: the query does not parse (the API's 400 for any such query).
        ("limit=x", StatusCode::BAD_REQUEST),
    ] {
        let (s, _) = a
            .call(
                "GET",
                &format!("/api/v1/devices?{bad}"),
                Some(ADMIN),
                Body::empty(),
            )
            .await;
        assert_eq!(s, status, "{bad}");
    }
    let (_, log) = a
        .call("GET", "/api/v1/audit", Some(ADMIN), Body::empty())
        .await;
    let enrolls = log["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .filter(|e| e["action"] == "device.enroll")
        .count();
    assert_eq!(enrolls, 300);
    // Operators cannot enroll.
    let ops = a.new_token("ops", "operator").await;
    let (s, _) = a
        .json(
            "POST",
            "/api/v1/enrollments",
            Some(&ops),
            json!({"devices": [{"id": "x-1"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// Runs the operator CLI in `dir`; panics with its output when it fails.
fn cli(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgefleet"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("edgefleet runs");
    assert!(
        out.status.success(),
        "edgefleet {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_stored_bundle_is_not_replaced_by_an_upload_signed_otherwise() {
    let a = api().await;
    let d = a._dir.path();
    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");
    for name in ["alice", "bob"] {
        cli(d, &["keys", "generate", "--out", "keys", "--name", name]);
    }
    // Either key is enough (1 of 2): both copies below verify.
    cli(
        d,
        &[
            "trust",
            "init",
            "--key",
            "keys/alice.key",
            "--key",
            "keys/bob.key",
            "--threshold",
            "1",
            "--out",
            "trust-root.cbor",
        ],
    );
    cli(
        d,
        &[
            "bundle",
            "build",
            "--model",
            &format!("{models}/iris_logreg.onnx"),
            "--channel",
            "iris",
            "--version",
            "1.0.0",
            "--release",
            "1",
            "--golden",
            &format!("{models}/iris_golden.json"),
            "--out",
            "alice.efb",
        ],
    );
    std::fs::copy(d.join("alice.efb"), d.join("bob.efb")).expect("copy");
    cli(
        d,
        &["bundle", "sign", "alice.efb", "--key", "keys/alice.key"],
    );
    cli(d, &["bundle", "sign", "bob.efb", "--key", "keys/bob.key"]);
    let upload = |file: &str| {
        let bytes = std::fs::read(d.join(file)).expect("bundle");
        a.call_as(
            "POST",
            "/api/v1/bundles",
            Some(ADMIN),
            Some("application/octet-stream"),
            Body::from(bytes),
        )
    };
    let (s, v) = upload("alice.efb").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let digest = v["bundle"]["digest"].as_str().expect("digest").to_owned();
    let alice = v["bundle"]["summary"]["signed_by"].clone();
    assert_eq!(alice.as_array().map(Vec::len), Some(1), "{v}");
    let stored = a._dir.path().join(format!("bundles/{digest}.efb"));
    let before = std::fs::read(&stored).expect("stored bundle");
    // The same file again: already stored.
    let (s, v) = upload("alice.efb").await;
    assert_eq!(
        (s, v["new"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{v}"
    );
    // The same bundle signed by another key: refused, naming both, and the
    // stored file, its registry entry and the audit are unchanged.
    let (s, v) = upload("bob.efb").await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "conflict"), "{v}");
    assert!(message(&v).contains("not replaced"), "{v}");
    assert_eq!(std::fs::read(&stored).expect("stored bundle"), before);
    let (_, v) = a
        .call("GET", "/api/v1/bundles", Some(ADMIN), Body::empty())
        .await;
    assert_eq!(v["bundles"][0]["summary"]["signed_by"], alice, "{v}");
    let (_, v) = a
        .call("GET", "/api/v1/audit", Some(ADMIN), Body::empty())
        .await;
    let uploads: Vec<&Value> = v["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .filter(|e| e["action"] == "bundle.upload")
        .collect();
    assert_eq!(uploads.len(), 1, "{v}");
    assert_eq!(uploads[0]["target"], digest.as_str());
    assert_eq!(uploads[0]["after"]["signed_by"], alice, "{v}");
}
