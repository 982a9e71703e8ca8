//! The agent's data directory and the install path that changes it.
//!
//! ```text
//! <data>/state.json           the slot state (one file, temp + fsync + rename)
//! <data>/bundles/<digest>/    an unpacked, verified bundle (appears atomically)
//! ```
//!
//! Crash safety: a bundle directory appears complete or not at all (unpack renames a
//! staging directory); the state file is replaced atomically and only names
//! directories that are complete and healthy. After a crash at any instant the agent
//! finds either the old state or the new one, each pointing at whole bundles; stray
//! directories are removed by `gc`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgefleet_shared::bundle::{DeviceFacts, InstalledRelease};
use edgefleet_shared::golden::GoldenSet;
use edgefleet_shared::manifest::ArtifactKind;
use edgefleet_shared::protocol::{BundleRef, FailureReason, InstallMode};
use edgefleet_shared::unpack::{UnpackStream, unpack_to_dir};
use edgefleet_shared::{
    BundleError, Digest, Limits, Policy, RawHeader, Refusal, TrustRoot, UnixTime,
};

use crate::model::{HealthFailure, HealthReport, LoadedModel, ModelError, health_check};
use crate::slots::{SlotError, SlotEvent, SlotsState};

/// Test hook for crash tests: when `EDGEFLEET_CRASH_AT` names this point, the
/// process aborts on the spot (no destructors, no flushing), as a power cut or
/// SIGKILL would stop it. Points: `after-unpack`, `after-health-check`,
/// `before-state-rename`, `after-state-save`.
fn crash_point_env(name: &str) {
    if std::env::var_os("EDGEFLEET_CRASH_AT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

/// Faults the fleet simulator (`devices/`) injects into one simulated device,
/// which shares its process with the others: a real agent has none. A crash
/// point here panics the install (the simulator restarts the device from its
/// directory, as after a power cut); it fires once.
#[derive(Debug, Default)]
pub struct Faults {
    crash_at: std::sync::Mutex<Option<String>>,
    fail_health: std::sync::atomic::AtomicBool,
}

impl Faults {
    /// Crash once at the named point: `after-unpack`, `after-health-check`,
    /// `before-state-rename` or `after-state-save`.
    pub fn crash_once_at(&self, point: &str) {
        *self.crash_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(point.to_owned());
    }

    /// Make every health check fail (or pass again).
    pub fn set_fail_health(&self, fail: bool) {
        self.fail_health
            .store(fail, std::sync::atomic::Ordering::Relaxed);
    }

    fn fails_health(&self) -> bool {
        self.fail_health.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take_crash(&self, name: &str) -> bool {
        let mut at = self.crash_at.lock().unwrap_or_else(|e| e.into_inner());
        if at.as_deref() == Some(name) {
            *at = None;
            return true;
        }
        false
    }
}

/// The panic message of a simulated crash (see [`Faults`]).
pub const SIMULATED_CRASH: &str = "simulated crash (fleet simulator fault)";

/// Replaces `path` with `bytes` durably (`edgefleet_shared::durable`: temp
/// file, fsync, rename, directory fsync), readable by the agent's user only.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    edgefleet_shared::durable::write(path, 0o600, bytes)
}

/// Largest state file read.
const MAX_STATE_LEN: u64 = 1024 * 1024;

/// Problems with the data directory itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The state file exists but cannot be read as state.
    #[error("{path} is not a valid agent state file: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The agent's data directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    faults: Arc<Faults>,
    /// `limits.models_memory_bytes`: what every channel's loaded models may
    /// declare together (None: no budget beyond MemAvailable).
    models_budget: Option<u64>,
}

/// A model that would take the channels' models past the memory budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the model needs {needed} bytes (constraints.memory_bytes); channels {held_by} hold {held} bytes; together over the budget of {budget} bytes (limits.models_memory_bytes)"
)]
pub struct OverBudget {
    /// The new model's declared memory.
    pub needed: u64,
    /// What the other loaded models declare.
    pub held: u64,
    /// Which channels hold it, with their figures.
    pub held_by: String,
    /// The budget.
    pub budget: u64,
}

