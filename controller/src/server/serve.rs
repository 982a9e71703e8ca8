//! `edgefleet serve`: the data directory, the CA, the broker (embedded or
//! external), the store, the fleet tasks and the HTTP API, until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_shared::protocol::Topics;

use crate::server::api::{self, AppState};
use crate::server::ca::Ca;
use crate::server::config::{BrokerMode, ControllerConfig};
use crate::server::db::Db;
use crate::server::fleet::{BrokerLink, Fleet, FleetOptions, RETENTION_MS, Replica, now_ms};

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

impl Started {
    /// The port devices connect to, from [`Started::broker_url`].
    pub fn broker_port(&self) -> Option<u16> {
        self.broker_url.rsplit(':').next()?.parse().ok()
    }
}

/// Why the controller could not start: the setting or part that failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct ServeError {
    /// The setting or part (`data_dir`, `database`, `gate TLS`, ...).
    pub context: &'static str,
    /// The cause.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn err<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    context: &'static str,
) -> impl Fn(E) -> ServeError {
    move |e| ServeError {
        context,
        source: e.into(),
    }
}

/// Starts everything; returns once the API listens, with the server future to
/// run: it serves until `shutdown` completes (the CLI passes [`shutdown_signal`],
/// SIGINT or SIGTERM), then finishes the requests in flight.
pub async fn start(
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(Started, impl Future<Output = ()>), ServeError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    RETENTION_MS.store(
        u64::from(config.telemetry.retention_days) * 86_400_000,
        std::sync::atomic::Ordering::Relaxed,
    );
    let data = config.data_dir.clone();
    private_dir(&data)?;
    let open_files = raise_open_files_limit();
    if config.mqtt.mode == BrokerMode::Embedded {
        log_broker_capacity(open_files);
    }
    let ca = Arc::new(Ca::open_or_create(&data.join("ca")).map_err(err("CA"))?);
    let topics = Topics::new(&config.mqtt.topic_prefix).map_err(err("mqtt.topic_prefix"))?;

    let command_key = ca.command_key().map_err(err("command key"))?;
    let gate_stats = std::sync::Arc::new(crate::server::gate::GateStats::default());
    let (link, broker_url, gate) = match config.mqtt.mode {
        BrokerMode::Embedded => {
            let (link, url, identities) =
                embedded_broker(&config, &ca, &topics, command_key, &gate_stats).await?;
            (link, url, Some(identities))
        }
        BrokerMode::External => {
            let (link, url) = external_broker(&config, command_key)?;
            (link, url, None)
        }
    };

    let db = open_store(&config).await?;
    let new_admin_token = ensure_admin_token(&db, &data).await?;
    if let Some(ids) = &gate {
        admit_enrolled(&db, ids).await?;
    }
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| err("http.listen")(format!("{}: {e}", config.http.listen)))?;
    let http = listener.local_addr().map_err(err("http.listen"))?;
    let fleet = Fleet::start(db, topics, link, fleet_options(&config, http))
        .await
        .map_err(err("fleet"))?;
    fleet.set_drift_alert(config.drift.clone());
    if !fleet.runs_rollouts() {
        tracing::info!(
            replica = %config.cluster.replica,
            "another replica holds the rollout lease; this one takes it if that one stops"
        );
    }

    let shutdown = releasing_the_lease(fleet.clone(), shutdown);
    let state = AppState {
        fleet,
        ca,
        trust_root: config.trust_root_path(),
        max_bundle_bytes: config.http.max_bundle_bytes,
        broker_url: broker_url.clone(),
        topic_prefix: config.mqtt.topic_prefix.clone(),
        subscribe_qos: config.mqtt.subscribe_qos,
        gate,
        gate_stats,
    };
    let app = api::router(state);
    let limits = config.http.connection_limits();
    let server = edgefleet_agent::http::serve(listener, app, limits, shutdown);
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

/// `shutdown`, after which the rollout lease is given up for another replica
/// to take at once (not after its expiry).
async fn releasing_the_lease(fleet: Arc<Fleet>, shutdown: impl Future<Output = ()>) {
    shutdown.await;
    fleet.release_lease().await;
}

