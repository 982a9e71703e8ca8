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
