//! The resumable download store: one directory per bundle under
//! `<data>/downloads/`, holding `bundle.part` (the header, then each chunk at
//! its offset), `chunks.bits` (the chunks on disk) and `offer.cbor` (the
//! command, written last: a directory without it is removed). The daemon
//! decides what to fetch; this module keeps the files.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use edgefleet_shared::bundle::{self, BundleError, CheckedChunk};
use edgefleet_shared::cbor;
use edgefleet_shared::manifest::Manifest;
use edgefleet_shared::protocol::InstallMode;
use edgefleet_shared::unpack::UnpackStream;
use edgefleet_shared::{ArtifactName, Digest, VerifiedHeader};
use serde::{Deserialize, Serialize};

use crate::chunks::ChunkTracker;
use crate::store::write_atomic;

/// Largest `offer.cbor` read back.
const MAX_OFFER_LEN: usize = 1_100_000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The install command a download carries out (`offer.cbor`).
pub(super) struct Offer {
    pub(super) command: u64,
    pub(super) mode: InstallMode,
    #[serde(with = "serde_bytes")]
    pub(super) header: Vec<u8>,
    /// For an agent release (`update_agent`): the one binary this device
    /// fetches. Only the chunks that hold it are asked for, and nothing is
    /// unpacked: the binary is read out of `bundle.part` at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) agent_binary: Option<ArtifactName>,
}

impl Offer {
    /// The offer of the download in `dir`; None when there is none or it does
    /// not decode (the directory is then removed).
    pub(super) fn read(dir: &Path) -> Option<Offer> {
        let bytes = fs::read(dir.join("offer.cbor")).ok()?;
        cbor::from_slice("download offer", &bytes, MAX_OFFER_LEN).ok()
    }
}

/// A file operation of the install that failed (reported as an internal failure).
#[derive(Debug, thiserror::Error)]
#[error("{doing} {}: {source}", path.display())]
pub struct DiskError {
    /// What was being done (`cannot create`, `cannot write`, ...).
    pub doing: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The OS error.
    pub source: io::Error,
}

fn io_detail(doing: &'static str, path: &Path, source: io::Error) -> DiskError {
    DiskError {
        doing,
        path: path.to_owned(),
        source,
    }
}

/// A bundle being downloaded: its file, the chunks on disk, the unpacking.
#[derive(Debug)]
pub(super) struct Download {
    pub(super) offer: Offer,
    pub(super) digest: Digest,
    pub(super) manifest: Manifest,
    pub(super) dir: PathBuf,
    pub(super) file: fs::File,
    pub(super) tracker: ChunkTracker,
    /// The payload unpacked so far (every chunk before its `next_chunk`); none
    /// for an agent release.
    pub(super) unpack: Option<UnpackStream>,
    pub(super) header_len: u64,
    /// Chunks below this index have been asked for.
    pub(super) requested_until: u32,
    pub(super) unsaved: u32,
    pub(super) last_chunk: Instant,
    pub(super) reported_tenth: u32,
    /// Chunk bytes received again though already on disk.
    pub(super) duplicate_bytes: u64,
    /// Chunk bytes read back from disk to be unpacked (out of order, or from
    /// before a restart).
    pub(super) read_back_bytes: u64,
    /// Chunks dropped because they did not match the table.
    pub(super) rejected: u32,
    /// Index of the chunk that failed last, and how many times in a row.
    pub(super) failing: Option<(u32, u32)>,
    /// Until then, only listen (see [`DaemonSettings::fetch_listen`]).
    pub(super) listen_until: Option<Instant>,
}

impl Download {
    /// A download with `tracker`'s chunks on disk and nothing asked for yet;
    /// nothing unpacked yet either. For an agent release, the tracker wants
    /// only the chunks of the offer's binary.
    pub(super) fn new(
        offer: Offer,
        verified: VerifiedHeader,
        dir: PathBuf,
        file: fs::File,
        tracker: ChunkTracker,
    ) -> io::Result<Download> {
        let (tracker, unpack) = match &offer.agent_binary {
            Some(name) => {
                let (start, end) = verified.manifest.artifact_range(name).ok_or_else(|| {
                    io::Error::other(format!("the release has no artifact {name}"))
                })?;
                let wanted = verified.manifest.payload.chunks_covering(start, end);
                (tracker.only(wanted), None)
            }
            None => (
                tracker,
                Some(UnpackStream::begin(&verified, dir.join("unpacking"))?),
            ),
        };
        Ok(Download {
            header_len: offer.header.len() as u64,
            offer,
            digest: verified.digest,
            manifest: verified.manifest,
            dir,
            file,
            tracker,
            unpack,
            requested_until: 0,
            unsaved: 0,
            last_chunk: Instant::now(),
            reported_tenth: 0,
            duplicate_bytes: 0,
            read_back_bytes: 0,
            rejected: 0,
            failing: None,
            listen_until: None,
        })
    }

