//! Signed commands (docs/protocol.md, "Commands are signed"): the controller signs
//! every command with a key of its own, whose public half each device receives at
//! enrollment; a device carries out a command only if that key signed it, it names
//! this device, it is fresh, and it was not carried out before. The broker's ACL
//! (or the embedded broker's gate) is the first fence; this is the second, so a
//! broker misconfiguration cannot become control of the fleet (MQTT says nothing
//! about who published a message).
//!
//! Pure: the time and the replay window come in as arguments; the agent persists
//! the window.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::cbor::DecodeError;
use crate::keys::{PublicKey, SecretKey, SignatureEntry};
use crate::protocol::{self, Command, Message};
use crate::{DeviceId, KeyId, UnixTime};

/// Put before the command's bytes in what is signed, so that a command
/// signature can never be taken for a signature of anything else.
pub const SIGNING_CONTEXT: &[u8] = b"edgefleet/v1 command\0";

/// What travels on a device's command topic: the encoded [`Command`] (its
/// versioned envelope, exactly as signed) and the controller's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCommand {
    /// `protocol::encode(&Command)`: the bytes the signature covers (after
    /// [`SIGNING_CONTEXT`]). Decoded only after the signature checked out.
    #[serde(with = "serde_bytes")]
    pub command: Vec<u8>,
    /// The controller's signature.
    pub signature: SignatureEntry,
}

impl Message for SignedCommand {
    const NAME: &'static str = "signed command";
    const MAX_LEN: usize = Command::MAX_LEN + 256;
    fn validate(&self) -> Result<(), DecodeError> {
        if self.command.len() > Command::MAX_LEN {
            return Err(DecodeError::Invalid {
                what: Self::NAME,
                field: "command",
                reason: format!("is over {} bytes", Command::MAX_LEN),
            });
        }
        Ok(())
    }
}

fn signed_bytes(command: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + command.len());
    out.extend_from_slice(SIGNING_CONTEXT);
    out.extend_from_slice(command);
    out
}

/// Encodes and signs `command`: the payload to publish on its device's topic.
pub fn sign_command(key: &SecretKey, command: &Command) -> Vec<u8> {
    let bytes = protocol::encode(command);
    let signature = key.sign(&signed_bytes(&bytes));
    protocol::encode(&SignedCommand {
        command: bytes,
        signature,
    })
}

/// What a device accepts.
#[derive(Debug, Clone)]
pub struct CommandPolicy {
    /// The controller's command key, pinned at enrollment.
    pub key: PublicKey,
    /// This device.
    pub device: DeviceId,
    /// A command issued longer ago than this (by the device's clock) is stale.
    pub max_age_s: i64,
    /// A command issued later than this after the device's now is refused: the
    /// clocks disagree too much for the age to mean anything.
    pub max_ahead_s: i64,
}

/// Default [`CommandPolicy::max_age_s`]: one hour. The controller sends each
/// command right when it decides (a copy, signed again, when a controller
/// taking a rollout over cannot know it was published); a rollout gives up on
/// a device long before.
pub const DEFAULT_MAX_AGE_S: i64 = 3600;

/// Default [`CommandPolicy::max_ahead_s`]: five minutes of clock difference.
pub const DEFAULT_MAX_AHEAD_S: i64 = 300;

/// Why a device refused a command. `code()` is stable; the text names the value
/// that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandRefusal {
    /// A plain `Command` with no signature (an older controller, or a forgery).
    #[error("the command is not signed (a plain command message)")]
    Unsigned,
    /// Neither a signed command nor a command.
    #[error("{0}")]
    Malformed(DecodeError),
    /// Signed by a key other than the pinned controller key.
    #[error("signed by key {got}, not the controller's key {pinned} pinned at enrollment")]
    UnknownKey {
        /// The key the signature names.
        got: KeyId,
        /// The pinned key.
        pinned: KeyId,
    },
    /// The signature does not verify over the command's bytes.
    #[error("the signature does not verify over the command's bytes")]
    BadSignature,
    /// Signed, but the command inside does not decode (a controller bug).
    #[error("signed, but {0}")]
    SignedButMalformed(DecodeError),
    /// Addressed to another device.
    #[error("command {id} is addressed to {named}, not to this device {device}")]
    WrongDevice {
        /// The command.
        id: u64,
        /// The device it names.
        named: DeviceId,
        /// This device.
        device: DeviceId,
    },
    /// Issued too long ago.
    #[error("command {id} was issued at {issued}, more than {max_age_s} s before now ({now})")]
    Stale {
        /// The command.
        id: u64,
        /// When it was issued.
        issued: UnixTime,
        /// The device's now.
        now: UnixTime,
        /// The limit.
        max_age_s: i64,
    },
    /// Issued in the future by this device's clock.
    #[error("command {id} was issued at {issued}, more than {max_ahead_s} s after now ({now})")]
    FromTheFuture {
        /// The command.
        id: u64,
        /// When it was issued.
        issued: UnixTime,
        /// The device's now.
        now: UnixTime,
        /// The limit.
        max_ahead_s: i64,
    },
    /// Carried out before, or older than every command the window remembers.
    #[error("command {id} was already received (a replay)")]
    Replayed {
        /// The command.
        id: u64,
    },
}

