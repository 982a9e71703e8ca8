//! A supervisor that restarts the agent like systemd's `Restart=always`, and
//! agent releases made in the test, for the tests of the agent's own updates
//! (agent/tests/mqtt.rs, controller/tests/agent_rollout.rs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_shared::{ModelChannel, RawHeader, SecretKey, UnixTime};

/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(90);

/// A supervisor that restarts like systemd's `Restart=always`, for the tests:
/// starts `binary` again 200 ms after it exits, until dropped. Everything the
/// agent prints on stdout is kept, across restarts and hand-overs (an exec
/// keeps the process and its pipe).
pub struct Supervisor {
    log: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    lines: Arc<Mutex<Vec<String>>>,
    exits: Arc<Mutex<Vec<std::process::ExitStatus>>>,
    pid: Arc<std::sync::atomic::AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    pub fn start(binary: &Path, args: &[&str], log: &Path) -> Supervisor {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let exits = Arc::new(Mutex::new(Vec::new()));
        let pid = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (binary, log, log_path) = (binary.to_owned(), log.to_owned(), log.to_owned());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let thread = {
            let (stop, lines, exits, pid) =
                (stop.clone(), lines.clone(), exits.clone(), pid.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let stderr = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .expect("log");
                    let mut child = Command::new(&binary)
                        .args(&args)
                        .env("EDGEFLEET_SUPERVISED", "1")
                        .env("EDGEFLEET_LOG", "debug")
                        .env_remove("INVOCATION_ID")
                        .stdout(Stdio::piped())
                        .stderr(stderr)
                        .spawn()
                        .expect("the supervised agent starts");
                    pid.store(child.id(), Ordering::SeqCst);
                    let stdout = child.stdout.take().expect("piped");
                    let kept = lines.clone();
                    std::thread::spawn(move || {
                        use std::io::BufRead;
                        for line in std::io::BufReader::new(stdout).lines() {
                            let Ok(line) = line else { break };
                            kept.lock().expect("lock").push(line);
                        }
                    });
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            let _ = child.kill();
                            let _ = child.wait();
                            return;
                        }
                        if let Ok(Some(status)) = child.try_wait() {
                            exits.lock().expect("lock").push(status);
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Supervisor {
            log: log_path,
            stop,
            lines,
            exits,
            pid,
            thread: Some(thread),
        }
    }

    /// The first line after the first `skip` lines that `pick` accepts.
    pub fn line(&self, skip: usize, pick: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self.lines.lock().expect("lock")[..]
                .iter()
                .skip(skip)
                .find(|l| pick(l))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no such line in {:?}; exits {:?}; log:\n{}",
                self.lines.lock().expect("lock"),
                self.exits(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The local API's address from the readiness line.
    pub fn api(&self) -> String {
        let line = self.line(0, |l| l.starts_with("local API listening on http://"));
        line.trim_start_matches("local API listening on http://")
            .to_string()
    }

    /// The process id of the agent running now (an exec keeps it), for a test
    /// that kills it.
    pub fn pid(&self) -> Arc<std::sync::atomic::AtomicU32> {
        self.pid.clone()
    }

    pub fn exits(&self) -> Vec<std::process::ExitStatus> {
        self.exits.lock().expect("lock").clone()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the agent binary at `path` says it is (`--version`), e.g.
/// `edgefleet-agent 9.9.1`.
pub fn version_of(path: &Path) -> String {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .expect("the agent binary runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `agent`, stripped, beside it (a debug build is hundreds of MB, most of it
/// debug information); made again when the agent is newer.
pub fn stripped(agent: &Path) -> PathBuf {
    let out = agent.with_file_name("edgefleet-agent.stripped");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&out) < modified(agent) {
        // Tests of one process strip at the same time: each into its own file.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = out.with_extension(format!("tmp-{}-{n}", std::process::id()));
        let ok = Command::new("strip")
            .arg("-o")
            .arg(&tmp)
            .arg(agent)
            .status()
            .expect("strip (binutils) runs");
        assert!(ok.success(), "strip failed");
        std::fs::rename(&tmp, &out).expect("rename");
    }
    out
}

/// An agent release file in `dir`: `binaries` (architecture, bytes) at
/// `version`, release `release`, signed by `signer`, in 64 KiB chunks.
pub fn agent_release_file(
    dir: &Path,
    binaries: &[(&str, Vec<u8>)],
    version: &str,
    release: u64,
    signer: &SecretKey,
) -> PathBuf {
    use edgefleet_shared::Arch;
    use edgefleet_shared::bundle::{
        ArtifactInput, ArtifactSource, ManifestDraft, manifest_bytes, prepare_manifest,
        write_bundle,
    };
    use edgefleet_shared::manifest::{
        AGENT_CHANNEL, ArtifactKind, Constraints, HealthPolicy, ModelSchema, agent_binary_name,
    };
    let inputs: Vec<ArtifactInput> = binaries
        .iter()
        .map(|(a, bytes)| ArtifactInput {
            name: agent_binary_name(&Arch::new(a).expect("arch")).expect("name"),
            kind: ArtifactKind::Agent,
            source: ArtifactSource::Bytes(bytes.clone()),
        })
        .collect();
    let now = UnixTime::now();
    let draft = ManifestDraft {
        channel: ModelChannel::new(AGENT_CHANNEL).expect("channel"),
        version: semver::Version::parse(version).expect("version"),
        release,
        created_at: now.plus_days(-1),
        expires_at: now.plus_days(30),
        schema: ModelSchema::default(),
        constraints: Constraints {
            architectures: binaries
                .iter()
                .map(|(a, _)| Arch::new(a).expect("arch"))
                .collect(),
            min_agent_version: "0.1.0".into(),
            memory_bytes: 1 << 20,
        },
        health: HealthPolicy::default(),
        chunk_size: 64 * 1024,
    };
    let manifest = prepare_manifest(&draft, &inputs).expect("in memory");
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(&manifest),
        signatures: vec![],
    };
    header.sign(signer);
    let path = dir.join(format!("agent-{version}.efb"));
    let mut file = std::fs::File::create(&path).expect("release file");
    write_bundle(&mut file, &header, &inputs).expect("write release");
    path
}

/// A stand-in for a broken agent build: answers the probe (`--version` with
/// `version`, `config check`) like a good one, then does `on_run` when started
/// to serve.
pub fn broken_agent(version: &str, on_run: &str) -> Vec<u8> {
    format!(
        "#!/bin/sh\ncase \"$*\" in\n  --version) echo \"edgefleet-agent {version}\" ;;\n  \
         *'config check'*) echo OK ;;\n  *) {on_run} ;;\nesac\n"
    )
    .into_bytes()
}
