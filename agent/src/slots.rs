//! The A/B slot state machine: which bundle is in which slot, which slot answers,
//! and the highest release seen per channel (rollback protection). Pure: no I/O,
//! time comes in with the event. `store` persists the result in one atomic step.
//!
//! One table (`apply`) decides every transition; anything else is an explicit error.

use std::collections::BTreeMap;

use edgefleet_shared::bundle::InstalledRelease;
use edgefleet_shared::protocol::{
    BundleRef, FailureReason, InstallMode, InstallResult, Slot, SlotRole,
};
use edgefleet_shared::{Digest, ModelChannel, UnixTime};
use serde::{Deserialize, Serialize};

/// Version of the state file format.
pub const STATE_FORMAT: u32 = 1;

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotEntry {
    /// The bundle.
    pub bundle: BundleRef,
    /// How it is used.
    pub role: SlotRole,
}

/// The agent's persistent state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// The slot answering requests, if any.
    pub active: Option<Slot>,
    /// Contents of slot A.
    pub a: Option<SlotEntry>,
    /// Contents of slot B.
    pub b: Option<SlotEntry>,
    /// Highest release installed or staged per channel.
    pub releases: BTreeMap<ModelChannel, InstalledRelease>,
    /// The last install attempt.
    pub last_install: Option<InstallResult>,
}

impl Default for SlotsState {
    fn default() -> Self {
        SlotsState {
            format: STATE_FORMAT,
            active: None,
            a: None,
            b: None,
            releases: BTreeMap::new(),
            last_install: None,
        }
    }
}

/// Something that happened to the slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotEvent {
    /// A bundle was verified, unpacked and passed its health check.
    Installed {
        /// The bundle.
        bundle: BundleRef,
        /// What to do with it.
        mode: InstallMode,
        /// When.
        at: UnixTime,
    },
    /// An install failed; nothing but the record changes.
    InstallFailed {
        /// The bundle.
        digest: Digest,
        /// Why.
        reason: FailureReason,
        /// When.
        at: UnixTime,
    },
    /// Activate the staged bundle with this digest.
    Activate {
        /// Its digest.
        digest: Digest,
    },
    /// Go back to the previous bundle.
    Revert,
}

/// A transition that is not allowed from the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// `activate` for a bundle that is not staged.
    #[error("bundle {} is not staged in the inactive slot", .0.short())]
    NotStaged(Digest),
    /// `revert` with no previous bundle.
    #[error("there is no previous bundle to revert to")]
    NothingToRevertTo,
    /// Installing a bundle that is already active.
    #[error("bundle {} is already active", .0.short())]
    AlreadyActive(Digest),
}

impl SlotsState {
    /// A slot's entry.
    pub fn get(&self, slot: Slot) -> Option<&SlotEntry> {
        match slot {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        }
    }

    fn set(&mut self, slot: Slot, entry: Option<SlotEntry>) {
        match slot {
            Slot::A => self.a = entry,
            Slot::B => self.b = entry,
        }
    }

    /// The active bundle.
    pub fn active_entry(&self) -> Option<&SlotEntry> {
        self.active.and_then(|s| self.get(s))
    }

    /// The slot a new install goes into: the one not answering requests.
    pub fn target_slot(&self) -> Slot {
        self.active.map_or(Slot::A, Slot::other)
    }

    /// Digests the state refers to (their directories must be kept).
    pub fn referenced(&self) -> Vec<Digest> {
        [&self.a, &self.b]
            .into_iter()
            .flatten()
            .map(|e| e.bundle.digest)
            .collect()
    }

    /// What rollback protection knows about `channel`.
    pub fn installed_release(&self, channel: &ModelChannel) -> Option<&InstalledRelease> {
        self.releases.get(channel)
    }

    /// Makes the inactive slot active and marks the old active one `previous`.
    fn swap(mut self) -> SlotsState {
        let new_active = self.target_slot();
        if let Some(old) = self.active
            && let Some(mut e) = self.get(old).cloned()
        {
            e.role = SlotRole::Previous;
            self.set(old, Some(e));
        }
        if let Some(mut e) = self.get(new_active).cloned() {
            e.role = SlotRole::Active;
            self.set(new_active, Some(e));
        }
        self.active = Some(new_active);
        self
    }