impl CommandRefusal {
    /// A stable code for reports and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            CommandRefusal::Unsigned => "unsigned",
            CommandRefusal::Malformed(_) => "malformed",
            CommandRefusal::UnknownKey { .. } => "unknown_key",
            CommandRefusal::BadSignature => "bad_signature",
            CommandRefusal::SignedButMalformed(_) => "malformed",
            CommandRefusal::WrongDevice { .. } => "wrong_device",
            CommandRefusal::Stale { .. } => "stale",
            CommandRefusal::FromTheFuture { .. } => "from_the_future",
            CommandRefusal::Replayed { .. } => "replayed",
        }
    }
}

/// The ids of the commands a device accepted most recently (at most
/// [`ReplayWindow::CAPACITY`]). An id in the window is a replay; once the window
/// is full, so is any id below its smallest (the controller numbers commands in
/// the order it issues them, so a lower id is an old one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayWindow {
    ids: BTreeSet<u64>,
}

impl ReplayWindow {
    /// How many accepted ids are remembered.
    pub const CAPACITY: usize = 1024;

    /// Whether `id` may be accepted.
    pub fn check(&self, id: u64) -> Result<(), CommandRefusal> {
        let below_window =
            self.ids.len() >= Self::CAPACITY && self.ids.first().is_some_and(|&lowest| id < lowest);
        if self.ids.contains(&id) || below_window {
            return Err(CommandRefusal::Replayed { id });
        }
        Ok(())
    }

