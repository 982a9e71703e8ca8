//! The A/B slot state machine of every model channel: which bundle is in which
//! slot of each channel, which slot answers, and the highest release seen per
//! channel (rollback protection). Pure: no I/O, time comes in with the event.
//! `store` persists the result in one atomic step, so a change to one channel
//! is one write and never leaves another channel half changed.
//!
//! One table (`apply`) decides every transition; anything else is an explicit error.

use std::collections::BTreeMap;

use edgefleet_shared::bundle::InstalledRelease;
use edgefleet_shared::protocol::{
    BundleRef, FailureReason, InstallMode, InstallResult, MAX_DEVICE_CHANNELS, Slot, SlotRole,
};
use edgefleet_shared::{Digest, ModelChannel, UnixTime};
use serde::{Deserialize, Serialize};

/// Version of the state file format (1: one A/B pair; 2: a pair per channel).
pub const STATE_FORMAT: u32 = 2;

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotEntry {
    /// The bundle.
    pub bundle: BundleRef,
    /// How it is used.
    pub role: SlotRole,
}

/// One channel's A/B pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSlots {
    /// The slot answering requests, if any.
    pub active: Option<Slot>,
    /// Contents of slot A.
    pub a: Option<SlotEntry>,
    /// Contents of slot B.
    pub b: Option<SlotEntry>,
}

/// The agent's persistent state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// The installed channels and their slots.
    pub channels: BTreeMap<ModelChannel, ChannelSlots>,
    /// Highest release installed or staged per channel; kept when a channel is
    /// removed, so an older release cannot come back.
    pub releases: BTreeMap<ModelChannel, InstalledRelease>,
    /// The last install attempt (any channel).
    pub last_install: Option<InstallResult>,
}

impl Default for SlotsState {
    fn default() -> Self {
        SlotsState {
            format: STATE_FORMAT,
            channels: BTreeMap::new(),
            releases: BTreeMap::new(),
            last_install: None,
        }
    }
}

/// The state file of format 1 (one A/B pair for the device), read once and
/// written back as format 2 ([`SlotsStateV1::upgrade`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsStateV1 {
    /// 1.
    pub format: u32,
    /// The slot answering requests, if any.
    pub active: Option<Slot>,
    /// Contents of slot A.
    pub a: Option<SlotEntry>,
    /// Contents of slot B.
    pub b: Option<SlotEntry>,
    /// Highest release per channel.
    pub releases: BTreeMap<ModelChannel, InstalledRelease>,
    /// The last install attempt.
    pub last_install: Option<InstallResult>,
}

impl SlotsStateV1 {
    /// The same state in format 2: each slot goes to its bundle's channel. One
    /// pair could hold two channels in format 1 (a bundle of another channel
    /// installed over the first): the active bundle's channel keeps its pair; an
    /// entry of another channel that is not active could only be reverted to
    /// across channels, which format 2 does not do, so it is dropped (its
    /// release floor stays).
    pub fn upgrade(self) -> SlotsState {
        let mut channels: BTreeMap<ModelChannel, ChannelSlots> = BTreeMap::new();
        let active_channel = self
            .active
            .and_then(|s| match s {
                Slot::A => self.a.as_ref(),
                Slot::B => self.b.as_ref(),
            })
            .map(|e| e.bundle.channel.clone());
        for (slot, entry) in [(Slot::A, self.a), (Slot::B, self.b)] {
            let Some(entry) = entry else { continue };
            let is_active = self.active == Some(slot);
            let keep = match &active_channel {
                Some(c) => *c == entry.bundle.channel,
                None => entry.role != SlotRole::Previous,
            };
            if !keep {
                continue;
            }
            let pair = channels.entry(entry.bundle.channel.clone()).or_default();
            if is_active {
                pair.active = Some(slot);
            }
            pair.set(slot, Some(entry));
        }
        SlotsState {
            format: STATE_FORMAT,
            channels,
            releases: self.releases,
            last_install: self.last_install,
        }
    }
}

