//! The trust root: which keys may sign bundles, how many must (k of n), until when,
//! and how the root itself is replaced (rotation). See `docs/bundle.md`, "Trust root".
//!
//! A trust root file is a CBOR map `{ "signed": bstr, "signatures": [..] }` where
//! `signed` holds the exact CBOR bytes of [`TrustRoot`]; signatures are checked over
//! those bytes before they are decoded.

use serde::{Deserialize, Serialize};

use crate::cbor::{self, DecodeError};
use crate::keys::{PublicKey, SecretKey, SignatureEntry, ThresholdFailure, check_signatures};
use crate::time::UnixTime;

/// Largest trust root file accepted.
pub const MAX_TRUST_ROOT_LEN: usize = 64 * 1024;
/// Most keys a trust root may list.
pub const MAX_KEYS: usize = 32;
/// Most signatures a signed document may carry.
pub const MAX_SIGNATURES: usize = 32;
/// The value of the `type` field of a trust root.
pub const TRUST_ROOT_TYPE: &str = "edgefleet/trust-root";

/// The signed content of a trust root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustRoot {
    /// Always [`TRUST_ROOT_TYPE`]; separates trust roots from manifests signed by
    /// the same keys.
    #[serde(rename = "type")]
    pub kind: String,
    /// Grows by at least one with each rotation.
    pub version: u32,
    /// After this instant the root no longer verifies bundles.
    pub expires_at: UnixTime,
    /// How many distinct keys must sign (k of n).
    pub threshold: u16,
    /// The trusted keys (n). They sign model bundles and the next root.
    pub keys: Vec<PublicKey>,
    /// The keys that sign agent releases (the agent's own binary), with their own
    /// threshold: a model signer cannot push code to the fleet. Absent from roots
    /// made before agent releases existed; such a root refuses every agent release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_releases: Option<RoleKeys>,
}

/// Keys and threshold of one signing role beside the root's own keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleKeys {
    /// How many distinct keys of the role must sign (k of n).
    pub threshold: u16,
    /// The role's keys (n).
    pub keys: Vec<PublicKey>,
}

/// What a signature is trusted for: which keys of a root verify a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Model bundles: the root's own keys.
    Models,
    /// Agent releases: the root's `agent_releases` keys.
    AgentReleases,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Models => "a model bundle",
            Role::AgentReleases => "an agent release",
        })
    }
}

/// A trust root file: exact signed bytes plus signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTrustRoot {
    /// CBOR bytes of [`TrustRoot`], exactly as signed.
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
    /// Signatures over `signed`.
    pub signatures: Vec<SignatureEntry>,
}

/// Why a trust root is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The file is not a trust root.
    #[error("trust root file: {0}")]
    Decode(#[from] DecodeError),
    /// The root names no keys, repeats a key, or has a threshold outside 1..=n.
    #[error("trust root is invalid: {0}")]
    Invalid(String),
    /// Not enough valid signatures by the named set of keys.
    #[error("trust root version {version} is not signed by {by}: {failure}")]
    Signatures {
        /// Version of the root being checked.
        version: u32,
        /// Whose signatures were missing (`its own keys` or `the current root`).
        by: &'static str,
        /// What was wrong with the signatures.
        failure: ThresholdDisplay,
    },
    /// The root's expiry has passed.
    #[error("trust root version {version} expired at {expired_at}")]
    Expired {
        /// Version of the expired root.
        version: u32,
        /// When it expired.
        expired_at: UnixTime,
    },
    /// A rotation must increase the version.
    #[error("new trust root version {new} does not follow current version {current}")]
    VersionNotNewer {
        /// Current version.
        current: u32,
        /// Offered version.
        new: u32,
    },
}

/// A [`ThresholdFailure`] with a human rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThresholdDisplay(pub ThresholdFailure);

impl std::fmt::Display for ThresholdDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ThresholdFailure::InvalidSignature(k) => {
                write!(f, "the signature by key {} does not verify", k.short())
            }
            ThresholdFailure::UnknownKey(k) => {
                write!(f, "signed only by unknown key {}", k.short())
            }
            ThresholdFailure::TooFew { valid, threshold } => {
                write!(f, "{valid} valid signature(s), {threshold} required")
            }
        }
    }
}

