//! The daemon's part of an agent update (docs/agent-update.md): `update_agent`
//! is checked, the chunks that hold this device's binary are fetched like a
//! bundle's, then the binary goes into the other slot, is probed, and the
//! device is handed over to it by exec. The new agent confirms once it is
//! connected ([`Daemon::confirm_trial`]).

use std::fs;
use std::time::Duration;

use edgefleet_shared::protocol::{self, AgentUpdateFailure, EventKind, FailureReason, InstallMode};
use edgefleet_shared::{Digest, RawHeader};

use super::Daemon;
use super::download::{Download, Offer};
use crate::selfupdate::handover::{self, HandOver, NewBinary, StageError};
use crate::selfupdate::{BeginError, Release, check_offer, start};

/// Time each probe of a new binary (`--version`, `config check`) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent-update reason of a download that failed.
pub(super) fn failure_of(reason: FailureReason) -> AgentUpdateFailure {
    match reason {
        FailureReason::Refused { refusal } => AgentUpdateFailure::Refused { refusal },
        FailureReason::Download { detail } => AgentUpdateFailure::Download { detail },
        FailureReason::Preflight { detail }
        | FailureReason::ModelLoad { detail }
        | FailureReason::HealthCheck { detail }
        | FailureReason::Internal { detail } => AgentUpdateFailure::Internal { detail },
    }
}

/// The agent-update reason of a release the record will not take.
fn refused_by_record(e: BeginError) -> AgentUpdateFailure {
    match e {
        BeginError::Refused(refusal) => AgentUpdateFailure::Refused { refusal },
        other => AgentUpdateFailure::Internal {
            detail: other.to_string(),
        },
    }
}

impl Daemon {
    fn agent_update_failed(&mut self, command: u64, digest: Digest, reason: AgentUpdateFailure) {
        tracing::warn!(digest = %digest.short(), "agent update failed: {reason:?}");
        self.emit(
            Some(command),
            EventKind::AgentUpdateFailed { digest, reason },
        );
    }

    /// The offer checked as the device would install it (role, floor,
    /// architecture, the named digest, the record of earlier trials), then
    /// the download of this device's binary.
    pub(super) async fn update_agent(&mut self, command: u64, offer: protocol::BundleOffer) {
        let digest = offer.digest;
        let checked = self.check_agent_offer(digest, &offer.header);
        let (verified, name, size) = match checked {
            Ok(found) => found,
            Err(reason) => return self.agent_update_failed(command, digest, reason),
        };
        match &self.download {
            Some(d) if d.digest == digest && d.is_agent() => {
                // The same release again (the controller retried): carry on.
                self.request_chunks(true);
                return self.finish_if_complete().await;
            }
            Some(d) => {
                let detail = format!(
                    "busy: downloading bundle {} for command {}; send the agent release again after it",
                    d.digest.short(),
                    d.offer.command
                );
                return self.agent_update_failed(
                    command,
                    digest,
                    AgentUpdateFailure::Internal { detail },
                );
            }
            None => {}
        }
        if let Err(refusal) = self.preflight(offer.header.len() as u64 + size) {
            let detail = refusal.to_string();
            return self.agent_update_failed(
                command,
                digest,
                AgentUpdateFailure::Internal { detail },
            );
        }
        let offer = Offer {
            command,
            mode: InstallMode::Stage,
            header: offer.header,
            agent_binary: Some(name),
        };
        match self.create_download(offer, verified) {
            Ok(d) => {
                tracing::info!(
                    digest = %digest.short(),
                    chunks = d.tracker.total(),
                    bytes = size,
                    "agent release download started"
                );
                self.start_fetching(d);
                self.finish_if_complete().await;
            }
            Err(e) => {
                let detail = e.to_string();
                self.agent_update_failed(command, digest, AgentUpdateFailure::Internal { detail });
            }
        }
    }

