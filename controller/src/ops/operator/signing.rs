//! A bundle file's header: read, add signatures, verify against a trust root.

use super::*;

/// Reads a bundle's header without verifying it (for signing and inspecting).
pub fn read_header(path: &Path) -> Result<RawHeader, OperatorError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    RawHeader::read_from(&mut io::BufReader::new(file)).map_err(|source| OperatorError::Bundle {
        path: path.to_owned(),
        source,
    })
}

/// Adds signatures to a bundle file in place (atomically): the manifest and the
/// payload are copied byte for byte; only the signature block changes.
pub fn sign_bundle(path: &Path, keys: &[SecretKey]) -> Result<RawHeader, OperatorError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let mut reader = io::BufReader::with_capacity(256 * 1024, file);
    let mut header = RawHeader::read_from(&mut reader).map_err(|source| OperatorError::Bundle {
        path: path.to_owned(),
        source,
    })?;
    header.decode_unverified().map_err(|e| {
        input_err(
            path.display().to_string(),
            format!("its manifest cannot be read: {e}"),
        )
    })?;
    for k in keys {
        header.sign(k);
    }
    let bytes = header.to_bytes();
    write_atomic(path, 0o644, |w| {
        w.write_all(&bytes)?;
        io::copy(&mut reader, w).map(|_| ())
    })?;
    Ok(header)
}

/// Verifies a bundle file completely (signatures, rules, every chunk and
/// artifact) against `trust` at `now`, in bounded memory. `expected` is the kind
/// the caller accepts; None takes the kind the manifest says (model bundle or
/// agent release) and checks it against that role's keys.
pub fn verify_bundle(
    path: &Path,
    trust: &TrustRoot,
    now: UnixTime,
    expected: Option<Role>,
) -> Result<VerifiedHeader, OperatorError> {
    let role = match expected {
        Some(role) => role,
        None => read_header(path)?
            .decode_unverified()
            .ok()
            .and_then(|m| m.role())
            .unwrap_or(Role::Models),
    };
    let file = fs::File::open(path).map_err(io_err(path))?;
    let policy = Policy {
        trust,
        role,
        now,
        limits: Limits::default(),
        installed: None,
        device: None,
    };
    verify_stream(
        io::BufReader::with_capacity(256 * 1024, file),
        &policy,
        &mut DiscardSink,
    )
    .map_err(|source| OperatorError::Bundle {
        path: path.to_owned(),
        source,
    })
}
