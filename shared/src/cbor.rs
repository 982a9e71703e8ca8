//! CBOR encoding and size-capped decoding, the only place the contract touches
//! ciborium. Decoders check the size cap before reading a byte, and never panic on
//! malformed input.

use serde::de::DeserializeOwned;
use serde::{Deserializer, Serialize};

/// Why bytes could not be decoded into a message or document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is larger than the cap for this kind of message.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The kind of message or document.
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// The bytes are not valid CBOR for this type.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The kind of message or document.
        what: &'static str,
        /// What the decoder reported.
        detail: String,
    },
    /// Valid CBOR followed by more bytes.
    #[error("malformed {what}: {extra} trailing bytes after the value")]
    TrailingBytes {
        /// The kind of message or document.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// The envelope names a protocol version this build does not speak.
    #[error("{what} has protocol version {found}, this build speaks {supported}")]
    UnsupportedVersion {
        /// The kind of message.
        what: &'static str,
        /// Version in the message.
        found: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// Decoded, but a field breaks a rule of the contract.
    #[error("invalid {what}: field `{field}` {reason}")]
    Invalid {
        /// The kind of message or document.
        what: &'static str,
        /// The offending field.
        field: &'static str,
        /// The rule it broke.
        reason: String,
    },
}

/// Encodes `value` as CBOR. Encoding into a `Vec` cannot fail for the contract's
/// types (no maps with non-string keys, no unsupported values).
pub fn to_vec<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec is infallible and every contract type is serialisable.
    if let Err(e) = ciborium::into_writer(value, &mut out) {
        unreachable!("CBOR encoding of a contract type failed: {e}");
    }
    out
}

/// Decodes exactly one CBOR value of type `T` from `bytes`, refusing inputs over
/// `limit` bytes and trailing bytes after the value.
pub fn from_slice<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    limit: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            what,
            size: bytes.len(),
            limit,
        });
    }
    let mut rest = bytes;
    // Nesting in the contract's types is shallow; a low recursion limit stops
    // deeply nested garbage early.
    let value = ciborium::de::from_reader_with_recursion_limit(&mut rest, 32).map_err(|e| {
        DecodeError::Malformed {
            what,
            detail: describe(e),
        }
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

fn describe(e: ciborium::de::Error<std::io::Error>) -> String {
    match e {
        ciborium::de::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "input ends in the middle of a value".into()
        }
        ciborium::de::Error::Io(e) => e.to_string(),
        ciborium::de::Error::Syntax(at) => format!("not CBOR (syntax error at byte {at})"),
        ciborium::de::Error::Semantic(at, msg) => match at {
            Some(at) => format!("{msg} (at byte {at})"),
            None => msg,
        },
        ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".into(),
    }
}

/// Deserialises `N` bytes given either as a byte string (CBOR) or as hex text
/// (JSON). Both are accepted whatever the format claims, because serde's
/// buffering of internally tagged enums reports every format as human-readable.
pub(crate) fn hex_or_bytes<'de, D: Deserializer<'de>, const N: usize>(
    d: D,
) -> Result<[u8; N], D::Error> {
    struct V<const N: usize>;
    impl<const N: usize> serde::de::Visitor<'_> for V<N> {
        type Value = [u8; N];
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a byte string of {N} bytes or {} hex digits", 2 * N)
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            let mut out = [0u8; N];
            if v.len() != 2 * N || v.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(E::invalid_value(serde::de::Unexpected::Str(v), &self));
            }
            hex::decode_to_slice(v, &mut out)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))?;
            Ok(out)
        }
    }
    d.deserialize_any(V::<N>)
}
