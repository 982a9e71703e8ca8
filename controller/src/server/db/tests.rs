//! The store against a real SQLite file.

use super::*;
use edgefleet_shared::protocol::{
    AgentMetrics, BundleRef, DeviceMetrics, DeviceState, Event, EventKind, ModelMetrics, Slot,
    SlotRole, SlotState, Telemetry,
};
use edgefleet_shared::{Arch, DeviceId, Digest, ModelChannel, UnixTime};

/// The backend a test runs on: every store test runs on both.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A fresh, empty store.
struct Store {
    db: Db,
    /// The SQLite file's directory, kept while the test runs.
    dir: Option<tempfile::TempDir>,
    /// The PostgreSQL database's URL.
    url: Option<String>,
}

/// A new database on the shared test PostgreSQL server (started on first use).
async fn postgres_database() -> String {
    tokio::task::spawn_blocking(|| super::testing::shared().create_database())
        .await
        .expect("join")
        .expect("test database")
}

/// Runs `sql` on a PostgreSQL database from outside the store.
async fn postgres_batch(url: &str, sql: &'static str) {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        c.batch_execute(sql).expect("batch");
    })
    .await
    .expect("join");
}

async fn fresh(kind: Kind) -> Store {
    match kind {
        Kind::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = Db::open(&dir.path().join("c.db")).await.expect("open");
            Store {
                db,
                dir: Some(dir),
                url: None,
            }
        }
        Kind::Postgres => {
            let url = postgres_database().await;
            let db = Db::open_at(&StoreLocation::Postgres {
                url: url.clone(),
                readers: 2,
            })
            .await
            .expect("connect");
            assert_eq!(db.backend(), "postgres");
            Store {
                db,
                dir: None,
                url: Some(url),
            }
        }
    }
}

impl Store {
    /// Makes every audit insert fail from now on (a trigger; a full disk or a
    /// SIGKILL in a real run).
    async fn refuse_audit(&self) {
        if let Some(dir) = &self.dir {
            let c = rusqlite::Connection::open(dir.path().join("c.db")).expect("second connection");
            c.execute_batch(
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'no audit'); END;",
            )
            .expect("trigger");
        }
        if let Some(url) = &self.url {
            postgres_batch(
                url,
                "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
                    $$ BEGIN RAISE EXCEPTION 'no audit'; END $$;
                 CREATE TRIGGER refuse_audit BEFORE INSERT ON audit
                    FOR EACH ROW EXECUTE FUNCTION refuse_audit();",
            )
            .await;
        }
    }
}

/// Each named test (an `async fn(Kind)`) on SQLite and on PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Sqlite).await;
            })*
        }
        mod on_postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Postgres).await;
            })*
        }
    };
}

on_both_backends!(
    devices_events_and_telemetry_round_trip,
    rollouts_commands_and_audit_are_kept,
    a_command_sent_again_keeps_its_id,
    the_latest_report_is_the_last_received_whatever_number_the_device_gave_it,
    a_change_and_its_audit_record_are_stored_together_or_not_at_all,
    dashboard_sessions_last_until_they_end_or_are_closed,
    a_devices_latest_drift_report_is_kept_with_it,
    a_report_of_several_channels_is_a_row_per_channel_and_counts_once,
    a_report_received_after_the_offline_state_shows_the_device_online_again,
    states_stored_in_one_batch_leave_each_devices_last,
);

/// A device's state with no slots, at agent version 0.1.0.
fn bare_state(id: &str, online: bool) -> DeviceState {
    DeviceState {
        device: dev(id),
        at: UnixTime(10),
        online,
        agent_version: "0.1.0".into(),
        arch: Arch::new("x86_64").expect("arch"),
        slots: Vec::new(),
        last_install: None,
    }
}

