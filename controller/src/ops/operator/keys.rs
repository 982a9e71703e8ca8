//! Signing keys (PKCS#8 files) and trust roots: generate, load, save.

use super::*;

/// A key file: secret keys can sign, public keys only be listed.
#[derive(Debug)]
pub enum KeyFile {
    /// A PKCS#8 secret key.
    Secret(SecretKey),
    /// An SPKI public key.
    Public(PublicKey),
}

impl KeyFile {
    /// The public half.
    pub fn public(&self) -> PublicKey {
        match self {
            KeyFile::Secret(k) => k.public(),
            KeyFile::Public(k) => *k,
        }
    }
}

/// Reads a key file (secret or public PEM).
pub fn load_key(path: &Path) -> Result<KeyFile, OperatorError> {
    let bytes = read_capped(path, MAX_KEY_FILE)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| input_err(path.display().to_string(), "is not a PEM text file"))?;
    let key_err = |source| OperatorError::Key {
        path: path.to_owned(),
        source,
    };
    if text.contains("PRIVATE KEY") {
        SecretKey::from_pem(&text)
            .map(KeyFile::Secret)
            .map_err(key_err)
    } else {
        PublicKey::from_pem(&text)
            .map(KeyFile::Public)
            .map_err(key_err)
    }
}

/// Reads a secret key file, with a clear error when given a public key.
pub fn load_secret_key(path: &Path) -> Result<SecretKey, OperatorError> {
    match load_key(path)? {
        KeyFile::Secret(k) => Ok(k),
        KeyFile::Public(_) => Err(input_err(
            path.display().to_string(),
            "is a public key; signing needs the secret key (the .key file)",
        )),
    }
}

/// Generates a key pair into `dir` as `<name>.key` (mode 0600) and `<name>.pub`.
/// Refuses to overwrite an existing key.
pub fn generate_key(
    dir: &Path,
    name: &str,
) -> Result<(PathBuf, PathBuf, SecretKey), OperatorError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(input_err(
            "--name",
            format!("{name:?} must be 1-64 letters, digits, '-' or '_'"),
        ));
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let secret_path = dir.join(format!("{name}.key"));
    let public_path = dir.join(format!("{name}.pub"));
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(input_err(
                p.display().to_string(),
                "already exists; refusing to overwrite a key",
            ));
        }
    }
    let key = SecretKey::generate().map_err(|source| OperatorError::Key {
        path: secret_path.clone(),
        source,
    })?;
    let pem = key.to_pem();
    write_atomic(&secret_path, 0o600, |w| w.write_all(pem.as_bytes()))?;
    let public = key.public().to_pem();
    write_atomic(&public_path, 0o644, |w| w.write_all(public.as_bytes()))?;
    Ok((secret_path, public_path, key))
}

/// Reads a trust root file (signatures not yet checked).
pub fn load_trust_file(path: &Path) -> Result<SignedTrustRoot, OperatorError> {
    let bytes = read_capped(path, edgefleet_shared::trust::MAX_TRUST_ROOT_LEN as u64)?;
    SignedTrustRoot::from_bytes(&bytes).map_err(|source| OperatorError::Trust {
        path: path.to_owned(),
        source,
    })
}

/// Reads and fully verifies a trust root at `now`.
pub fn load_trust_root(path: &Path, now: UnixTime) -> Result<TrustRoot, OperatorError> {
    load_trust_file(path)?
        .verify_self(now)
        .map_err(|source| OperatorError::Trust {
            path: path.to_owned(),
            source,
        })
}

/// Creates a trust root document listing `keys`, signed by the secret ones.
pub fn new_trust_root(
    keys: &[KeyFile],
    threshold: u16,
    version: u32,
    expires_at: UnixTime,
    extra_signers: &[SecretKey],
) -> Result<SignedTrustRoot, OperatorError> {
    new_trust_root_with_roles(keys, threshold, version, expires_at, None, extra_signers)
}

/// The public keys of `keys`, each once, in order.
pub fn distinct_publics(keys: &[KeyFile]) -> Vec<PublicKey> {
    let mut publics: Vec<PublicKey> = Vec::new();
    for k in keys {
        if !publics.contains(&k.public()) {
            publics.push(k.public());
        }
    }
    publics
}

/// [`new_trust_root`] with the keys that sign agent releases (their own role and
/// threshold; they do not sign the root).
pub fn new_trust_root_with_roles(
    keys: &[KeyFile],
    threshold: u16,
    version: u32,
    expires_at: UnixTime,
    agent_releases: Option<RoleKeys>,
    extra_signers: &[SecretKey],
) -> Result<SignedTrustRoot, OperatorError> {
    let mut doc = TrustRoot::new(version, expires_at, threshold, distinct_publics(keys));
    doc.agent_releases = agent_releases;
    doc.validate()
        .map_err(|e| input_err("trust root", e.to_string()))?;
    let mut signed = doc.to_unsigned();
    for k in keys {
        if let KeyFile::Secret(s) = k {
            signed.sign(s);
        }
    }
    for s in extra_signers {
        signed.sign(s);
    }
    Ok(signed)
}

/// Writes a trust root file.
pub fn save_trust_root(path: &Path, root: &SignedTrustRoot) -> Result<(), OperatorError> {
    let bytes = root.to_bytes();
    write_atomic(path, 0o644, |w| w.write_all(&bytes))
}
