//! Ed25519 keys, signatures, and the one threshold check used for bundles and trust
//! roots alike (see `docs/bundle.md`, "Signatures").
//!
//! Key files are standard PEM (PKCS#8 for secret keys, SPKI for public keys), so
//! `openssl pkey` can read them.

use std::collections::BTreeSet;
use std::fmt;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{Digest, KeyId};

/// Problems with key material or key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The operating system's random source failed.
    #[error("cannot read random bytes from the operating system: {0}")]
    Random(String),
    /// The text is not a PEM Ed25519 key of the expected kind.
    #[error("not an Ed25519 {expected} key in PEM form: {detail}")]
    Pem {
        /// `secret` or `public`.
        expected: &'static str,
        /// What the PEM/DER parser said.
        detail: String,
    },
    /// The 32 bytes are not a valid Ed25519 public key.
    #[error("invalid Ed25519 public key")]
    InvalidPublicKey,
}

/// An Ed25519 public key, encoded in CBOR as a 32-byte byte string.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Checks that `bytes` are a valid (decompressible, not weak) Ed25519 point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<PublicKey, KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::InvalidPublicKey)?;
        if key.is_weak() {
            return Err(KeyError::InvalidPublicKey);
        }
        Ok(PublicKey(bytes))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key's id: SHA-256 of the 32 public-key bytes.
    pub fn id(&self) -> KeyId {
        Digest::of(&self.0)
    }

    /// Parses an SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(pem: &str) -> Result<PublicKey, KeyError> {
        let key =
            ed25519_dalek::VerifyingKey::from_public_key_pem(pem).map_err(|e| KeyError::Pem {
                expected: "public",
                detail: e.to_string(),
            })?;
        PublicKey::from_bytes(key.to_bytes())
    }

    /// The key as SPKI PEM.
    pub fn to_pem(&self) -> String {
        match self.verifying_key().and_then(|k| {
            k.to_public_key_pem(LineEnding::LF)
                .map_err(|_| KeyError::InvalidPublicKey)
        }) {
            Ok(pem) => pem,
            // A PublicKey is only constructed from a validated point.
            Err(e) => unreachable!("validated public key failed to encode: {e}"),
        }
    }

    fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::InvalidPublicKey)
    }

    /// Strict Ed25519 verification (rejects non-canonical and small-order values).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = self.verifying_key() else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(message, &sig).is_ok() && key.verify(message, &sig).is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(id {})", self.id().short())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = crate::cbor::hex_or_bytes::<D, 32>(d)?;
        PublicKey::from_bytes(bytes).map_err(serde::de::Error::custom)
    }
}

/// An Ed25519 secret key. Never serialised into any contract message.
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey::from_seed(seed))
    }

    /// A key from a 32-byte seed (tests use fixed seeds for repeatable bundles).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Parses a PKCS#8 PEM secret key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<SecretKey, KeyError> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map(SecretKey)
            .map_err(|e| KeyError::Pem {
                expected: "secret",
                detail: e.to_string(),
            })
    }

    /// The key as PKCS#8 v1 PEM (RFC 8410: the seed only). The caller writes it
    /// with mode 0600. Not v2 (with the public key), which ed25519-dalek writes
    /// by default and OpenSSL 3.0 and Python's `cryptography` refuse to read.
    pub fn to_pem(&self) -> String {
        let v1 = ed25519_dalek::ed25519::pkcs8::KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        };
        match v1.to_pkcs8_pem(LineEnding::LF) {
            Ok(pem) => pem.to_string(),
            Err(e) => unreachable!("PKCS#8 encoding of an Ed25519 key failed: {e}"),
        }
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `message`, returning the entry to store next to it.
    pub fn sign(&self, message: &[u8]) -> SignatureEntry {
        SignatureEntry {
            key: self.public().id(),
            sig: self.0.sign(message).to_bytes(),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public id {})", self.public().id().short())
    }
}

/// One signature: the signing key's id and the 64-byte Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    /// Id of the key that made the signature.
    pub key: KeyId,
    /// The Ed25519 signature over the exact signed bytes.
    #[serde(with = "sig_bytes")]
    pub sig: [u8; 64],
}

mod sig_bytes {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(v))
        } else {
            s.serialize_bytes(v)
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        crate::cbor::hex_or_bytes::<D, 64>(d)
    }
}

/// Result of checking a list of signatures against a set of trusted keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignatureCheck {
    /// Distinct trusted keys with a valid signature (a key counts once however
    /// many times it signed).
    pub valid: BTreeSet<KeyId>,
    /// Signatures by keys that are not in the trusted set.
    pub unknown: Vec<KeyId>,
    /// Signatures by trusted keys that do not verify over the message.
    pub invalid: Vec<KeyId>,
}

