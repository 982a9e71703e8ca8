//! The agent's own binary, A/B, and the hand-over to a new one
//! (docs/agent-update.md). This module is the pure core: the durable record of an
//! agent update and the one decision a starting agent takes from it. No I/O, time
//! comes in as an argument; the shell that downloads, probes, execs and switches
//! the link persists [`AgentUpdateState`] with one atomic write per step.
//!
//! The steps: [`AgentUpdateState::begin_trial`] (the old agent, just before it
//! execs the new binary), [`AgentUpdateState::confirm`] and
//! [`AgentUpdateState::commit`] (the new agent, around the link switch),
//! [`AgentUpdateState::fail`] (whichever agent finds the trial lost). A start at
//! any point between them is decided by [`AgentUpdateState::on_start`].

pub mod handover;
pub mod start;

use edgefleet_shared::bundle::{DeviceFacts, InstalledRelease};
pub use edgefleet_shared::protocol::TrialFailure;
use edgefleet_shared::protocol::{AgentUpdateFailure, EventKind};
use edgefleet_shared::trust::Role;
use edgefleet_shared::{
    Digest, Limits, Policy, RawHeader, Refusal, TrustRoot, UnixTime, VerifiedHeader,
};
use serde::{Deserialize, Serialize};

/// File name of the record in the agent's data directory.
pub const RECORD_FILE: &str = "agent-update.json";
/// Failed releases remembered (so that a broken release is not tried again).
pub const MAX_FAILED: usize = 16;

/// One of the two places the agent's binary lives (`agent.a`, `agent.b` in the
/// binary directory; the unit starts a link to one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BinarySlot {
    /// `agent.a`.
    A,
    /// `agent.b`.
    B,
}

impl BinarySlot {
    /// The other slot.
    pub fn other(self) -> BinarySlot {
        match self {
            BinarySlot::A => BinarySlot::B,
            BinarySlot::B => BinarySlot::A,
        }
    }

    /// The slot's file name in the binary directory.
    pub fn file_name(self) -> &'static str {
        match self {
            BinarySlot::A => "agent.a",
            BinarySlot::B => "agent.b",
        }
    }

    /// The slot a running binary's file name says (None: not started from a
    /// slot, e.g. a device flashed before agent releases, or a developer build).
    pub fn from_file_name(name: &str) -> Option<BinarySlot> {
        match name {
            "agent.a" => Some(BinarySlot::A),
            "agent.b" => Some(BinarySlot::B),
            _ => None,
        }
    }
}

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The new binary is running (or about to be) and has not confirmed.
    Trial,
    /// The new binary confirmed; the link may not be switched yet.
    Confirmed,
    /// The link names the new binary: the update is done.
    Committed,
    /// The trial was lost; the old binary runs.
    Failed,
}

/// One agent update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRecord {
    /// Where it stands.
    pub phase: Phase,
    /// The slot of the agent that started the update.
    pub from: BinarySlot,
    /// The slot of the new binary.
    pub to: BinarySlot,
    /// The agent release (its manifest digest).
    pub digest: Digest,
    /// Its release number.
    pub release: u64,
    /// Its version (the new binary's `--version`).
    pub version: String,
    /// When the old agent handed over.
    pub started_at: UnixTime,
    /// The new agent must confirm before this instant.
    pub deadline: UnixTime,
    /// Why it failed (phase `failed`).
    pub failure: Option<TrialFailure>,
    /// Its outcome (committed or failed) was spooled to the controller.
    #[serde(default)]
    pub reported: bool,
}

/// Everything the device keeps about its own binary: one file, written whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentUpdateState {
    /// The highest agent release committed (rollback protection).
    pub floor: Option<InstalledRelease>,
    /// The latest update, whatever its phase.
    pub current: Option<UpdateRecord>,
    /// Releases whose trial failed on this device, newest last; not tried again.
    pub failed: Vec<Digest>,
}

