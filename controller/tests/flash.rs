//! `edgefleet flash` end to end: a real controller process, the real CLI, the
//! agent binary flashed into a directory laid out as a device's root
//! filesystem, then started from there (under qemu-user for the ARM builds)
//! until the controller sees it online and a rollout reaches it; the install
//! archive and its `install.sh`; a real sshd on loopback; and the refusals.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// The host's agent, stripped (a debug build is hundreds of MB, most of it
/// debug information; flash refuses binaries over 128 MiB).
fn flashable_agent() -> PathBuf {
    common::supervisor::stripped(&agent_bin())
}

/// Runs `edgefleet` in `cwd`; (success, stdout + stderr).
fn run(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (bool, String) {
    let out = Command::new(EDGEFLEET)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .expect("edgefleet runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The config of an agent flashed into `root`, with its paths moved under
/// `root` (the files sit where they would on the device; only the process
/// runs here) and a 1 s telemetry interval; written beside the root.
fn rerooted_config(root: &Path, profile_data: &str) -> PathBuf {
    let text = std::fs::read_to_string(root.join("etc/edgefleet/agent.toml")).expect("agent.toml");
    let text = text
        .replace(
            "\"/etc/edgefleet",
            &format!("\"{}", s(&root.join("etc/edgefleet"))),
        )
        .replace(
            "\"/usr/lib/edgefleet",
            &format!("\"{}", s(&root.join("usr/lib/edgefleet"))),
        )
        .replace(
            &format!("\"{profile_data}"),
            &format!("\"{}", s(&root.join(profile_data.trim_start_matches('/')))),
        );
    let text = with_one_second_interval(&text);
    let path = root.with_extension("toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// `interval_s = N` -> `interval_s = 1`.
fn with_one_second_interval(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with("interval_s = ") {
                "interval_s = 1".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn wait_online(c: &Controller, id: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, v) = c.call("GET", &format!("/api/v1/devices/{id}"), None);
        if status == 200 && v["device"]["online"].as_bool() == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never came online: {v}\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("file").permissions().mode() & 0o7777
}

/// One OIP inference of the iris model through an agent's local API.
fn infer(api: &str) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let body = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
        "data": [5.1, 3.5, 1.4, 0.2]}]});
    let mut r = agent
        .post(format!("{api}/v2/models/iris/infer"))
        .send_json(body)
        .expect("infer");
    assert_eq!(r.status().as_u16(), 200);
    r.body_mut().read_json().expect("json")
}

#[test]
fn a_device_flashed_into_a_directory_comes_online_and_takes_a_rollout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let c = Controller::start(&data, free_port());
    let root = dir.path().join("gw-1-root");
    std::fs::create_dir(&root).expect("root");
    let agent = flashable_agent();
    let (ok, text) = run(
        &[
            "flash",
            "--profile",
            &format!(
                "{}/../devices/x86-64-gateway.toml",
                env!("CARGO_MANIFEST_DIR")
            ),
            "--device-id",
            "gw-1",
            "--tags",
            "site=lab",
            "--binary",
            s(&agent),
            "--root",
            s(&root),
        ],
        &c.env(),
        dir.path(),
    );
    assert!(ok, "{text}");
    assert!(text.contains("flashed gw-1"), "{text}");
    // Laid out as on the device.
    let bin = root.join("usr/local/bin/edgefleet-agent");
    assert_eq!(
        std::fs::read(&bin).expect("binary"),
        std::fs::read(&agent).expect("agent")
    );
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&root.join("etc/edgefleet/device.key")), 0o600);
    assert_eq!(
        std::fs::read(root.join("etc/edgefleet/trust-root.cbor")).expect("trust root"),
        std::fs::read(data.join("trust-root.cbor")).expect("controller's")
    );
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/edgefleet-agent.service"))
        .expect("unit");
    assert!(unit.contains(
        "ExecStart=/usr/local/bin/edgefleet-agent --config /etc/edgefleet/agent.toml run"
    ));
    assert_eq!(
        std::fs::read_link(
            root.join("etc/systemd/system/multi-user.target.wants/edgefleet-agent.service")
        )
        .expect("enabled"),
        Path::new("/etc/systemd/system/edgefleet-agent.service")
    );
    // The flashed unit passes systemd's own check (run on a copy whose paths
    // point into the root, where the files are).
    let checked = dir.path().join("edgefleet-agent.service");
    std::fs::write(
        &checked,
        unit.replace("/usr/local/bin/edgefleet-agent", s(&bin)),
    )
    .expect("unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .expect("systemd-analyze is installed (.ci/run installs systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    assert!(root.join("usr/lib/sysusers.d/edgefleet.conf").is_file());
    assert!(root.join("usr/lib/tmpfiles.d/edgefleet.conf").is_file());
    assert_eq!(mode(&root.join("var/lib/edgefleet")), 0o700);
    assert!(
        c.device("gw-1")["device"]["enrolled"]
            .as_bool()
            .unwrap_or(false)
    );

    // Started from the flashed files, it comes online and takes a rollout.
    let config = rerooted_config(&root, "/var/lib/edgefleet");
    let a = Agent::spawn(
        Command::new(&bin),
        &config,
        "gw-1",
        &root.with_extension("log"),
    );
    wait_online(&c, "gw-1");
    let digest = push(&c, &bundles.v1);
    let id = start_rollout(&c, &digest, &["--waves", "1,100%", "--soak-s", "1"]);
    c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    assert_eq!(versions(&c, std::slice::from_ref(&a)), ["1.0.0"]);
    let out = infer(&a.api);
    assert!(
        out["outputs"].as_array().is_some_and(|o| !o.is_empty()),
        "{out}"
    );
}

#[test]
fn flash_refuses_what_it_cannot_finish_and_enrolls_nobody_then() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    make_bundles(dir.path(), &data);
    let c = Controller::start(&data, free_port());
    let env = c.env();
    let agent = flashable_agent();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let flash = |profile: &str, id: &str, extra: &[&str]| {
        let mut args = vec!["flash", "--profile", profile, "--device-id", id];
        args.extend_from_slice(extra);
        run(&args, &env, dir.path())
    };
    let not_enrolled = |id: &str| {
        let (status, _) = c.call("GET", &format!("/api/v1/devices/{id}"), None);
        assert_eq!(status, 404, "{id} was enrolled by a refused flash");
    };

    // No binary built for the profile's target (cross/out/... is missing here).
    let (ok, text) = flash("raspberry-pi-4", "pi-1", &["--root", s(&root)]);
    assert!(!ok);
    assert!(
        text.contains("cross/build.sh aarch64-unknown-linux-musl"),
        "{text}"
    );
    // A binary for another architecture.
    let (ok, text) = flash(
        "raspberry-pi-4",
        "pi-1",
        &["--binary", s(&agent), "--root", s(&root)],
    );
    assert!(!ok);
    assert!(
        text.contains("is an agent for x86_64") && text.contains("aarch64"),
        "{text}"
    );
    // Not a binary at all.
    let (ok, text) = flash(
        "x86-64-gateway",
        "gw-9",
        &[
            "--binary",
            s(&data.join("trust-root.cbor")),
            "--root",
            s(&root),
        ],
    );
    assert!(!ok && text.contains("not an ELF"), "{text}");
    // Destinations that cannot be written.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("file");
    let (ok, text) = flash(
        "x86-64-gateway",
        "gw-9",
        &["--binary", s(&agent), "--root", s(&file)],
    );
    assert!(!ok && text.contains("not a directory"), "{text}");
    let (ok, text) = flash(
        "x86-64-gateway",
        "gw-9",
        &["--binary", s(&agent), "--root", "/proc"],
    );
    assert!(!ok && text.contains("not writable"), "{text}");
    let (ok, text) = flash(
        "x86-64-gateway",
        "gw-9",
        &["--binary", s(&agent), "--out", s(&file.join("x.tar.gz"))],
    );
    assert!(!ok && text.contains("not a directory"), "{text}");
    // A bad profile names its field; a bad id says why.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        include_str!("../../devices/raspberry-pi-4.toml")
            .replace("raspberry-pi-4", "bad")
            .replace("cpus = 4", "cpus = 0"),
    )
    .expect("profile");
    let (ok, text) = flash(
        s(&bad),
        "gw-9",
        &["--binary", s(&agent), "--root", s(&root)],
    );
    assert!(!ok && text.contains("cpus"), "{text}");
    let (ok, text) = flash(
        "x86-64-gateway",
        "no/slashes",
        &["--binary", s(&agent), "--root", s(&root)],
    );
    assert!(!ok && text.contains("--device-id"), "{text}");
    for id in ["pi-1", "gw-9"] {
        not_enrolled(id);
    }
    assert_eq!(
        std::fs::read_dir(&root).expect("root").count(),
        0,
        "nothing written"
    );

    // A taken id is refused, and the installed files stay as they were.
    let (ok, text) = flash(
        "x86-64-gateway",
        "gw-1",
        &["--binary", s(&agent), "--root", s(&root)],
    );
    assert!(ok, "{text}");
    let key = std::fs::read(root.join("etc/edgefleet/device.key")).expect("key");
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("dir");
    let (ok, text) = flash(
        "x86-64-gateway",
        "gw-1",
        &["--binary", s(&agent), "--root", s(&other)],
    );
    assert!(
        !ok && text.contains("gw-1 is taken") && text.contains("--replace"),
        "{text}"
    );
    assert_eq!(std::fs::read_dir(&other).expect("dir").count(), 0);
    // Flashing the same root again needs --force; with --replace, a new key.
    let (ok, text) = flash(
        "x86-64-gateway",
        "gw-2",
        &["--binary", s(&agent), "--root", s(&root)],
    );
    assert!(
        !ok && text.contains("device gw-1") && text.contains("--force"),
        "{text}"
    );
    not_enrolled("gw-2");
    let (ok, text) = flash(
        "x86-64-gateway",
        "gw-1",
        &[
            "--binary",
            s(&agent),
            "--root",
            s(&root),
            "--force",
            "--replace",
        ],
    );
    assert!(ok, "{text}");
    assert_ne!(
        std::fs::read(root.join("etc/edgefleet/device.key")).expect("key"),
        key,
        "re-enrolled: a new key"
    );
}