/// The state writer stores what queued in one transaction, in the order it
/// came: a device's later state in the batch is the one kept. A device read
/// alone (`Db::device`) is its row of the list.
async fn states_stored_in_one_batch_leave_each_devices_last(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    db.device_states(&[
        (bare_state("cam-1", true), 100),
        (bare_state("cam-2", true), 110),
        (bare_state("cam-1", false), 120),
    ])
    .await
    .expect("states");
    let seen: Vec<_> = db
        .devices()
        .await
        .expect("devices")
        .into_iter()
        .map(|d| (d.id.to_string(), d.online, d.last_seen))
        .collect();
    assert_eq!(
        seen,
        [
            ("cam-1".to_owned(), false, Some(120)),
            ("cam-2".to_owned(), true, Some(110))
        ]
    );
    // One device alone is its row of the whole list; an unknown one is none.
    let all = db.devices().await.expect("devices");
    let one = db
        .device("cam-2")
        .await
        .expect("device")
        .expect("cam-2 known");
    assert_eq!(one, all[1]);
    assert!(db.device("cam-9").await.expect("device").is_none());
}

/// A will can arrive after the device's next connection announced it online
/// (a broker cluster publishing the will of a connection attempt that failed):
/// a report received after the offline state proves the device is connected;
/// one received before it (the device's last, stored late) does not.
async fn a_report_received_after_the_offline_state_shows_the_device_online_again(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    let d = Digest::of(b"bundle");
    let state = |online| bare_state("cam-1", online);
    let online = || async { db.devices().await.expect("devices")[0].online };
    db.device_state(&state(true), 100).await.expect("online");
    db.device_state(&state(false), 200).await.expect("will");
    assert!(!online().await);
    // Its last report, received before the will, stored after it.
    db.insert_telemetry(vec![(telemetry("cam-1", 1, d, 5), 150)])
        .await
        .expect("report");
    assert!(!online().await, "a report from before the will");
    db.insert_telemetry(vec![(telemetry("cam-1", 2, d, 5), 250)])
        .await
        .expect("report");
    assert!(online().await, "a report from after the will");
    // And a real will after that holds.
    db.device_state(&state(false), 300).await.expect("will");
    assert!(!online().await);
}

async fn a_report_of_several_channels_is_a_row_per_channel_and_counts_once(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    let (iris, vision) = (Digest::of(b"iris"), Digest::of(b"vision"));
    let two = |seq: u64| {
        let one = telemetry("cam-1", seq, iris, 10 * seq);
        let part = |name: &str, digest: Digest| edgefleet_shared::protocol::ChannelTelemetry {
            channel: ModelChannel::new(name).expect("channel"),
            model: telemetry("cam-1", seq, digest, seq).model,
            drift: None,
            shadow: None,
        };
        Telemetry {
            model: None,
            channels: vec![part("iris", iris), part("vision", vision)],
            ..one
        }
    };
    // One channel first, then two: the latest report is the one with two.
    let batch = vec![
        (telemetry("cam-1", 1, iris, 10), 100),
        (two(2), 200),
        (two(2), 201),
    ];
    assert_eq!(
        db.insert_telemetry(batch).await.expect("batch"),
        2,
        "a report counts once"
    );
    let latest = db.latest_telemetry(0).await.expect("latest");
    let mut got: Vec<(u64, Option<Digest>)> = latest.iter().map(|t| (t.seq, t.digest)).collect();
    got.sort_by_key(|(_, d)| d.map(|d| d.to_hex()));
    let mut want = vec![(2, Some(iris)), (2, Some(vision))];
    want.sort_by_key(|(_, d)| d.map(|d| d.to_hex()));
    assert_eq!(
        got, want,
        "that report's row of each channel, not the older one"
    );
    // Each row's body reads as a one-channel report of its channel.
    let rows = db.telemetry("cam-1", 0, 300, 10).await.expect("rows");
    assert_eq!(rows.len(), 3);
    // A device back to one channel: only its newest report counts.
    db.insert_telemetry(vec![(telemetry("cam-1", 3, iris, 30), 300)])
        .await
        .expect("one");
    let latest = db.latest_telemetry(0).await.expect("latest");
    assert_eq!(latest.len(), 1);
    assert_eq!((latest[0].seq, latest[0].digest), (3, Some(iris)));
}

