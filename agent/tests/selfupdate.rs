//! The file and process steps of an agent update with the real agent binary
//! (docs/agent-update.md): the version slot, writing a slot, switching the link,
//! adopting a device flashed before agent releases, and the probe of a new binary.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edgefleet_agent::selfupdate::BinarySlot;
use edgefleet_agent::selfupdate::handover::{Layout, ProbeError, probe};
use edgefleet_agent::version::rewrite_version;

const AGENT: &str = env!("CARGO_BIN_EXE_edgefleet-agent");

fn layout(dir: &Path) -> Layout {
    Layout {
        binary_dir: dir.join("lib"),
        link: dir.join("bin/edgefleet-agent"),
    }
}

fn version_of(binary: &Path) -> String {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .expect("the binary runs");
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
    probe(&path, "9.3.0", &good, t).expect("a good binary passes");

    match probe(&path, "9.4.0", &good, t) {
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
    match probe(&path, "9.3.0", &bad, t) {
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
        probe(&foreign_path, "9.3.0", &good, t),
        Err(ProbeError::Start(_))
    ));
    // A binary that never answers is killed at the timeout.
    let script = dir.path().join("hangs");
    std::fs::write(&script, "#!/bin/sh\nsleep 30\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let started = std::time::Instant::now();
    assert!(matches!(
        probe(&script, "9.3.0", &good, Duration::from_millis(500)),
        Err(ProbeError::Timeout {
            step: "--version",
            ..
        })
    ));
    assert!(started.elapsed() < Duration::from_secs(10));
}