#[test]
fn the_install_archive_installs_the_same_device_with_its_script() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    make_bundles(dir.path(), &data);
    let c = Controller::start(&data, free_port());
    let agent = flashable_agent();
    // An existing enrollment (as `devices enroll --out` wrote it) is used as is.
    let enrollment = dir.path().join("enrollment");
    run_ok(
        &["devices", "enroll", "gw-5", "--out", s(&enrollment)],
        &c.env(),
    );
    let archive = dir.path().join("gw-5.tar.gz");
    let (ok, text) = run(
        &[
            "flash",
            "--profile",
            "x86-64-gateway",
            "--device-id",
            "gw-5",
            "--binary",
            s(&agent),
            "--enrollment",
            s(&enrollment),
            "--out",
            s(&archive),
        ],
        &c.env(),
        dir.path(),
    );
    assert!(ok, "{text}");
    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir(&unpacked).expect("dir");
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .expect("tar");
    assert!(status.success());
    let root = dir.path().join("device");
    std::fs::create_dir(&root).expect("dir");
    let out = Command::new("sh")
        .arg(unpacked.join("edgefleet-flash/install.sh"))
        .arg(&root)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(root.join("etc/edgefleet/device.key")).expect("key"),
        std::fs::read(enrollment.join("device.key")).expect("enrolled key")
    );
    assert_eq!(mode(&root.join("etc/edgefleet/device.key")), 0o600);
    let config = std::fs::read_to_string(root.join("etc/edgefleet/agent.toml")).expect("config");
    assert!(config.contains("device_id = \"gw-5\""), "{config}");
    // The installed agent comes online.
    let config = rerooted_config(&root, "/var/lib/edgefleet");
    let _a = Agent::spawn(
        Command::new(root.join("usr/local/bin/edgefleet-agent")),
        &config,
        "gw-5",
        &root.with_extension("log"),
    );
    wait_online(&c, "gw-5");
}

