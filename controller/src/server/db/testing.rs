//! A real PostgreSQL server for tests: a cluster made with `initdb` in a
//! temporary directory, on a free loopback port, stopped when the value is
//! dropped or the test process ends (whichever comes first). Never a mock:
//! the store tests run against it as they run against a SQLite file.
//!
//! The binaries are taken from `EDGEFLEET_PG_BIN`, else from the newest
//! `/usr/lib/postgresql/<version>/bin` (Debian's `postgresql` package, which
//! `.ci/run` installs where it is missing). Run as root, the server runs as the
//! `postgres` user (PostgreSQL refuses root).

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A running test server.
#[derive(Debug)]
pub struct TestPostgres {
    /// Keeps the cluster's directory.
    dir: tempfile::TempDir,
    port: u16,
    /// The shell that owns the server: closing its standard input stops it.
    supervisor: Child,
}

/// Why the test server could not start.
#[derive(Debug, thiserror::Error)]
#[error("test PostgreSQL: {0}")]
pub struct TestPostgresError(String);

fn fail(what: impl std::fmt::Display) -> TestPostgresError {
    TestPostgresError(what.to_string())
}

/// The directory of PostgreSQL's server binaries.
pub fn server_binaries() -> Result<PathBuf, TestPostgresError> {
    if let Some(dir) = std::env::var_os("EDGEFLEET_PG_BIN") {
        return Ok(dir.into());
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        fail(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: install Debian's \
             `postgresql` package (.ci/run does) or set EDGEFLEET_PG_BIN",
        )
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program args..`, as the `postgres` user when we are root.
fn command(bin: &Path, program: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

fn free_port() -> Result<u16, TestPostgresError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(fail)?;
    Ok(l.local_addr().map_err(fail)?.port())
}

impl TestPostgres {
    /// Makes a cluster and starts its server; waits until it answers.
    pub fn start() -> Result<TestPostgres, TestPostgresError> {
        let bin = server_binaries()?;
        let root = running_as_root();
        let mut builder = tempfile::Builder::new();
        let dir = builder.prefix("edgefleet-pg-").tempdir().map_err(fail)?;
        let data = dir.path().join("data");
        if root {
            let ids = |flag: &str| -> Result<u32, TestPostgresError> {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .map_err(fail)?;
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .map_err(|_| fail("no `postgres` user to run the server as root"))
            };
            std::os::unix::fs::chown(dir.path(), Some(ids("-u")?), Some(ids("-g")?))
                .map_err(fail)?;
        }
        let out = command(&bin, "initdb", root)
            .args(["--auth=trust", "--username=postgres", "--no-sync"])
            .args(["--encoding=UTF8", "--locale=C", "-D"])
            .arg(&data)
            .output()
            .map_err(|e| fail(format!("running initdb: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let port = free_port()?;
        // The server in the background of a shell that waits for its standard
        // input to close (this value dropped, or this process gone) and then
        // stops it and removes its files: no server outlives its tests.
        let script = format!(
            "{} -D \"$1\" -p \"$2\" -k \"$1\" -c listen_addresses=127.0.0.1 -c fsync=off \
             -c full_page_writes=off -c max_connections=200 \
             -c shared_preload_libraries=pg_stat_statements >\"$1/server.log\" 2>&1 & \
             pid=$!; cat >/dev/null; kill -INT $pid; wait $pid; rm -rf \"$3\"",
            bin.join("postgres").display()
        );
        let mut sh = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c"]);
            c
        } else {
            let mut c = Command::new("sh");
            c.arg("-c");
            c
        };
        let supervisor = sh
            .arg(script)
            .arg("sh")
            .arg(&data)
            .arg(port.to_string())
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("starting postgres: {e}")))?;
        let pg = TestPostgres {
            dir,
            port,
            supervisor,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match postgres::Client::connect(&pg.url("postgres"), postgres::NoTls) {
                Ok(_) => return Ok(pg),
                Err(e) if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(data.join("server.log")).unwrap_or_default();
                    return Err(fail(format!("server did not answer in 60 s: {e}\n{log}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The server's process id (the postmaster; its children are the
    /// connections and background workers), 0 if it cannot be read.
    pub fn server_pid(&self) -> u32 {
        std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database; returns its URL.
    pub fn create_database(&self) -> Result<String, TestPostgresError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut c =
            postgres::Client::connect(&self.url("postgres"), postgres::NoTls).map_err(fail)?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(fail)?;
        Ok(self.url(&name))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Closing the shell's input stops the server (fast shutdown).
        if let Some(mut input) = self.supervisor.stdin.take() {
            let _ = input.flush();
        }
        let _ = self.supervisor.wait();
    }
}

/// One server for the whole test process (started on first use): each test
/// takes its own database from it.
pub fn shared() -> &'static TestPostgres {
    static SERVER: std::sync::OnceLock<TestPostgres> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| match TestPostgres::start() {
        Ok(pg) => pg,
        // A test that needs PostgreSQL fails, never skips, without it.
        Err(e) => panic!("{e}"),
    })
}
