//! The rollout engine: a pure state machine. No I/O, no clock: time comes in as
//! milliseconds since the Unix epoch, device news and operator commands come in as
//! [`Input`]s, and what must happen comes out as [`Effect`]s for the shell
//! ([`crate::server::fleet`]) to carry out. The whole state serialises, so the shell
//! persists it after every step and a restarted controller continues from it.
//!
//! Rules (docs/rollouts.md):
//! - The target devices are fixed when the rollout starts; which wave each falls in
//!   is [`assign_waves`], a function of rollout id and device id only.
//! - A wave starts by commanding its devices, at most `rate_per_minute` per minute.
//!   A device is *terminal* once it succeeded, failed, or stayed silent past
//!   `install_timeout_ms` (counted as failed).
//! - The install gate is checked as results arrive: once failures exceed
//!   `max_failure_ratio` of the wave the gate trips at once; once every device is
//!   terminal the success ratio must reach `min_success_ratio`.
//! - Then the wave soaks for `soak_ms`; the shell reports the wave's health
//!   ([`WaveHealth`]) at every tick, and a breach of the error-rate or latency bound
//!   trips the gate. After the soak the next wave starts; after the last, the
//!   rollout is complete.
//! - A tripped gate pauses the rollout or halts it and reverts every device of the
//!   rollout that switched, per [`FailurePolicy`].

use std::collections::{BTreeMap, HashMap};

use edgefleet_shared::DeviceId;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// How big a wave is: cumulative, as the share of the target that has been asked
/// to install once the wave has started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    /// This many devices in total (at least 1).
    Count(u32),
    /// This percentage of the target in total (1-100), rounded up.
    Percent(u8),
}

/// Why a rollout plan (or a wave size) is refused; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A wave size as written is not one.
    #[error("wave {text:?}: {why}")]
    WaveText {
        /// As written.
        text: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Too few or too many waves.
    #[error("waves must list 1 to 20 wave sizes")]
    WaveCount,
    /// A wave of no device.
    #[error("waves: a wave needs at least 1 device")]
    EmptyWave,
    /// A percentage out of range.
    #[error("waves: {0}% is not between 1% and 100%")]
    Percent(u8),
    /// A number out of its range (`field` must be `rule`, it is `value`).
    #[error("{field} must be {rule}, got {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its range.
        rule: &'static str,
        /// The value given.
        value: f64,
    },
    /// A setting past its limit.
    #[error("{field} must be {rule}")]
    Limit {
        /// The field.
        field: &'static str,
        /// Its range.
        rule: &'static str,
    },
    /// More shadow waves than waves.
    #[error("shadow_waves ({shadow}) must not exceed the number of waves ({waves})")]
    ShadowWaves {
        /// Shadow waves asked for.
        shadow: u32,
        /// Waves in the plan.
        waves: usize,
    },
    /// The selector chose nobody.
    #[error("the selector matches no device")]
    NoDevice,
}

impl WaveSize {
    /// Parses `5` (devices) or `10%`.
    pub fn parse(text: &str) -> Result<WaveSize, PlanError> {
        let t = text.trim();
        let refuse = |why| PlanError::WaveText {
            text: t.to_owned(),
            why,
        };
        if let Some(p) = t.strip_suffix('%') {
            let percent = "a percentage must be 1% to 100%";
            let p: u8 = p.trim().parse().map_err(|_| refuse(percent))?;
            if !(1..=100).contains(&p) {
                return Err(refuse(percent));
            }
            Ok(WaveSize::Percent(p))
        } else {
            let n: u32 = t.parse().map_err(|_| {
                refuse("expected a device count (e.g. 1) or a percentage (e.g. 10%)")
            })?;
            if n == 0 {
                return Err(refuse("a wave needs at least 1 device"));
            }
            Ok(WaveSize::Count(n))
        }
    }