/// What a starting agent does, from the record and the slot it runs from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Nothing pending: run as usual.
    Normal,
    /// This process is the new agent on trial: run, and confirm once ready,
    /// before `deadline`.
    Trial {
        /// The confirmation deadline.
        deadline: UnixTime,
    },
    /// This process is the new agent and it confirmed before a restart: switch
    /// the link to its slot (again: the switch is idempotent) and commit.
    FinishCommit,
    /// The trial was lost and this is the old agent: record the failure and
    /// report it, then run as usual.
    Revert(TrialFailure),
}

/// Why an update cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BeginError {
    /// The contract refuses the release (a lower release than installed, or the
    /// same release with other content).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// This release already failed its trial on this device.
    #[error("agent release {0} already failed its trial on this device")]
    AlreadyFailed(Digest),
    /// Another update is still in its trial.
    #[error("an agent update to release {release} is still in its trial")]
    Busy {
        /// The pending update's release.
        release: u64,
    },
}

/// Checks an offered agent release before anything is fetched, as this device
/// would install it: the header is the one the command names, it verifies with
/// the trust root's agent-release role (docs/bundle.md steps 1-10), its release
/// is not below this device's agent floor, and it holds a binary for this
/// device's architecture.
pub fn check_offer(
    state: &AgentUpdateState,
    trust: &TrustRoot,
    device: &DeviceFacts,
    digest: Digest,
    header: &[u8],
    now: UnixTime,
) -> Result<VerifiedHeader, AgentUpdateFailure> {
    let refused = |refusal| AgentUpdateFailure::Refused { refusal };
    let raw = RawHeader::parse_offer(header, digest).map_err(refused)?;
    let policy = Policy {
        trust,
        role: Role::AgentReleases,
        now,
        limits: Limits::default(),
        installed: state.floor.as_ref(),
        device: Some(device),
    };
    let verified = raw.verify(&policy).map_err(refused)?;
    if verified.manifest.agent_binary(&device.arch).is_none() {
        return Err(refused(Refusal::ArchitectureNotSupported {
            device: device.arch.clone(),
            supported: verified.manifest.constraints.architectures.clone(),
        }));
    }
    Ok(verified)
}

/// The release an update installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Its manifest digest.
    pub digest: Digest,
    /// Its release number.
    pub release: u64,
    /// Its version.
    pub version: String,
}

impl AgentUpdateState {
    /// The decision of an agent starting from `running` (None: not from a slot)
    /// at `now`. The exec keeps the trial's process running the new slot's
    /// binary; a start by the supervisor or at boot runs what the link names,
    /// which is the old slot until the commit.
    pub fn on_start(&self, running: Option<BinarySlot>, now: UnixTime) -> Start {
        let Some(r) = &self.current else {
            return Start::Normal;
        };
        let from_new = running == Some(r.to);
        match (r.phase, from_new) {
            (Phase::Trial, true) if now < r.deadline => Start::Trial {
                deadline: r.deadline,
            },
            // The new binary started again after its deadline (by hand, or a
            // supervisor that starts the slot directly): the trial is lost.
            (Phase::Trial, true) => Start::Revert(TrialFailure::NoConfirmation),
            (Phase::Trial, false) if now >= r.deadline => {
                Start::Revert(TrialFailure::NoConfirmation)
            }
            (Phase::Trial, false) => Start::Revert(TrialFailure::Crashed),
            (Phase::Confirmed, true) => Start::FinishCommit,
            (Phase::Confirmed, false) => Start::Revert(TrialFailure::Interrupted),
            (Phase::Committed | Phase::Failed, _) => Start::Normal,
        }
    }

    /// The old agent, running from `from`, hands over to `release` in the other
    /// slot at `now`, with `confirm_within_s` seconds to confirm. Checks the
    /// floor, the failed list and that no trial is pending; the caller has
    /// already verified the release's signatures.
    pub fn begin_trial(
        &self,
        from: BinarySlot,
        release: &Release,
        now: UnixTime,
        confirm_within_s: u32,
    ) -> Result<AgentUpdateState, BeginError> {
        self.check_release(release)?;
        let mut next = self.clone();
        next.current = Some(UpdateRecord {
            phase: Phase::Trial,
            from,
            to: from.other(),
            digest: release.digest,
            release: release.release,
            version: release.version.clone(),
            started_at: now,
            deadline: UnixTime(now.0.saturating_add(i64::from(confirm_within_s))),
            failure: None,
            reported: false,
        });
        Ok(next)
    }