async fn a_devices_latest_drift_report_is_kept_with_it(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    let audit = Audit {
        actor: "admin".into(),
        action: "device.enroll".into(),
        target: "cam-1".into(),
        before: None,
        after: None,
        at: 1,
    };
    db.enroll(vec![(dev("cam-1"), BTreeMap::new(), "f1".into(), audit)], 1)
        .await
        .expect("enroll");
    let digest = Digest::of(b"m");
    let with_drift = |seq: u64, drifted: bool| {
        let mut t = telemetry("cam-1", seq, digest, 10);
        t.drift = Some(edgefleet_shared::protocol::DriftReport {
            digest,
            window: seq,
            started: UnixTime(1),
            rows: 100,
            closed: true,
            inputs: Vec::new(),
            outputs: Vec::new(),
            drifted_share: if drifted { 0.5 } else { 0.0 },
            drifted,
        });
        t
    };
    let drift_of = |rows: Vec<DeviceRow>| rows.into_iter().next().and_then(|d| d.drift);
    assert_eq!(drift_of(db.devices().await.expect("devices")), None);
    // In one batch, the later received wins; a report without drift changes nothing.
    db.insert_telemetry(vec![
        (with_drift(1, false), 100),
        (with_drift(2, true), 200),
    ])
    .await
    .expect("insert");
    db.insert_telemetry(vec![(telemetry("cam-1", 3, digest, 20), 300)])
        .await
        .expect("insert");
    let d = drift_of(db.devices().await.expect("devices")).expect("drift kept");
    assert_eq!((d.received_at, d.drifted), (200, true));
    // An older report arriving late does not replace a newer one.
    db.insert_telemetry(vec![(with_drift(4, false), 150)])
        .await
        .expect("insert");
    let d = drift_of(db.devices().await.expect("devices")).expect("drift kept");
    assert_eq!((d.received_at, d.drifted), (200, true));
    db.insert_telemetry(vec![(with_drift(5, false), 400)])
        .await
        .expect("insert");
    let d = drift_of(db.devices().await.expect("devices")).expect("drift kept");
    assert_eq!((d.received_at, d.drifted), (400, false));
}

async fn dashboard_sessions_last_until_they_end_or_are_closed(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    db.insert_token("tok-hash", "olivia", "operator", 1, None)
        .await
        .expect("token");
    db.open_session("s1", "tok-hash", "form-1", 100, 1_000)
        .await
        .expect("open");
    db.open_session("s2", "unknown-token", "form-2", 100, 1_000)
        .await
        .expect("open");
    let alive = db.session("s1", 999).await.expect("read");
    assert_eq!(
        alive,
        Some(("olivia".into(), "operator".into(), "form-1".into()))
    );
    assert_eq!(db.session("s1", 1_000).await.expect("read"), None, "ended");
    assert_eq!(
        db.session("s2", 500).await.expect("read"),
        None,
        "no token, no session"
    );
    // Opening another session clears the ended ones.
    db.open_session("s3", "tok-hash", "form-3", 2_000, 9_000)
        .await
        .expect("open");
    assert_eq!(db.session("s1", 500).await.expect("read"), None, "pruned");
    db.close_session("s3").await.expect("close");
    assert_eq!(db.session("s3", 2_001).await.expect("read"), None, "closed");
}

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).expect("device id")
}

fn telemetry(device: &str, seq: u64, digest: Digest, inferences: u64) -> Telemetry {
    Telemetry {
        device: dev(device),
        epoch: 1,
        seq,
        at: UnixTime(1_000 + seq as i64),
        device_metrics: DeviceMetrics::default(),
        agent: AgentMetrics::default(),
        model: Some(ModelMetrics {
            digest,
            inferences,
            errors: 1,
            latency_bounds_us: vec![100],
            latency_counts: vec![inferences, 0],
        }),
        drift: None,
        shadow: None,
        channels: Vec::new(),
    }
}

#[tokio::test]
async fn migrations_apply_once_and_the_file_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.db");
    let db = Db::open(&path).await.expect("open");
    assert_eq!(
        db.schema_version().await.expect("v"),
        MIGRATIONS.len() as i64
    );
    db.insert_token("ab", "admin", "admin", 1, None)
        .await
        .expect("token");
    drop(db);
    let db = Db::open(&path).await.expect("reopen");
    assert_eq!(
        db.schema_version().await.expect("v"),
        MIGRATIONS.len() as i64
    );
    assert_eq!(
        db.token("ab").await.expect("token"),
        Some(("admin".into(), "admin".into()))
    );
    assert_eq!(db.token("cd").await.expect("token"), None);
    // Names are unique: a second token named admin is refused, the first is kept.
    assert!(
        db.insert_token("ef", "admin", "viewer", 2, None)
            .await
            .is_err()
    );
    assert_eq!(db.token_count().await.expect("count"), 1);
}

