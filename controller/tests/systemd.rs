//! The flashed agent under a real systemd: a Debian 12 root filesystem
//! (debootstrap, cached in /var/tmp), flashed by `edgefleet flash` with the
//! shipped unit, sysusers.d and tmpfiles.d files, booted with
//! `systemd-nspawn -b` (systemd as the container's PID 1, the host's network).
//! The agent runs as the unit says (its own user, `ProtectSystem=strict`, the
//! system-call filter, `Type=notify`, the watchdog) and a real controller rolls
//! out a model and then agent releases to it: the good one is handed over by
//! exec under systemd's eyes (same main PID, no restart, the watchdog petted
//! by the new binary), the broken one is restarted by systemd into the
//! previous binary, which reports why.
//!
//! Needs root, `debootstrap` and `systemd-container` (.ci/run installs them);
//! the first run downloads Debian's base packages (about 2 minutes).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::flashed::{
    agent_version, infer, push_own_release, push_release, release_root, roll_out_agent, updates,
    watch_inference,
};
use common::supervisor::{broken_agent, stripped};
use common::*;

/// A Debian 12 root filesystem with systemd, made once with debootstrap and
/// reused (`EDGEFLEET_SYSTEMD_ROOT` names another).
fn debian_root() -> PathBuf {
    let root = std::env::var_os("EDGEFLEET_SYSTEMD_ROOT").map_or_else(
        || PathBuf::from("/var/tmp/edgefleet-systemd-root"),
        PathBuf::from,
    );
    if root.join(".complete").is_file() {
        return root;
    }
    let partial = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let out = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus",
            "bookworm",
        ])
        .arg(&partial)
        .arg("http://deb.debian.org/debian")
        .output()
        .expect("debootstrap is installed (.ci/run installs it: apt-get install debootstrap)");
    assert!(
        out.status.success(),
        "debootstrap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(partial.join(".complete"), "").expect("marker");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root).expect("rename");
    root
}

/// A root filesystem booted with systemd as its init, until dropped.
struct Booted {
    nspawn: Child,
    console: PathBuf,
}