    /// Cumulative devices for a target of `total`.
    fn cumulative(self, total: usize) -> usize {
        match self {
            WaveSize::Count(n) => (n as usize).min(total),
            WaveSize::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

impl std::fmt::Display for WaveSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaveSize::Count(n) => write!(f, "{n}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The bounds each wave must meet before the next starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Gates {
    /// Share of the wave that must install successfully (0-1).
    pub min_success_ratio: f64,
    /// Share of the wave whose failure trips the gate at once (0-1); a failure
    /// ratio strictly above it trips.
    pub max_failure_ratio: f64,
    /// How long a complete wave must stay healthy before the next starts.
    pub soak_ms: u64,
    /// Highest inference error rate (errors / inferences) of the wave during soak.
    pub max_error_rate: f64,
    /// Highest p95 latency of the wave relative to devices still on the previous
    /// version (1.5 = 50% slower).
    pub max_p95_latency_ratio: f64,
    /// Highest share of the wave's devices reporting drift above the share among
    /// devices still on the previous version (0-1; 1 turns the gate off).
    pub max_drift_increase: f64,
    /// In a shadow stage: lowest share of sampled requests on which the new
    /// bundle, run in shadow, agreed with the active one (0-1).
    pub min_shadow_agreement: f64,
    /// A commanded device silent this long counts as failed.
    pub install_timeout_ms: u64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            min_success_ratio: 0.9,
            max_failure_ratio: 0.1,
            soak_ms: 60_000,
            max_error_rate: 0.05,
            max_p95_latency_ratio: 1.5,
            max_drift_increase: 0.25,
            min_shadow_agreement: 0.9,
            install_timeout_ms: 600_000,
        }
    }
}

impl Gates {
    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        let ratio = |field, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(PlanError::OutOfRange {
                    field,
                    rule: "between 0 and 1",
                    value,
                })
            }
        };
        ratio("gates.min_success_ratio", self.min_success_ratio)?;
        ratio("gates.max_failure_ratio", self.max_failure_ratio)?;
        ratio("gates.max_error_rate", self.max_error_rate)?;
        ratio("gates.max_drift_increase", self.max_drift_increase)?;
        ratio("gates.min_shadow_agreement", self.min_shadow_agreement)?;
        if !(self.max_p95_latency_ratio.is_finite() && self.max_p95_latency_ratio >= 1.0) {
            return Err(PlanError::OutOfRange {
                field: "gates.max_p95_latency_ratio",
                rule: "at least 1",
                value: self.max_p95_latency_ratio,
            });
        }
        if self.install_timeout_ms < 1_000 {
            return Err(PlanError::Limit {
                field: "gates.install_timeout_ms",
                rule: "at least 1000",
            });
        }
        if self.soak_ms > 7 * 86_400_000 {
            return Err(PlanError::Limit {
                field: "gates.soak_ms",
                rule: "at most 7 days",
            });
        }
        Ok(())
    }
}

/// What a tripped gate does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Stop commanding; the operator resumes (accepting the wave) or aborts.
    Pause,
    /// Stop and send `revert` to every device of the rollout that switched.
    HaltAndRevert,
}

/// Everything an operator chooses for a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Cumulative wave sizes; a final 100% is added when missing.
    pub waves: Vec<WaveSize>,
    /// The gates of every wave.
    pub gates: Gates,
    /// What a tripped gate does.
    pub policy: FailurePolicy,
    /// Install commands per minute at most (1-100000).
    pub rate_per_minute: u32,
    /// A commanded device with no news this long is sent the command again
    /// (commands are idempotent on the device).
    pub resend_after_ms: u64,
    /// The first this many waves install the bundle in shadow first: it runs
    /// beside the active model on live requests through a soak gated on
    /// agreement, and only then is the wave told to activate it.
    #[serde(default)]
    pub shadow_waves: u32,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            waves: vec![
                WaveSize::Count(1),
                WaveSize::Percent(10),
                WaveSize::Percent(50),
                WaveSize::Percent(100),
            ],
            gates: Gates::default(),
            policy: FailurePolicy::HaltAndRevert,
            rate_per_minute: 600,
            resend_after_ms: 60_000,
            shadow_waves: 0,
        }
    }
}

impl Plan {
    /// Checks the plan; the error names the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.waves.is_empty() || self.waves.len() > 20 {
            return Err(PlanError::WaveCount);
        }
        for w in &self.waves {
            match *w {
                WaveSize::Count(0) => return Err(PlanError::EmptyWave),
                WaveSize::Percent(p) if !(1..=100).contains(&p) => {
                    return Err(PlanError::Percent(p));
                }
                _ => {}
            }
        }
        if !(1..=100_000).contains(&self.rate_per_minute) {
            return Err(PlanError::Limit {
                field: "rate_per_minute",
                rule: "1 to 100000",
            });
        }
        if self.resend_after_ms < 1_000 {
            return Err(PlanError::Limit {
                field: "resend_after_ms",
                rule: "at least 1000",
            });
        }
        if self.shadow_waves as usize > self.waves.len() {
            return Err(PlanError::ShadowWaves {
                shadow: self.shadow_waves,
                waves: self.waves.len(),
            });
        }
        self.gates.validate()
    }
}