/// The rules for one set of keys: 1 to [`MAX_KEYS`] distinct keys and a
/// threshold in 1..=n. `what` prefixes the error (empty for the root's own keys).
fn check_key_set(what: &str, keys: &[PublicKey], threshold: u16) -> Result<(), TrustError> {
    if keys.is_empty() || keys.len() > MAX_KEYS {
        return Err(TrustError::Invalid(format!(
            "{what}it lists {} keys; 1 to {MAX_KEYS} are allowed",
            keys.len()
        )));
    }
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].contains(k) {
            return Err(TrustError::Invalid(format!(
                "{what}key {} is listed twice",
                k.id().short()
            )));
        }
    }
    if threshold == 0 || usize::from(threshold) > keys.len() {
        return Err(TrustError::Invalid(format!(
            "{what}threshold {threshold} is outside 1..={}",
            keys.len()
        )));
    }
    Ok(())
}

impl TrustRoot {
    /// A new root document (not yet signed).
    pub fn new(version: u32, expires_at: UnixTime, threshold: u16, keys: Vec<PublicKey>) -> Self {
        TrustRoot {
            kind: TRUST_ROOT_TYPE.into(),
            version,
            expires_at,
            threshold,
            keys,
            agent_releases: None,
        }
    }

    /// The same root with `role` as its agent-release signers.
    pub fn with_agent_releases(mut self, role: RoleKeys) -> Self {
        self.agent_releases = Some(role);
        self
    }

    /// The keys and threshold that sign content of `role`; None when the root has
    /// no such role.
    pub fn role(&self, role: Role) -> Option<(&[PublicKey], u16)> {
        match role {
            Role::Models => Some((&self.keys, self.threshold)),
            Role::AgentReleases => self
                .agent_releases
                .as_ref()
                .map(|r| (r.keys.as_slice(), r.threshold)),
        }
    }

    /// Structural rules: right type, 1..=32 distinct keys, 1 <= k <= n.
    pub fn validate(&self) -> Result<(), TrustError> {
        if self.kind != TRUST_ROOT_TYPE {
            return Err(TrustError::Invalid(format!(
                "type is {:?}, expected {TRUST_ROOT_TYPE:?}",
                self.kind
            )));
        }
        check_key_set("", &self.keys, self.threshold)?;
        if let Some(role) = &self.agent_releases {
            check_key_set("agent_releases: ", &role.keys, role.threshold)?;
        }
        Ok(())
    }

    /// Errors when the root has expired at `now`.
    pub fn check_not_expired(&self, now: UnixTime) -> Result<(), TrustError> {
        if now >= self.expires_at {
            return Err(TrustError::Expired {
                version: self.version,
                expired_at: self.expires_at,
            });
        }
        Ok(())
    }

    /// Checks that `signatures` over `message` meet this root's threshold.
    pub fn check(
        &self,
        message: &[u8],
        signatures: &[SignatureEntry],
    ) -> Result<(), ThresholdFailure> {
        check_signatures(message, signatures, &self.keys).require(usize::from(self.threshold))
    }

    /// Encodes and wraps the root for signing.
    pub fn to_unsigned(&self) -> SignedTrustRoot {
        SignedTrustRoot {
            signed: cbor::to_vec(self),
            signatures: Vec::new(),
        }
    }

    /// Accepts `new` as the successor of this (current) root at `now`, following
    /// the rotation rule: `new` must be valid, not expired, of a higher version,
    /// signed by a threshold of the current root's keys AND by a threshold of its
    /// own keys. The current root may itself have expired: rotation is the way out.
    pub fn accept_rotation(
        &self,
        new: &SignedTrustRoot,
        now: UnixTime,
    ) -> Result<TrustRoot, TrustError> {
        let root = new.decode()?;
        if root.version <= self.version {
            return Err(TrustError::VersionNotNewer {
                current: self.version,
                new: root.version,
            });
        }
        self.check(&new.signed, &new.signatures)
            .map_err(|f| TrustError::Signatures {
                version: root.version,
                by: "a threshold of the current root's keys",
                failure: ThresholdDisplay(f),
            })?;
        new.verify_self(now)
    }
}