/// A real sshd on a free loopback port, for the current user, with its own
/// host key and an authorized client key; stopped on drop.
struct Sshd {
    child: std::process::Child,
    port: u16,
    client_key: PathBuf,
    user: String,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let keygen = |name: &str| {
            let path = dir.join(name);
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&path)
                .status()
                .expect("ssh-keygen is installed (.ci/run installs openssh-client)");
            assert!(ok.success());
            path
        };
        let host_key = keygen("host_key");
        let client_key = keygen("client_key");
        std::fs::copy(
            client_key.with_extension("pub"),
            dir.join("authorized_keys"),
        )
        .expect("authorized_keys");
        let user = String::from_utf8(Command::new("id").arg("-un").output().expect("id").stdout)
            .expect("utf-8")
            .trim()
            .to_string();
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nPidFile {}\n\
                 AuthorizedKeysFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nAllowUsers {user}\n",
                s(&host_key),
                s(&dir.join("sshd.pid")),
                s(&dir.join("authorized_keys")),
            ),
        )
        .expect("sshd_config");
        // sshd's privilege separation directory (Debian's package makes it at boot).
        let _ = std::fs::create_dir_all("/run/sshd");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).expect("log"))
            .spawn()
            .expect("sshd is installed (.ci/run installs openssh-server)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd {
            child,
            port,
            client_key,
            user,
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn flash_over_ssh_installs_through_a_real_sshd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    make_bundles(dir.path(), &data);
    let c = Controller::start(&data, free_port());
    let sshd = Sshd::start(dir.path());
    let root = dir.path().join("remote-root");
    std::fs::create_dir(&root).expect("dir");
    let target = format!("ssh://{}@127.0.0.1:{}", sshd.user, sshd.port);
    let identity = format!("IdentityFile={}", s(&sshd.client_key));
    let flash = |id: &str, root: &Path| {
        run(
            &[
                "flash",
                "--profile",
                "x86-64-gateway",
                "--device-id",
                id,
                "--binary",
                s(&flashable_agent()),
                "--ssh",
                &target,
                "--remote-root",
                s(root),
                "--ssh-option",
                &identity,
                "--ssh-option",
                "UserKnownHostsFile=/dev/null",
                "--ssh-option",
                "StrictHostKeyChecking=no",
                "--ssh-option",
                "LogLevel=ERROR",
            ],
            &c.env(),
            dir.path(),
        )
    };
    // A remote root that is not there: refused before enrolling.
    let (ok, text) = flash("gw-7", &dir.path().join("missing"));
    assert!(!ok && text.contains("is not a directory"), "{text}");
    let (status, _) = c.call("GET", "/api/v1/devices/gw-7", None);
    assert_eq!(status, 404, "refused flash enrolled nobody");
    let (ok, text) = flash("gw-7", &root);
    assert!(
        ok,
        "{text}\n{}",
        std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default()
    );
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/edgefleet-agent")).expect("binary"),
        std::fs::read(flashable_agent()).expect("agent")
    );
    assert_eq!(mode(&root.join("etc/edgefleet/device.key")), 0o600);
    assert!(
        std::fs::read_link(
            root.join("etc/systemd/system/multi-user.target.wants/edgefleet-agent.service")
        )
        .is_ok()
    );
    let leftovers: Vec<_> = std::fs::read_dir(root.join("etc/edgefleet"))
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".edgefleet-new"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Again without --force: the installed agent is kept.
    let (ok, text) = flash("gw-8", &root);
    assert!(!ok && text.contains("--force"), "{text}");
}

