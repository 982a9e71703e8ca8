//! Controller replicas as separate `edgefleet serve` processes, and what the
//! tests ask of them: their API, their metrics, the shared PostgreSQL store.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use edgefleet::ops::remote::{ApiArgs, Client};

use crate::edgefleet_bin;

/// One `edgefleet serve --replica NAME` process (killed on drop).
#[derive(Debug)]
pub struct Replica {
    /// The process.
    pub child: Child,
    /// Its API, with the admin token.
    pub api: Client,
}

impl Replica {
    /// Starts a replica on `config` and waits for its API; `data` holds the
    /// admin token.
    pub fn start(config: &Path, name: &str, data: &Path) -> Replica {
        let mut child = Command::new(edgefleet_bin())
            .args(["serve", "--config"])
            .arg(config)
            .args(["--replica", name])
            // Warnings, or what the caller's EDGEFLEET_LOG asks for.
            .env(
                "EDGEFLEET_LOG",
                std::env::var("EDGEFLEET_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("replica starts");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = loop {
            let line = lines.next().expect("readiness line").expect("line");
            if let Some(u) = line.strip_prefix("controller API listening on ") {
                break u.to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let token = std::fs::read_to_string(data.join("admin-token")).expect("token");
        Replica {
            child,
            api: Client::new(&ApiArgs {
                controller: url,
                token: Some(token.trim().to_owned()),
                json: false,
            }),
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `sql` with one text parameter on the database at `url`: each row's
/// first column as text, its second as a number.
pub fn query(url: &str, sql: &'static str, param: &str) -> Vec<(String, i64)> {
    let (url, param) = (url.to_owned(), param.to_owned());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        c.query(sql, &[&param])
            .expect("query")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    })
    .join()
    .expect("join")
}

/// A counter from a replica's `/metrics` (0 when absent).
pub fn metric(api: &Client, name: &str) -> u64 {
    let text = api.get_text("/metrics").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// The replica holding the rollout lease, as the store at `url` says.
pub fn rollout_holder(url: &str) -> Option<String> {
    query(
        url,
        "SELECT holder, 0::bigint FROM leases WHERE name = $1",
        "rollouts",
    )
    .into_iter()
    .next()
    .map(|(holder, _)| holder)
}

/// Signs an iris bundle with `key` into `dir` and uploads it through `api`;
/// its digest.
pub fn upload_iris(api: &Client, key: &edgefleet_shared::SecretKey, dir: &Path) -> String {
    let bundle = dir.join("v1.efb");
    crate::signed_iris_bundle(key, &bundle);
    api.upload("/api/v1/bundles", &bundle).expect("upload")["bundle"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned()
}

/// What a replicas test starts from: a temporary directory with the
/// controller's data directory and trust root (signed by `key`), a fresh
/// PostgreSQL database, and a configuration on it for the caller to point at
/// a broker before [`Setup::write_config`].
#[derive(Debug)]
pub struct Setup {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The replicas' shared data directory.
    pub data: std::path::PathBuf,
    /// The bundle signing key of the trust root.
    pub key: edgefleet_shared::SecretKey,
    /// The database's URL.
    pub url: String,
    /// The replicas' configuration.
    pub config: edgefleet::server::config::ControllerConfig,
}

impl Setup {
    /// A new directory, trust root and database.
    pub fn new() -> Setup {
        use edgefleet::server::config::{ControllerConfig, DatabaseSetting};
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("controller");
        std::fs::create_dir_all(&data).expect("data dir");
        let key = crate::alice_and_trust_root(dir.path(), &data.join("trust-root.cbor"));
        let url = edgefleet::server::db::testing::shared()
            .create_database()
            .expect("test database");
        let config = ControllerConfig {
            data_dir: data.clone(),
            database: Some(DatabaseSetting::Location(url.clone())),
            ..ControllerConfig::default()
        };
        Setup {
            dir,
            data,
            key,
            url,
            config,
        }
    }

    /// Writes the configuration (API on a free port, a 200 ms rollout tick,
    /// a 1.5 s lease) for `edgefleet serve --config`.
    pub fn write_config(&mut self) -> std::path::PathBuf {
        self.write_config_leased(1_500)
    }

    /// Its directory, the controller's data directory and the database's URL.
    pub fn paths(&self) -> (std::path::PathBuf, std::path::PathBuf, String) {
        (
            self.dir.path().to_owned(),
            self.data.clone(),
            self.url.clone(),
        )
    }

    /// [`Setup::write_config`] with a lease of `lease_ms`.
    pub fn write_config_leased(&mut self, lease_ms: u64) -> std::path::PathBuf {
        self.config.http.listen = ([127, 0, 0, 1], 0).into();
        self.config.rollouts.tick_ms = 200;
        self.config.cluster.lease_ms = lease_ms;
        let file = self.dir.path().join("controller.toml");
        std::fs::write(
            &file,
            toml::to_string(&self.config).expect("config as TOML"),
        )
        .expect("config file");
        file
    }
}

impl Default for Setup {
    fn default() -> Setup {
        Setup::new()
    }
}

/// How many devices the replica behind `api` sees online.
pub fn online(api: &Client) -> u64 {
    api.get("/api/v1/devices?state=online&limit=1")
        .ok()
        .and_then(|v| v["total"].as_u64())
        .unwrap_or(0)
}

/// Rollout `id` as the replica behind `api` has it stored.
pub fn rollout(api: &Client, id: &str) -> serde_json::Value {
    api.get(&format!("/api/v1/rollouts/{id}")).expect("view")["rollout"].clone()
}

/// Waits up to 90 s until rollout `id` is in `wave` or later; `context` is
/// printed if it never is.
pub fn wait_for_wave(api: &Client, id: &str, wave: u64, context: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while rollout(api, id)["wave"].as_u64() < Some(wave) {
        assert!(
            std::time::Instant::now() < deadline,
            "no wave {wave} in 90 s: {}\n{}",
            rollout(api, id),
            context()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A TCP relay to a broker whose link can be cut: once cut, every byte either
/// way is read and dropped, the connections left open (a network that loses
/// everything, as a replica behind a failed link sees it).
#[derive(Debug)]
pub struct Relay {
    /// Where to connect instead of the broker.
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    /// Relays connections on a new loopback port to `target`.
    pub fn start(target: std::net::SocketAddr) -> Relay {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay port");
        let addr = listener.local_addr().expect("relay address");
        let cut = std::sync::Arc::<std::sync::atomic::AtomicBool>::default();
        let pump = |mut from: TcpStream, mut to: TcpStream, cut: std::sync::Arc<_>| {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    let cut: &std::sync::atomic::AtomicBool = &cut;
                    if !cut.load(std::sync::atomic::Ordering::SeqCst)
                        && to.write_all(&buf[..n]).is_err()
                    {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        };
        let relay_cut = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(broker) = TcpStream::connect(target) else {
                    continue;
                };
                let (Ok(c2), Ok(b2)) = (client.try_clone(), broker.try_clone()) else {
                    continue;
                };
                pump(client, broker, relay_cut.clone());
                pump(b2, c2, relay_cut.clone());
            }
        });
        Relay { addr, cut }
    }

    /// Cuts the link: nothing passes from now on.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