/// The rank of a device in a rollout: the first 8 bytes of
/// SHA-256(rollout id, 0, device id). Stable across restarts and machines.
pub fn rank(rollout: &str, device: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(rollout.as_bytes());
    h.update([0]);
    h.update(device.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Splits `devices` into waves: devices are ordered by [`rank`] (ties by id) and
/// cut at the cumulative wave sizes; waves that would be empty are dropped, and a
/// final wave takes everyone left. Returns one list per wave, each ordered.
pub fn assign_waves(rollout: &str, devices: &[DeviceId], waves: &[WaveSize]) -> Vec<Vec<DeviceId>> {
    let mut ordered: Vec<(u64, &DeviceId)> =
        devices.iter().map(|d| (rank(rollout, d), d)).collect();
    ordered.sort();
    ordered.dedup_by(|a, b| a.1 == b.1);
    let total = ordered.len();
    let mut out = Vec::new();
    let mut taken = 0;
    for w in waves {
        let upto = w.cumulative(total).max(taken);
        if upto > taken {
            out.push(
                ordered[taken..upto]
                    .iter()
                    .map(|(_, d)| (*d).clone())
                    .collect(),
            );
            taken = upto;
        }
    }
    if taken < total {
        out.push(ordered[taken..].iter().map(|(_, d)| (*d).clone()).collect());
    }
    out
}

/// Where one device is in the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Member {
    /// Not yet asked (its wave has not started, or the rate limit holds it).
    Pending,
    /// Asked to install; `heard_at` is the last sign of progress.
    Commanded {
        /// When it was first asked.
        first_at: u64,
        /// When it was last asked.
        sent_at: u64,
        /// Last sign of life for this install.
        heard_at: u64,
        /// Chunks done / total, from progress events.
        progress: Option<(u32, u32)>,
    },
    /// Installed and switched to the new bundle.
    Succeeded {
        /// When.
        at: u64,
    },
    /// Reported a failure (the reason as the device gave it), or timed out.
    Failed {
        /// When.
        at: u64,
        /// Why.
        reason: String,
    },
    /// Sent `revert` after a halt.
    Reverting {
        /// When.
        sent_at: u64,
    },
    /// Back on its previous bundle.
    Reverted {
        /// When.
        at: u64,
    },
}

impl Member {
    /// Short name for counts and tables.
    pub fn name(&self) -> &'static str {
        match self {
            Member::Pending => "pending",
            Member::Commanded { progress: None, .. } => "commanded",
            Member::Commanded { .. } => "downloading",
            Member::Succeeded { .. } => "succeeded",
            Member::Failed { .. } => "failed",
            Member::Reverting { .. } => "reverting",
            Member::Reverted { .. } => "reverted",
        }
    }
}

/// Where the rollout as a whole is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Commanding and waiting for the current wave's installs.
    Installing {
        /// Since when.
        since: u64,
    },
    /// The wave passed its install gate and must stay healthy until `until`.
    Soaking {
        /// Soak start.
        since: u64,
        /// Soak end.
        until: u64,
    },
    /// Stopped by the operator or by a gate (policy `pause`).
    Paused {
        /// Since when.
        since: u64,
        /// Why (operator, or the gate that tripped).
        reason: String,
        /// True when a gate paused it: resuming accepts the wave as it is.
        by_gate: bool,
        /// The phase to go back to on resume (operator pause only).
        resume_to: Box<Phase>,
    },
    /// Every wave passed.
    Completed {
        /// When.
        at: u64,
    },
    /// A gate tripped under `halt_and_revert`; switched devices were told to revert.
    Halted {
        /// When.
        at: u64,
        /// The gate that tripped.
        reason: String,
    },
    /// Stopped by the operator.
    Aborted {
        /// When.
        at: u64,
        /// Whether switched devices were told to revert.
        reverted: bool,
    },
}

impl Phase {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Installing { .. } => "installing",
            Phase::Soaking { .. } => "soaking",
            Phase::Paused { .. } => "paused",
            Phase::Completed { .. } => "completed",
            Phase::Halted { .. } => "halted",
            Phase::Aborted { .. } => "aborted",
        }
    }

    /// True once the rollout will command no more installs.
    pub fn finished(&self) -> bool {
        matches!(
            self,
            Phase::Completed { .. } | Phase::Halted { .. } | Phase::Aborted { .. }
        )
    }
}

/// Health of the current wave over its soak so far, computed by the shell from
/// telemetry. `None` fields are unknown (no traffic, no baseline) and pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WaveHealth {
    /// errors / inferences of the wave's devices on the new bundle.
    pub error_rate: Option<f64>,
    /// p95 latency of the wave on the new bundle / p95 of devices still on the
    /// previous version.
    pub p95_latency_ratio: Option<f64>,
    /// Share of the wave's devices whose drift window is drifted, minus the same
    /// share among devices still on the previous version.
    #[serde(default)]
    pub drift_increase: Option<f64>,
    /// In a shadow stage: agreed / runs of the new bundle in shadow on the wave.
    #[serde(default)]
    pub shadow_agreement: Option<f64>,
    /// In a shadow stage: p95 latency of the shadow over the active model's on
    /// the same requests.
    #[serde(default)]
    pub shadow_p95_latency_ratio: Option<f64>,
}