async fn devices_events_and_telemetry_round_trip(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    let tags = BTreeMap::from([("site".to_string(), "north".to_string())]);
    let audit = Audit {
        actor: "admin".into(),
        action: "device.enroll".into(),
        target: "pi-01".into(),
        before: None,
        after: None,
        at: 5,
    };
    db.enroll(vec![(dev("pi-01"), tags.clone(), "f00d".into(), audit)], 5)
        .await
        .expect("enroll");
    let d = Digest::of(b"bundle");
    let state = DeviceState {
        device: dev("pi-01"),
        at: UnixTime(10),
        online: true,
        agent_version: "0.1.0".into(),
        arch: Arch::new("aarch64").expect("arch"),
        slots: vec![SlotState {
            slot: Slot::A,
            bundle: BundleRef {
                digest: d,
                channel: ModelChannel::new("iris").expect("channel"),
                version: "1.0.0".into(),
                release: 1,
            },
            role: SlotRole::Active,
        }],
        last_install: None,
    };
    db.device_state(&state, 20).await.expect("state");
    db.device_state(
        &DeviceState {
            device: dev("stranger"),
            slots: Vec::new(),
            ..state.clone()
        },
        21,
    )
    .await
    .expect("state");
    let devices = db.devices().await.expect("devices");
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0].id, "pi-01");
    assert!(devices[0].enrolled && devices[0].online);
    assert_eq!(devices[0].tags, tags);
    assert_eq!(devices[0].arch.as_deref(), Some("aarch64"));
    assert_eq!(devices[0].active_digest, Some(d));
    assert_eq!(devices[0].active_version.as_deref(), Some("1.0.0"));
    assert!(!devices[1].enrolled, "seen on the broker, never enrolled");
    assert_eq!(
        db.enrolled_fingerprints().await.expect("fp"),
        BTreeMap::from([("f00d".to_string(), "pi-01".to_string())])
    );

    let event = Event {
        device: dev("pi-01"),
        epoch: 1,
        seq: 7,
        at: UnixTime(11),
        command: Some(3),
        kind: EventKind::InstallStarted { digest: d },
    };
    assert!(db.insert_event(&event, 30, true).await.expect("event"));
    assert!(
        !db.insert_event(&event, 31, true).await.expect("again"),
        "a redelivery"
    );
    // Replicas: one that does not run rollouts stores an event first; the
    // lease's holder then claims it once, and nobody again.
    let mut heard_by_both = event.clone();
    heard_by_both.device = dev("pi-02");
    assert!(
        db.insert_event(&heard_by_both, 32, false)
            .await
            .expect("stored by the other replica")
    );
    assert!(
        db.insert_event(&heard_by_both, 33, true)
            .await
            .expect("claimed by the holder")
    );
    assert!(
        !db.insert_event(&heard_by_both, 34, true)
            .await
            .expect("once")
    );
    assert!(
        !db.insert_event(&heard_by_both, 35, false)
            .await
            .expect("stored")
    );
    let mut heard_by_holder_first = event.clone();
    heard_by_holder_first.device = dev("pi-03");
    assert!(
        db.insert_event(&heard_by_holder_first, 36, true)
            .await
            .expect("holder")
    );
    assert!(
        !db.insert_event(&heard_by_holder_first, 37, false)
            .await
            .expect("other")
    );
    assert!(
        !db.insert_event(&heard_by_holder_first, 38, true)
            .await
            .expect("again")
    );
    // Events only another replica heard: the holder claims them from the
    // store once they are old enough, in the order they came, and its own
    // late copy is not applied again.
    assert!(!db.has_unapplied_events(1_000).await.expect("none"));
    let only_elsewhere: Vec<Event> = (0..3)
        .map(|k| Event {
            device: dev("pi-04"),
            seq: 20 + k,
            kind: EventKind::InstallProgress {
                digest: d,
                chunks_done: u32::try_from(k).expect("small"),
                chunks_total: 3,
            },
            ..event.clone()
        })
        .collect();
    for (k, e) in only_elsewhere.iter().enumerate() {
        let at = 80 + 10 * k as u64;
        assert!(db.insert_event(e, at, false).await.expect("elsewhere"));
    }
    assert!(!db.has_unapplied_events(79).await.expect("not yet"));
    assert!(db.has_unapplied_events(80).await.expect("the oldest"));
    let claimed = db.claim_unapplied_events(90, 10).await.expect("claim");
    assert_eq!(
        claimed,
        only_elsewhere[..2].to_vec(),
        "received by 90, in order"
    );
    let claimed = db.claim_unapplied_events(1_000, 1).await.expect("claim");
    assert_eq!(claimed, only_elsewhere[2..].to_vec(), "the rest");
    assert!(
        db.claim_unapplied_events(1_000, 10)
            .await
            .expect("none")
            .is_empty()
    );
    assert!(!db.has_unapplied_events(1_000).await.expect("none left"));
    assert!(
        !db.insert_event(&only_elsewhere[2], 200, true)
            .await
            .expect("the holder's own copy, late"),
        "claimed once"
    );
    let events = db.events("pi-01", 10).await.expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "install_started");
    assert_eq!(events[0].digest, Some(d));
    assert_eq!(events[0].command, Some(3));

    let batch = vec![
        (telemetry("pi-01", 1, d, 10), 100),
        (telemetry("pi-01", 2, d, 20), 200),
        (telemetry("pi-01", 2, d, 20), 201),
        (telemetry("stranger", 1, d, 5), 150),
    ];
    assert_eq!(db.insert_telemetry(batch).await.expect("batch"), 3);
    let latest = db.latest_telemetry(0).await.expect("latest");
    assert_eq!(latest.len(), 2);
    let pi = latest.iter().find(|t| t.device == "pi-01").expect("pi-01");
    assert_eq!((pi.seq, pi.inferences, pi.errors), (2, Some(20), Some(1)));
    assert_eq!(pi.latency_counts, Some(vec![20, 0]));
    assert_eq!(db.latest_telemetry(160).await.expect("since").len(), 1);
    assert_eq!(
        db.telemetry("pi-01", 0, 150, 10)
            .await
            .expect("range")
            .len(),
        1
    );
    assert_eq!(db.prune_telemetry(160).await.expect("prune"), 2);
    assert_eq!(db.latest_telemetry(0).await.expect("after prune").len(), 1);
}