    /// The transition table.
    pub fn apply(self, event: SlotEvent) -> Result<SlotsState, SlotError> {
        let target = self.target_slot();
        match event {
            SlotEvent::Installed { bundle, .. }
                if self
                    .active_entry()
                    .is_some_and(|e| e.bundle.digest == bundle.digest) =>
            {
                Err(SlotError::AlreadyActive(bundle.digest))
            }
            SlotEvent::Installed { bundle, mode, at } => {
                let mut next = self;
                let highest = next.releases.get(&bundle.channel).map_or(0, |r| r.release);
                if bundle.release >= highest {
                    next.releases.insert(
                        bundle.channel.clone(),
                        InstalledRelease {
                            release: bundle.release,
                            manifest_digest: bundle.digest,
                        },
                    );
                }
                next.last_install = Some(InstallResult {
                    digest: bundle.digest,
                    at,
                    failure: None,
                });
                let role = match mode {
                    InstallMode::Activate | InstallMode::Stage => SlotRole::Staged,
                    InstallMode::Shadow => SlotRole::Shadow,
                };
                next.set(target, Some(SlotEntry { bundle, role }));
                Ok(if mode == InstallMode::Activate {
                    next.swap()
                } else {
                    next
                })
            }
            SlotEvent::InstallFailed { digest, reason, at } => {
                let mut next = self;
                next.last_install = Some(InstallResult {
                    digest,
                    at,
                    failure: Some(reason),
                });
                Ok(next)
            }
            SlotEvent::Activate { digest } => match self.get(target) {
                Some(e)
                    if e.bundle.digest == digest
                        && matches!(e.role, SlotRole::Staged | SlotRole::Shadow) =>
                {
                    Ok(self.swap())
                }
                _ => Err(SlotError::NotStaged(digest)),
            },
            SlotEvent::Revert => match self.get(target) {
                Some(e) if e.role == SlotRole::Previous && self.active.is_some() => Ok(self.swap()),
                _ => Err(SlotError::NothingToRevertTo),
            },
        }
    }