    /// The offered release and this device's binary in it (its name and
    /// size), if the device may take the release.
    fn check_agent_offer(
        &self,
        digest: Digest,
        header: &[u8],
    ) -> Result<
        (
            edgefleet_shared::VerifiedHeader,
            edgefleet_shared::ArtifactName,
            u64,
        ),
        AgentUpdateFailure,
    > {
        let raw = RawHeader::parse_offer(header, digest)
            .map_err(|refusal| AgentUpdateFailure::Refused { refusal })?;
        let verified = self.check_agent_header(&raw)?;
        let Some(hand_over) = &self.settings.self_update else {
            return Err(AgentUpdateFailure::Internal {
                detail:
                    "this agent cannot replace its binary (a simulated device shares its process)"
                        .into(),
            });
        };
        if !hand_over.supervised {
            return Err(AgentUpdateFailure::Unsupervised);
        }
        let binary = verified
            .manifest
            .agent_binary(&self.settings.facts.arch)
            .ok_or_else(|| AgentUpdateFailure::Internal {
                detail: "checked release without this device's binary".into(),
            })?;
        let (name, size) = (binary.name.clone(), binary.size);
        Ok((verified, name, size))
    }

    /// The header of an agent release checked against the trust root's role,
    /// this device and its record (floor, releases that failed their trial).
    fn check_agent_header(
        &self,
        raw: &RawHeader,
    ) -> Result<edgefleet_shared::VerifiedHeader, AgentUpdateFailure> {
        let state = start::load(self.store.dir()).map_err(|e| AgentUpdateFailure::Internal {
            detail: format!("agent update record: {e}"),
        })?;
        let verified = check_offer(
            &state,
            &self.settings.trust,
            &self.settings.facts,
            raw.digest(),
            &raw.to_bytes(),
            self.now(),
        )?;
        state
            .check_release(&release_of(&verified))
            .map_err(refused_by_record)?;
        Ok(verified)
    }

    /// After a restart: the agent release download in `dir`, if the release
    /// is still one this device takes.
    pub(super) fn load_agent_download(
        &self,
        dir: &std::path::Path,
        offer: Offer,
    ) -> Option<Download> {
        let raw = RawHeader::parse(&offer.header).ok()?;
        // Handed over already (the directory goes once the trial is recorded):
        // the record, not the download, carries that release now.
        let record = start::load(self.store.dir()).ok()?;
        if record.current.is_some_and(|r| r.digest == raw.digest()) {
            return None;
        }
        let verified = self.check_agent_header(&raw).ok()?;
        Download::reopen(dir, offer, verified)
    }

    /// Every chunk of the binary is here: it goes into the other slot and is
    /// probed, the trial is recorded, and this process becomes the new agent.
    /// Returns only if the release failed before the hand-over.
    pub(super) async fn finish_agent_update(&mut self, d: Download) {
        let (command, digest) = (d.offer.command, d.digest);
        let dir = d.dir.clone();
        let staged = self.stage_agent(d).await;
        let (hand_over, release, from, path) = match staged {
            Ok(staged) => staged,
            Err(reason) => {
                let _ = fs::remove_dir_all(&dir);
                return self.agent_update_failed(command, digest, reason);
            }
        };
        // The trial is recorded before the download goes: killed in between,
        // the agent started again finds one or the other, never neither (and
        // drops a download whose release the record already names).
        let recorded = self.record_trial(from, &release, hand_over.confirm_within_s);
        let _ = fs::remove_dir_all(&dir);
        if let Err(reason) = recorded {
            return self.agent_update_failed(command, digest, reason);
        }
        tracing::info!(
            version = %release.version,
            release = release.release,
            binary = %path.display(),
            "handing over to the new agent"
        );
        // A clean goodbye without the offline state: the broker keeps this
        // device's last state (online) and sends no will; the new agent
        // reconnects within seconds. Unsent events stay in the spool.
        self.link.disconnect().await;
        let err = handover::exec_new(
            &path,
            &hand_over.args,
            hand_over.listen_fd,
            hand_over.confirm_within_s,
        );
        // The record says trial from this slot: started again by the
        // supervisor, this agent reports the update as crashed and serves.
        tracing::error!(
            "cannot start the new agent {}: {err}; exiting for the supervisor to start this one again",
            path.display()
        );
        std::process::exit(1);
    }