/// A stored bundle's row, for the iris channel.
fn iris_bundle(digest: Digest) -> BundleRow {
    BundleRow {
        digest,
        channel: "iris".into(),
        version: "1.0.0".into(),
        release: 1,
        size: 10,
        chunks: 1,
        created_at: 1,
        expires_at: 2,
        uploaded_at: 3,
        uploaded_by: "admin".into(),
        summary: serde_json::json!({"k": 1}),
    }
}

/// A rollout step that sends a command again (unanswered, or left by a
/// holder that died) stores no second command: it is the newest one of that
/// rollout, device and action, with its id.
async fn a_command_sent_again_keeps_its_id(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    let digest = Digest::of(b"aa");
    db.insert_bundle(&iris_bundle(digest), None)
        .await
        .expect("bundle");
    for id in ["r1", "r2"] {
        let row = RolloutRow {
            id: id.into(),
            bundle: digest,
            created_at: 5,
            created_by: "admin".into(),
            selector: "{}".into(),
            state: "{}".into(),
        };
        db.insert_rollout(&row, "installing", None)
            .await
            .expect("rollout");
    }
    let command = |device: &str, action, again| StepCommand {
        device: dev(device),
        action,
        bundle: Some(digest),
        again,
    };
    let step = |rollout: &str, commands| RolloutStep {
        rollout: rollout.into(),
        state: None,
        notes: Vec::new(),
        audit: None,
        commands,
        fence: None,
    };
    let first = db
        .step_rollout(
            step(
                "r1",
                vec![
                    command("pi-01", "install", false),
                    command("pi-02", "install", false),
                ],
            ),
            10,
        )
        .await
        .expect("first");
    // Again to pi-02; a first revert to pi-01; again for a command never
    // stored (a new one then); the same device in another rollout.
    let again = db
        .step_rollout(
            step(
                "r1",
                vec![
                    command("pi-02", "install", true),
                    command("pi-01", "revert", false),
                    command("pi-03", "install", true),
                ],
            ),
            20,
        )
        .await
        .expect("again");
    assert_eq!(again[0], first[1], "the same command");
    assert!(again[1] > first[1] && again[2] > again[1], "{again:?}");
    let other = db
        .step_rollout(step("r2", vec![command("pi-02", "install", true)]), 30)
        .await
        .expect("other rollout");
    assert!(other[0] > again[2], "a rollout's commands are its own");
    // After two installs to one device (a shadow stage, then activation),
    // the newest is the one sent again.
    let second = db
        .step_rollout(step("r1", vec![command("pi-01", "install", false)]), 40)
        .await
        .expect("second install");
    let copy = db
        .step_rollout(step("r1", vec![command("pi-01", "install", true)]), 50)
        .await
        .expect("copy");
    assert_eq!(copy, second);
    assert_eq!(
        db.command_counts("pi-02").await.expect("counts"),
        BTreeMap::from([("install".to_string(), 2)]),
        "one in each rollout"
    );
}

