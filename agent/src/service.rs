//! The running device: one composition root that wires the served model, the
//! controller link (when the config has one), the offline drift checkpoints,
//! the systemd watchdog and the local API on its listeners, and stops them all
//! when `shutdown` completes. `edgefleet-agent run` parses, binds and calls
//! [`run`]; everything it spawns ends with the shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgefleet_shared::UnixTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Served;
use crate::config::AgentConfig;
use crate::daemon::{Daemon, SPOOL_RETRY, Spools, now_ms};
use crate::store::{LoadedChannels, Store};

/// Where the local API listens: a loopback TCP listener, and a Unix socket
/// when the config or the command line asks for one.
#[derive(Debug)]
pub struct Listeners {
    /// The TCP listener (loopback).
    pub tcp: tokio::net::TcpListener,
    /// The Unix socket listener.
    pub unix: Option<tokio::net::UnixListener>,
}

/// The served models of a device: each channel's active model and shadow,
/// with the drift windows and sample capture of `config`.
pub fn served(loaded: LoadedChannels, config: &AgentConfig) -> Served {
    let served = Served::with_settings(
        config
            .drift
            .enabled
            .then(|| crate::drift::tracker::WindowSettings::from(&config.drift)),
    );
    served.set_samples_config(config.samples.clone());
    served.replace_all(loaded);
    served
}

/// The controller link of a running device: how to connect (from
/// [`crate::cli::link_setup`]) and what the daemon needs, used again at each
/// restart. After a crash of the daemon (a panic, in a build that unwinds) the
/// served slots are read back from disk, as after a power cut, and the link
/// starts again after [`RESTART_AFTER`]; a device is never left serving
/// without its link. (The device build aborts on a panic instead, and its
/// service manager restarts the process.)
pub struct Link {
    /// The MQTT options (brokers, identity, TLS).
    pub options: crate::link::Brokers,
    /// The daemon's settings.
    pub settings: crate::daemon::DaemonSettings,
    /// Made at each start and put between the link and the daemon (the fleet
    /// simulator's faults); none on a real device.
    pub tap: Option<Box<dyn FnMut() -> LinkTap + Send>>,
    /// Told of each crash, before the restart (the simulator counts them).
    pub on_crash: Option<Box<dyn FnMut() + Send>>,
}