    /// Records the trial of `release` from the running slot, durably.
    fn record_trial(
        &self,
        from: crate::selfupdate::BinarySlot,
        release: &Release,
        confirm_within_s: u32,
    ) -> Result<(), AgentUpdateFailure> {
        let internal = |e: std::io::Error| AgentUpdateFailure::Internal {
            detail: format!("agent update record: {e}"),
        };
        let state = start::load(self.store.dir()).map_err(internal)?;
        let trial = state
            .begin_trial(from, release, self.now(), confirm_within_s)
            .map_err(refused_by_record)?;
        start::save(self.store.dir(), &trial).map_err(internal)
    }

    /// The binary of `d`, checked again, into the other slot and probed.
    async fn stage_agent(
        &self,
        d: Download,
    ) -> Result<
        (
            HandOver,
            Release,
            crate::selfupdate::BinarySlot,
            std::path::PathBuf,
        ),
        AgentUpdateFailure,
    > {
        let internal = |detail: String| AgentUpdateFailure::Internal { detail };
        let hand_over = self
            .settings
            .self_update
            .clone()
            .ok_or_else(|| internal("this agent cannot replace its binary".into()))?;
        // The trust root, the time or the record may have changed since the offer.
        let raw = RawHeader::parse(&d.offer.header)
            .map_err(|refusal| AgentUpdateFailure::Refused { refusal })?;
        let verified = self.check_agent_header(&raw)?;
        let release = release_of(&verified);
        let entry = verified
            .manifest
            .agent_binary(&self.settings.facts.arch)
            .cloned()
            .ok_or_else(|| internal("the release lost this device's binary".into()))?;
        let (offset, len) = d
            .agent_binary_at()
            .ok_or_else(|| internal("the download does not hold the binary".into()))?;
        let exe = std::env::current_exe()
            .map_err(|e| internal(format!("cannot find the running binary: {e}")))?;
        let (layout, config, version) = (
            hand_over.layout.clone(),
            hand_over.config.clone(),
            release.version.clone(),
        );
        let staged = tokio::task::spawn_blocking(move || {
            let new = NewBinary {
                source: &d.file,
                offset,
                len,
                sha256: entry.sha256,
                version: &version,
            };
            handover::stage(&layout, &exe, &new, config.as_deref(), PROBE_TIMEOUT)
        })
        .await
        .map_err(|e| internal(format!("staging task failed: {e}")))?;
        let (from, path) = staged.map_err(|e| match e {
            StageError::Probe(p) => AgentUpdateFailure::Probe {
                detail: p.to_string(),
            },
            StageError::Digest { .. } => AgentUpdateFailure::Download {
                detail: e.to_string(),
            },
            StageError::Io(e) => internal(format!("cannot put the new binary in place: {e}")),
        })?;
        Ok((hand_over, release, from, path))
    }

    /// This new agent is connected: its trial is confirmed and committed
    /// (once), before the outcome is reported.
    pub(super) fn confirm_trial(&mut self) {
        let Some(trial) = &self.settings.trial else {
            return;
        };
        match trial.confirm_once() {
            Some(Ok(r)) => {
                tracing::info!(version = %r.version, release = r.release, "agent update confirmed");
                println!(
                    "agent update to {} (release {}) confirmed",
                    r.version, r.release
                );
            }
            Some(Err(e)) => {
                tracing::error!("agent update not confirmed: {e}; the next start decides");
            }
            None => {}
        }
    }
}

/// The release a verified agent-release header describes.
fn release_of(verified: &edgefleet_shared::VerifiedHeader) -> Release {
    Release {
        digest: verified.digest,
        release: verified.manifest.release,
        version: verified.manifest.version.to_string(),
    }
}