    /// The slots as the protocol reports them.
    pub fn slot_states(&self) -> Vec<edgefleet_shared::protocol::SlotState> {
        [Slot::A, Slot::B]
            .into_iter()
            .filter_map(|slot| {
                self.get(slot)
                    .map(|e| edgefleet_shared::protocol::SlotState {
                        slot,
                        bundle: e.bundle.clone(),
                        role: e.role,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bundle(release: u64) -> BundleRef {
        BundleRef {
            digest: Digest::of(&release.to_be_bytes()),
            channel: ModelChannel::new("iris").expect("channel"),
            version: format!("1.{release}.0"),
            release,
        }
    }

    fn install(s: SlotsState, release: u64, mode: InstallMode) -> SlotsState {
        s.apply(SlotEvent::Installed {
            bundle: bundle(release),
            mode,
            at: UnixTime(release as i64),
        })
        .expect("install allowed")
    }

    #[test]
    fn first_install_goes_to_a_and_the_next_to_b_keeping_a_as_previous() {
        let s = install(SlotsState::default(), 1, InstallMode::Activate);
        assert_eq!(s.active, Some(Slot::A));
        assert_eq!(s.get(Slot::A).map(|e| e.role), Some(SlotRole::Active));
        let s = install(s, 2, InstallMode::Activate);
        assert_eq!(s.active, Some(Slot::B));
        assert_eq!(s.get(Slot::A).map(|e| e.role), Some(SlotRole::Previous));
        assert_eq!(
            s.installed_release(&bundle(1).channel).map(|r| r.release),
            Some(2)
        );
    }

    #[test]
    fn revert_swaps_back_and_forth_and_needs_a_previous_bundle() {
        assert_eq!(
            SlotsState::default().apply(SlotEvent::Revert),
            Err(SlotError::NothingToRevertTo)
        );
        let one = install(SlotsState::default(), 1, InstallMode::Activate);
        assert_eq!(
            one.clone().apply(SlotEvent::Revert),
            Err(SlotError::NothingToRevertTo)
        );
        let two = install(one, 2, InstallMode::Activate);
        let back = two.clone().apply(SlotEvent::Revert).expect("revert");
        assert_eq!(back.active_entry().map(|e| e.bundle.release), Some(1));
        // Rollback protection still remembers release 2.
        assert_eq!(
            back.installed_release(&bundle(1).channel)
                .map(|r| r.release),
            Some(2)
        );
        let forward = back.apply(SlotEvent::Revert).expect("revert again");
        assert_eq!(forward.active_entry().map(|e| e.bundle.release), Some(2));
    }

    #[test]
    fn staged_bundles_wait_for_activate_of_their_own_digest() {
        let s = install(SlotsState::default(), 1, InstallMode::Activate);
        let s = install(s, 2, InstallMode::Stage);
        assert_eq!(s.active_entry().map(|e| e.bundle.release), Some(1));
        assert_eq!(s.get(Slot::B).map(|e| e.role), Some(SlotRole::Staged));
        assert_eq!(
            s.clone().apply(SlotEvent::Revert),
            Err(SlotError::NothingToRevertTo)
        );
        let wrong = Digest::of(b"other");
        assert_eq!(
            s.clone().apply(SlotEvent::Activate { digest: wrong }),
            Err(SlotError::NotStaged(wrong))
        );
        let s = s
            .apply(SlotEvent::Activate {
                digest: bundle(2).digest,
            })
            .expect("activate");
        assert_eq!(s.active_entry().map(|e| e.bundle.release), Some(2));
        assert_eq!(s.get(Slot::A).map(|e| e.role), Some(SlotRole::Previous));
    }

    #[test]
    fn a_failed_install_changes_nothing_but_the_record() {
        let s = install(SlotsState::default(), 1, InstallMode::Activate);
        let reason = FailureReason::HealthCheck {
            detail: "case 0".into(),
        };
        let after = s
            .clone()
            .apply(SlotEvent::InstallFailed {
                digest: bundle(2).digest,
                reason: reason.clone(),
                at: UnixTime(5),
            })
            .expect("always allowed");
        assert_eq!(
            (after.a.clone(), after.b.clone(), after.active),
            (s.a, s.b, s.active)
        );
        assert_eq!(after.last_install.and_then(|r| r.failure), Some(reason));
    }

    #[test]
    fn reinstalling_the_active_bundle_is_refused() {
        let s = install(SlotsState::default(), 1, InstallMode::Activate);
        let again = s.apply(SlotEvent::Installed {
            bundle: bundle(1),
            mode: InstallMode::Activate,
            at: UnixTime(0),
        });
        assert_eq!(again, Err(SlotError::AlreadyActive(bundle(1).digest)));
    }

    proptest! {
        #[test]
        fn any_sequence_keeps_exactly_one_active_slot_holding_an_active_entry(
            ops in proptest::collection::vec(0u8..5, 1..40)
        ) {
            let mut s = SlotsState::default();
            let mut release = 0;
            for op in ops {
                let event = match op {
                    0 | 1 => { release += 1; SlotEvent::Installed { bundle: bundle(release), mode: if op == 0 { InstallMode::Activate } else { InstallMode::Stage }, at: UnixTime(0) } }
                    2 => SlotEvent::Activate { digest: bundle(release).digest },
                    3 => SlotEvent::Revert,
                    _ => SlotEvent::InstallFailed { digest: bundle(99).digest, reason: FailureReason::Download { detail: "x".into() }, at: UnixTime(0) },
                };
                if let Ok(next) = s.clone().apply(event) {
                    s = next;
                }
                let actives = [Slot::A, Slot::B].into_iter().filter(|x| s.get(*x).is_some_and(|e| e.role == SlotRole::Active)).count();
                prop_assert_eq!(actives, usize::from(s.active.is_some()));
                if let Some(a) = s.active {
                    prop_assert_eq!(s.get(a).map(|e| e.role), Some(SlotRole::Active));
                }
                // The highest release never decreases.
                let highest = s.releases.values().map(|r| r.release).max().unwrap_or(0);
                prop_assert!(s.referenced().len() <= 2 && highest <= release);
            }
        }
    }
}