/// Opens the configured store (SQLite or PostgreSQL), migrating it.
async fn open_store(config: &ControllerConfig) -> Result<Db, ServeError> {
    let store = config.store_location();
    let db = Db::open_at(&store)
        .await
        .map_err(|e| err("database")(format!("{store}: {e}")))?;
    tracing::info!(backend = db.backend(), at = %store, "store opened");
    Ok(db)
}

/// The fleet's settings from the configuration; `http` is the API's bound
/// address (this replica's default address for the others).
fn fleet_options(config: &ControllerConfig, http: SocketAddr) -> FleetOptions {
    FleetOptions {
        bundles_dir: config.data_dir.join("bundles"),
        tick: Duration::from_millis(config.rollouts.tick_ms),
        coalesce: Duration::from_millis(config.rollouts.chunk_coalesce_ms),
        telemetry: (
            config.telemetry.batch_max as usize,
            Duration::from_millis(config.telemetry.batch_ms),
        ),
        replica: Replica {
            name: config.cluster.replica.clone(),
            address: Some(
                config
                    .cluster
                    .address
                    .clone()
                    .unwrap_or_else(|| format!("http://{http}")),
            ),
            lease_ms: config.cluster.lease_ms,
            shared_ingest: config.cluster.shared_subscriptions,
        },
    }
}

/// The data directory, made if missing, readable by the controller's user only.
fn private_dir(data: &std::path::Path) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data)
        .map_err(|e| err("data_dir")(format!("{}: {e}", data.display())))?;
    let _ = std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700));
    Ok(())
}

/// Admits the enrolled devices' certificates at the gate.
async fn admit_enrolled(
    db: &Db,
    identities: &crate::server::gate::Identities,
) -> Result<(), ServeError> {
    let enrolled = db.enrolled_fingerprints().await.map_err(err("database"))?;
    let mut map = identities.write().unwrap_or_else(|p| p.into_inner());
    for (fp, device) in enrolled {
        map.insert(fp, crate::server::gate::Identity::Device(device));
    }
    Ok(())
}

/// rumqttd on loopback, and the gate in front of it on `mqtt.listen` for
/// devices: the controller's link to it, the URL devices dial, and the
/// certificate fingerprints the gate admits (the controller's, then devices').
async fn embedded_broker(
    config: &ControllerConfig,
    ca: &Ca,
    topics: &Topics,
    command_key: edgefleet_shared::SecretKey,
    gate_stats: &Arc<crate::server::gate::GateStats>,
) -> Result<(BrokerLink, String, crate::server::gate::Identities), ServeError> {
    let server = ca
        .server_identity(&config.mqtt.hosts)
        .map_err(err("broker certificate"))?;
    // rumqttd on loopback, devices through the gate.
    let (internal, broker) =
        crate::server::broker::start_embedded(([127, 0, 0, 1], 0).into(), None)
            .map_err(err("embedded broker"))?;
    let me = ca
        .controller_identity()
        .map_err(err("controller certificate"))?;
    let identities: crate::server::gate::Identities = Default::default();
    let controller_pem =
        std::fs::read_to_string(&me.cert).map_err(err("controller certificate"))?;
    identities
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            api::cert_fingerprint(&controller_pem),
            crate::server::gate::Identity::Controller,
        );
    let tls = gate_tls(&ca.cert_path(), &server).map_err(err("gate TLS"))?;
    let listener = tokio::net::TcpListener::bind(config.mqtt.listen)
        .await
        .map_err(|e| err("mqtt.listen")(format!("{}: {e}", config.mqtt.listen)))?;
    let addr = listener.local_addr().map_err(err("mqtt.listen"))?;
    tokio::spawn(crate::server::gate::serve(
        listener,
        tls,
        broker,
        identities.clone(),
        topics.clone(),
        gate_stats.clone(),
    ));
    let host = config.mqtt.hosts[0].clone();
    Ok((
        BrokerLink {
            endpoints: vec![edgefleet_agent::link::Endpoint {
                host: "127.0.0.1".into(),
                port: internal.port(),
                tls: false,
            }],
            tls: None,
            command_key,
            subscribe_qos: link_qos(config)?,
        },
        format!("mqtts://{host}:{}", addr.port()),
        identities,
    ))
}