impl Link {
    /// The link of a real device: no tap, crashes only logged.
    pub fn new(options: crate::link::Brokers, settings: crate::daemon::DaemonSettings) -> Link {
        Link {
            options,
            settings,
            tap: None,
            on_crash: None,
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("options", &self.options)
            .field("settings", &self.settings)
            .field("tap", &self.tap.is_some())
            .field("on_crash", &self.on_crash.is_some())
            .finish()
    }
}

/// The pause before the link starts again after its daemon ended or crashed.
pub const RESTART_AFTER: Duration = Duration::from_millis(200);

/// Runs the device until `shutdown` completes, then lets the local API finish
/// its requests and the link its last step (up to 3 s). The model is
/// `served`; the link runs when `link` is given, restarted as [`Link`] says.
pub async fn run(
    config: &AgentConfig,
    store: Store,
    served: Served,
    link: Option<Link>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let heartbeat = Arc::new(AtomicU64::new(now_ms()));
    let daemon = link.map(|link| {
        tokio::spawn(supervise(
            link,
            store.clone(),
            served.clone(),
            heartbeat.clone(),
            stop_rx.clone(),
        ))
    });
    if daemon.is_none() {
        offline_drift(&served, &store, config.telemetry.interval_s, &stop_rx);
    }
    crate::notify::ready();
    if let Some(every) = crate::notify::watchdog_interval() {
        watchdog(every, daemon.is_some().then_some(heartbeat), &stop_rx);
    }
    let on_unix = {
        let (served, stop) = (served.clone(), stop_rx.clone());
        async move {
            if let Some(listener) = listeners.unix {
                crate::api::serve_unix(listener, served, &config.limits, stopped(stop)).await;
            }
        }
    };
    let on_tcp = crate::api::serve(listeners.tcp, served, &config.limits, stopped(stop_rx));
    tokio::join!(on_tcp, on_unix);
    crate::notify::stopping();
    if let Some(d) = daemon {
        let _ = tokio::time::timeout(Duration::from_secs(3), d).await;
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Keeps the link running until `stop`: starts it, and starts it again after
/// its daemon ended or crashed (see [`Link`]).
async fn supervise(
    mut link: Link,
    store: Store,
    served: Served,
    heartbeat: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let tap = link.tap.as_mut().map(|make| make());
        let mut task = start_link(
            link.options.clone(),
            link.settings.clone(),
            &store,
            &served,
            &heartbeat,
            &stop,
            tap,
        );
        tokio::select! {
            r = &mut task => match r {
                Err(e) if e.is_panic() => {
                    tracing::error!("the daemon crashed: reloading the active slots and restarting the link");
                    if let Some(told) = link.on_crash.as_mut() {
                        told();
                    }
                    let store = store.clone();
                    match tokio::task::spawn_blocking(move || crate::store::load_served(&store)).await {
                        Ok(Ok(loaded)) => served.replace_all(loaded),
                        Ok(Err(e)) => tracing::error!("after the crash, the slots do not load: {e}"),
                        Err(e) => tracing::error!("after the crash, reading the slots failed: {e}"),
                    }
                }
                _ if *stop.borrow() => return,
                _ => {}
            },
            () = stopped(stop.clone()) => {
                // The daemon sees the same stop and finishes its step.
                let _ = tokio::time::timeout(Duration::from_secs(3), &mut task).await;
                task.abort();
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RESTART_AFTER) => {}
            () = stopped(stop.clone()) => return,
        }
    }
}

/// What may sit between the link and the daemon: it sees each link event
/// first and may hold it back for the time it returns. The fleet simulator's
/// faults (a slow link, a disconnect after some chunks) live there; a real
/// device has none.
pub type LinkTap = Box<dyn FnMut(&crate::link::LinkEvent) -> Option<Duration> + Send>;

/// Starts the controller link and its daemon; a full disk at start delays the
/// daemon until the spools can be opened. The task ends when `stop` turns
/// true (the daemon finishes its step) or the daemon ends; it panics when the
/// daemon does.
pub fn start_link(
    options: crate::link::Brokers,
    settings: crate::daemon::DaemonSettings,
    store: &Store,
    served: &Served,
    heartbeat: &Arc<AtomicU64>,
    stop: &watch::Receiver<bool>,
    tap: Option<LinkTap>,
) -> JoinHandle<()> {
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(64);
    let (link, link_task) = crate::link::start(options, events_tx);
    let events_rx = match tap {
        Some(tap) => tapped(events_rx, tap),
        None => events_rx,
    };
    let (store, served, heartbeat, stop) = (
        store.clone(),
        served.clone(),
        heartbeat.clone(),
        stop.clone(),
    );
    tokio::spawn(async move {
        let max = settings.spool_max_bytes;
        let spools =
            Spools::open_retrying(&store, max, &heartbeat, SPOOL_RETRY, stopped(stop.clone()))
                .await;
        if let Some(spools) = spools {
            let d = Daemon::new(settings, store, served, link, spools, heartbeat);
            // In its own task, so that a panic can take the link down with it,
            // as a crashed process would, before it ends this task too.
            let result = tokio::spawn(d.run(events_rx, stopped(stop))).await;
            if let Err(e) = result
                && e.is_panic()
            {
                link_task.abort();
                std::panic::resume_unwind(e.into_panic());
            }
        }
    })
}

/// The link's events through `tap`, each held back as long as it says.
fn tapped(
    mut events: tokio::sync::mpsc::Receiver<crate::link::LinkEvent>,
    mut tap: LinkTap,
) -> tokio::sync::mpsc::Receiver<crate::link::LinkEvent> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let Some(delay) = tap(&event) {
                tokio::time::sleep(delay).await;
            }
            if tx.send(event).await.is_err() {
                break;
            }
        }
    });
    rx
}

/// Without a controller link, drift is still tracked and written for `status`.
fn offline_drift(served: &Served, store: &Store, interval_s: u32, stop: &watch::Receiver<bool>) {
    let (served, dir, mut stop) = (served.clone(), store.dir().to_owned(), stop.clone());
    let every = Duration::from_secs(u64::from(interval_s));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = UnixTime::now();
            let statuses: std::collections::BTreeMap<_, _> = served
                .channels()
                .into_iter()
                .filter_map(|(channel, m)| Some((channel, m.drift_checkpoint(now)?.status)))
                .collect();
            if !statuses.is_empty() {
                let dir = dir.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    crate::api::save_drift_status(&dir, &statuses)
                })
                .await;
            }
        }
    });
}

/// Pets the systemd watchdog every `every`: while the link's loop is alive
/// (it ticks every second), or, with no link, while the runtime is.
fn watchdog(every: Duration, heartbeat: Option<Arc<AtomicU64>>, stop: &watch::Receiver<bool>) {
    let mut stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let alive = heartbeat
                .as_ref()
                .is_none_or(|h| now_ms().saturating_sub(h.load(Ordering::Relaxed)) < 10_000);
            if alive {
                crate::notify::watchdog();
            }
        }
    });
}