/// Whether a model declaring `needed` bytes fits `budget` beside `held` (each
/// other loaded model's declared bytes, by channel). Pure.
pub fn memory_fits(
    needed: u64,
    held: &[(edgefleet_shared::ModelChannel, u64)],
    budget: u64,
) -> Result<(), OverBudget> {
    let total: u64 = held.iter().map(|(_, b)| *b).fold(0, u64::saturating_add);
    // A sum past u64::MAX fits no budget.
    if needed.checked_add(total).is_some_and(|t| t <= budget) {
        return Ok(());
    }
    let held_by: Vec<String> = held.iter().map(|(c, b)| format!("{c} ({b})")).collect();
    Err(OverBudget {
        needed,
        held: total,
        held_by: if held_by.is_empty() {
            "none".into()
        } else {
            held_by.join(", ")
        },
        budget,
    })
}

impl Store {
    /// Opens (and creates) the data directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let dir = dir.into();
        let bundles = dir.join("bundles");
        fs::create_dir_all(&bundles).map_err(io_at(&bundles))?;
        Ok(Store {
            dir,
            faults: Arc::default(),
            models_budget: None,
        })
    }

    /// This store with a memory budget for every channel's models together
    /// (`limits.models_memory_bytes`).
    pub fn with_models_budget(mut self, budget: Option<u64>) -> Store {
        self.models_budget = budget;
        self
    }

    /// Checks a bundle's model against the memory budget, beside the models
    /// that stay loaded once it is installed in `mode`: every other channel's
    /// active and shadow models, and with `shadow` its own channel's active
    /// one (it keeps serving). Their declared memory is read from their
    /// manifests.
    pub fn check_memory(
        &self,
        state: &SlotsState,
        manifest: &edgefleet_shared::manifest::Manifest,
        mode: InstallMode,
    ) -> Result<(), InstallError> {
        let Some(budget) = self.models_budget else {
            return Ok(());
        };
        let mut held = Vec::new();
        for (channel, pair) in &state.channels {
            let mut entries: Vec<&crate::slots::SlotEntry> = Vec::new();
            if *channel != manifest.channel || mode == InstallMode::Shadow {
                entries.extend(pair.active_entry());
            }
            if *channel != manifest.channel {
                entries.extend(
                    pair.target_entry()
                        .filter(|e| e.role == edgefleet_shared::protocol::SlotRole::Shadow),
                );
            }
            let mut bytes = 0u64;
            for e in entries {
                let dir = self.bundle_dir(&e.bundle.digest);
                let m = edgefleet_shared::unpack::read_manifest(&dir)
                    .map_err(|source| InstallError::Store(StoreError::Io { path: dir, source }))?;
                bytes = bytes.saturating_add(m.constraints.memory_bytes);
            }
            if bytes > 0 {
                held.push((channel.clone(), bytes));
            }
        }
        memory_fits(manifest.constraints.memory_bytes, &held, budget)
            .map_err(InstallError::OverBudget)
    }

    /// This store with simulated faults (the fleet simulator's devices).
    pub fn with_faults(mut self, faults: Arc<Faults>) -> Store {
        self.faults = faults;
        self
    }

    fn crash_point(&self, name: &str) {
        crash_point_env(name);
        if self.faults.take_crash(name) {
            std::panic::panic_any(SIMULATED_CRASH);
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Where a bundle is unpacked.
    pub fn bundle_dir(&self, digest: &Digest) -> PathBuf {
        self.dir.join("bundles").join(digest.to_hex())
    }

    /// Reads the state; a missing file is the empty state.
    pub fn load(&self) -> Result<SlotsState, StoreError> {
        let path = self.state_path();
        let bytes = match fs::File::open(&path) {
            Ok(f) => {
                let mut out = Vec::new();
                io::Read::read_to_end(&mut io::Read::take(f, MAX_STATE_LEN + 1), &mut out)
                    .map_err(io_at(&path))?;
                if out.len() as u64 > MAX_STATE_LEN {
                    return Err(StoreError::Corrupt {
                        path,
                        detail: format!("over {MAX_STATE_LEN} bytes"),
                    });
                }
                out
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SlotsState::default()),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let corrupt = |detail: String| StoreError::Corrupt {
            path: path.clone(),
            detail,
        };
        #[derive(serde::Deserialize)]
        struct Format {
            format: u32,
        }
        let format: Format = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let state = match format.format {
            1 => serde_json::from_slice::<crate::slots::SlotsStateV1>(&bytes)
                .map_err(|e| corrupt(e.to_string()))?
                .upgrade(),
            crate::slots::STATE_FORMAT => {
                serde_json::from_slice::<SlotsState>(&bytes).map_err(|e| corrupt(e.to_string()))?
            }
            other => return Err(corrupt(format!("format {other} is not supported"))),
        };
        Ok(state)
    }

    /// Replaces the state in one durable step (temp file, fsync, rename,
    /// directory fsync).
    pub fn save(&self, state: &SlotsState) -> Result<(), StoreError> {
        let path = self.state_path();
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        edgefleet_shared::durable::write_with(&path, 0o600, |w| {
            w.write_all(&bytes)?;
            // Written, not yet renamed: the old state stays.
            self.crash_point("before-state-rename");
            Ok(())
        })
        .map_err(io_at(&path))
    }

    /// Removes bundle directories and staging leftovers the state does not name.
    pub fn gc(&self, state: &SlotsState) -> Result<(), StoreError> {
        let keep: Vec<String> = state.referenced().iter().map(Digest::to_hex).collect();
        let bundles = self.dir.join("bundles");
        for entry in fs::read_dir(&bundles).map_err(io_at(&bundles))? {
            let entry = entry.map_err(io_at(&bundles))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                fs::remove_dir_all(entry.path()).map_err(io_at(&entry.path()))?;
            }
        }
        Ok(())
    }
}

/// Why an install did not complete. The active slot is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The bundle is refused by the contract's rules.
    #[error("refused ({code}): {refusal}", code = .0.code(), refusal = .0)]
    Refused(Refusal),
    /// The model does not load.
    #[error("the model does not load: {0}")]
    Model(#[from] ModelError),
    /// A golden case failed.
    #[error("health check failed: {0}")]
    Health(#[from] HealthFailure),
    /// The slot transition is not allowed (e.g. already active).
    #[error("{0}")]
    Slot(#[from] SlotError),
    /// The data directory failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The model does not fit the memory budget beside the other channels'.
    #[error("refused before install: {0}")]
    OverBudget(OverBudget),
}

impl InstallError {
    /// The reason as the protocol reports it.
    pub fn reason(&self) -> FailureReason {
        match self {
            InstallError::Refused(refusal) => FailureReason::Refused {
                refusal: refusal.clone(),
            },
            InstallError::Model(e) => FailureReason::ModelLoad {
                detail: e.to_string(),
            },
            InstallError::Health(e) => FailureReason::HealthCheck {
                detail: e.to_string(),
            },
            InstallError::Slot(e) => FailureReason::Internal {
                detail: e.to_string(),
            },
            InstallError::Store(e) => FailureReason::Internal {
                detail: e.to_string(),
            },
            InstallError::OverBudget(e) => FailureReason::Preflight {
                detail: e.to_string(),
            },
        }
    }
}

/// A bundle's refusal, or an I/O error at `path`.
pub fn bundle_error(path: &Path, e: BundleError) -> InstallError {
    match e {
        BundleError::Refused(r) => InstallError::Refused(r),
        BundleError::Io(source) => InstallError::Store(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The release recorded for the header's channel. The channel is read from the
/// unverified manifest only to look it up; verification checks the same bytes.
pub fn installed_for(state: &SlotsState, header: &RawHeader) -> Option<InstalledRelease> {
    header
        .decode_unverified()
        .ok()
        .and_then(|m| state.installed_release(&m.channel).cloned())
}

/// The rules this device applies to a bundle: its trust root, the time, the
/// channel's installed release (rollback) and its own constraints.
pub fn device_policy<'a>(
    trust: &'a TrustRoot,
    device: &'a DeviceFacts,
    installed: Option<&'a InstalledRelease>,
    now: UnixTime,
) -> Policy<'a> {
    Policy {
        trust,
        role: edgefleet_shared::trust::Role::Models,
        now,
        limits: Limits::default(),
        installed,
        device: Some(device),
    }
}

/// Verifies a header (docs/bundle.md steps 1-10) as this device would install it.
pub fn verify_header(
    state: &SlotsState,
    trust: &TrustRoot,
    device: &DeviceFacts,
    header: &RawHeader,
    now: UnixTime,
) -> Result<edgefleet_shared::VerifiedHeader, Refusal> {
    let installed = installed_for(state, header);
    header.verify(&device_policy(trust, device, installed.as_ref(), now))
}

/// A successful install.
#[derive(Debug)]
pub struct Installed {
    /// The new state.
    pub state: SlotsState,
    /// The bundle.
    pub bundle: BundleRef,
    /// What the health check measured.
    pub health: HealthReport,
}

/// Loads the model of an unpacked bundle and runs its golden cases.
pub fn prove_bundle(
    dir: &Path,
    manifest: &edgefleet_shared::manifest::Manifest,
) -> Result<(LoadedModel, HealthReport), InstallError> {
    let read = |name: &str| -> Result<Vec<u8>, InstallError> {
        let p = dir.join(name);
        fs::read(&p).map_err(|source| InstallError::Store(StoreError::Io { path: p, source }))
    };
    let model_entry = manifest.model().ok_or_else(|| {
        InstallError::Refused(Refusal::InvalidManifest {
            detail: "no model artifact".into(),
        })
    })?;
    let model = LoadedModel::load(&read(model_entry.name.as_str())?)?;
    if model.schema() != &manifest.schema {
        return Err(InstallError::Model(ModelError::Invalid(
            "the model's inputs/outputs differ from the schema in the manifest".into(),
        )));
    }
    let golden = match manifest.artifact(ArtifactKind::Golden) {
        Some(g) => GoldenSet::from_bytes(&read(g.name.as_str())?).map_err(|e| {
            InstallError::Health(HealthFailure::Run {
                case: 0,
                detail: e.to_string(),
            })
        })?,
        None => {
            return Err(InstallError::Health(HealthFailure::Run {
                case: 0,
                detail: "the bundle has no golden cases".into(),
            }));
        }
    };
    let report = health_check(&model, &golden, &manifest.health)?;
    Ok((model, report))
}

/// [`prove_bundle`] on this device (with its simulated faults, if any).
fn prove_on_device(
    store: &Store,
    dir: &Path,
    manifest: &edgefleet_shared::manifest::Manifest,
) -> Result<HealthReport, InstallError> {
    let (_, health) = prove_bundle(dir, manifest)?;
    if store.faults.fails_health() {
        return Err(InstallError::Health(HealthFailure::Run {
            case: 0,
            detail: "simulated health-check failure (fleet simulator fault)".into(),
        }));
    }
    Ok(health)
}

/// Installs a bundle file (sideloading): verify against the trust root and the
/// channel's installed release, unpack into its own directory, prove the model,
/// then switch slots in one atomic state write. On failure the failure is recorded
/// and the active slot stays as it was.
pub fn install_file(
    store: &Store,
    trust: &TrustRoot,
    device: &DeviceFacts,
    path: &Path,
    mode: InstallMode,
    now: UnixTime,
) -> Result<Installed, InstallError> {
    let open = || {
        fs::File::open(path).map_err(|source| {
            InstallError::Store(StoreError::Io {
                path: path.to_owned(),
                source,
            })
        })
    };
    let header = RawHeader::read_from(&mut io::BufReader::new(open()?))
        .map_err(|e| bundle_error(path, e))?;
    install(
        store,
        trust,
        device,
        mode,
        now,
        &header,
        |policy, _, dir| {
            let reader = io::BufReader::with_capacity(256 * 1024, open()?);
            unpack_to_dir(reader, policy, dir).map_err(|e| bundle_error(path, e))
        },
    )
}

/// Installs a completed download whose payload was unpacked while it arrived
/// (each chunk checked against the signed table on arrival, each artifact hashed
/// as it passed): the check left is the header's signature and rules as of `now`
/// and a digest compare, then the unpacked directory is moved into place; then as
/// [`install_file`].
/// `unpacked` finishes the unpacking (chunks that came out of order) when the
/// header passed.
pub fn install_download(
    store: &Store,
    trust: &TrustRoot,
    device: &DeviceFacts,
    header: &RawHeader,
    unpacked: impl FnOnce() -> Result<UnpackStream, InstallError>,
    mode: InstallMode,
    now: UnixTime,
) -> Result<Installed, InstallError> {
    install(
        store,
        trust,
        device,
        mode,
        now,
        header,
        |_, verified, dir| {
            unpacked()?
                .finish(verified, dir)
                .map_err(|e| bundle_error(dir, e))?;
            Ok(verified.clone())
        },
    )
}

/// The install steps shared by files and downloads; `unpack` puts the verified
/// bundle's artifacts into the (absent) directory it is given and returns the
/// header it unpacked.
fn install(
    store: &Store,
    trust: &TrustRoot,
    device: &DeviceFacts,
    mode: InstallMode,
    now: UnixTime,
    header: &RawHeader,
    unpack: impl FnOnce(
        &Policy<'_>,
        &edgefleet_shared::VerifiedHeader,
        &Path,
    ) -> Result<edgefleet_shared::VerifiedHeader, InstallError>,
) -> Result<Installed, InstallError> {
    let state = store.load()?;
    let digest = header.digest();
    let installed = installed_for(&state, header);
    let policy = device_policy(trust, device, installed.as_ref(), now);
    let result = (|| {
        let verified = header.verify(&policy).map_err(InstallError::Refused)?;
        store.check_memory(&state, &verified.manifest, mode)?;
        if state
            .active_entry(&verified.manifest.channel)
            .is_some_and(|e| e.bundle.digest == digest)
        {
            return Err(InstallError::Slot(SlotError::AlreadyActive(digest)));
        }
        let dir = store.bundle_dir(&digest);
        if dir.exists() {
            // A leftover of an interrupted install, or the inactive slot's copy:
            // unpack again from scratch rather than trust it.
            if state.referenced().contains(&digest) {
                let next = state.clone().apply(SlotEvent::Installed {
                    bundle: bundle_ref(&verified),
                    mode,
                    at: now,
                })?;
                let health = prove_on_device(store, &dir, &verified.manifest)?;
                return Ok((next, bundle_ref(&verified), health));
            }
            fs::remove_dir_all(&dir).map_err(|source| {
                InstallError::Store(StoreError::Io {
                    path: dir.clone(),
                    source,
                })
            })?;
        }
        let verified = unpack(&policy, &verified, &dir)?;
        store.crash_point("after-unpack");
        let health = prove_on_device(store, &dir, &verified.manifest)?;
        store.crash_point("after-health-check");
        let bundle = bundle_ref(&verified);
        let next = state.clone().apply(SlotEvent::Installed {
            bundle: bundle.clone(),
            mode,
            at: now,
        })?;
        Ok((next, bundle, health))
    })();
    match result {
        Ok((next, bundle, health)) => {
            store.save(&next)?;
            store.crash_point("after-state-save");
            store.gc(&next)?;
            Ok(Installed {
                state: next,
                bundle,
                health,
            })
        }
        Err(e) => {
            let failed = state.apply(SlotEvent::InstallFailed {
                digest,
                reason: e.reason(),
                at: now,
            })?;
            store.save(&failed)?;
            store.gc(&failed)?;
            Err(e)
        }
    }
}

fn bundle_ref(v: &edgefleet_shared::VerifiedHeader) -> BundleRef {
    BundleRef {
        digest: v.digest,
        channel: v.manifest.channel.clone(),
        version: v.manifest.version.clone(),
        release: v.manifest.release,
    }
}

/// Applies a local slot command (`revert`, `activate`) and persists it.
pub fn change_slots(store: &Store, event: SlotEvent) -> Result<SlotsState, InstallError> {
    let next = store.load()?.apply(event)?;
    store.save(&next)?;
    Ok(next)
}

/// The active bundle, loaded: what the local API serves.
#[derive(Debug, Clone)]
pub struct ActiveModel {
    /// The bundle.
    pub bundle: BundleRef,
    /// Its model, ready to run.
    pub model: LoadedModel,
    /// Its reference statistics for drift, when it carries them.
    pub reference: Option<std::sync::Arc<edgefleet_shared::reference::ReferenceStats>>,
}

/// One channel's active model and shadow model, as the local API serves them.
pub type LoadedSlots = (Option<ActiveModel>, Option<crate::shadow::Shadow>);

/// Loads one channel's active model, if it has one (see [`load_served`]).
pub fn load_active(
    store: &Store,
    channel: &edgefleet_shared::ModelChannel,
) -> Result<Option<ActiveModel>, InstallError> {
    match store.load()?.active_entry(channel) {
        Some(entry) => Ok(Some(load_bundle(store, &entry.bundle)?.0)),
        None => Ok(None),
    }
}

/// What every channel serves.
pub type LoadedChannels = std::collections::BTreeMap<edgefleet_shared::ModelChannel, LoadedSlots>;

/// Loads every channel's active model (with its reference statistics) and
/// shadow model (the inactive slot's bundle installed in shadow mode, with the
/// health policy its answers are compared under). A reference that does not
/// decode (it was verified at install, so this means a damaged disk) is logged
/// and drift is off for the bundle; the model still serves.
pub fn load_served(store: &Store) -> Result<LoadedChannels, InstallError> {
    let state = store.load()?;
    let mut out = LoadedChannels::new();
    for (channel, pair) in &state.channels {
        let active = match pair.active_entry() {
            Some(entry) => Some(load_bundle(store, &entry.bundle)?.0),
            None => None,
        };
        let shadow = match pair
            .target_entry()
            .filter(|e| e.role == edgefleet_shared::protocol::SlotRole::Shadow)
        {
            Some(entry) => {
                let (m, policy) = load_bundle(store, &entry.bundle)?;
                Some(crate::shadow::Shadow::new(m.bundle, m.model, policy))
            }
            None => None,
        };
        out.insert(channel.clone(), (active, shadow));
    }
    Ok(out)
}

fn load_bundle(
    store: &Store,
    bundle: &BundleRef,
) -> Result<(ActiveModel, edgefleet_shared::manifest::HealthPolicy), InstallError> {
    let dir = store.bundle_dir(&bundle.digest);
    let manifest = edgefleet_shared::unpack::read_manifest(&dir).map_err(|source| {
        InstallError::Store(StoreError::Io {
            path: dir.clone(),
            source,
        })
    })?;
    let name = manifest
        .model()
        .map(|m| m.name.to_string())
        .unwrap_or_default();
    let path = dir.join(name);
    let bytes =
        fs::read(&path).map_err(|source| InstallError::Store(StoreError::Io { path, source }))?;
    let model = LoadedModel::load(&bytes)?;
    let reference = manifest
        .artifact(edgefleet_shared::manifest::ArtifactKind::Reference)
        .and_then(|a| {
            let path = dir.join(a.name.as_str());
            let decoded = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                edgefleet_shared::reference::ReferenceStats::from_bytes(&b)
                    .map_err(|e| e.to_string())
            });
            match decoded {
                Ok(r) => Some(std::sync::Arc::new(r)),
                Err(e) => {
                    tracing::error!(path = %path.display(), "drift off for this bundle: {e}");
                    None
                }
            }
        });
    Ok((
        ActiveModel {
            bundle: bundle.clone(),
            model,
            reference,
        },
        manifest.health.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::ModelChannel;

    #[test]
    fn a_model_fits_the_budget_beside_the_others_or_is_refused_with_every_figure() {
        let c = |n: &str| ModelChannel::new(n).expect("channel");
        assert_eq!(memory_fits(10, &[], 10), Ok(()));
        let held = [(c("a"), 30), (c("b"), 50)];
        assert_eq!(memory_fits(20, &held, 100), Ok(()));
        let over = memory_fits(21, &held, 100).expect_err("over");
        assert_eq!((over.needed, over.held, over.budget), (21, 80, 100));
        assert_eq!(
            over.to_string(),
            "the model needs 21 bytes (constraints.memory_bytes); channels a (30), b (50) hold 80 bytes; together over the budget of 100 bytes (limits.models_memory_bytes)"
        );
        // Sums past u64::MAX fit no budget.
        assert!(memory_fits(u64::MAX, &held, u64::MAX).is_err());
        assert_eq!(
            memory_fits(11, &[], 10).map_err(|e| e.held_by),
            Err("none".to_owned())
        );
    }
}