/// News for the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Download progress of a device.
    Progress {
        /// Device.
        device: DeviceId,
        /// Chunks done.
        done: u32,
        /// Chunks total.
        total: u32,
    },
    /// The device installed and activated the rollout's bundle.
    Succeeded {
        /// Device.
        device: DeviceId,
    },
    /// The device failed to install it.
    Failed {
        /// Device.
        device: DeviceId,
        /// Its reason.
        reason: String,
    },
    /// The device switched back after our revert.
    Reverted {
        /// Device.
        device: DeviceId,
    },
    /// Operator: stop commanding.
    Pause,
    /// Operator: continue (after a gate pause: accept the wave as it is).
    Resume,
    /// Operator: stop for good, optionally reverting switched devices.
    Abort {
        /// Revert the devices that switched.
        revert: bool,
    },
    /// Operator: end the current soak now.
    Promote,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send the rollout's install command to this device.
    Install(DeviceId),
    /// Send the install command in shadow mode to this device.
    InstallShadow(DeviceId),
    /// Tell this device to stop running its shadow (a halted shadow stage).
    StopShadow(DeviceId),
    /// Send `revert` to this device.
    Revert(DeviceId),
    /// `Install`, `InstallShadow` or `Revert` once more, as the same command
    /// (the id it was first sent with): the controller does not know whether
    /// it was ever published (`Rollout::take_over`). A device that had it
    /// refuses the copy as a replay; one that never got it carries it out,
    /// so no device is told twice.
    Resend(Box<Effect>),
    /// Something worth telling the operator (also the audit of automatic steps).
    Note(String),
}

/// Why an operator command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a rollout that is {phase}")]
pub struct NotNow {
    /// The command.
    pub action: &'static str,
    /// The phase it met.
    pub phase: &'static str,
}

/// The state of one rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The plan.
    pub plan: Plan,
    /// Device ids per wave.
    pub waves: Vec<Vec<DeviceId>>,
    /// Index of the current wave.
    pub wave: usize,
    /// Where it is.
    pub phase: Phase,
    /// Every target device.
    pub members: BTreeMap<DeviceId, Member>,
    /// Rate limiter: the earliest time the next command may go (see [`Rollout::may_send`]).
    pub next_send_at: u64,
    /// The current wave runs the bundle in shadow (its first stage).
    #[serde(default)]
    pub shadow_stage: bool,
    /// Each wave's counts, kept as members change (never stored).
    #[serde(skip)]
    tally: Tally,
}

/// What a [`Rollout`] derives from `waves` and `members` so that the install
/// gate, which runs on every device's news, reads its wave's counts in O(1):
/// counting the wave each time was O(wave) per event, 45% of the controller's
/// CPU in a rollout to 5,000 devices (docs/scale.md). Built on first use
/// (after a rollout is loaded, too), then updated by [`Rollout::set_member`];
/// not part of a rollout's equality: it is a cache.
#[derive(Debug, Clone, Default)]
struct Tally {
    /// The wave of each member.
    wave_of: HashMap<DeviceId, usize>,
    /// Counts per wave (empty until built).
    per_wave: Vec<Counts>,
}

impl PartialEq for Tally {
    fn eq(&self, _: &Tally) -> bool {
        true
    }
}

/// Counts of members by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Not yet asked.
    pub pending: usize,
    /// Asked, no result yet.
    pub in_progress: usize,
    /// Switched.
    pub succeeded: usize,
    /// Failed or timed out.
    pub failed: usize,
    /// Reverting or reverted.
    pub reverted: usize,
}

impl Counts {
    /// The count a member in state `m` falls under (`None`: not yet asked).
    fn slot(&mut self, m: Option<&Member>) -> &mut usize {
        match m {
            Some(Member::Pending) | None => &mut self.pending,
            Some(Member::Commanded { .. }) => &mut self.in_progress,
            Some(Member::Succeeded { .. }) => &mut self.succeeded,
            Some(Member::Failed { .. }) => &mut self.failed,
            Some(Member::Reverting { .. } | Member::Reverted { .. }) => &mut self.reverted,
        }
    }
}

