//! Operator commands that create and check keys, trust roots and bundles. They run
//! on the operator's machine: signing keys never reach the controller. Keys and
//! trust roots in [`keys`], `bundle build` in [`build`], signing and verifying a
//! bundle file in [`signing`]; the error and file helpers they share here.
//!
//! Every file is written to a temporary file in the target directory, fsynced and
//! renamed, so a failed command leaves nothing half-written.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use edgefleet_agent::model::{HealthFailure, LoadedModel, ModelError, check_outputs};
use edgefleet_shared::bundle::{
    ArtifactInput, ArtifactSource, BundleError, DiscardSink, ManifestDraft, manifest_bytes,
    prepare_manifest, verify_stream, write_bundle,
};
use edgefleet_shared::golden::{GoldenCase, GoldenSet, Tensor, TensorData};
use edgefleet_shared::keys::KeyError;
use edgefleet_shared::manifest::{
    ArtifactKind, Constraints, Dim, ElementType, HealthPolicy, Manifest, TensorSpec,
};
use edgefleet_shared::reference::ReferenceStats;
use edgefleet_shared::trust::{Role, RoleKeys, TrustError};
use edgefleet_shared::{
    Arch, ArtifactName, Limits, ModelChannel, Policy, PublicKey, RawHeader, SecretKey,
    SignedTrustRoot, TrustRoot, UnixTime, VerifiedHeader,
};

/// Largest key file read.
const MAX_KEY_FILE: u64 = 16 * 1024;
/// Largest golden-cases JSON read.
const MAX_GOLDEN_JSON: u64 = 64 * 1024 * 1024;
/// Largest reference CSV read.
const MAX_REFERENCE_CSV: u64 = 512 * 1024 * 1024;
/// Most reference rows used.
const MAX_REFERENCE_ROWS: usize = 1_000_000;

/// Why an operator command failed. Each variant names the file or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file is larger than the command accepts.
    #[error("{path} is {size} bytes, over the limit of {limit} for this kind of file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        limit: u64,
    },
    /// A key file is not a key of the needed kind.
    #[error("{path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: KeyError,
    },
    /// A trust root is not acceptable.
    #[error("{path}: {source}")]
    Trust {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: TrustError,
    },
    /// A bundle is refused or unreadable.
    #[error("{path}: {source}")]
    Bundle {
        /// The file.
        path: PathBuf,
        /// The refusal.
        source: BundleError,
    },
    /// The model cannot be used on devices.
    #[error("{path}: {source}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: ModelError,
    },
    /// An input (argument, golden file, reference data) is wrong.
    #[error("{what}: {detail}")]
    Input {
        /// Which input.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OperatorError + '_ {
    move |source| OperatorError::Io {
        path: path.to_owned(),
        source,
    }
}

fn input_err(what: impl Into<String>, detail: impl Into<String>) -> OperatorError {
    OperatorError::Input {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Reads a whole file, refusing files over `limit` bytes before reading them.
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, OperatorError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    if size > limit {
        return Err(OperatorError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    let mut out = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(io_err(path))?;
    if out.len() as u64 > limit {
        return Err(OperatorError::TooLarge {
            path: path.to_owned(),
            size: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// Checks `manifest`'s rules (errors name `what`), signs it with `signers` and
/// writes the bundle file `out` with `inputs` as its payload, atomically.
pub fn write_signed(
    out: &Path,
    what: &str,
    manifest: &Manifest,
    inputs: &[ArtifactInput],
    signers: &[SecretKey],
) -> Result<RawHeader, OperatorError> {
    manifest
        .validate(Limits::default().max_artifact_size)
        .map_err(|e| input_err(what, e.to_string()))?;
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(manifest),
        signatures: vec![],
    };
    for key in signers {
        header.sign(key);
    }
    write_atomic(out, 0o644, |w| write_bundle(w, &header, inputs))?;
    Ok(header)
}

/// Writes `path` durably with permissions `mode` (`edgefleet_shared::durable`:
/// temporary file in the same directory, fsync, rename, fsync of the directory).
pub fn write_atomic(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), OperatorError> {
    edgefleet_shared::durable::write_with(path, mode, write).map_err(io_err(path))
}

pub mod agent_release;
pub mod build;
pub mod keys;
pub mod signing;

pub use agent_release::{AgentReleaseOptions, AgentReleaseReport, build_agent_release};
pub use build::{BuildOptions, BuildReport, build_bundle};
pub use keys::{
    KeyFile, distinct_publics, generate_key, load_key, load_secret_key, load_trust_file,
    load_trust_root, new_trust_root, new_trust_root_with_roles, save_trust_root,
};
pub use signing::{read_header, sign_bundle, verify_bundle};