/// Something that happened to the slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotEvent {
    /// A bundle was verified, unpacked and passed its health check; it goes to
    /// its manifest's channel (added when new).
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
    /// Activate the staged bundle with this digest (in whichever channel holds it).
    Activate {
        /// Its digest.
        digest: Digest,
    },
    /// Go back to the channel's previous bundle.
    Revert {
        /// The channel.
        channel: ModelChannel,
    },
    /// Uninstall the channel (its release floor stays).
    Remove {
        /// The channel.
        channel: ModelChannel,
    },
}

/// A transition that is not allowed from the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// `activate` for a bundle that is not staged.
    #[error("bundle {} is not staged in the inactive slot of its channel", .0.short())]
    NotStaged(Digest),
    /// `revert` with no previous bundle.
    #[error("channel `{0}` has no previous bundle to revert to")]
    NothingToRevertTo(ModelChannel),
    /// Installing a bundle that is already active.
    #[error("bundle {} is already active", .0.short())]
    AlreadyActive(Digest),
    /// A channel that is not installed.
    #[error("no channel `{channel}` is installed (installed: {installed})")]
    NoSuchChannel {
        /// The channel asked for.
        channel: ModelChannel,
        /// The installed ones, comma separated, or `none`.
        installed: String,
    },
    /// No channel named and several are installed.
    #[error("several channels are installed ({installed}): name one")]
    ChannelRequired {
        /// The installed ones, comma separated.
        installed: String,
    },
    /// No channel named and none is installed.
    #[error("no model is installed")]
    NothingInstalled,
    /// A new channel past the limit.
    #[error(
        "this device already serves {MAX_DEVICE_CHANNELS} channels, the most it can: remove one first"
    )]
    TooManyChannels,
}

impl ChannelSlots {
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

    /// The entry of the inactive slot.
    pub fn target_entry(&self) -> Option<&SlotEntry> {
        self.get(self.target_slot())
    }

    /// Makes the inactive slot active and marks the old active one `previous`.
    fn swap(mut self) -> ChannelSlots {
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
}

impl SlotsState {
    /// One channel's slots.
    pub fn channel(&self, channel: &ModelChannel) -> Option<&ChannelSlots> {
        self.channels.get(channel)
    }

    /// A channel's active bundle.
    pub fn active_entry(&self, channel: &ModelChannel) -> Option<&SlotEntry> {
        self.channel(channel).and_then(ChannelSlots::active_entry)
    }

    /// The active bundle of every channel that has one.
    pub fn active_bundles(&self) -> impl Iterator<Item = &BundleRef> {
        self.channels
            .values()
            .filter_map(|c| c.active_entry().map(|e| &e.bundle))
    }

    /// Digests the state refers to (their directories must be kept).
    pub fn referenced(&self) -> Vec<Digest> {
        self.channels
            .values()
            .flat_map(|c| [&c.a, &c.b])
            .flatten()
            .map(|e| e.bundle.digest)
            .collect()
    }

    /// What rollback protection knows about `channel`.
    pub fn installed_release(&self, channel: &ModelChannel) -> Option<&InstalledRelease> {
        self.releases.get(channel)
    }

    /// The installed channels, comma separated (`none` when there are none),
    /// for messages.
    pub fn channel_list(&self) -> String {
        if self.channels.is_empty() {
            return "none".into();
        }
        let names: Vec<&str> = self.channels.keys().map(ModelChannel::as_str).collect();
        names.join(", ")
    }

    /// The channel a command means: the one it names (which must be
    /// installed), or the only one installed.
    pub fn resolve_channel(&self, named: Option<&ModelChannel>) -> Result<ModelChannel, SlotError> {
        match named {
            Some(c) if self.channels.contains_key(c) => Ok(c.clone()),
            Some(c) => Err(SlotError::NoSuchChannel {
                channel: c.clone(),
                installed: self.channel_list(),
            }),
            None => match self.channels.len() {
                0 => Err(SlotError::NothingInstalled),
                1 => Ok(self.channels.keys().next().cloned().expect("one channel")),
                _ => Err(SlotError::ChannelRequired {
                    installed: self.channel_list(),
                }),
            },
        }
    }