/// The ARM agents, cross-built and run under qemu-user: flashed with their
/// profiles, started from the flashed files, online at the controller, a
/// rollout reaches both, and both serve inference. Needs the cross builds
/// (about an hour each on 2 cores, so not in CI):
///
/// ```text
/// cross/build.sh aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf
/// cargo test -p edgefleet --test flash -- --ignored
/// ```
///
/// `EDGEFLEET_CROSS_TARGETS=armv7-unknown-linux-musleabihf` runs one of them.
#[test]
#[ignore = "needs cross/build.sh aarch64 and armv7 builds and qemu-user-static: cargo test -p edgefleet --test flash -- --ignored"]
fn arm_agents_under_qemu_are_flashed_come_online_and_take_a_rollout() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let c = Controller::start(&data, free_port());
    let mut agents = Vec::new();
    // Both by default; EDGEFLEET_CROSS_TARGETS=<triple>,... names fewer.
    let wanted = std::env::var("EDGEFLEET_CROSS_TARGETS")
        .unwrap_or_else(|_| "aarch64-unknown-linux-musl,armv7-unknown-linux-musleabihf".into());
    let boards = [
        (
            "raspberry-pi-4",
            "aarch64-unknown-linux-musl",
            "qemu-aarch64-static",
            "pi4-qemu",
        ),
        (
            "raspberry-pi-3",
            "armv7-unknown-linux-musleabihf",
            "qemu-arm-static",
            "pi3-qemu",
        ),
    ];
    let boards: Vec<_> = boards
        .into_iter()
        .filter(|(_, t, _, _)| wanted.split(',').any(|w| w == *t))
        .collect();
    assert!(
        !boards.is_empty(),
        "EDGEFLEET_CROSS_TARGETS={wanted} names no ARM target"
    );
    for (profile, target, qemu, id) in boards {
        let binary = repo.join("cross/out").join(target).join("edgefleet-agent");
        assert!(
            binary.is_file(),
            "{} is missing: run cross/build.sh {target}",
            binary.display()
        );
        let root = dir.path().join(id);
        std::fs::create_dir(&root).expect("root");
        let config = flash_board(&c, profile, id, &root);
        let mut cmd = Command::new(qemu);
        cmd.arg(root.join("usr/local/bin/edgefleet-agent"));
        agents.push(Agent::spawn(cmd, &config, id, &root.with_extension("log")));
        wait_online(&c, id);
        let arch = c.device(id)["device"]["arch"].clone();
        assert_eq!(
            arch,
            if id == "pi4-qemu" { "aarch64" } else { "arm" },
            "reported by the agent"
        );
    }
    let digest = push(&c, &bundles.v1);
    let id = start_rollout(&c, &digest, &["--waves", "1,100%", "--soak-s", "1"]);
    c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    assert!(versions(&c, &agents).iter().all(|v| v == "1.0.0"));
    let host = infer_host_reference();
    for a in &agents {
        let out = infer(&a.api);
        assert_eq!(numbers(&out["outputs"]).len(), numbers(&host).len());
        for (x, h) in numbers(&out["outputs"]).iter().zip(numbers(&host)) {
            assert!(
                (x - h).abs() <= 1e-4 * h.abs().max(1.0),
                "{} answers {} where the x86-64 build answers {host}",
                a.id,
                out["outputs"]
            );
        }
    }
}