impl Rollout {
    /// A new rollout over `devices` (split with [`assign_waves`]), starting at `now`.
    pub fn new(id: &str, devices: &[DeviceId], plan: Plan, now: u64) -> Result<Rollout, PlanError> {
        plan.validate()?;
        if devices.is_empty() {
            return Err(PlanError::NoDevice);
        }
        let waves = assign_waves(id, devices, &plan.waves);
        let members = waves
            .iter()
            .flatten()
            .map(|d| (d.clone(), Member::Pending))
            .collect();
        Ok(Rollout {
            shadow_stage: plan.shadow_waves > 0,
            plan,
            waves,
            wave: 0,
            phase: Phase::Installing { since: now },
            members,
            next_send_at: now,
            tally: Tally::default(),
        })
    }

    /// Sets a member's state, keeping its wave's counts in step.
    fn set_member(&mut self, id: DeviceId, m: Member) {
        if let Some(&w) = self.tally.wave_of.get(&id)
            && let Some(counts) = self.tally.per_wave.get_mut(w)
        {
            let old = counts.slot(self.members.get(&id));
            *old = old.saturating_sub(1);
            *counts.slot(Some(&m)) += 1;
        }
        self.members.insert(id, m);
    }

    /// The current wave's counts, from the tally (built here when missing).
    fn wave_counts(&mut self) -> Counts {
        if self.tally.per_wave.len() != self.waves.len() {
            let mut t = Tally {
                wave_of: HashMap::with_capacity(self.members.len()),
                per_wave: vec![Counts::default(); self.waves.len()],
            };
            for (w, ids) in self.waves.iter().enumerate() {
                for id in ids {
                    t.wave_of.insert(id.clone(), w);
                    *t.per_wave[w].slot(self.members.get(id)) += 1;
                }
            }
            self.tally = t;
        }
        let c = self
            .tally
            .per_wave
            .get(self.wave)
            .copied()
            .unwrap_or_default();
        debug_assert_eq!(c, self.counts(Some(self.wave)), "the tally kept in step");
        c
    }

    /// Counts of the members of wave `w` (all members if `None`).
    pub fn counts(&self, w: Option<usize>) -> Counts {
        let mut c = Counts::default();
        let ids: Vec<&DeviceId> = match w {
            Some(w) => self
                .waves
                .get(w)
                .map(|v| v.iter().collect())
                .unwrap_or_default(),
            None => self.members.keys().collect(),
        };
        for id in ids {
            *c.slot(self.members.get(id)) += 1;
        }
        c
    }

    /// Applies news or an operator command. News about devices outside the
    /// rollout, or that no longer matters, is ignored; operator commands that do
    /// not fit the phase are refused.
    pub fn apply(&mut self, now: u64, input: Input) -> Result<Vec<Effect>, NotNow> {
        let mut fx = Vec::new();
        let news = matches!(
            input,
            Input::Progress { .. } | Input::Succeeded { .. } | Input::Failed { .. }
        );
        match input {
            Input::Progress {
                device,
                done,
                total,
            } => {
                if let Some(Member::Commanded {
                    heard_at, progress, ..
                }) = self.members.get_mut(&device)
                {
                    *heard_at = now;
                    *progress = Some((done, total));
                }
            }
            Input::Succeeded { device } => match self.members.get(&device) {
                Some(Member::Commanded { .. }) | Some(Member::Failed { .. }) => {
                    if matches!(
                        self.phase,
                        Phase::Halted { .. } | Phase::Aborted { reverted: true, .. }
                    ) {
                        // Finished after the halt: take it back too.
                        if self.in_shadow(&device) {
                            self.set_member(device.clone(), Member::Reverted { at: now });
                            fx.push(Effect::StopShadow(device));
                        } else {
                            self.set_member(device.clone(), Member::Reverting { sent_at: now });
                            fx.push(Effect::Revert(device));
                        }
                    } else {
                        self.set_member(device, Member::Succeeded { at: now });
                    }
                }
                _ => {}
            },
            Input::Failed { device, reason } => {
                if let Some(Member::Commanded { .. }) = self.members.get(&device) {
                    self.set_member(device, Member::Failed { at: now, reason });
                }
            }
            Input::Reverted { device } => {
                if let Some(Member::Reverting { .. }) = self.members.get(&device) {
                    self.set_member(device, Member::Reverted { at: now });
                }
            }
            Input::Pause => match &self.phase {
                Phase::Installing { .. } | Phase::Soaking { .. } => {
                    let resume_to = Box::new(self.phase.clone());
                    fx.push(Effect::Note(format!(
                        "paused by the operator in wave {}",
                        self.wave + 1
                    )));
                    self.phase = Phase::Paused {
                        since: now,
                        reason: "paused by the operator".into(),
                        by_gate: false,
                        resume_to,
                    };
                }
                p => return Err(not_now("pause", p)),
            },
            Input::Resume => match &self.phase {
                Phase::Paused {
                    by_gate: false,
                    resume_to,
                    since,
                    ..
                } => {
                    // The paused time does not count against the soak.
                    let paused_for = now.saturating_sub(*since);
                    self.phase = match **resume_to {
                        Phase::Soaking { since, until } => Phase::Soaking {
                            since,
                            until: until.saturating_add(paused_for),
                        },
                        ref p => p.clone(),
                    };
                    fx.push(Effect::Note(format!("resumed in wave {}", self.wave + 1)));
                }
                Phase::Paused { by_gate: true, .. } => {
                    fx.push(Effect::Note(format!(
                        "resumed: wave {} accepted by the operator despite its gate",
                        self.wave + 1
                    )));
                    self.next_wave(now, &mut fx);
                }
                p => return Err(not_now("resume", p)),
            },
            Input::Abort { revert } => {
                if self.phase.finished() {
                    return Err(not_now("abort", &self.phase));
                }
                fx.push(Effect::Note(if revert {
                    "aborted by the operator; switched devices are told to revert".into()
                } else {
                    "aborted by the operator; devices keep what they have".into()
                }));
                self.phase = Phase::Aborted {
                    at: now,
                    reverted: revert,
                };
                if revert {
                    self.revert_all(now, &mut fx);
                }
            }
            Input::Promote => match &self.phase {
                Phase::Soaking { .. } => {
                    fx.push(Effect::Note(format!(
                        "wave {} promoted by the operator (soak skipped)",
                        self.wave + 1
                    )));
                    self.next_wave(now, &mut fx);
                }
                p => return Err(not_now("promote", p)),
            },
        }
        // News may complete a gate: evaluate now rather than at the next tick.
        // A device's news makes no command due and times nobody out, so while
        // installing only the gate is evaluated (the whole tick walked every
        // member of the wave on each event: minutes for a 4,500-device wave).
        if news && matches!(self.phase, Phase::Installing { .. }) {
            self.install_gate(now, &mut fx);
        } else {
            fx.extend(self.tick(now, None));
        }
        Ok(fx)
    }

