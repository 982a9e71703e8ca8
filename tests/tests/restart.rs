//! The controller as a real process (`edgefleet serve`), killed with SIGKILL in
//! the middle of a staged rollout to a simulated fleet, started again on the same
//! data directory and port: the rollout goes on from its persisted state and
//! every device ends on the new bundle, installed once. On the SQLite store and,
//! with `--database postgres://...`, on a real PostgreSQL server.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgefleet::ops::remote::{ApiArgs, Client, write_enrollment};
use edgefleet_devices::Profile;
use edgefleet_devices::sim::{DeviceSpec, FaultPlan, FleetSettings, SimFleet, TlsFiles};
use edgefleet_tests::{edgefleet_bin, wait_for};
use serde_json::{Value, json};

struct Controller {
    child: Child,
    url: String,
    port: u16,
}

impl Controller {
    fn start(data: &Path, mqtt: &str, database: Option<&str>) -> Controller {
        let mut command = Command::new(edgefleet_bin());
        command.args(["serve", "--data-dir"]).arg(data).args([
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            mqtt,
        ]);
        if let Some(url) = database {
            command.args(["--database", url]);
        }
        let mut child = command
            .env("EDGEFLEET_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("controller starts");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (mut url, mut port) = (None, None);
        while url.is_none() || port.is_none() {
            let line = lines.next().expect("readiness lines").expect("line");
            if let Some(u) = line.strip_prefix("controller API listening on ") {
                url = Some(u.to_owned());
            }
            if let Some(p) = line.strip_prefix("devices connect to mqtts://localhost:") {
                port = Some(p.parse().expect("port"));
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Controller {
            child,
            url: url.expect("url"),
            port: port.expect("port"),
        }
    }

    fn api(&self, data: &Path) -> Client {
        let token = std::fs::read_to_string(data.join("admin-token")).expect("token");
        Client::new(&ApiArgs {
            controller: self.url.clone(),
            token: Some(token.trim().to_owned()),
            json: false,
        })
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_controller_killed_mid_rollout_carries_on_after_a_restart() {
    killed_mid_rollout(None);
}

#[test]
fn a_controller_on_postgres_killed_mid_rollout_carries_on_after_a_restart() {
    let url = edgefleet::server::db::testing::shared()
        .create_database()
        .expect("test database");
    killed_mid_rollout(Some(&url));
}

fn killed_mid_rollout(database: Option<&str>) {
    let runtime = edgefleet_tests::runtime();
    let _enter = runtime.enter();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("controller");
    std::fs::create_dir_all(&data).expect("data dir");
    let trust_root = data.join("trust-root.cbor");
    let key = edgefleet_tests::alice_and_trust_root(dir.path(), &trust_root);

    let mut controller = Controller::start(&data, "127.0.0.1:0", database);
    let port = controller.port;
    let api = controller.api(&data);
    let ids: Vec<String> = (1..=8).map(|i| format!("r{i}")).collect();
    let mut specs = Vec::new();
    for id in &ids {
        let out = dir.path().join("identities").join(id);
        let v = api
            .post(&format!("/api/v1/devices/{id}/enroll"), &json!({}))
            .expect("enroll");
        write_enrollment(&v, &out).expect("files");
        specs.push(DeviceSpec {
            id: id.clone(),
            profile: Profile::builtin("raspberry-pi-4").expect("profile"),
            tls: Some(TlsFiles {
                ca: out.join("ca.pem"),
                cert: out.join("device.pem"),
                key: out.join("device.key"),
            }),
            faults: FaultPlan::default(),
            trust_root: None,
        });
    }
    let settings = FleetSettings {
        broker: ([127, 0, 0, 1], port).into(),
        tls: true,
        topic_prefix: edgefleet::server::config::ControllerConfig::default()
            .mqtt
            .topic_prefix,
        trust_root: trust_root.clone(),
        controller_key: dir
            .path()
            .join("identities")
            .join(&ids[0])
            .join("controller.pub"),
        dir: dir.path().join("devices"),
        telemetry_interval: Duration::from_secs(1),
        subscribe_qos: 1,
    };
    let fleet = runtime
        .block_on(SimFleet::start(&settings, specs))
        .expect("fleet");
    let online = |api: &Client| {
        wait_for("every device online", || {
            let v = api.get("/api/v1/devices").ok()?;
            let n = v["devices"]
                .as_array()?
                .iter()
                .filter(|d| d["online"] == Value::Bool(true))
                .count();
            (n == ids.len()).then_some(())
        })
    };
    online(&api);

    let bundle = dir.path().join("v1.efb");
    edgefleet_tests::signed_iris_bundle(&key, &bundle);
    let digest = api.upload("/api/v1/bundles", &bundle).expect("upload")["bundle"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let id = edgefleet_tests::start_rollout_to_all(&api, &digest, &["1", "50%", "100%"], 3000);
    let view =
        |api: &Client| api.get(&format!("/api/v1/rollouts/{id}")).expect("view")["rollout"].clone();
    // Kill it once the second wave is under way.
    wait_for("wave 2", || {
        (view(&api)["wave"].as_u64() >= Some(2)).then_some(())
    });
    let before = view(&api);
    assert_ne!(before["phase"], "completed", "killed too late: {before}");
    let _ = controller.child.kill();
    let _ = controller.child.wait();
    drop(controller);

    let controller = Controller::start(&data, &format!("127.0.0.1:{port}"), database);
    let api = controller.api(&data);
    let resumed = view(&api);
    assert!(
        resumed["wave"].as_u64() >= before["wave"].as_u64(),
        "the rollout went back: {before} -> {resumed}"
    );
    online(&api);
    let done = wait_for("the rollout to complete", || {
        let r = view(&api);
        matches!(r["phase"].as_str(), Some("completed" | "halted" | "paused")).then_some(r)
    });
    assert_eq!(done["phase"], "completed", "{done}");
    for d in fleet.devices() {
        assert_eq!(done["members"][d.id()]["state"], "succeeded", "{done}");
        let state = d.state();
        assert_eq!(
            state
                .active_bundles()
                .map(|b| b.release)
                .collect::<Vec<_>>(),
            vec![1]
        );
        // The last install is this bundle's, and it did not fail.
        let last = state.last_install.as_ref().expect("an install record");
        assert_eq!(last.digest.to_hex(), digest);
        assert!(last.failure.is_none(), "{last:?}");
    }
    let log = done["log"].to_string();
    assert!(log.contains("rollout complete"), "{log}");
    if let Some(url) = database {
        // The state lived in PostgreSQL, not in a file beside the data.
        assert!(!data.join("controller.db").exists());
        let (url, id) = (url.to_owned(), id.clone());
        let phase: String = std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
            c.query_one("SELECT phase FROM rollouts WHERE id = $1", &[&id])
                .expect("rollout row")
                .get(0)
        })
        .join()
        .expect("join");
        assert_eq!(phase, "completed");
    }
    runtime.block_on(fleet.stop());
}