async fn rollouts_commands_and_audit_are_kept(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    let bundle = iris_bundle(Digest::of(b"aa"));
    assert!(db.insert_bundle(&bundle, None).await.expect("bundle"));
    assert!(!db.insert_bundle(&bundle, None).await.expect("again"));
    assert_eq!(
        db.bundle(&Digest::of(b"aa")).await.expect("get"),
        Some(bundle.clone())
    );
    assert_eq!(db.bundle(&Digest::of(b"bb")).await.expect("get"), None);
    // A rollout must name a stored bundle.
    let mut row = RolloutRow {
        id: "r1".into(),
        bundle: Digest::of(b"zz"),
        created_at: 5,
        created_by: "admin".into(),
        selector: "{}".into(),
        state: "{}".into(),
    };
    assert!(db.insert_rollout(&row, "installing", None).await.is_err());
    row.bundle = Digest::of(b"aa");
    db.insert_rollout(&row, "installing", None)
        .await
        .expect("rollout");
    assert_eq!(db.rollouts(true).await.expect("open").len(), 1);
    db.save_rollout(
        "r1",
        "completed",
        "{\"x\":1}".into(),
        vec!["done".into()],
        9,
        Some(Audit {
            actor: "controller".into(),
            action: "rollout.step".into(),
            target: "r1".into(),
            before: None,
            after: Some(serde_json::json!({"phase": "completed"})),
            at: 9,
        }),
    )
    .await
    .expect("save");
    assert!(db.rollouts(true).await.expect("open").is_empty());
    let all = db.rollouts(false).await.expect("all");
    assert_eq!(all[0].state, "{\"x\":1}");
    assert_eq!(
        db.rollout_log("r1").await.expect("log"),
        vec![(9, "done".to_string())]
    );

    let offered = Digest::of(b"offered");
    let a = db
        .new_command("pi-01", Some("r1"), "install", Some(&offered), 1, None)
        .await
        .expect("cmd");
    let b = db
        .new_command("pi-01", Some("r1"), "install", Some(&offered), 2, None)
        .await
        .expect("cmd");
    assert!(b > a);
    assert!(db.was_offered("pi-01", &offered).await.expect("offered"));
    assert!(
        !db.was_offered("pi-02", &offered)
            .await
            .expect("other device")
    );
    assert!(
        !db.was_offered("pi-01", &Digest::of(b"other"))
            .await
            .expect("other bundle")
    );
    assert_eq!(
        db.command_counts("pi-01").await.expect("counts"),
        BTreeMap::from([("install".to_string(), 2)])
    );

    db.audit(
        "admin",
        "rollout.pause",
        "r1",
        Some(serde_json::json!({"phase": "installing"})),
        Some(serde_json::json!({"phase": "paused"})),
        10,
    )
    .await
    .expect("audit");
    let log = db.audit_log(10).await.expect("audit log");
    let actions: Vec<&str> = log.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(log.len(), 2, "{actions:?}");
    // The step stored with the rollout's state, in its transaction.
    let step = log
        .iter()
        .find(|a| a.action == "rollout.step")
        .expect("step");
    assert_eq!((step.at, step.target.as_str()), (9, "r1"));
    let pause = log
        .iter()
        .find(|a| a.action == "rollout.pause")
        .expect("pause");
    assert_eq!(pause.after, Some(serde_json::json!({"phase": "paused"})));
}