    /// Advances time: sends due commands, times out silent devices, evaluates
    /// the gates. `health` is the current wave's health while it soaks.
    pub fn tick(&mut self, now: u64, health: Option<WaveHealth>) -> Vec<Effect> {
        let mut fx = Vec::new();
        match self.phase.clone() {
            Phase::Installing { .. } => {
                self.command_wave(now, &mut fx);
                self.time_out(now, &mut fx);
                self.install_gate(now, &mut fx);
            }
            Phase::Soaking { until, .. } => {
                if let Some(reason) = self.health_breach(health) {
                    self.trip(now, reason, &mut fx);
                } else if now >= until {
                    fx.push(Effect::Note(format!(
                        "wave {} passed its soak",
                        self.wave + 1
                    )));
                    self.next_wave(now, &mut fx);
                }
            }
            Phase::Halted { .. } | Phase::Aborted { reverted: true, .. } => {
                // Revert commands are re-sent until answered.
                for (id, m) in self.members.iter_mut() {
                    if let Member::Reverting { sent_at } = m
                        && now.saturating_sub(*sent_at) >= self.plan.resend_after_ms
                    {
                        *sent_at = now;
                        fx.push(Effect::Revert(id.clone()));
                    }
                }
            }
            Phase::Paused { .. } | Phase::Completed { .. } | Phase::Aborted { .. } => {}
        }
        fx
    }

    /// True when the rate limit lets one more command go at `now`, and takes the
    /// slot: a generic cell rate limiter (GCRA) that allows a burst of one
    /// minute's worth and then `rate_per_minute` per minute, evenly spaced.
    /// `next_send_at` is the theoretical arrival time of the next command.
    fn may_send(&mut self, now: u64) -> bool {
        let spacing = 60_000 / u64::from(self.plan.rate_per_minute.max(1));
        let tat = self.next_send_at.max(now);
        if tat - now > 60_000 - spacing {
            return false;
        }
        self.next_send_at = tat + spacing;
        true
    }