/// An aarch64 agent release rolled out to the flashed qemu board: the cross
/// build, saying 9.9.1, made into a release and signed with the operator's
/// commands (`agent-release build`, `bundle verify`, `bundles push`, `rollout
/// start --agent-version-below`). The board's agent runs under qemu-user from
/// its flashed slot layout, under a supervisor that restarts like systemd; it
/// fetches its binary, probes it (`--version`, `config check`), execs it
/// (binfmt_misc runs the new aarch64 binary), the new agent confirms and
/// switches `current`, and the model answers all along. Needs the aarch64
/// cross build (about an hour on 2 cores, so not in CI) and binfmt_misc:
///
/// ```text
/// cross/build.sh aarch64-unknown-linux-musl
/// mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc   # where it is not mounted
/// update-binfmts --enable qemu-aarch64
/// cargo test -p edgefleet --test flash -- --ignored an_aarch64_agent_release
/// ```
#[test]
#[ignore = "needs cross/build.sh aarch64 and binfmt_misc for qemu-aarch64: cargo test -p edgefleet --test flash -- --ignored an_aarch64_agent_release"]
fn an_aarch64_agent_release_reaches_the_flashed_qemu_board_and_it_keeps_serving() {
    use common::flashed::{agent_version, release_root, roll_out_agent, watch_inference};
    use common::supervisor::{Supervisor, version_of};
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = "aarch64-unknown-linux-musl";
    let binary = repo.join("cross/out").join(target).join("edgefleet-agent");
    assert!(
        binary.is_file(),
        "{} is missing: run cross/build.sh {target}",
        binary.display()
    );
    // The agent execs its new binary itself: the kernel must hand an aarch64
    // executable to qemu (qemu-user alone runs only the first one).
    let binfmt =
        std::fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64").unwrap_or_default();
    assert!(
        binfmt.starts_with("enabled"),
        "binfmt_misc does not run aarch64 binaries: update-binfmts --enable qemu-aarch64 \
         (after mounting /proc/sys/fs/binfmt_misc)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    release_root(dir.path(), &data);
    let c = Controller::start(&data, free_port());
    let id = "pi4-qemu";
    let root = dir.path().join(id);
    std::fs::create_dir(&root).expect("root");
    let config = flash_board(&c, "raspberry-pi-4", id, &root);
    let link = root.join("usr/local/bin/edgefleet-agent");
    let http = format!("127.0.0.1:{}", free_port());
    let board = Supervisor::start(
        &link,
        &["--config", s(&config), "run", "--http", &http],
        &root.with_extension("log"),
    );
    assert_eq!(board.api(), http);
    let api = format!("http://{http}");
    wait_online(&c, id);
    assert_eq!(c.device(id)["device"]["arch"], "aarch64");
    let v1 = push(&c, &bundles.v1);
    let rollout = start_rollout(&c, &v1, &["--waves", "100%", "--soak-s", "1"]);
    c.wait_rollout(&rollout, "model rollout", |r| r["phase"] == "completed");
    assert!(!infer(&api)["outputs"].is_null());
    let running = env!("CARGO_PKG_VERSION");
    assert_eq!(agent_version(&c, id), running);

    // The release, as an operator makes it.
    let own = std::fs::read(&binary).expect("the cross build");
    let next = dir.path().join("edgefleet-agent-9.9.1");
    std::fs::write(
        &next,
        edgefleet_agent::version::rewrite_version(&own, "9.9.1").expect("version slot"),
    )
    .expect("next binary");
    let release = dir.path().join("agent-9.9.1.efb");
    let (ok, text) = run(
        &[
            "agent-release",
            "build",
            "--binary",
            s(&next),
            "--target",
            target,
            "--version",
            "9.9.1",
            "--release",
            "1",
            "--out",
            s(&release),
            "--key",
            s(&dir.path().join("keys/rel.key")),
        ],
        &[],
        dir.path(),
    );
    assert!(ok, "{text}");
    let (ok, text) = run(
        &[
            "bundle",
            "verify",
            s(&release),
            "--trust",
            s(&data.join("trust-root.cbor")),
        ],
        &[],
        dir.path(),
    );
    assert!(ok, "{text}");
    let digest = push(&c, &release);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_inference(vec![http.clone()], stop.clone());
    let started = Instant::now();
    let r = roll_out_agent(&c, &digest, "9.9.1", "100%");
    assert_eq!(r["phase"], "completed", "{r}");
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (failed, gap) = watcher.join().expect("watcher");

    assert_eq!(agent_version(&c, id), "9.9.1");
    assert_eq!(version_of(&link), "edgefleet-agent 9.9.1");
    assert_eq!(
        std::fs::read_link(root.join("usr/lib/edgefleet/current"))
            .expect("current")
            .file_name(),
        Some(std::ffi::OsStr::new("agent.b"))
    );
    assert!(
        board.exits().is_empty(),
        "the agent exited: {:?}",
        board.exits()
    );
    assert_eq!(failed, 0, "inference requests unanswered during the update");
    assert!(!infer(&api)["outputs"].is_null());
    eprintln!(
        "aarch64 agent {running} -> 9.9.1 on the qemu board: {:.1} s, longest inference gap {} ms",
        took.as_secs_f64(),
        gap.as_millis()
    );
}

/// Flashes the ARM board `id` of `profile` (its cross build from
/// `cross/out/`) into `root`, tagged `site=lab`: the config to start its agent
/// with ([`rerooted_config`]).
fn flash_board(c: &Controller, profile: &str, id: &str, root: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (ok, text) = run(
        &[
            "flash",
            "--profile",
            profile,
            "--device-id",
            id,
            "--tags",
            "site=lab",
            "--root",
            s(root),
        ],
        &c.env(),
        &repo,
    );
    assert!(ok, "{text}");
    rerooted_config(root, "/var/lib/edgefleet")
}

/// Every number of every output, in order.
fn numbers(outputs: &Value) -> Vec<f64> {
    outputs
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|o| o["data"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .collect()
}

/// The iris outputs of the host's agent for the input [`infer`] sends.
fn infer_host_reference() -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let c = Controller::start(&data, free_port());
    let a = Agent::enroll_and_start(&c, dir.path(), "host", "site=lab");
    let digest = push(&c, &bundles.v1);
    let id = start_rollout(&c, &digest, &["--waves", "1,100%", "--soak-s", "1"]);
    c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    infer(&a.api)["outputs"].clone()
}