impl Booted {
    fn boot(root: &Path, name: &str, console: &Path) -> Booted {
        let log = std::fs::File::create(console).expect("console log");
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(root)
            .args(["--boot", "--register=no", "--keep-unit"])
            .args(["--console=read-only", "--machine", name])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn is installed (.ci/run installs systemd-container)");
        let booted = Booted {
            nspawn,
            console: console.to_owned(),
        };
        let deadline = Instant::now() + WAIT;
        while booted
            .systemctl(&["is-system-running"])
            .is_none_or(|s| s == "starting" || s == "initializing")
        {
            assert!(
                Instant::now() < deadline,
                "the container did not boot:\n{}",
                booted.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        booted
    }

    /// The container's init, as the host sees it: the `systemd` process in
    /// nspawn's process tree.
    fn init(&self) -> Option<u32> {
        let mut parents = vec![self.nspawn.id()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for p in &parents {
                let children =
                    std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).ok()?;
                for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                    let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).ok()?;
                    if comm.trim() == "systemd" {
                        return Some(c);
                    }
                    next.push(c);
                }
            }
            parents = next;
        }
        None
    }

    /// Runs a command inside the container; its stdout, or None when it
    /// could not run there yet.
    fn run(&self, args: &[&str]) -> Option<String> {
        let init = self.init()?;
        let out = Command::new("nsenter")
            .args(["--target", &init.to_string(), "--all", "--"])
            .args(args)
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn systemctl(&self, args: &[&str]) -> Option<String> {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// A property of the agent's unit (`systemctl show`).
    fn agent(&self, property: &str) -> String {
        self.systemctl(&[
            "show",
            "--value",
            "--property",
            property,
            "edgefleet-agent.service",
        ])
        .unwrap_or_default()
    }

    fn console(&self) -> String {
        let journal = self
            .run(&[
                "journalctl",
                "--no-pager",
                "-n",
                "80",
                "-u",
                "edgefleet-agent.service",
            ])
            .unwrap_or_default();
        format!(
            "{}\n-- the agent's journal --\n{journal}",
            std::fs::read_to_string(&self.console).unwrap_or_default()
        )
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        // SIGTERM asks nspawn for an orderly poweroff of the container.
        let pid = self.nspawn.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Killing the namespace's init takes everything in it along.
        if let Some(init) = self.init() {
            let _ = Command::new("kill")
                .args(["-KILL", &init.to_string()])
                .status();
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// `key = ...` lines of a TOML text set to `value` (the key must be there).
fn set(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key} = ");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with(&prefix)),
        "no {key} in agent.toml:\n{text}"
    );
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with(&prefix) {
                format!("{prefix}{value}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn under_systemd_the_flashed_agent_updates_itself_in_place_and_a_broken_release_is_restarted_away()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let rel_key = release_root(dir.path(), &data);
    let c = Controller::start(&data, free_port());

    // The device: Debian with systemd, flashed as an operator flashes one.
    let root = dir.path().join("gw-sd");
    let copied = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(debian_root())
        .arg(&root)
        .status()
        .expect("cp");
    assert!(copied.success());
    // As the Debian installer writes it (debootstrap does not): the flashed
    // config names the controller's broker as `localhost`.
    std::fs::write(
        root.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )
    .expect("hosts");
    let agent = stripped(&agent_bin());
    run_ok(
        &[
            "flash",
            "--profile",
            &format!(
                "{}/../devices/x86-64-gateway.toml",
                env!("CARGO_MANIFEST_DIR")
            ),
            "--device-id",
            "gw-sd",
            "--tags",
            "site=lab",
            "--binary",
            s(&agent),
            "--root",
            s(&root),
        ],
        &c.env(),
    );
    // Test-speed settings, as an operator may set them on a device: the local
    // API on a free port (the container shares the host's network),
    // telemetry every second, and a drop-in that shortens the watchdog to 4 s,
    // so that a new binary which did not pet it is killed within the test.
    let http = format!("127.0.0.1:{}", free_port());
    let config = root.join("etc/edgefleet/agent.toml");
    let text = std::fs::read_to_string(&config).expect("agent.toml");
    let text = set(&text, "api_listen", &format!("\"{http}\""));
    let text = set(&text, "interval_s", "1");
    std::fs::write(&config, text).expect("agent.toml");
    let dropin = root.join("etc/systemd/system/edgefleet-agent.service.d");
    std::fs::create_dir_all(&dropin).expect("drop-in dir");
    std::fs::write(dropin.join("test.conf"), "[Service]\nWatchdogSec=4\n").expect("drop-in");

    let device = Booted::boot(&root, "gw-sd", &dir.path().join("console.log"));
    let deadline = Instant::now() + WAIT;
    while device.agent("ActiveState") != "active" {
        assert!(
            Instant::now() < deadline,
            "the agent's unit never became active:\n{}",
            device.console()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    while agent_version(&c, "gw-sd") == "-"
        || !c.device("gw-sd")["device"]["online"]
            .as_bool()
            .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "the agent never came online at the controller:\n{}",
            device.console()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let main_pid = device.agent("MainPID");
    let user = device
        .run(&["stat", "-c", "%U", &format!("/proc/{main_pid}")])
        .unwrap_or_default();
    assert_eq!(user, "edgefleet", "the agent runs as its own user");
    assert_eq!(device.agent("WatchdogUSec"), "4s");

    let v1 = push(&c, &bundles.v1);
    let id = start_rollout(&c, &v1, &["--waves", "100%", "--soak-s", "1"]);
    c.wait_rollout(&id, "model rollout", |r| r["phase"] == "completed");
    assert_eq!(infer(&http), 200, "{}", device.console());

    // 1. A good release: this build, saying 9.9.1, handed over by exec.
    let good = push_own_release(&c, dir.path(), "9.9.1", 1, &rel_key);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_inference(vec![http.clone()], stop.clone());
    let started = Instant::now();
    let r = roll_out_agent(&c, &good, "9.9.1", "100%");
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (failed, gap) = watcher.join().expect("watcher");
    assert_eq!(r["phase"], "completed", "{r}\n{}", device.console());
    println!(
        "under systemd: 9.9.1 confirmed in {took:?}; inference: {failed} failed, longest gap {gap:?}"
    );
    assert_eq!(failed, 0, "every inference answered during the hand-over");
    assert_eq!(agent_version(&c, "gw-sd"), "9.9.1");
    assert_eq!(
        std::fs::read_link(root.join("usr/lib/edgefleet/current")).expect("current"),
        Path::new("/usr/lib/edgefleet/agent.b"),
        "the agent switched its link under ProtectSystem=strict"
    );
    // Handed over in place: the same process (an exec), never restarted.
    assert_eq!(device.agent("MainPID"), main_pid);
    assert_eq!(device.agent("NRestarts"), "0", "{}", device.console());
    // The new binary pets the watchdog: three 4 s periods later it still runs.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(device.agent("NRestarts"), "0", "{}", device.console());
    assert_eq!(device.agent("MainPID"), main_pid);
    assert_eq!(device.agent("ActiveState"), "active");
    assert_eq!(infer(&http), 200);

    // 2. A broken release (exits at start): systemd restarts the unit, whose
    // link still names 9.9.1; that agent reports the crash and the rollout
    // halts.
    let broken = push_release(
        &c,
        dir.path(),
        broken_agent("9.9.2", "exit 3"),
        "9.9.2",
        2,
        &rel_key,
    );
    let id = start_rollout(
        &c,
        &broken,
        &[
            "--waves",
            "100%",
            "--soak-s",
            "1",
            "--policy",
            "halt_and_revert",
        ],
    );
    let r = c.wait_rollout(&id, "halted", |r| r["phase"] == "halted");
    let reason = r["members"]["gw-sd"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("trial") && reason.contains("crashed"),
        "{r}\n{}",
        device.console()
    );
    assert_eq!(device.agent("NRestarts"), "1", "systemd restarted it once");
    assert_eq!(device.agent("ActiveState"), "active");
    assert_eq!(agent_version(&c, "gw-sd"), "9.9.1");
    assert_eq!(updates(&c, "gw-sd"), 2);
    assert_eq!(
        std::fs::read_link(root.join("usr/lib/edgefleet/current")).expect("current"),
        Path::new("/usr/lib/edgefleet/agent.b")
    );
    assert_eq!(infer(&http), 200);
}