    fn command_wave(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let size = self.waves.get(self.wave).map_or(0, Vec::len);
        let resend = self.plan.resend_after_ms;
        for i in 0..size {
            let id = &self.waves[self.wave][i];
            let due = match self.members.get(id) {
                Some(Member::Pending) => true,
                Some(Member::Commanded {
                    sent_at, heard_at, ..
                }) => now.saturating_sub((*sent_at).max(*heard_at)) >= resend,
                _ => false,
            };
            if !due {
                continue;
            }
            let id = id.clone();
            if !self.may_send(now) {
                continue;
            }
            let commanded = match self.members.get(&id) {
                Some(&Member::Commanded {
                    first_at,
                    heard_at,
                    progress,
                    ..
                }) => Member::Commanded {
                    first_at,
                    sent_at: now,
                    heard_at,
                    progress,
                },
                _ => Member::Commanded {
                    first_at: now,
                    sent_at: now,
                    heard_at: now,
                    progress: None,
                },
            };
            self.set_member(id.clone(), commanded);
            // Asked again after `resend_after_ms` without news: a new
            // command, so that a device that lost the first (killed between
            // receiving and acting on it: it had recorded the id) carries it
            // out; an install of what it has or is fetching is a no-op there.
            fx.push(self.install_effect(id));
        }
    }

    /// The install command of this stage for `id`.
    fn install_effect(&self, id: DeviceId) -> Effect {
        if self.shadow_stage {
            Effect::InstallShadow(id)
        } else {
            Effect::Install(id)
        }
    }

