//! Unpacking a verified bundle into a directory, all or nothing.
//!
//! Artifacts are written into a staging directory beside the target, each file
//! fsynced; only when the whole bundle verified is the staging directory renamed
//! into place (and its parent fsynced). On any failure the staging directory is
//! removed and the target is untouched.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::bundle::{
    ArtifactSink, BundleError, CheckedChunk, PayloadVerifier, Policy, VerifiedHeader, verify_stream,
};
use crate::ids::Digest;
use crate::manifest::{ArtifactEntry, Manifest};

/// File name of the manifest copy in an unpacked bundle directory.
pub const MANIFEST_FILE: &str = ".manifest.cbor";

/// Reads the manifest copy of an unpacked bundle directory.
pub fn read_manifest(dir: &Path) -> io::Result<crate::manifest::Manifest> {
    let bytes = fs::read(dir.join(MANIFEST_FILE))?;
    crate::cbor::from_slice("manifest", &bytes, crate::bundle::MAX_MANIFEST_LEN as usize)
        .map_err(io::Error::other)
}

/// Writes each artifact to `<dir>/<artifact name>`.
#[derive(Debug)]
pub struct DirSink {
    dir: PathBuf,
    current: Option<BufWriter<File>>,
}

impl DirSink {
    /// Writes into `dir`, which must exist.
    pub fn new(dir: impl Into<PathBuf>) -> DirSink {
        DirSink {
            dir: dir.into(),
            current: None,
        }
    }
}

impl ArtifactSink for DirSink {
    fn begin(&mut self, entry: &ArtifactEntry) -> io::Result<()> {
        // ArtifactName cannot contain a separator or be `.`/`..`.
        let file = File::create_new(self.dir.join(entry.name.as_str()))?;
        self.current = Some(BufWriter::with_capacity(64 * 1024, file));
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.current {
            Some(w) => w.write_all(bytes),
            None => Err(io::Error::other("artifact data before its start")),
        }
    }

    fn end(&mut self, _: &ArtifactEntry) -> io::Result<()> {
        if let Some(w) = self.current.take() {
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
        }
        Ok(())
    }
}

pub use crate::durable::sync_dir;

/// Verifies the bundle from `reader` and unpacks it into `target`, which must not
/// exist yet. Returns the verified header. `target` appears only complete.
pub fn unpack_to_dir<R: Read>(
    reader: R,
    policy: &Policy<'_>,
    target: &Path,
) -> Result<VerifiedHeader, BundleError> {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", target.display())))?;
    if target.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", target.display()),
        )
        .into());
    }
    let staging = parent.join(format!(
        ".{}.staging-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    let result = verify_stream(reader, policy, &mut DirSink::new(&staging));
    match result {
        Ok(header) => {
            seal(&staging, &header.manifest, target)?;
            Ok(header)
        }
        Err(e) => {
            // Best effort: the staging directory holds nothing anyone uses.
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// Moves a complete staging directory to `target`: the manifest copy written,
/// everything fsynced, then one rename (and the parent fsynced).
fn seal(staging: &Path, manifest: &Manifest, target: &Path) -> io::Result<()> {
    // The decoded manifest, for local reading only (the verified bytes were
    // checked by the caller). Artifact names cannot start with a dot: no clash.
    let mut f = File::create_new(staging.join(MANIFEST_FILE))?;
    f.write_all(&crate::cbor::to_vec(manifest))?;
    f.sync_all()?;
    sync_dir(staging)?;
    fs::rename(staging, target)?;
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// Unpacking while a bundle downloads: chunks that matched the signed table on
/// arrival are fed in payload order into a staging directory and each artifact is
/// hashed as it passes, so after the last chunk what is left is the header's
/// signature check, a digest compare and one rename ([`UnpackStream::finish`]).
/// The staging directory is removed when the stream is dropped unfinished.
#[derive(Debug)]
pub struct UnpackStream {
    digest: Digest,
    verifier: PayloadVerifier,
    sink: DirSink,
    staging: PathBuf,
}

impl UnpackStream {
    /// Starts unpacking the payload of `header` into `staging`, which is created
    /// (anything already there is removed first). `staging` must be on the same
    /// file system as the target given to [`UnpackStream::finish`].
    pub fn begin(header: &VerifiedHeader, staging: impl Into<PathBuf>) -> io::Result<UnpackStream> {
        let staging = staging.into();
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        fs::create_dir_all(&staging)?;
        Ok(UnpackStream {
            digest: header.digest,
            verifier: PayloadVerifier::new(Arc::new(header.manifest.clone())),
            sink: DirSink::new(&staging),
            staging,
        })
    }

    /// The chunk to feed next; the chunk count once every chunk was fed.
    pub fn next_chunk(&self) -> u32 {
        self.verifier.next_chunk()
    }

    /// Whether the whole payload was fed.
    pub fn complete(&self) -> bool {
        self.verifier.remaining() == 0
    }

    /// Feeds the next chunk (see [`PayloadVerifier::feed_chunk`]). After an error
    /// the stream is unusable: drop it.
    pub fn feed(&mut self, chunk: CheckedChunk<'_>) -> Result<(), BundleError> {
        self.verifier.feed_chunk(chunk, &mut self.sink)
    }

    /// The check after the last chunk: `header` (just verified again, for the
    /// signature and the rules as of now) must be the bundle this stream started
    /// with, and the whole payload must have been fed; then the staging directory
    /// becomes `target`, which must not exist yet.
    pub fn finish(mut self, header: &VerifiedHeader, target: &Path) -> Result<(), BundleError> {
        if header.digest != self.digest {
            return Err(io::Error::other(format!(
                "the download unpacked bundle {} but bundle {} is being installed",
                self.digest.short(),
                header.digest.short()
            ))
            .into());
        }
        self.verifier.finish()?;
        if target.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", target.display()),
            )
            .into());
        }
        seal(&self.staging, self.verifier.manifest(), target)?;
        self.staging = PathBuf::new();
        Ok(())
    }
}

impl Drop for UnpackStream {
    fn drop(&mut self) {
        if !self.staging.as_os_str().is_empty() {
            // Best effort: the staging directory holds nothing anyone uses.
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}