#[tokio::test]
async fn a_database_of_schema_1_is_migrated_without_losing_telemetry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.db");
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch(MIGRATIONS[0]).expect("schema 1");
        c.pragma_update(None, "user_version", 1).expect("version");
        c.execute(
            "INSERT INTO telemetry (device, seq, at, received_at, digest, inferences, errors, body)
             VALUES ('pi-01', 4, 10, 500, ?1, 7, 1, '{}')",
            [Digest::of(b"ab").to_hex()],
        )
        .expect("old row");
    }
    let db = Db::open(&path).await.expect("migrate");
    assert_eq!(
        db.schema_version().await.expect("v"),
        MIGRATIONS.len() as i64
    );
    let rows = db.latest_telemetry(0).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].seq, rows[0].inferences), (4, Some(7)));
    // Old rows are epoch 0: a redelivery of one is ignored; the same number in
    // another epoch (a counter that started again) is a new sample.
    let mut t = telemetry("pi-01", 4, Digest::of(b"x"), 1);
    t.epoch = 0;
    assert_eq!(
        db.insert_telemetry(vec![(t.clone(), 600)])
            .await
            .expect("insert"),
        0
    );
    t.epoch = 77;
    assert_eq!(
        db.insert_telemetry(vec![(t, 700)]).await.expect("insert"),
        1
    );
}

async fn the_latest_report_is_the_last_received_whatever_number_the_device_gave_it(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    let d = Digest::of(b"bundle");
    let sample = |epoch: u64, seq: u64, inferences: u64| {
        let mut t = telemetry("pi-01", seq, d, inferences);
        t.epoch = epoch;
        t
    };
    // One sample numbered 10^9 (a counter gone wrong), then the device is
    // reflashed: a new epoch whose counter starts at 1, and epochs above
    // i64::MAX stay distinct.
    let old_epoch = u64::MAX - 1;
    let new_epoch = u64::MAX;
    let mut batch = vec![(sample(old_epoch, 1_000_000_000, 1), 100)];
    batch.extend((1..=130).map(|seq| (sample(new_epoch, seq, 1000 + seq), 200 + seq)));
    assert_eq!(db.insert_telemetry(batch).await.expect("batch"), 131);
    let latest = db.latest_telemetry(0).await.expect("latest");
    assert_eq!(
        (latest[0].seq, latest[0].inferences),
        (130, Some(1130)),
        "the last received, not MAX(seq)"
    );
    // A device's page: the latest 120 of the range, oldest first.
    let rows = db.telemetry("pi-01", 0, u64::MAX, 120).await.expect("rows");
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (11..=130).collect::<Vec<u64>>());
    // Redeliveries in either epoch are still recognised.
    let again = vec![
        (sample(old_epoch, 1_000_000_000, 1), 900),
        (sample(new_epoch, 5, 1005), 901),
    ];
    assert_eq!(db.insert_telemetry(again).await.expect("again"), 0);

    // Events: a restarted counter's event 1 is new, and comes first in the list.
    let event = |epoch: u64, seq: u64, command: u64| Event {
        device: dev("pi-01"),
        epoch,
        seq,
        at: UnixTime(11),
        command: Some(command),
        kind: EventKind::InstallStarted { digest: d },
    };
    assert!(
        db.insert_event(&event(old_epoch, 1_000_000_000, 1), 10, true)
            .await
            .expect("e")
    );
    assert!(
        db.insert_event(&event(new_epoch, 1, 2), 20, true)
            .await
            .expect("e")
    );
    assert!(
        !db.insert_event(&event(new_epoch, 1, 2), 30, true)
            .await
            .expect("e")
    );
    let events = db.events("pi-01", 10).await.expect("events");
    let commands: Vec<Option<u64>> = events.iter().map(|e| e.command).collect();
    assert_eq!(commands, vec![Some(2), Some(1)]);
}