    /// Unpacks in payload order: `arrived` (checked, and on disk) if it is the
    /// next chunk, then the chunks after it that are on disk, read back and checked
    /// again, until `budget` bytes were read back.
    pub(super) fn unpack_more(
        &mut self,
        arrived: Option<CheckedChunk<'_>>,
        budget: u64,
    ) -> Result<(), BundleError> {
        let Some(unpack) = self.unpack.as_mut() else {
            return Ok(());
        };
        if let Some(chunk) = arrived
            && chunk.index() == unpack.next_chunk()
        {
            unpack.feed(chunk)?;
        }
        let mut buf = Vec::new();
        let mut read = 0;
        while read < budget {
            let index = unpack.next_chunk();
            let Some((start, end)) = self.manifest.payload.chunk_range(index) else {
                break;
            };
            if !self.tracker.has(index) {
                break;
            }
            buf.resize((end - start) as usize, 0);
            self.file.read_exact_at(&mut buf, self.header_len + start)?;
            let checked =
                bundle::verify_chunk(&self.manifest.payload, index, &buf).map_err(|_| {
                    io::Error::other(format!(
                        "chunk {index} read back from {} no longer matches the signed table (changed on disk)",
                        self.dir.join("bundle.part").display()
                    ))
                })?;
            unpack.feed(checked)?;
            read += end - start;
            self.read_back_bytes += end - start;
        }
        Ok(())
    }

    /// Whether this is the download of an agent release.
    pub(super) fn is_agent(&self) -> bool {
        self.offer.agent_binary.is_some()
    }

    /// The agent binary's bytes in `bundle.part`: `(offset, length)`.
    pub(super) fn agent_binary_at(&self) -> Option<(u64, u64)> {
        let (start, end) = self
            .manifest
            .artifact_range(self.offer.agent_binary.as_ref()?)?;
        Some((self.header_len + start, end - start))
    }
}

impl Download {
    /// A new download in `dir` (emptied first): the part file at its full size
    /// with the header, an empty chunk bitmap, then the offer.
    pub(super) fn create(
        dir: PathBuf,
        offer: Offer,
        verified: VerifiedHeader,
    ) -> Result<Download, DiskError> {
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| io_detail("cannot clear", &dir, e))?;
        }
        fs::create_dir_all(&dir).map_err(|e| io_detail("cannot create", &dir, e))?;
        let header_len = offer.header.len() as u64;
        let part = dir.join("bundle.part");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(|e| io_detail("cannot create", &part, e))?;
        file.write_all_at(&offer.header, 0)
            .and_then(|()| file.set_len(header_len + verified.manifest.payload.size))
            .and_then(|()| file.sync_all())
            .map_err(|e| io_detail("cannot write", &part, e))?;
        let tracker = ChunkTracker::new(verified.manifest.payload.chunks.len() as u32);
        write_atomic(&dir.join("chunks.bits"), tracker.to_bytes())
            .map_err(|e| io_detail("cannot write", &dir, e))?;
        // The offer is written last: a download directory without it is removed.
        write_atomic(&dir.join("offer.cbor"), &cbor::to_vec(&offer))
            .map_err(|e| io_detail("cannot write", &dir, e))?;
        Download::new(offer, verified, dir.clone(), file, tracker)
            .map_err(|e| io_detail("cannot start unpacking in", &dir, e))
    }

    /// The download in `dir` after a restart, with the chunks already on disk
    /// (`verified`: its header, checked again). None when its files do not
    /// match the header; what was unpacked before is unpacked again.
    pub(super) fn reopen(dir: &Path, offer: Offer, verified: VerifiedHeader) -> Option<Download> {
        let total = verified.manifest.payload.chunks.len() as u32;
        let bits = fs::read(dir.join("chunks.bits")).ok()?;
        let tracker = ChunkTracker::from_bytes(total, &bits).ok()?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("bundle.part"))
            .ok()?;
        let expected_len = offer.header.len() as u64 + verified.manifest.payload.size;
        if file.metadata().ok()?.len() != expected_len {
            return None;
        }
        Download::new(offer, verified, dir.to_owned(), file, tracker).ok()
    }
}