    /// What a replica taking the rollout over from a holder that died must
    /// send: the commands its predecessor stored may not all have reached the
    /// broker (they are stored first, then published), so every one not
    /// answered since it was sent goes again at once, as the same command
    /// (devices that had it refuse the copy as a replay), instead of after
    /// `resend_after_ms`.
    pub fn take_over(&mut self, now: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        let wave = match self.phase {
            Phase::Installing { .. } => self.waves.get(self.wave).cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        for id in wave {
            // Still commanded: its sent time moves, its state does not.
            if let Some(Member::Commanded {
                sent_at, heard_at, ..
            }) = self.members.get_mut(&id)
                && *heard_at <= *sent_at
            {
                *sent_at = now;
                fx.push(Effect::Resend(Box::new(self.install_effect(id))));
            }
        }
        for (id, m) in self.members.iter_mut() {
            if let Member::Reverting { sent_at } = m {
                *sent_at = now;
                fx.push(Effect::Resend(Box::new(Effect::Revert(id.clone()))));
            }
        }
        fx
    }

    /// Whether `device` runs the bundle in shadow only (its wave is in its
    /// shadow stage): it never switched, so there is nothing to revert.
    fn in_shadow(&self, device: &str) -> bool {
        self.shadow_stage
            && self
                .waves
                .get(self.wave)
                .is_some_and(|w| w.iter().any(|d| d.as_str() == device))
    }

    fn time_out(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let limit = self.plan.gates.install_timeout_ms;
        for id in self.waves.get(self.wave).cloned().unwrap_or_default() {
            if let Some(Member::Commanded { first_at, .. }) = self.members.get(&id)
                && now.saturating_sub(*first_at) >= limit
            {
                fx.push(Effect::Note(format!(
                    "{id}: no result within {} s, counted as failed",
                    limit / 1000
                )));
                self.set_member(
                    id,
                    Member::Failed {
                        at: now,
                        reason: format!("timed out after {} s", limit / 1000),
                    },
                );
            }
        }
    }

    fn install_gate(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let c = self.wave_counts();
        let size = self.waves.get(self.wave).map_or(0, Vec::len);
        if size == 0 {
            return;
        }
        let g = &self.plan.gates;
        let failure_ratio = c.failed as f64 / size as f64;
        if failure_ratio > g.max_failure_ratio {
            let reason = format!(
                "wave {}: {} of {} devices failed ({:.0}%, more than max_failure_ratio {:.0}%)",
                self.wave + 1,
                c.failed,
                size,
                failure_ratio * 100.0,
                g.max_failure_ratio * 100.0
            );
            self.trip(now, reason, fx);
            return;
        }
        if c.pending + c.in_progress > 0 {
            return;
        }
        let success_ratio = c.succeeded as f64 / size as f64;
        if success_ratio < g.min_success_ratio {
            let reason = format!(
                "wave {}: {} of {} devices succeeded ({:.0}%, below min_success_ratio {:.0}%)",
                self.wave + 1,
                c.succeeded,
                size,
                success_ratio * 100.0,
                g.min_success_ratio * 100.0
            );
            self.trip(now, reason, fx);
            return;
        }
        fx.push(Effect::Note(format!(
            "wave {}: {} of {} installed{}; soaking for {} s",
            self.wave + 1,
            c.succeeded,
            size,
            if self.shadow_stage {
                " in shadow (running beside the active model)"
            } else {
                ""
            },
            g.soak_ms / 1000
        )));
        self.phase = Phase::Soaking {
            since: now,
            until: now.saturating_add(g.soak_ms),
        };
        if g.soak_ms == 0 {
            self.next_wave(now, fx);
        }
    }

    fn health_breach(&self, health: Option<WaveHealth>) -> Option<String> {
        let h = health?;
        let g = &self.plan.gates;
        if self.shadow_stage {
            if let Some(a) = h.shadow_agreement
                && a < g.min_shadow_agreement
            {
                return Some(format!(
                    "wave {} (shadow): the new bundle agreed with the active one on {:.1}% of requests, below min_shadow_agreement {:.1}%",
                    self.wave + 1,
                    a * 100.0,
                    g.min_shadow_agreement * 100.0
                ));
            }
            if let Some(r) = h.shadow_p95_latency_ratio
                && r > g.max_p95_latency_ratio
            {
                return Some(format!(
                    "wave {} (shadow): p95 latency {:.2}x the active model's, above max_p95_latency_ratio {:.2}x",
                    self.wave + 1,
                    r,
                    g.max_p95_latency_ratio
                ));
            }
        }
        if let Some(e) = h.error_rate
            && e > g.max_error_rate
        {
            return Some(format!(
                "wave {}: error rate {:.1}% above max_error_rate {:.1}%",
                self.wave + 1,
                e * 100.0,
                g.max_error_rate * 100.0
            ));
        }
        if let Some(d) = h.drift_increase
            && d > g.max_drift_increase
        {
            return Some(format!(
                "wave {}: {:.0}% more of its devices report drift than on the previous version, above max_drift_increase {:.0}%",
                self.wave + 1,
                d * 100.0,
                g.max_drift_increase * 100.0
            ));
        }
        if let Some(r) = h.p95_latency_ratio
            && r > g.max_p95_latency_ratio
        {
            return Some(format!(
                "wave {}: p95 latency {:.2}x the previous version's, above max_p95_latency_ratio {:.2}x",
                self.wave + 1,
                r,
                g.max_p95_latency_ratio
            ));
        }
        None
    }

    fn trip(&mut self, now: u64, reason: String, fx: &mut Vec<Effect>) {
        match self.plan.policy {
            FailurePolicy::Pause => {
                fx.push(Effect::Note(format!("gate tripped, pausing: {reason}")));
                self.phase = Phase::Paused {
                    since: now,
                    reason,
                    by_gate: true,
                    resume_to: Box::new(self.phase.clone()),
                };
            }
            FailurePolicy::HaltAndRevert => {
                fx.push(Effect::Note(format!(
                    "gate tripped, halting and reverting: {reason}"
                )));
                self.phase = Phase::Halted { at: now, reason };
                self.revert_all(now, fx);
            }
        }
    }

    fn revert_all(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let ids: Vec<DeviceId> = self.members.keys().cloned().collect();
        for id in ids {
            if !matches!(self.members.get(&id), Some(Member::Succeeded { .. })) {
                continue;
            }
            if self.in_shadow(&id) {
                self.set_member(id.clone(), Member::Reverted { at: now });
                fx.push(Effect::StopShadow(id));
            } else {
                self.set_member(id.clone(), Member::Reverting { sent_at: now });
                fx.push(Effect::Revert(id));
            }
        }
    }

    fn next_wave(&mut self, now: u64, fx: &mut Vec<Effect>) {
        if self.shadow_stage {
            // The shadow stage passed: the same wave now activates the bundle
            // (the devices have it installed already; no second download).
            self.shadow_stage = false;
            let ids = self.waves.get(self.wave).cloned().unwrap_or_default();
            for id in ids {
                if let Some(Member::Succeeded { .. }) = self.members.get(&id) {
                    self.set_member(id, Member::Pending);
                }
            }
            fx.push(Effect::Note(format!(
                "wave {}: shadow stage passed; activating",
                self.wave + 1
            )));
            self.phase = Phase::Installing { since: now };
            self.command_wave(now, fx);
            return;
        }
        if self.wave + 1 >= self.waves.len() {
            let c = self.counts(None);
            fx.push(Effect::Note(format!(
                "rollout complete: {} devices switched, {} failed",
                c.succeeded, c.failed
            )));
            self.phase = Phase::Completed { at: now };
            return;
        }
        self.wave += 1;
        self.shadow_stage = (self.wave as u32) < self.plan.shadow_waves;
        let n = self.waves[self.wave].len();
        fx.push(Effect::Note(format!(
            "wave {} of {} started ({n} device{})",
            self.wave + 1,
            self.waves.len(),
            if n == 1 { "" } else { "s" }
        )));
        self.phase = Phase::Installing { since: now };
        self.command_wave(now, fx);
    }
}

fn not_now(action: &'static str, phase: &Phase) -> NotNow {
    NotNow {
        action,
        phase: phase.name(),
    }
}

#[cfg(test)]
mod tests;