    fn no_such(&self, channel: ModelChannel) -> SlotError {
        SlotError::NoSuchChannel {
            channel,
            installed: self.channel_list(),
        }
    }

    /// `Installed`: the bundle goes to the inactive slot of its channel (added
    /// when new), activated with `Activate`.
    fn installed(
        self,
        bundle: BundleRef,
        mode: InstallMode,
        at: UnixTime,
    ) -> Result<SlotsState, SlotError> {
        let mut next = self;
        let channel = bundle.channel.clone();
        if next.active_entry(&channel).map(|e| e.bundle.digest) == Some(bundle.digest) {
            return Err(SlotError::AlreadyActive(bundle.digest));
        }
        if !next.channels.contains_key(&channel) && next.channels.len() >= MAX_DEVICE_CHANNELS {
            return Err(SlotError::TooManyChannels);
        }
        let highest = next.releases.get(&channel).map_or(0, |r| r.release);
        if bundle.release >= highest {
            next.releases.insert(
                channel.clone(),
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
        let mut pair = next.channels.remove(&channel).unwrap_or_default();
        pair.set(pair.target_slot(), Some(SlotEntry { bundle, role }));
        if mode == InstallMode::Activate {
            pair = pair.swap();
        }
        next.channels.insert(channel, pair);
        Ok(next)
    }

    /// The transition table.
    pub fn apply(self, event: SlotEvent) -> Result<SlotsState, SlotError> {
        let mut next = self;
        match event {
            SlotEvent::Installed { bundle, mode, at } => next.installed(bundle, mode, at),
            SlotEvent::InstallFailed { digest, reason, at } => {
                next.last_install = Some(InstallResult {
                    digest,
                    at,
                    failure: Some(reason),
                });
                Ok(next)
            }
            SlotEvent::Activate { digest } => {
                let staged = next.channels.iter().find_map(|(c, pair)| {
                    pair.target_entry()
                        .filter(|e| {
                            e.bundle.digest == digest
                                && matches!(e.role, SlotRole::Staged | SlotRole::Shadow)
                        })
                        .map(|_| c.clone())
                });
                let Some(channel) = staged else {
                    return Err(SlotError::NotStaged(digest));
                };
                let pair = next.channels.remove(&channel).unwrap_or_default();
                next.channels.insert(channel, pair.swap());
                Ok(next)
            }
            SlotEvent::Revert { channel } => {
                let Some(pair) = next.channels.get(&channel) else {
                    return Err(next.no_such(channel));
                };
                let revertible = pair.active.is_some()
                    && pair
                        .target_entry()
                        .is_some_and(|e| e.role == SlotRole::Previous);
                if !revertible {
                    return Err(SlotError::NothingToRevertTo(channel));
                }
                let pair = next.channels.remove(&channel).unwrap_or_default();
                next.channels.insert(channel, pair.swap());
                Ok(next)
            }
            SlotEvent::Remove { channel } => match next.channels.remove(&channel) {
                Some(_) => Ok(next),
                None => Err(next.no_such(channel)),
            },
        }
    }

    /// The slots of every channel as the protocol reports them.
    pub fn slot_states(&self) -> Vec<edgefleet_shared::protocol::SlotState> {
        self.channels
            .values()
            .flat_map(|pair| {
                [Slot::A, Slot::B].into_iter().filter_map(|slot| {
                    pair.get(slot)
                        .map(|e| edgefleet_shared::protocol::SlotState {
                            slot,
                            bundle: e.bundle.clone(),
                            role: e.role,
                        })
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn channel(name: &str) -> ModelChannel {
        ModelChannel::new(name).expect("channel")
    }

    fn bundle_of(name: &str, release: u64) -> BundleRef {
        BundleRef {
            digest: Digest::of(format!("{name}/{release}").as_bytes()),
            channel: channel(name),
            version: format!("1.{release}.0"),
            release,
        }
    }

    fn bundle(release: u64) -> BundleRef {
        bundle_of("iris", release)
    }

    fn install_of(s: SlotsState, name: &str, release: u64, mode: InstallMode) -> SlotsState {
        s.apply(SlotEvent::Installed {
            bundle: bundle_of(name, release),
            mode,
            at: UnixTime(release as i64),
        })
        .expect("install allowed")
    }

    fn install(s: SlotsState, release: u64, mode: InstallMode) -> SlotsState {
        install_of(s, "iris", release, mode)
    }

    fn iris(s: &SlotsState) -> &ChannelSlots {
        s.channel(&channel("iris")).expect("iris installed")
    }

    fn revert(name: &str) -> SlotEvent {
        SlotEvent::Revert {
            channel: channel(name),
        }
    }

    #[test]
    fn first_install_goes_to_a_and_the_next_to_b_keeping_a_as_previous() {
        let s = install(SlotsState::default(), 1, InstallMode::Activate);
        assert_eq!(iris(&s).active, Some(Slot::A));
        assert_eq!(
            iris(&s).get(Slot::A).map(|e| e.role),
            Some(SlotRole::Active)
        );
        let s = install(s, 2, InstallMode::Activate);
        assert_eq!(iris(&s).active, Some(Slot::B));
        assert_eq!(
            iris(&s).get(Slot::A).map(|e| e.role),
            Some(SlotRole::Previous)
        );
        assert_eq!(
            s.installed_release(&channel("iris")).map(|r| r.release),
            Some(2)
        );
    }

    #[test]
    fn revert_swaps_back_and_forth_and_needs_a_previous_bundle() {
        assert_eq!(
            SlotsState::default().apply(revert("iris")),
            Err(SlotError::NoSuchChannel {
                channel: channel("iris"),
                installed: "none".into()
            })
        );
        let one = install(SlotsState::default(), 1, InstallMode::Activate);
        assert_eq!(
            one.clone().apply(revert("iris")),
            Err(SlotError::NothingToRevertTo(channel("iris")))
        );
        let two = install(one, 2, InstallMode::Activate);
        let back = two.clone().apply(revert("iris")).expect("revert");
        assert_eq!(
            back.active_entry(&channel("iris"))
                .map(|e| e.bundle.release),
            Some(1)
        );
        // Rollback protection still remembers release 2.
        assert_eq!(
            back.installed_release(&channel("iris")).map(|r| r.release),
            Some(2)
        );
        let forward = back.apply(revert("iris")).expect("revert again");
        assert_eq!(
            forward
                .active_entry(&channel("iris"))
                .map(|e| e.bundle.release),
            Some(2)
        );
    }

    #[test]
    fn staged_bundles_wait_for_activate_of_their_own_digest() {
        let s = install(SlotsState::default(), 1, InstallMode::Activate);
        let s = install(s, 2, InstallMode::Stage);
        assert_eq!(
            s.active_entry(&channel("iris")).map(|e| e.bundle.release),
            Some(1)
        );
        assert_eq!(
            iris(&s).get(Slot::B).map(|e| e.role),
            Some(SlotRole::Staged)
        );
        assert_eq!(
            s.clone().apply(revert("iris")),
            Err(SlotError::NothingToRevertTo(channel("iris")))
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
        assert_eq!(
            s.active_entry(&channel("iris")).map(|e| e.bundle.release),
            Some(2)
        );
        assert_eq!(
            iris(&s).get(Slot::A).map(|e| e.role),
            Some(SlotRole::Previous)
        );
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
        assert_eq!(after.channels, s.channels);
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

    #[test]
    fn channels_have_their_own_slots_and_a_change_to_one_leaves_the_others_alone() {
        let s = install_of(SlotsState::default(), "iris", 1, InstallMode::Activate);
        let s = install_of(s, "vision", 1, InstallMode::Activate);
        // Each channel's first bundle is in its own slot A.
        for name in ["iris", "vision"] {
            let pair = s.channel(&channel(name)).expect("installed");
            assert_eq!(pair.active, Some(Slot::A));
            assert_eq!(pair.b, None);
        }
        let s = install_of(s, "iris", 2, InstallMode::Activate);
        let vision_before = s.channel(&channel("vision")).cloned();
        let reverted = s.clone().apply(revert("iris")).expect("revert iris");
        assert_eq!(reverted.channel(&channel("vision")).cloned(), vision_before);
        assert_eq!(
            reverted
                .active_entry(&channel("iris"))
                .map(|e| e.bundle.release),
            Some(1)
        );
        // vision has no previous bundle; iris's does not count.
        assert_eq!(
            s.clone().apply(revert("vision")),
            Err(SlotError::NothingToRevertTo(channel("vision")))
        );
        // Activate finds the channel from the digest.
        let staged = install_of(s.clone(), "vision", 2, InstallMode::Stage);
        let active = staged
            .apply(SlotEvent::Activate {
                digest: bundle_of("vision", 2).digest,
            })
            .expect("activate");
        assert_eq!(
            active
                .active_entry(&channel("vision"))
                .map(|e| e.bundle.release),
            Some(2)
        );
        assert_eq!(
            active.channel(&channel("iris")),
            s.channel(&channel("iris"))
        );
        assert_eq!(s.referenced().len(), 3);
        assert_eq!(s.slot_states().len(), 3);
    }

    #[test]
    fn remove_drops_a_channel_and_keeps_its_release_floor() {
        let s = install_of(SlotsState::default(), "iris", 3, InstallMode::Activate);
        let s = install_of(s, "vision", 1, InstallMode::Activate);
        let removed = s
            .clone()
            .apply(SlotEvent::Remove {
                channel: channel("iris"),
            })
            .expect("remove");
        assert_eq!(removed.channel(&channel("iris")), None);
        assert_eq!(
            removed.channel(&channel("vision")),
            s.channel(&channel("vision"))
        );
        assert_eq!(
            removed
                .installed_release(&channel("iris"))
                .map(|r| r.release),
            Some(3)
        );
        assert_eq!(removed.referenced(), vec![bundle_of("vision", 1).digest]);
        assert_eq!(
            removed.apply(SlotEvent::Remove {
                channel: channel("iris")
            }),
            Err(SlotError::NoSuchChannel {
                channel: channel("iris"),
                installed: "vision".into()
            })
        );
    }

    #[test]
    fn a_command_without_a_channel_means_the_only_one() {
        let none = SlotsState::default();
        assert_eq!(none.resolve_channel(None), Err(SlotError::NothingInstalled));
        let one = install_of(none, "iris", 1, InstallMode::Activate);
        assert_eq!(one.resolve_channel(None), Ok(channel("iris")));
        let two = install_of(one, "vision", 1, InstallMode::Activate);
        assert_eq!(
            two.resolve_channel(None),
            Err(SlotError::ChannelRequired {
                installed: "iris, vision".into()
            })
        );
        assert_eq!(
            two.resolve_channel(Some(&channel("vision"))),
            Ok(channel("vision"))
        );
        let err = two
            .resolve_channel(Some(&channel("audio")))
            .expect_err("not installed");
        assert_eq!(
            err.to_string(),
            "no channel `audio` is installed (installed: iris, vision)"
        );
    }

    #[test]
    fn a_device_serves_at_most_the_channel_limit() {
        let mut s = SlotsState::default();
        for i in 0..MAX_DEVICE_CHANNELS {
            s = install_of(s, &format!("c{i}"), 1, InstallMode::Activate);
        }
        let one_more = s.clone().apply(SlotEvent::Installed {
            bundle: bundle_of("extra", 1),
            mode: InstallMode::Activate,
            at: UnixTime(0),
        });
        assert_eq!(one_more, Err(SlotError::TooManyChannels));
        // A channel already there can still be replaced.
        install_of(s, "c0", 2, InstallMode::Activate);
    }

    #[test]
    fn a_format_1_state_becomes_one_channel() {
        let entry = |release, role| SlotEntry {
            bundle: bundle(release),
            role,
        };
        let v1 = SlotsStateV1 {
            format: 1,
            active: Some(Slot::B),
            a: Some(entry(1, SlotRole::Previous)),
            b: Some(entry(2, SlotRole::Active)),
            releases: BTreeMap::from([(
                channel("iris"),
                InstalledRelease {
                    release: 2,
                    manifest_digest: bundle(2).digest,
                },
            )]),
            last_install: None,
        };
        let v2 = v1.clone().upgrade();
        assert_eq!(v2.format, STATE_FORMAT);
        let pair = iris(&v2);
        assert_eq!(
            (pair.active, pair.a.clone(), pair.b.clone()),
            (v1.active, v1.a, v1.b)
        );
        assert_eq!(v2.releases, v1.releases);
        // Format 1 let a bundle of another channel replace the active one: its
        // previous bundle (of the old channel) is dropped, not made a channel.
        let mixed = SlotsStateV1 {
            format: 1,
            active: Some(Slot::B),
            a: Some(entry(1, SlotRole::Previous)),
            b: Some(SlotEntry {
                bundle: bundle_of("vision", 1),
                role: SlotRole::Active,
            }),
            releases: BTreeMap::new(),
            last_install: None,
        }
        .upgrade();
        assert_eq!(mixed.channels.len(), 1);
        assert_eq!(
            mixed
                .active_entry(&channel("vision"))
                .map(|e| e.bundle.release),
            Some(1)
        );
        let staged_only = SlotsStateV1 {
            format: 1,
            active: None,
            a: Some(entry(1, SlotRole::Staged)),
            b: None,
            releases: BTreeMap::new(),
            last_install: None,
        }
        .upgrade();
        assert_eq!(iris(&staged_only).active, None);
        assert_eq!(
            iris(&staged_only).target_entry().map(|e| e.role),
            Some(SlotRole::Staged)
        );
    }

    proptest! {
        #[test]
        fn any_sequence_keeps_each_channel_whole_and_leaves_the_others_alone(
            ops in proptest::collection::vec((0u8..6, 0usize..3), 1..60)
        ) {
            let names = ["a", "b", "c"];
            let mut s = SlotsState::default();
            let mut release = 0;
            for (op, which) in ops {
                let name = names[which];
                let event = match op {
                    0 | 1 => { release += 1; SlotEvent::Installed { bundle: bundle_of(name, release), mode: if op == 0 { InstallMode::Activate } else { InstallMode::Stage }, at: UnixTime(0) } }
                    2 => SlotEvent::Activate { digest: bundle_of(name, release).digest },
                    3 => revert(name),
                    4 => SlotEvent::Remove { channel: channel(name) },
                    _ => SlotEvent::InstallFailed { digest: bundle(99).digest, reason: FailureReason::Download { detail: "x".into() }, at: UnixTime(0) },
                };
                let before = s.clone();
                if let Ok(next) = s.clone().apply(event) {
                    s = next;
                }
                for (c, pair) in &s.channels {
                    // Exactly one active entry when the channel has an active slot.
                    let actives = [Slot::A, Slot::B].into_iter().filter(|x| pair.get(*x).is_some_and(|e| e.role == SlotRole::Active)).count();
                    prop_assert_eq!(actives, usize::from(pair.active.is_some()));
                    if let Some(a) = pair.active {
                        prop_assert_eq!(pair.get(a).map(|e| e.role), Some(SlotRole::Active));
                    }
                    // Every entry belongs to its channel.
                    for e in [&pair.a, &pair.b].into_iter().flatten() {
                        prop_assert_eq!(&e.bundle.channel, c);
                    }
                    // Only the named channel changed.
                    if c.as_str() != name {
                        prop_assert_eq!(Some(pair), before.channel(c));
                    }
                }
                for (c, r) in &before.releases {
                    // Floors never go down, also for removed channels.
                    prop_assert!(s.releases.get(c).is_some_and(|n| n.release >= r.release));
                }
                prop_assert!(s.referenced().len() <= 2 * s.channels.len());
            }
        }
    }
}