async fn a_change_and_its_audit_record_are_stored_together_or_not_at_all(kind: Kind) {
    let store = fresh(kind).await;
    let db = &store.db;
    let audit = |action: &str, target: &str| {
        Some(Audit {
            actor: "admin".into(),
            action: action.into(),
            target: target.into(),
            before: None,
            after: None,
            at: 7,
        })
    };
    db.insert_token("aa", "ops", "operator", 1, audit("token.create", "ops"))
        .await
        .expect("token");
    let log = db.audit_log(10).await.expect("log");
    assert_eq!(
        (log.len(), log[0].action.as_str(), log[0].target.as_str()),
        (1, "token.create", "ops")
    );
    let id = db
        .new_command(
            "pi-01",
            None,
            "revert",
            None,
            2,
            audit("device.revert", "pi-01"),
        )
        .await
        .expect("command");
    let log = db.audit_log(10).await.expect("log");
    assert_eq!(log[0].after, Some(serde_json::json!({"command": id})));
    // The audit insert fails (a trigger here; a full disk or a SIGKILL in a
    // real run): the change it records is not stored either.
    store.refuse_audit().await;
    assert!(
        db.insert_token("bb", "ci", "viewer", 2, audit("token.create", "ci"))
            .await
            .is_err()
    );
    assert_eq!(
        db.token("bb").await.expect("token"),
        None,
        "token without audit"
    );
    let tags = BTreeMap::new();
    assert!(
        db.enroll(
            vec![(
                dev("pi-01"),
                tags,
                "f00d".into(),
                audit("device.enroll", "pi-01").expect("audit")
            )],
            3
        )
        .await
        .is_err()
    );
    assert!(
        db.devices().await.expect("devices").is_empty(),
        "device without audit"
    );
    assert!(
        db.new_command(
            "pi-01",
            None,
            "revert",
            None,
            4,
            audit("device.revert", "pi-01")
        )
        .await
        .is_err()
    );
    assert_eq!(
        db.command_counts("pi-01").await.expect("counts"),
        BTreeMap::from([("revert".to_string(), 1)]),
        "a command without its audit record"
    );
    assert_eq!(db.audit_log(10).await.expect("log").len(), 2);
}

#[tokio::test]
async fn postgres_migrates_once_even_when_replicas_start_together() {
    let url = postgres_database().await;
    let at = StoreLocation::Postgres {
        url: url.clone(),
        readers: 1,
    };
    // Two controllers starting at the same instant: the advisory lock lets
    // one migrate, the other then finds the schema in place.
    let (a, b) = tokio::join!(Db::open_at(&at), Db::open_at(&at));
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(
        a.schema_version().await.expect("v"),
        MIGRATIONS.len() as i64
    );
    assert_eq!(
        b.schema_version().await.expect("v"),
        MIGRATIONS.len() as i64
    );
    a.insert_token("ab", "admin", "admin", 1, None)
        .await
        .expect("token");
    drop((a, b));
    let again = Db::open_at(&at).await.expect("reopen");
    assert_eq!(
        again.token("ab").await.expect("token"),
        Some(("admin".into(), "admin".into()))
    );
    // A bad URL is refused with PostgreSQL's reason, not a hang or a panic.
    let bad = StoreLocation::Postgres {
        url: url.replace("/t", "/no_such_database_t"),
        readers: 1,
    };
    let e = Db::open_at(&bad)
        .await
        .expect_err("missing database")
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[tokio::test]
async fn both_backends_have_the_same_tables_and_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.db");
    Db::open(&path).await.expect("sqlite");
    let c = rusqlite::Connection::open(&path).expect("open");
    let mut sqlite = std::collections::BTreeSet::new();
    let mut st = c
        .prepare(
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
        )
        .expect("prepare");
    for row in st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .expect("query")
    {
        sqlite.insert(row.expect("row"));
    }
    let url = postgres_database().await;
    Db::open_at(&StoreLocation::Postgres {
        url: url.clone(),
        readers: 1,
    })
    .await
    .expect("postgres");
    let postgres: std::collections::BTreeSet<(String, String)> =
        tokio::task::spawn_blocking(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
            c.query(
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name <> 'edgefleet_schema'",
                &[],
            )
            .expect("columns")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
        })
        .await
        .expect("join");
    assert!(sqlite.len() > 50, "{sqlite:?}");
    assert_eq!(sqlite, postgres);
}
