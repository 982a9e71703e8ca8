//! What an agent does about its own update when it starts, and how a new agent
//! confirms (docs/agent-update.md): the shell around
//! [`AgentUpdateState::on_start`], with the record in the data directory.

use std::io;
use std::path::Path;

use edgefleet_shared::UnixTime;

use super::handover::Layout;
use super::{AgentUpdateState, RECORD_FILE, Start, TrialFailure, UpdateRecord};

/// Largest record read back.
const MAX_RECORD_LEN: u64 = 64 * 1024;

/// Reads the record in `data_dir`; none yet is the default state. A record
/// that cannot be read or decoded is an error: nothing is decided from it.
pub fn load(data_dir: &Path) -> io::Result<AgentUpdateState> {
    let path = data_dir.join(RECORD_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(AgentUpdateState::default()),
        Err(e) => return Err(e),
    };
    if bytes.len() as u64 > MAX_RECORD_LEN {
        return Err(io::Error::other(format!(
            "{} is over {MAX_RECORD_LEN} bytes",
            path.display()
        )));
    }
    serde_json::from_slice(&bytes).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
}

/// Writes the record durably (one atomic replacement).
pub fn save(data_dir: &Path, state: &AgentUpdateState) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    std::fs::create_dir_all(data_dir)?;
    crate::store::write_atomic(&data_dir.join(RECORD_FILE), &bytes)
}

/// What the agent did at its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// No update pending.
    Normal,
    /// This is a new agent on trial: it confirms with [`confirm`] once it serves.
    Trial(UpdateRecord),
    /// This new agent had confirmed before a restart: the switch is now committed.
    Committed(UpdateRecord),
    /// The trial was lost; recorded. `hand_back` when this process is the new
    /// binary: it must give the device back to the old one (exec the link).
    Reverted {
        /// How the trial was lost.
        failure: TrialFailure,
        /// This process runs the new binary.
        hand_back: bool,
    },
}

/// Decides and carries out what the record says at this start, for the process
/// running `exe` at `now`.
pub fn at_start(
    data_dir: &Path,
    layout: &Layout,
    exe: &Path,
    now: UnixTime,
) -> io::Result<Started> {
    let state = load(data_dir)?;
    let running = layout.slot_of(exe);
    let Some(record) = state.current.clone() else {
        return Ok(Started::Normal);
    };
    match state.on_start(running, now) {
        Start::Normal => Ok(Started::Normal),
        Start::Trial { .. } => Ok(Started::Trial(record)),
        Start::FinishCommit => {
            layout.switch_link(record.to)?;
            let done = state.commit();
            save(data_dir, &done)?;
            Ok(Started::Committed(done.current.unwrap_or(record)))
        }
        Start::Revert(failure) => {
            save(data_dir, &state.fail(failure))?;
            // The link names the old slot until a commit; make sure of it.
            if layout.link_target() != Some(record.from) {
                layout.switch_link(record.from)?;
            }
            Ok(Started::Reverted {
                failure,
                hand_back: running == Some(record.to),
            })
        }
    }
}

/// The new agent serves: it cancels the deadline alarm, records the
/// confirmation, switches the link to its slot and commits. A failure part way
/// leaves a record that the next start finishes or reverts.
pub fn confirm(data_dir: &Path, layout: &Layout) -> io::Result<UpdateRecord> {
    cancel_alarm();
    let confirmed = load(data_dir)?.confirm();
    save(data_dir, &confirmed)?;
    let record = confirmed
        .current
        .clone()
        .ok_or_else(|| io::Error::other("no agent update to confirm"))?;
    layout.switch_link(record.to)?;
    let committed = confirmed.commit();
    save(data_dir, &committed)?;
    Ok(committed.current.unwrap_or(record))
}

/// The trial of this new agent, confirmed once ([`confirm`]): when its daemon
/// has connected to the broker, or at once when it has no broker link. Clones
/// share it (the daemon is restarted after a crash with the same settings).
#[derive(Debug, Clone)]
pub struct PendingTrial {
    data_dir: std::path::PathBuf,
    layout: Layout,
    pending: std::sync::Arc<std::sync::Mutex<Option<UpdateRecord>>>,
}

impl PendingTrial {
    /// The trial `record` of the agent whose data is in `data_dir`.
    pub fn new(data_dir: &Path, layout: Layout, record: UpdateRecord) -> PendingTrial {
        PendingTrial {
            data_dir: data_dir.to_owned(),
            layout,
            pending: std::sync::Arc::new(std::sync::Mutex::new(Some(record))),
        }
    }

    /// Confirms and commits the trial the first time it is called; None after.
    pub fn confirm_once(&self) -> Option<io::Result<UpdateRecord>> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.take()?;
        Some(confirm(&self.data_dir, &self.layout))
    }
}

/// Cancels a pending `alarm(2)` (the hand-over's deadline).
fn cancel_alarm() {
    // SAFETY: alarm(0) only cancels this process's pending SIGALRM timer.
    #[allow(unsafe_code)]
    unsafe {
        libc::alarm(0);
    }
}