impl SignedTrustRoot {
    /// Reads a trust root file from its exact bytes (no signature check yet).
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedTrustRoot, TrustError> {
        let signed: SignedTrustRoot = cbor::from_slice("trust root", bytes, MAX_TRUST_ROOT_LEN)?;
        if signed.signatures.len() > MAX_SIGNATURES {
            return Err(TrustError::Invalid(format!(
                "it carries {} signatures; at most {MAX_SIGNATURES} are allowed",
                signed.signatures.len()
            )));
        }
        Ok(signed)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// Decodes and validates the signed content without checking signatures.
    /// Use [`SignedTrustRoot::verify_self`] or [`TrustRoot::accept_rotation`] to
    /// obtain a root you may trust.
    pub fn decode(&self) -> Result<TrustRoot, TrustError> {
        let root: TrustRoot =
            cbor::from_slice("trust root content", &self.signed, MAX_TRUST_ROOT_LEN)?;
        root.validate()?;
        Ok(root)
    }

    /// Verifies a root on its own: valid, signed by a threshold of its own keys and
    /// not expired at `now`. This is how a pinned root is loaded on a device.
    pub fn verify_self(&self, now: UnixTime) -> Result<TrustRoot, TrustError> {
        let root = self.decode()?;
        root.check(&self.signed, &self.signatures)
            .map_err(|f| TrustError::Signatures {
                version: root.version,
                by: "a threshold of its own keys",
                failure: ThresholdDisplay(f),
            })?;
        root.check_not_expired(now)?;
        Ok(root)
    }

    /// Adds (or replaces) `key`'s signature over the signed bytes.
    pub fn sign(&mut self, key: &SecretKey) {
        let entry = key.sign(&self.signed);
        self.signatures.retain(|s| s.key != entry.key);
        self.signatures.push(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn root(version: u32, k: u16, keys: &[&SecretKey], signers: &[&SecretKey]) -> SignedTrustRoot {
        let doc = TrustRoot::new(
            version,
            UnixTime(1000),
            k,
            keys.iter().map(|k| k.public()).collect(),
        );
        let mut signed = doc.to_unsigned();
        for s in signers {
            signed.sign(s);
        }
        signed
    }

    #[test]
    fn a_root_signed_by_its_threshold_verifies_and_round_trips() {
        let (a, b, c) = (key(1), key(2), key(3));
        let signed = root(1, 2, &[&a, &b, &c], &[&a, &c]);
        let again = SignedTrustRoot::from_bytes(&signed.to_bytes());
        assert_eq!(again.as_ref().ok(), Some(&signed));
        let r = signed.verify_self(UnixTime(10)).ok();
        assert_eq!(r.map(|r| r.threshold), Some(2));
    }

    #[test]
    fn a_root_below_its_threshold_is_refused() {
        let (a, b) = (key(1), key(2));
        let signed = root(1, 2, &[&a, &b], &[&a, &a]);
        assert!(matches!(
            signed.verify_self(UnixTime(10)),
            Err(TrustError::Signatures {
                failure: ThresholdDisplay(ThresholdFailure::TooFew {
                    valid: 1,
                    threshold: 2
                }),
                ..
            })
        ));
    }

    #[test]
    fn an_expired_root_is_refused() {
        let a = key(1);
        let signed = root(1, 1, &[&a], &[&a]);
        assert_eq!(
            signed.verify_self(UnixTime(1000)),
            Err(TrustError::Expired {
                version: 1,
                expired_at: UnixTime(1000)
            })
        );
    }

    #[test]
    fn bad_thresholds_and_repeated_keys_are_invalid() {
        let (a, b) = (key(1), key(2));
        for bad in [
            root(1, 0, &[&a, &b], &[&a]),
            root(1, 3, &[&a, &b], &[&a, &b]),
            root(1, 1, &[&a, &a], &[&a]),
            root(1, 1, &[], &[&a]),
        ] {
            assert!(matches!(
                bad.verify_self(UnixTime(0)),
                Err(TrustError::Invalid(_))
            ));
        }
    }

    #[test]
    fn rotation_needs_the_current_threshold_and_the_new_threshold() {
        let (a, b, c, d) = (key(1), key(2), key(3), key(4));
        let current = root(1, 2, &[&a, &b], &[&a, &b]).verify_self(UnixTime(0));
        let Ok(current) = current else {
            panic!("current root must verify")
        };
        // Fully signed: two old keys and two new keys.
        let good = root(2, 2, &[&c, &d], &[&a, &b, &c, &d]);
        assert_eq!(
            current
                .accept_rotation(&good, UnixTime(0))
                .map(|r| r.version),
            Ok(2)
        );
        // Only one old key.
        let weak_old = root(2, 2, &[&c, &d], &[&a, &c, &d]);
        assert!(matches!(
            current.accept_rotation(&weak_old, UnixTime(0)),
            Err(TrustError::Signatures { .. })
        ));
        // Only one new key.
        let weak_new = root(2, 2, &[&c, &d], &[&a, &b, &c]);
        assert!(matches!(
            current.accept_rotation(&weak_new, UnixTime(0)),
            Err(TrustError::Signatures { .. })
        ));
        // Same version is not a rotation.
        let same = root(1, 2, &[&c, &d], &[&a, &b, &c, &d]);
        assert_eq!(
            current.accept_rotation(&same, UnixTime(0)),
            Err(TrustError::VersionNotNewer { current: 1, new: 1 })
        );
    }

    #[test]
    fn rotation_away_from_an_expired_root_is_allowed_but_not_to_an_expired_one() {
        let (a, c) = (key(1), key(3));
        let Ok(current) = root(1, 1, &[&a], &[&a]).verify_self(UnixTime(0)) else {
            panic!("current root must verify")
        };
        let next = root(2, 1, &[&c], &[&a, &c]);
        assert!(current.accept_rotation(&next, UnixTime(999)).is_ok());
        assert!(matches!(
            current.accept_rotation(&next, UnixTime(2000)),
            Err(TrustError::Expired { .. })
        ));
    }

    fn role(k: u16, keys: &[&SecretKey]) -> RoleKeys {
        RoleKeys {
            threshold: k,
            keys: keys.iter().map(|k| k.public()).collect(),
        }
    }

    #[test]
    fn a_root_without_the_agent_release_role_keeps_its_bytes_and_has_no_such_role() {
        let a = key(1);
        let doc = TrustRoot::new(1, UnixTime(1000), 1, vec![a.public()]);
        let bytes = cbor::to_vec(&doc);
        // The encoding has exactly the five fields roots had before roles.
        let value: ciborium::Value =
            ciborium::from_reader(bytes.as_slice()).unwrap_or(ciborium::Value::Null);
        assert_eq!(value.as_map().map(Vec::len), Some(5));
        let again: Result<TrustRoot, _> = cbor::from_slice("t", &bytes, MAX_TRUST_ROOT_LEN);
        assert_eq!(again.as_ref().ok(), Some(&doc));
        assert!(doc.role(Role::AgentReleases).is_none());
        assert_eq!(
            doc.role(Role::Models).map(|(k, t)| (k.len(), t)),
            Some((1, 1))
        );
    }

    #[test]
    fn the_agent_release_role_round_trips_and_is_validated() {
        let (a, r1, r2) = (key(1), key(7), key(8));
        let doc = TrustRoot::new(1, UnixTime(1000), 1, vec![a.public()])
            .with_agent_releases(role(2, &[&r1, &r2]));
        let mut signed = doc.to_unsigned();
        signed.sign(&a);
        let back = signed.verify_self(UnixTime(0));
        assert_eq!(back.as_ref().ok(), Some(&doc));
        let (keys, k) = doc.role(Role::AgentReleases).unwrap_or((&[], 0));
        assert_eq!((keys.len(), k), (2, 2));
        for (bad, why) in [
            (
                role(0, &[&r1]),
                "agent_releases: threshold 0 is outside 1..=1",
            ),
            (
                role(3, &[&r1, &r2]),
                "agent_releases: threshold 3 is outside 1..=2",
            ),
            (role(1, &[&r1, &r1]), "is listed twice"),
            (role(1, &[]), "agent_releases: it lists 0 keys"),
        ] {
            let doc =
                TrustRoot::new(1, UnixTime(1000), 1, vec![a.public()]).with_agent_releases(bad);
            let err = doc
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(why), "{err:?} should say {why:?}");
        }
    }

    #[test]
    fn rotation_carries_the_role_and_is_signed_by_the_root_keys() {
        let (a, r1, r2) = (key(1), key(7), key(8));
        let Ok(current) = root(1, 1, &[&a], &[&a]).verify_self(UnixTime(0)) else {
            panic!("current root must verify")
        };
        let next = TrustRoot::new(2, UnixTime(1000), 1, vec![a.public()])
            .with_agent_releases(role(1, &[&r2]));
        // Signed by the role's keys only: not a rotation.
        let mut by_role = next.to_unsigned();
        by_role.sign(&r1);
        by_role.sign(&r2);
        assert!(matches!(
            current.accept_rotation(&by_role, UnixTime(0)),
            Err(TrustError::Signatures { .. })
        ));
        let mut by_root = next.to_unsigned();
        by_root.sign(&a);
        let accepted = current.accept_rotation(&by_root, UnixTime(0));
        assert_eq!(
            accepted.ok().and_then(|r| r.agent_releases).map(|r| r.keys),
            Some(vec![r2.public()])
        );
    }
}
