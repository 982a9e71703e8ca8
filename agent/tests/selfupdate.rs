//! The file and process steps of an agent update with the real agent binary
//! (docs/agent-update.md): the version slot, writing a slot, switching the link,
//! adopting a device flashed before agent releases, the probe of a new binary,
//! and what a starting agent does with a pending update: confirm and commit as
//! the new binary, record the lost trial as the old one, give the device back.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgefleet_agent::selfupdate::handover::{Layout, ProbeError, probe, spawn_when_not_busy};
use edgefleet_agent::selfupdate::{
    AgentUpdateState, BinarySlot, Phase, Release, TrialFailure, start,
};
use edgefleet_agent::version::rewrite_version;
use edgefleet_shared::{Digest, UnixTime};

const AGENT: &str = env!("CARGO_BIN_EXE_edgefleet-agent");

fn layout(dir: &Path) -> Layout {
    Layout {
        binary_dir: dir.join("lib"),
        link: dir.join("bin/edgefleet-agent"),
    }
}

fn version_of(binary: &Path) -> String {
    let child = spawn_when_not_busy(Command::new(binary).arg("--version").stdout(Stdio::piped()))
        .expect("the binary runs");
    let out = child.wait_with_output().expect("it ends");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A config the agent accepts, with its data in `dir`.
fn config(dir: &Path) -> std::path::PathBuf {
    let out = Command::new(AGENT)
        .args(["config", "print-default"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout)
        .replace("/var/lib/edgefleet", &dir.join("data").to_string_lossy());
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn a_rewritten_binary_reports_the_new_version_and_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let own = std::fs::read(AGENT).expect("read the agent");
    let next = rewrite_version(&own, "9.1.0").expect("one version slot");
    let l = layout(dir.path());
    let path = l
        .write_slot(BinarySlot::B, &mut next.as_slice(), next.len() as u64)
        .expect("write slot");
    assert_eq!(
        version_of(Path::new(AGENT)),
        format!("edgefleet-agent {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(version_of(&path), "edgefleet-agent 9.1.0");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    // Over the cap: refused, and the slot keeps what it had.
    let err = l.write_slot(BinarySlot::B, &mut own.as_slice(), 1000);
    assert!(err.is_err_and(|e| e.to_string().contains("over 1000 bytes")));
    assert_eq!(version_of(&path), "edgefleet-agent 9.1.0");
}

#[test]
fn the_link_switches_in_one_step_and_a_plain_binary_is_adopted_into_slot_a() {
    let dir = tempfile::tempdir().expect("tempdir");
    let l = layout(dir.path());
    std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir");
    // As flashed before agent releases: the binary itself at the link's path.
    std::fs::copy(AGENT, &l.link).expect("copy");
    assert_eq!(l.link_target(), None);
    assert_eq!(l.slot_of(&l.link), None);
    assert_eq!(l.adopt(&l.link).expect("adopt"), BinarySlot::A);
    assert_eq!(l.link_target(), Some(BinarySlot::A));
    assert_eq!(l.slot_of(&l.slot_path(BinarySlot::A)), Some(BinarySlot::A));
    assert_eq!(
        version_of(&l.link),
        format!("edgefleet-agent {}", env!("CARGO_PKG_VERSION"))
    );

    let own = std::fs::read(AGENT).expect("read the agent");
    let next = rewrite_version(&own, "9.2.0").expect("one version slot");
    l.write_slot(BinarySlot::B, &mut next.as_slice(), next.len() as u64)
        .expect("write slot");
    l.switch_link(BinarySlot::B).expect("switch");
    assert_eq!(l.link_target(), Some(BinarySlot::B));
    assert_eq!(version_of(&l.link), "edgefleet-agent 9.2.0");
    l.switch_link(BinarySlot::A).expect("switch back");
    assert_eq!(
        version_of(&l.link),
        format!("edgefleet-agent {}", env!("CARGO_PKG_VERSION"))
    );
    // No temporary link is left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("bin"))
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(names, vec!["edgefleet-agent".to_string()]);
}

#[test]
fn the_probe_checks_the_version_and_the_configuration_and_names_the_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let l = layout(dir.path());
    let own = std::fs::read(AGENT).expect("read the agent");
    let next = rewrite_version(&own, "9.3.0").expect("one version slot");
    let path = l
        .write_slot(BinarySlot::B, &mut next.as_slice(), next.len() as u64)
        .expect("write slot");
    let good = config(dir.path());
    let t = Duration::from_secs(30);
    probe(&path, "9.3.0", Some(&good), t).expect("a good binary passes");

    match probe(&path, "9.4.0", Some(&good), t) {
        Err(ProbeError::Version { expected, got }) => {
            assert_eq!(
                (expected.as_str(), got.as_str()),
                ("9.4.0", "edgefleet-agent 9.3.0")
            );
        }
        other => panic!("expected a version mismatch, got {other:?}"),
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "device_id = \"pi 4\"\n").expect("write");
    match probe(&path, "9.3.0", Some(&bad), t) {
        Err(ProbeError::Config(text)) => assert!(text.contains("device_id"), "{text}"),
        other => panic!("expected a refused config, got {other:?}"),
    }
    // Not a program for this machine (an ARM header on this x86 file, or
    // garbage): it does not start.
    let mut foreign = next.clone();
    foreign[18] = 0x28; // EM_ARM
    foreign[4] = 1; // 32-bit
    let foreign_path = l
        .write_slot(BinarySlot::A, &mut foreign.as_slice(), foreign.len() as u64)
        .expect("write slot");
    assert!(matches!(
        probe(&foreign_path, "9.3.0", Some(&good), t),
        Err(ProbeError::Start(_))
    ));
    // A binary that never answers is killed at the timeout.
    let script = dir.path().join("hangs");
    std::fs::write(&script, "#!/bin/sh\nsleep 30\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let started = std::time::Instant::now();
    assert!(matches!(
        probe(&script, "9.3.0", Some(&good), Duration::from_millis(500)),
        Err(ProbeError::Timeout {
            step: "--version",
            ..
        })
    ));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A device laid out as after the old agent handed over: `agent.a` the current
/// build, `agent.b` the same build as version 9.6.0, the link on `agent.a`, a
/// config naming them, and the update record the old agent wrote.
struct Device {
    dir: tempfile::TempDir,
    layout: Layout,
    config: PathBuf,
}

impl Device {
    fn new() -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = layout(dir.path());
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir");
        std::fs::create_dir_all(&layout.binary_dir).expect("mkdir");
        // Slot A is the build itself (a link to the file when it can be).
        let a = layout.slot_path(BinarySlot::A);
        if std::fs::hard_link(AGENT, &a).is_err() {
            std::fs::copy(AGENT, &a).expect("copy the agent");
        }
        let own = std::fs::read(AGENT).expect("read the agent");
        let next = rewrite_version(&own, "9.6.0").expect("one version slot");
        layout
            .write_slot(BinarySlot::B, &mut next.as_slice(), next.len() as u64)
            .expect("slot b");
        layout.switch_link(BinarySlot::A).expect("link");
        common::write_root(&dir.path().join("root.cbor"));
        let config = config(dir.path());
        let text = std::fs::read_to_string(&config)
            .expect("read config")
            .replace(
                "/usr/local/bin/edgefleet-agent",
                &layout.link.to_string_lossy(),
            )
            .replace("/usr/lib/edgefleet", &layout.binary_dir.to_string_lossy())
            .replace(
                "/etc/edgefleet/trust-root.cbor",
                &dir.path().join("root.cbor").to_string_lossy(),
            );
        std::fs::write(&config, text).expect("write config");
        Device {
            dir,
            layout,
            config,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The record of a hand-over from A to B that started `ago_s` seconds ago.
    fn hand_over(&self, ago_s: i64) {
        let release = Release {
            digest: Digest::of(b"agent 9.6.0"),
            release: 2,
            version: "9.6.0".into(),
        };
        let now = UnixTime(UnixTime::now().0 - ago_s);
        let state = AgentUpdateState::default()
            .begin_trial(BinarySlot::A, &release, now, 60)
            .expect("begin");
        start::save(&self.data(), &state).expect("save record");
    }

    fn state(&self) -> AgentUpdateState {
        start::load(&self.data()).expect("record")
    }

    /// Starts `binary` as the supervisor (or the exec) would; returns it with
    /// the lines it printed up to its readiness line.
    fn run(&self, binary: &Path) -> (Child, Vec<String>) {
        let mut child = spawn_when_not_busy(
            Command::new(binary)
                .args(["--config"])
                .arg(&self.config)
                .args(["run", "--http", "127.0.0.1:0"])
                .env("RUST_LIB_BACKTRACE", "0")
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )
        .expect("the agent starts");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("line");
            let ready = line.starts_with("local API listening on http://");
            seen.push(line);
            if ready {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        (child, seen)
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn running_binary(child: &Child) -> PathBuf {
    std::fs::read_link(format!("/proc/{}/exe", child.id())).expect("exe of the child")
}

#[test]
fn the_new_agent_confirms_once_it_serves_and_the_switch_is_committed() {
    let dev = Device::new();
    dev.hand_over(0);
    // The exec keeps the process on the new slot's binary.
    let (child, lines) = dev.run(&dev.layout.slot_path(BinarySlot::B));
    let text = lines.join("\n");
    assert!(
        text.contains("agent update to 9.6.0 (release 2) confirmed"),
        "{text}"
    );
    let state = dev.state();
    let record = state.current.clone().expect("record");
    assert_eq!(record.phase, Phase::Committed);
    assert_eq!(state.floor.map(|f| f.release), Some(2));
    assert_eq!(dev.layout.link_target(), Some(BinarySlot::B));
    assert_eq!(version_of(&dev.layout.link), "edgefleet-agent 9.6.0");
    stop(child);
    // Started again by the supervisor (from the link): nothing more to do.
    let (child, lines) = dev.run(&dev.layout.link);
    assert!(!lines.join("\n").contains("agent update"), "{lines:?}");
    assert_eq!(
        running_binary(&child),
        dev.layout
            .slot_path(BinarySlot::B)
            .canonicalize()
            .expect("path")
    );
    stop(child);
}

#[test]
fn the_old_agent_started_again_records_the_lost_trial_and_keeps_the_device() {
    let dev = Device::new();
    dev.hand_over(0);
    // The new agent died before confirming: the supervisor starts the link.
    let (child, lines) = dev.run(&dev.layout.link);
    let text = lines.join("\n");
    assert!(
        text.contains("agent update reverted: the new agent ended before confirming"),
        "{text}"
    );
    let state = dev.state();
    let record = state.current.clone().expect("record");
    assert_eq!(record.phase, Phase::Failed);
    assert_eq!(record.failure, Some(TrialFailure::Crashed));
    assert_eq!(state.failed, vec![record.digest]);
    assert_eq!(state.floor, None);
    assert_eq!(dev.layout.link_target(), Some(BinarySlot::A));
    stop(child);
}

#[test]
fn a_new_agent_started_after_its_deadline_gives_the_device_back_to_the_old_one() {
    let dev = Device::new();
    dev.hand_over(120);
    let (child, lines) = dev.run(&dev.layout.slot_path(BinarySlot::B));
    // The process that answers is the old binary, exec'd from the link.
    assert_eq!(
        running_binary(&child),
        dev.layout
            .slot_path(BinarySlot::A)
            .canonicalize()
            .expect("path")
    );
    assert!(!lines.join("\n").contains("confirmed"), "{lines:?}");
    let record = dev.state().current.expect("record");
    assert_eq!(record.failure, Some(TrialFailure::NoConfirmation));
    assert_eq!(dev.layout.link_target(), Some(BinarySlot::A));
    stop(child);
}

/// The hand-over keeps the local API's socket: an agent started with the
/// descriptor in EDGEFLEET_LISTEN_FD serves on it, and a request sent before
/// the agent started waits in the backlog and is answered.
#[test]
fn an_agent_serves_on_the_listening_socket_it_was_passed() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fd = listener.as_raw_fd();
    // SAFETY: clears close-on-exec on a descriptor this test owns.
    #[allow(unsafe_code)]
    let cleared = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    assert_eq!(cleared, 0);
    // Sent while nobody serves: the kernel queues it.
    let mut early = std::net::TcpStream::connect(addr).expect("connect");
    early
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut child = spawn_when_not_busy(
        Command::new(AGENT)
            .arg("--config")
            .arg(&config)
            .args(["run", "--http", "127.0.0.1:0"])
            .env("EDGEFLEET_LISTEN_FD", fd.to_string())
            .env("RUST_LIB_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .expect("the agent starts");
    drop(listener);
    let api = common::wait_for_api(&mut child);
    assert_eq!(api, addr.to_string(), "the agent bound another socket");
    early
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = String::new();
    early.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let _ = child.kill();
    let _ = child.wait();
}