    /// Whether `release` may be tried on this device now: no trial under way,
    /// not below the floor (nor the floor's number with other content), not a
    /// release that already failed here.
    pub fn check_release(&self, release: &Release) -> Result<(), BeginError> {
        if let Some(r) = self.current.as_ref().filter(|r| r.phase == Phase::Trial) {
            return Err(BeginError::Busy { release: r.release });
        }
        if let Some(floor) = &self.floor {
            let channel = edgefleet_shared::ModelChannel::agent();
            edgefleet_shared::bundle::check_floor(
                &channel,
                release.release,
                release.digest,
                floor,
            )?;
        }
        if self.failed.contains(&release.digest) {
            return Err(BeginError::AlreadyFailed(release.digest));
        }
        Ok(())
    }

    /// The new agent confirmed (before its deadline: the caller's alarm).
    pub fn confirm(&self) -> AgentUpdateState {
        self.with_phase(Phase::Trial, Phase::Confirmed)
    }

    /// The link names the new slot: the update is done and its release is the
    /// new floor.
    pub fn commit(&self) -> AgentUpdateState {
        let mut next = self.with_phase(Phase::Confirmed, Phase::Committed);
        if let Some(r) = next
            .current
            .as_ref()
            .filter(|r| r.phase == Phase::Committed)
        {
            next.floor = Some(InstalledRelease {
                release: r.release,
                manifest_digest: r.digest,
            });
        }
        next
    }

    /// The trial was lost: remember why, and never try this release again.
    pub fn fail(&self, why: TrialFailure) -> AgentUpdateState {
        let mut next = self.clone();
        if let Some(r) = next
            .current
            .as_mut()
            .filter(|r| matches!(r.phase, Phase::Trial | Phase::Confirmed))
        {
            r.phase = Phase::Failed;
            r.failure = Some(why);
            if !next.failed.contains(&r.digest) {
                next.failed.push(r.digest);
            }
            let excess = next.failed.len().saturating_sub(MAX_FAILED);
            next.failed.drain(..excess);
        }
        next
    }

    /// The slot the agent should run from after this state (the link's target):
    /// the new slot once committed, else the slot the update started from.
    pub fn link_target(&self) -> Option<BinarySlot> {
        self.current.as_ref().map(|r| match r.phase {
            Phase::Committed => r.to,
            Phase::Trial | Phase::Confirmed | Phase::Failed => r.from,
        })
    }

    /// The event that tells the controller how the latest update ended, until
    /// it was sent: `agent_updated` once committed (the only moment a device
    /// counts as updated), `agent_update_failed` once the trial was lost.
    pub fn unreported_event(&self) -> Option<EventKind> {
        let r = self.current.as_ref().filter(|r| !r.reported)?;
        match (r.phase, r.failure) {
            (Phase::Committed, _) => Some(EventKind::AgentUpdated {
                digest: r.digest,
                version: r.version.clone(),
                release: r.release,
            }),
            (Phase::Failed, Some(failure)) => Some(EventKind::AgentUpdateFailed {
                digest: r.digest,
                reason: AgentUpdateFailure::Trial { failure },
            }),
            _ => None,
        }
    }

    /// The same state with the latest update's outcome marked as sent.
    pub fn mark_reported(&self) -> AgentUpdateState {
        let mut next = self.clone();
        if let Some(r) = next
            .current
            .as_mut()
            .filter(|r| matches!(r.phase, Phase::Committed | Phase::Failed))
        {
            r.reported = true;
        }
        next
    }

    fn with_phase(&self, from: Phase, to: Phase) -> AgentUpdateState {
        let mut next = self.clone();
        if let Some(r) = next.current.as_mut().filter(|r| r.phase == from) {
            r.phase = to;
        }
        next
    }
}

#[cfg(test)]
mod tests;