/// Why a threshold of signatures was not met. Ordered by how much it tells the
/// operator: a signature that fails tells more than a missing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThresholdFailure {
    /// A trusted key's signature does not verify: the signed bytes were changed
    /// after signing, or the signature is corrupt.
    InvalidSignature(KeyId),
    /// Signatures exist only from keys outside the trusted set.
    UnknownKey(KeyId),
    /// Fewer distinct trusted keys signed than the threshold requires.
    TooFew {
        /// Distinct valid trusted signatures.
        valid: usize,
        /// Required number.
        threshold: usize,
    },
}

/// Checks `signatures` over the exact bytes `message` against `trusted` keys.
pub fn check_signatures(
    message: &[u8],
    signatures: &[SignatureEntry],
    trusted: &[PublicKey],
) -> SignatureCheck {
    let mut check = SignatureCheck::default();
    for entry in signatures {
        match trusted.iter().find(|k| k.id() == entry.key) {
            None => check.unknown.push(entry.key),
            Some(key) if key.verify(message, &entry.sig) => {
                check.valid.insert(entry.key);
            }
            Some(_) => check.invalid.push(entry.key),
        }
    }
    check
}

impl SignatureCheck {
    /// Succeeds when at least `threshold` distinct trusted keys signed. Extra
    /// invalid or unknown signatures do not matter once the threshold is met
    /// (as in TUF); otherwise the most specific failure is returned.
    pub fn require(&self, threshold: usize) -> Result<(), ThresholdFailure> {
        if threshold > 0 && self.valid.len() >= threshold {
            return Ok(());
        }
        if let Some(key) = self.invalid.first() {
            return Err(ThresholdFailure::InvalidSignature(*key));
        }
        if self.valid.is_empty()
            && let Some(key) = self.unknown.first()
        {
            return Err(ThresholdFailure::UnknownKey(*key));
        }
        Err(ThresholdFailure::TooFew {
            valid: self.valid.len(),
            threshold,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_and_public_keys_round_trip_through_pem() {
        let key = SecretKey::from_seed([7; 32]);
        let again = SecretKey::from_pem(&key.to_pem()).map(|k| k.public());
        assert_eq!(again.ok(), Some(key.public()));
        let public = PublicKey::from_pem(&key.public().to_pem()).ok();
        assert_eq!(public, Some(key.public()));
        assert!(PublicKey::from_pem(&key.to_pem()).is_err());
        assert!(SecretKey::from_pem(&key.public().to_pem()).is_err());
    }

    #[test]
    fn secret_keys_are_written_as_pkcs8_v1_and_v2_files_still_read() {
        // RFC 8410's v1 form: version 0, the algorithm, the seed; 48 bytes.
        let pem = SecretKey::from_seed([7; 32]).to_pem();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI"),
            "{pem}"
        );
        // A v2 file (with the public key) as earlier versions wrote them.
        let v2 = "-----BEGIN PRIVATE KEY-----\n\
                  MFECAQEwBQYDK2VwBCIEIDLrS4iQmu2hu453s4LoQKQdlTMy0m5Fm4zGqhkRs18z\n\
                  gSEAkqem6oubzk+aKn5ni38QYeVK8MdYNkK54UTsLn0b3C4=\n\
                  -----END PRIVATE KEY-----\n";
        let key = SecretKey::from_pem(v2).expect("v2 reads");
        assert_eq!(
            key.public().id().to_hex(),
            "73b88f5317c6352cfe49966cb1423f46497ad4fc6e4c7b8ae7a1ae2b14ff1ab8"
        );
        assert_eq!(
            SecretKey::from_pem(&key.to_pem()).map(|k| k.public()).ok(),
            Some(key.public())
        );
    }

    #[test]
    fn duplicate_signatures_by_one_key_count_once() {
        let a = SecretKey::from_seed([1; 32]);
        let b = SecretKey::from_seed([2; 32]);
        let msg = b"manifest bytes";
        let sigs = vec![a.sign(msg), a.sign(msg), a.sign(msg)];
        let check = check_signatures(msg, &sigs, &[a.public(), b.public()]);
        assert_eq!(check.valid.len(), 1);
        assert_eq!(
            check.require(2),
            Err(ThresholdFailure::TooFew {
                valid: 1,
                threshold: 2
            })
        );
    }

    #[test]
    fn a_signature_over_other_bytes_is_invalid_and_reported_by_key() {
        let a = SecretKey::from_seed([1; 32]);
        let sigs = vec![a.sign(b"original")];
        let check = check_signatures(b"tampered", &sigs, &[a.public()]);
        assert_eq!(
            check.require(1),
            Err(ThresholdFailure::InvalidSignature(a.public().id()))
        );
    }

    #[test]
    fn only_unknown_signers_is_reported_as_unknown_key() {
        let a = SecretKey::from_seed([1; 32]);
        let stranger = SecretKey::from_seed([9; 32]);
        let check = check_signatures(b"m", &[stranger.sign(b"m")], &[a.public()]);
        assert_eq!(
            check.require(1),
            Err(ThresholdFailure::UnknownKey(stranger.public().id()))
        );
    }

    #[test]
    fn zero_threshold_never_passes() {
        let check = SignatureCheck::default();
        assert!(check.require(0).is_err());
    }
}
