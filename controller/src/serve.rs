//! `edgefleet serve`: the data directory, the CA, the broker (embedded or
//! external), the store, the fleet tasks and the HTTP API, until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_shared::protocol::Topics;

use crate::api::{self, AppState};
use crate::ca::Ca;
use crate::config::{BrokerMode, ControllerConfig};
use crate::db::Db;
use crate::fleet::{BrokerLink, Fleet, RETENTION_MS, now_ms};

/// What a started controller tells its caller (printed by the CLI; used by tests).
#[derive(Debug, Clone)]
pub struct Started {
    /// API address.
    pub http: SocketAddr,
    /// Broker URL devices use.
    pub broker_url: String,
    /// Where the first admin token was written, when it was created now.
    pub new_admin_token: Option<PathBuf>,
    /// The data directory.
    pub data_dir: PathBuf,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServeError(pub String);

fn err(context: &str) -> impl Fn(String) -> ServeError + '_ {
    move |e| ServeError(format!("{context}: {e}"))
}

/// Starts everything; returns once the API listens, with the server future to run.
pub async fn start(
    config: ControllerConfig,
) -> Result<(Started, impl Future<Output = std::io::Result<()>>), ServeError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    RETENTION_MS.store(
        u64::from(config.telemetry.retention_days) * 86_400_000,
        std::sync::atomic::Ordering::Relaxed,
    );
    let data = config.data_dir.clone();
    std::fs::create_dir_all(&data)
        .map_err(|e| err("data_dir")(format!("{}: {e}", data.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
    }
    let ca = Arc::new(Ca::open_or_create(&data.join("ca")).map_err(|e| err("CA")(e.to_string()))?);
    let topics = Topics::new(&config.mqtt.topic_prefix)
        .map_err(|e| err("mqtt.topic_prefix")(e.to_string()))?;

    let (link, broker_url) = match config.mqtt.mode {
        BrokerMode::Embedded => {
            let server = ca
                .server_identity(&config.mqtt.hosts)
                .map_err(|e| err("broker certificate")(e.to_string()))?;
            let addr = crate::broker::start_embedded(config.mqtt.listen, &ca.cert_path(), &server)
                .map_err(err("embedded broker"))?;
            let me = ca
                .controller_identity()
                .map_err(|e| err("controller certificate")(e.to_string()))?;
            let tls = edgefleet_agent::link::tls_config(&ca.cert_path(), &me.cert, &me.key)
                .map_err(|e| err("controller TLS")(e.to_string()))?;
            let host = config.mqtt.hosts[0].clone();
            (
                BrokerLink {
                    host: host.clone(),
                    port: addr.port(),
                    tls: Some(tls),
                },
                format!("mqtts://{host}:{}", addr.port()),
            )
        }
        BrokerMode::External => {
            let url = config.mqtt.url.clone().unwrap_or_default();
            let ep = edgefleet_agent::link::Endpoint::parse(&url).map_err(err("mqtt.url"))?;
            let tls = if ep.tls {
                let (Some(ca_path), Some(cert), Some(key)) =
                    (&config.mqtt.ca, &config.mqtt.cert, &config.mqtt.key)
                else {
                    return Err(ServeError(
                        "mqtt.ca/cert/key are needed for mqtts://".into(),
                    ));
                };
                Some(
                    edgefleet_agent::link::tls_config(ca_path, cert, key)
                        .map_err(|e| err("mqtt TLS")(e.to_string()))?,
                )
            } else {
                tracing::warn!("plain MQTT to {url}: for development only");
                None
            };
            (
                BrokerLink {
                    host: ep.host,
                    port: ep.port,
                    tls,
                },
                url,
            )
        }
    };

    let db = Db::open(&config.database_path())
        .await
        .map_err(|e| err("database")(format!("{}: {e}", config.database_path().display())))?;
    let new_admin_token = ensure_admin_token(&db, &data).await?;
    let fleet = Fleet::start(
        db,
        topics,
        link,
        data.join("bundles"),
        Duration::from_millis(config.rollouts.tick_ms),
        Duration::from_millis(config.rollouts.chunk_coalesce_ms),
        (
            config.telemetry.batch_max as usize,
            Duration::from_millis(config.telemetry.batch_ms),
        ),
    )
    .await
    .map_err(|e| err("fleet")(e.to_string()))?;

    let state = AppState {
        fleet,
        ca,
        trust_root: config.trust_root_path(),
        max_bundle_bytes: config.http.max_bundle_bytes,
        broker_url: broker_url.clone(),
        topic_prefix: config.mqtt.topic_prefix.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| err("http.listen")(format!("{}: {e}", config.http.listen)))?;
    let http = listener
        .local_addr()
        .map_err(|e| err("http.listen")(e.to_string()))?;
    let app = api::router(state);
    let server = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
    };
    Ok((
        Started {
            http,
            broker_url,
            new_admin_token,
            data_dir: data,
        },
        server,
    ))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// On first start (no token at all) creates the `admin` token and writes it to
/// `<data>/admin-token`, mode 0600. The store keeps only its SHA-256.
async fn ensure_admin_token(
    db: &Db,
    data: &std::path::Path,
) -> Result<Option<PathBuf>, ServeError> {
    if db
        .token_count()
        .await
        .map_err(|e| err("database")(e.to_string()))?
        > 0
    {
        return Ok(None);
    }
    let token = api::new_token().map_err(err("admin token"))?;
    let path = data.join("admin-token");
    crate::operator::write_atomic(&path, 0o600, |w| {
        w.write_all(format!("{token}\n").as_bytes())
    })
    .map_err(|e| err("admin token")(e.to_string()))?;
    db.insert_token(&api::token_hash(&token), "admin", "admin", now_ms())
        .await
        .map_err(|e| err("admin token")(e.to_string()))?;
    Ok(Some(path))
}
