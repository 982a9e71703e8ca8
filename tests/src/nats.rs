//! A NATS cluster of `nats-server` processes on loopback, on the files
//! `edgefleet broker nats` writes (killed on drop).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use edgefleet::ops::remote::{BrokerCommand, broker};
use edgefleet::server::config::{BrokerMode, ControllerConfig};

use crate::wait_for;

/// The nodes of a running cluster.
#[derive(Debug)]
pub struct NatsCluster {
    dir: PathBuf,
    data: PathBuf,
    database: Option<String>,
    nodes: Vec<(Option<Child>, SocketAddr)>,
}

/// `count` free loopback ports in a row.
fn free_ports(count: u16) -> u16 {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let all_free = (0..count).all(|i| {
            first
                .checked_add(i)
                .is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        });
        if all_free {
            return first;
        }
    }
    panic!("no {count} free ports in a row");
}

impl NatsCluster {
    /// Prepares a cluster of `count` nodes in `dir` for the controller whose
    /// data directory is `data` and store is `database` (None: the data
    /// directory's SQLite file), starts every node, and points `config` at all
    /// of them as its external broker.
    pub fn start(
        dir: &Path,
        data: &Path,
        database: Option<&str>,
        count: u16,
        config: &mut ControllerConfig,
    ) -> NatsCluster {
        let mqtt = free_ports(count);
        let cluster_port = free_ports(count);
        let command = |users_only| BrokerCommand::Nats {
            data_dir: data.to_path_buf(),
            out: dir.to_path_buf(),
            nodes: count,
            listen: ([127, 0, 0, 1], mqtt).into(),
            cluster_port,
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            topic_prefix: config.mqtt.topic_prefix.clone(),
            database: database.map(str::to_owned),
            users_only,
        };
        broker(command(false)).expect("edgefleet broker nats");
        let mut cluster = NatsCluster {
            dir: dir.to_path_buf(),
            data: data.to_path_buf(),
            database: database.map(str::to_owned),
            nodes: (0..count)
                .map(|i| (None, SocketAddr::from(([127, 0, 0, 1], mqtt + i))))
                .collect(),
        };
        for i in 0..usize::from(count) {
            cluster.spawn(i);
        }
        for (_, addr) in &cluster.nodes {
            wait_for("a NATS node accepting MQTT", || {
                std::net::TcpStream::connect(addr).ok()
            });
        }
        // The [mqtt] section `edgefleet broker nats` wrote for the controller.
        let snippet = std::fs::read_to_string(dir.join("controller-mqtt.toml")).expect("snippet");
        let mut table: toml::Table = toml::from_str(&snippet).expect("controller-mqtt.toml");
        config.mqtt = table
            .remove("mqtt")
            .and_then(|m| m.try_into().ok())
            .expect("controller-mqtt.toml holds an [mqtt] section");
        assert_eq!(config.mqtt.mode, BrokerMode::External);
        // NATS has no MQTT shared subscriptions.
        config.cluster.shared_subscriptions = false;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let name = format!("n{}", i + 1);
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(self.dir.join(format!("{name}.conf")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server is installed (.ci/run installs it)");
        self.nodes[i].0 = Some(child);
    }

    /// Each running node's process id.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|(c, _)| c.as_ref().map(Child::id))
            .collect()
    }

    /// Each node's MQTT address.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|(_, a)| *a).collect()
    }

    /// Rewrites devices.conf from the store (`edgefleet broker nats
    /// --users-only`) and has every running node reload it; returns once each
    /// says it has (a reload took 4.5 s here, and a device dialling a node
    /// before it was refused).
    pub fn reload_users(&self) {
        const RELOADED: &str = "Reloaded server configuration";
        let reloads = |i: usize| self.log(i).matches(RELOADED).count();
        let before: Vec<usize> = (0..self.nodes.len()).map(reloads).collect();
        broker(BrokerCommand::Nats {
            data_dir: self.data.clone(),
            out: self.dir.clone(),
            nodes: u16::try_from(self.nodes.len()).expect("nodes"),
            listen: self.nodes[0].1,
            cluster_port: 1,
            hosts: vec!["127.0.0.1".into()],
            topic_prefix: ControllerConfig::default().mqtt.topic_prefix,
            database: self.database.clone(),
            users_only: true,
        })
        .expect("edgefleet broker nats --users-only");
        for (child, _) in &self.nodes {
            if let Some(c) = child {
                let ok = Command::new("nats-server")
                    .arg("--signal")
                    .arg(format!("reload={}", c.id()))
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "nats-server {} did not reload", c.id());
            }
        }
        for (i, (child, _)) in self.nodes.iter().enumerate() {
            if child.is_some() {
                wait_for("a NATS node to reload its users", || {
                    (reloads(i) > before[i]).then_some(())
                });
            }
        }
    }

    /// Kills node `i` (0-based) with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log of node `i` (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("n{}.log", i + 1))).unwrap_or_default()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
