//! The agent's version, as `--version`, the local API, the device state and
//! telemetry report it.
//!
//! It lives in a fixed 64-byte slot of the binary, after a marker, so that one
//! build can be given another version by rewriting the slot in place:
//! [`rewrite_version`] is how the tests make the "next release" of the binary
//! they have (docs/agent-update.md) without a second build of the agent. The
//! slot is read with a volatile read, so the compiler cannot fold the bytes of
//! the build into the code that prints them.

use std::sync::OnceLock;

/// What precedes the version in the slot.
pub const MARKER: &[u8; 24] = b"edgefleet-agent-version=";
/// The slot's size: the marker, the version, zero padding.
pub const SLOT_LEN: usize = 64;

const fn slot() -> [u8; SLOT_LEN] {
    let mut out = [0u8; SLOT_LEN];
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let mut i = 0;
    while i < MARKER.len() {
        out[i] = MARKER[i];
        i += 1;
    }
    let mut j = 0;
    while j < version.len() && MARKER.len() + j < SLOT_LEN {
        out[MARKER.len() + j] = version[j];
        j += 1;
    }
    out
}

#[used]
static VERSION_SLOT: [u8; SLOT_LEN] = slot();

/// This binary's version.
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        // SAFETY: a read of an immutable static of plain bytes; volatile only
        // so that the bytes in the file, whatever they are, are what is read.
        #[allow(unsafe_code)]
        let slot = unsafe { std::ptr::read_volatile(&raw const VERSION_SLOT) };
        parse_slot(&slot)
            .unwrap_or(env!("CARGO_PKG_VERSION"))
            .to_owned()
    })
}

/// The version in a slot's bytes: after the marker, up to the first zero.
fn parse_slot(slot: &[u8]) -> Option<&str> {
    let rest = slot.strip_prefix(MARKER.as_slice())?;
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    semver::Version::parse(text).ok().map(|_| text)
}

/// Why a binary's version could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// No version slot (not an agent binary), or more than one.
    #[error("the binary has {0} version slots, expected exactly one")]
    Slots(usize),
    /// The new version is not a semantic version or does not fit.
    #[error("{0:?} is not a semantic version of at most 40 bytes")]
    Version(String),
}

/// A copy of an agent binary's bytes that reports `version` instead of its own.
pub fn rewrite_version(binary: &[u8], version: &str) -> Result<Vec<u8>, RewriteError> {
    if semver::Version::parse(version).is_err() || MARKER.len() + version.len() > SLOT_LEN {
        return Err(RewriteError::Version(version.to_owned()));
    }
    let starts: Vec<usize> = memchr::memmem::find_iter(binary, MARKER.as_slice())
        .filter(|i| {
            binary
                .get(*i..*i + SLOT_LEN)
                .is_some_and(|s| parse_slot(s).is_some())
        })
        .collect();
    let [start] = starts.as_slice() else {
        return Err(RewriteError::Slots(starts.len()));
    };
    let mut out = binary.to_vec();
    let slot = &mut out[*start + MARKER.len()..*start + SLOT_LEN];
    slot.fill(0);
    slot[..version.len()].copy_from_slice(version.as_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_holds_the_package_version() {
        assert_eq!(version(), env!("CARGO_PKG_VERSION"));
        assert_eq!(parse_slot(&slot()), Some(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn a_rewritten_slot_reads_back_and_bad_versions_are_refused() {
        let mut binary = b"some code ".to_vec();
        binary.extend_from_slice(&slot());
        binary.extend_from_slice(b" more");
        let again = rewrite_version(&binary, "7.8.9-rc.1");
        let Ok(again) = again else {
            panic!("rewrite: {again:?}")
        };
        assert_eq!(again.len(), binary.len());
        let at = MARKER.len() + 10;
        assert_eq!(parse_slot(&again[10..10 + SLOT_LEN]), Some("7.8.9-rc.1"));
        assert_eq!(again[at - 1], b'=');
        assert_eq!(
            rewrite_version(&binary, "not a version"),
            Err(RewriteError::Version("not a version".into()))
        );
        assert_eq!(
            rewrite_version(b"no slot here", "1.0.0"),
            Err(RewriteError::Slots(0))
        );
        let mut twice = binary.clone();
        twice.extend_from_slice(&slot());
        assert_eq!(
            rewrite_version(&twice, "1.0.0"),
            Err(RewriteError::Slots(2))
        );
    }
}
