//! Validated identifiers: everything that ends up in a file path or an MQTT topic.
//!
//! Each newtype is checked once where it enters the process (CLI argument, CBOR
//! field, config value) and trusted everywhere after. The character sets exclude
//! path separators, MQTT wildcards (`+`, `#`), `/`, NUL and leading dots, so a value
//! can never escape a directory or widen a topic subscription.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Why a string is not a valid identifier of the named kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct InvalidId {
    /// Which identifier was being parsed (`device id`, `model channel`, ...).
    pub kind: &'static str,
    /// The offending value, truncated to 80 characters.
    pub value: String,
    /// What rule it broke.
    pub reason: &'static str,
}

impl InvalidId {
    fn new(kind: &'static str, value: &str, reason: &'static str) -> Self {
        InvalidId {
            kind,
            value: value.chars().take(80).collect(),
            reason,
        }
    }
}

/// Checks the shared rule: 1..=max characters from `[a-z0-9_-]` (plus `extra`),
/// starting with an ASCII letter or digit.
fn check_name(
    kind: &'static str,
    value: &str,
    max: usize,
    allow_upper: bool,
    extra: &[char],
) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Err(InvalidId::new(kind, value, "must not be empty"));
    }
    if value.len() > max {
        return Err(InvalidId::new(kind, value, "too long"));
    }
    let first = value.chars().next().unwrap_or('-');
    if !first.is_ascii_alphanumeric() {
        return Err(InvalidId::new(
            kind,
            value,
            "must start with a letter or digit",
        ));
    }
    for c in value.chars() {
        let ok = c.is_ascii_digit()
            || c.is_ascii_lowercase()
            || (allow_upper && c.is_ascii_uppercase())
            || c == '-'
            || c == '_'
            || extra.contains(&c);
        if !ok {
            return Err(InvalidId::new(
                kind,
                value,
                if c.is_ascii_uppercase() {
                    "upper-case letters are not allowed"
                } else {
                    "only letters, digits, '-' and '_' are allowed"
                },
            ));
        }
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, upper = $upper:expr, extra = $extra:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `value`.
            pub fn new(value: &str) -> Result<Self, InvalidId> {
                check_name($kind, value, $max, $upper, $extra)?;
                Ok(Self(value.to_owned()))
            }

            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Maps and sets keyed by the id are looked up with a `&str` (the derived
        /// order and hash are the string's).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        /// Read as the validated string wherever a `&str` is taken.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A device's identity: topic segment, directory name and certificate CN.
    /// 1-64 characters of `[A-Za-z0-9_-]`, starting with a letter or digit.
    DeviceId, "device id", 64, upper = true, extra = &[]
);

string_id!(
    /// A model channel (the model's name): rollback protection counts releases per
    /// channel. 1-64 characters of `[a-z0-9_-]`, starting with a letter or digit.
    ModelChannel, "model channel", 64, upper = false, extra = &[]
);

string_id!(
    /// The file name of an artifact inside a bundle (`model.onnx`, `golden.cbor`).
    /// 1-64 characters of `[a-z0-9_.-]`, starting with a letter or digit, so it is
    /// never `.`/`..` and never hidden.
    ArtifactName, "artifact name", 64, upper = false, extra = &['.']
);

string_id!(
    /// A CPU architecture as Rust names it (`x86_64`, `aarch64`, `arm`), used in
    /// bundle constraints. 1-32 characters of `[a-z0-9_-]`.
    Arch, "architecture", 32, upper = false, extra = &[]
);

impl ModelChannel {
    /// The channel of agent releases (`edgefleet-agent`, reserved: docs/agent-update.md).
    pub fn agent() -> ModelChannel {
        ModelChannel(crate::manifest::AGENT_CHANNEL.to_owned())
    }
}

impl Arch {
    /// The architecture this process was compiled for.
    pub fn current() -> Arch {
        Arch(std::env::consts::ARCH.to_owned())
    }
}

/// A SHA-256 digest. Displayed and parsed as 64 lower-case hex digits; encoded in
/// CBOR as a 32-byte byte string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes `data` in one go.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// The first 12 hex digits, for human output.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// All 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(InvalidId::new("digest", s, "must be 64 hex digits"));
        }
        if s.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(InvalidId::new("digest", s, "must be lower-case hex"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| InvalidId::new("digest", s, "must be 64 hex digits"))?;
        Ok(Digest(out))
    }
}

/// CBOR: a 32-byte byte string. Human-readable formats (the JSON of the API and
/// `--json` output): 64 hex digits.
impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Digest(crate::cbor::hex_or_bytes::<D, 32>(d)?))
    }
}

/// Identifies a signing key: the SHA-256 of its 32-byte Ed25519 public key.
pub type KeyId = Digest;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_that_could_escape_a_path_or_topic_are_rejected() {
        for bad in [
            "", ".", "..", "../etc", "a/b", "a+b", "a#", "a b", "a\0b", "-lead", "_lead",
        ] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted as device id");
            assert!(
                ModelChannel::new(bad).is_err(),
                "{bad:?} accepted as channel"
            );
            assert!(
                ArtifactName::new(bad).is_err(),
                "{bad:?} accepted as artifact"
            );
        }
        assert!(ArtifactName::new(".hidden").is_err());
        assert!(ModelChannel::new("Iris").is_err());
        assert!(DeviceId::new(&"a".repeat(65)).is_err());
    }

    #[test]
    fn the_agent_channel_is_a_valid_channel() {
        assert_eq!(
            ModelChannel::new(crate::manifest::AGENT_CHANNEL).ok(),
            Some(ModelChannel::agent())
        );
    }

    #[test]
    fn ordinary_identifiers_are_accepted() {
        assert_eq!(
            DeviceId::new("Pi4-kitchen_01").map(|d| d.to_string()).ok(),
            Some("Pi4-kitchen_01".into())
        );
        assert!(ModelChannel::new("iris-classifier").is_ok());
        assert!(ArtifactName::new("model.onnx").is_ok());
        assert!(DeviceId::new(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn digest_round_trips_through_hex_and_rejects_other_lengths() {
        let d = Digest::of(b"hello");
        assert_eq!(d.to_hex().parse::<Digest>().ok(), Some(d));
        assert!("abc".parse::<Digest>().is_err());
        assert!(d.to_hex().to_uppercase().parse::<Digest>().is_err());
    }
}