/// The controller's link to an external broker (`mqtt.url`), and its URL.
fn external_broker(
    config: &ControllerConfig,
    command_key: edgefleet_shared::SecretKey,
) -> Result<(BrokerLink, String), ServeError> {
    let url = config.mqtt.url.clone().unwrap_or_default();
    let endpoints = edgefleet_agent::link::Endpoint::parse_list(&url).map_err(err("mqtt.url"))?;
    let tls = if endpoints[0].tls {
        let (Some(ca_path), Some(cert), Some(key)) =
            (&config.mqtt.ca, &config.mqtt.cert, &config.mqtt.key)
        else {
            return Err(err("mqtt.ca/cert/key")("all three are needed for mqtts://"));
        };
        Some(edgefleet_agent::link::tls_config(ca_path, cert, key).map_err(err("mqtt TLS"))?)
    } else {
        tracing::warn!("plain MQTT to {url}: for development only");
        None
    };
    Ok((
        BrokerLink {
            endpoints,
            tls,
            command_key,
            subscribe_qos: link_qos(config)?,
        },
        url,
    ))
}

/// `[mqtt] subscribe_qos` as a QoS.
fn link_qos(config: &ControllerConfig) -> Result<rumqttc::QoS, ServeError> {
    edgefleet_agent::link::subscribe_qos(config.mqtt.subscribe_qos)
        .map_err(err("mqtt.subscribe_qos"))
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
    if db.token_count().await.map_err(err("database"))? > 0 {
        return Ok(None);
    }
    let token = api::new_token().map_err(err("admin token"))?;
    let path = data.join("admin-token");
    crate::ops::operator::write_atomic(&path, 0o600, |w| {
        w.write_all(format!("{token}\n").as_bytes())
    })
    .map_err(err("admin token"))?;
    let audit = crate::server::db::Audit {
        actor: "edgefleet serve".into(),
        action: "token.create".into(),
        target: "admin".into(),
        before: None,
        after: Some(serde_json::json!({"role": "admin", "first": true})),
        at: now_ms(),
    };
    db.insert_token(
        &api::token_hash(&token),
        "admin",
        "admin",
        now_ms(),
        Some(audit),
    )
    .await
    .map_err(err("admin token"))?;
    Ok(Some(path))
}

/// The gate's TLS: the broker's server certificate, client certificates required
/// and checked against the controller's CA.
fn gate_tls(
    ca: &std::path::Path,
    server: &crate::server::ca::Identity,
) -> Result<Arc<rustls::ServerConfig>, Box<dyn std::error::Error + Send + Sync>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |e: rustls::pki_types::pem::Error| format!("{path}: {e}")
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(pem(ca))? {
        roots.add(c.map_err(pem(ca))?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let certs = CertificateDer::pem_file_iter(&server.cert)
        .map_err(pem(&server.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(&server.cert))?;
    let key = PrivateKeyDer::from_pem_file(&server.key).map_err(pem(&server.key))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Says how many devices the embedded broker holds within `open_files`: each
/// holds one descriptor here, its TLS connection at the gate (the gate hands
/// the connection to rumqttd in process).
fn log_broker_capacity(open_files: u64) {
    let devices = open_files.saturating_sub(200);
    tracing::info!(
        open_files,
        "the embedded broker can hold about {devices} devices within this process's open-files limit"
    );
}

/// Raises this process's soft limit on open files to its hard limit (as Go
/// programs and many servers do: the shell's usual soft 1,024 holds only some
/// 800 devices with the embedded broker); returns the limit now in force.
#[allow(unsafe_code)]
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    // rlim_t is u64 on the targets built here, not on every libc.
    #[allow(clippy::useless_conversion)]
    u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX)
}