    /// Remembers an accepted id, forgetting the lowest beyond the capacity.
    pub fn record(&mut self, id: u64) {
        self.ids.insert(id);
        while self.ids.len() > Self::CAPACITY {
            self.ids.pop_first();
        }
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Checks a payload from the device's command topic, step by step, and returns
/// the command if the device may carry it out. The caller records its id in
/// `window` (and persists the window) before carrying it out.
pub fn open_command(
    payload: &[u8],
    policy: &CommandPolicy,
    now: UnixTime,
    window: &ReplayWindow,
) -> Result<Command, CommandRefusal> {
    // 1. The envelope: size-capped, then decoded. A plain command is named as
    //    unsigned rather than malformed, so an old controller is recognisable.
    let signed: SignedCommand = match protocol::decode(payload) {
        Ok(s) => s,
        Err(e) => {
            return Err(match protocol::decode::<Command>(payload) {
                Ok(_) => CommandRefusal::Unsigned,
                Err(_) => CommandRefusal::Malformed(e),
            });
        }
    };
    // 2. The pinned key, and its signature over the exact bytes received.
    let pinned = policy.key.id();
    if signed.signature.key != pinned {
        return Err(CommandRefusal::UnknownKey {
            got: signed.signature.key,
            pinned,
        });
    }
    if !policy
        .key
        .verify(&signed_bytes(&signed.command), &signed.signature.sig)
    {
        return Err(CommandRefusal::BadSignature);
    }
    // 3. Only now the command itself.
    let command: Command =
        protocol::decode(&signed.command).map_err(CommandRefusal::SignedButMalformed)?;
    // 4. Addressed to this device.
    if command.device != policy.device {
        return Err(CommandRefusal::WrongDevice {
            id: command.id,
            named: command.device,
            device: policy.device.clone(),
        });
    }
    // 5. Fresh by this device's clock.
    let age = now.0.saturating_sub(command.issued_at.0);
    if age > policy.max_age_s {
        return Err(CommandRefusal::Stale {
            id: command.id,
            issued: command.issued_at,
            now,
            max_age_s: policy.max_age_s,
        });
    }
    if -age > policy.max_ahead_s {
        return Err(CommandRefusal::FromTheFuture {
            id: command.id,
            issued: command.issued_at,
            now,
            max_ahead_s: policy.max_ahead_s,
        });
    }
    // 6. Not seen before.
    window.check(command.id)?;
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Action;

    const NOW: UnixTime = UnixTime(1_800_000_000);

    fn key() -> SecretKey {
        SecretKey::from_seed([9; 32])
    }

    fn policy() -> CommandPolicy {
        CommandPolicy {
            key: key().public(),
            device: DeviceId::new("pi-01").expect("id"),
            max_age_s: DEFAULT_MAX_AGE_S,
            max_ahead_s: DEFAULT_MAX_AHEAD_S,
        }
    }

    fn command(id: u64, device: &str, issued_at: UnixTime) -> Command {
        Command {
            id,
            issued_at,
            device: DeviceId::new(device).expect("id"),
            action: Action::Revert,
        }
    }

    fn open(payload: &[u8]) -> Result<Command, CommandRefusal> {
        open_command(payload, &policy(), NOW, &ReplayWindow::default())
    }

    #[test]
    fn a_command_signed_by_the_pinned_key_for_this_device_opens() {
        let c = command(7, "pi-01", NOW);
        assert_eq!(open(&sign_command(&key(), &c)), Ok(c));
    }

    #[test]
    fn unsigned_foreign_tampered_misaddressed_stale_and_future_commands_are_refused() {
        let c = command(7, "pi-01", NOW);
        assert_eq!(
            open(&protocol::encode(&c)).map_err(|e| e.code()),
            Err("unsigned")
        );
        assert_eq!(open(b"\xa0").map_err(|e| e.code()), Err("malformed"));
        let other = SecretKey::from_seed([8; 32]);
        assert!(matches!(
            open(&sign_command(&other, &c)),
            Err(CommandRefusal::UnknownKey { .. })
        ));
        // The right key id over another command's signature.
        let mut signed: SignedCommand =
            protocol::decode(&sign_command(&key(), &c)).expect("decodes");
        signed.command = protocol::encode(&command(8, "pi-01", NOW));
        assert_eq!(
            open(&protocol::encode(&signed)),
            Err(CommandRefusal::BadSignature)
        );
        // A signature over the bytes without the context is not one over the command.
        let bare = protocol::encode(&c);
        let forged = SignedCommand {
            signature: key().sign(&bare),
            command: bare,
        };
        assert_eq!(
            open(&protocol::encode(&forged)),
            Err(CommandRefusal::BadSignature)
        );
        assert!(matches!(
            open(&sign_command(&key(), &command(7, "pi-02", NOW))),
            Err(CommandRefusal::WrongDevice { named, .. }) if named.as_str() == "pi-02"
        ));
        let old = NOW.plus_secs(-DEFAULT_MAX_AGE_S - 1);
        assert!(matches!(
            open(&sign_command(&key(), &command(7, "pi-01", old))),
            Err(CommandRefusal::Stale { .. })
        ));
        assert!(
            open(&sign_command(
                &key(),
                &command(7, "pi-01", NOW.plus_secs(-DEFAULT_MAX_AGE_S))
            ))
            .is_ok()
        );
        let ahead = NOW.plus_secs(DEFAULT_MAX_AHEAD_S + 1);
        assert!(matches!(
            open(&sign_command(&key(), &command(7, "pi-01", ahead))),
            Err(CommandRefusal::FromTheFuture { .. })
        ));
    }

    #[test]
    fn a_command_is_carried_out_once() {
        let mut window = ReplayWindow::default();
        let payload = sign_command(&key(), &command(7, "pi-01", NOW));
        let c = open_command(&payload, &policy(), NOW, &window).expect("first time");
        window.record(c.id);
        assert_eq!(
            open_command(&payload, &policy(), NOW, &window),
            Err(CommandRefusal::Replayed { id: 7 })
        );
        // Another id still passes, also a lower one while the window has room.
        assert!(
            open_command(
                &sign_command(&key(), &command(3, "pi-01", NOW)),
                &policy(),
                NOW,
                &window
            )
            .is_ok()
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// The window refuses exactly the ids it holds and, once full, those
        /// below its lowest; it never holds more than its capacity.
        #[test]
        fn the_replay_window_matches_a_model(ids in proptest::collection::vec(0u64..3000, 0..2500)) {
            let mut w = ReplayWindow::default();
            let mut accepted: Vec<u64> = Vec::new();
            for id in ids {
                let mut newest: Vec<u64> = accepted.clone();
                newest.sort_unstable();
                newest.dedup();
                let kept = &newest[newest.len().saturating_sub(ReplayWindow::CAPACITY)..];
                let full = kept.len() >= ReplayWindow::CAPACITY;
                let refuse = kept.contains(&id) || (full && id < kept[0]);
                proptest::prop_assert_eq!(w.check(id).is_err(), refuse);
                if !refuse {
                    w.record(id);
                    accepted.push(id);
                }
                proptest::prop_assert!(w.len() <= ReplayWindow::CAPACITY);
            }
        }
    }
}
