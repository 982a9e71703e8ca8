//! One durable write for every file edgefleet keeps (agent state, spool records,
//! download bitmaps, keys, certificates, bundles, configuration): the new
//! content goes to a temporary file beside the target, created with its final
//! mode, written, fsynced, renamed over the target, and then the directory is
//! fsynced, so after a crash or power loss the file is the old one or the new
//! one, and the rename itself is on disk when this returns. A failed write
//! removes its temporary file (a partial file on a full disk would hold the
//! space it lacks).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `bytes` durably, the file's mode `mode` (see the
/// module documentation).
pub fn write(path: &Path, mode: u32, bytes: &[u8]) -> io::Result<()> {
    write_with(path, mode, |w| w.write_all(bytes))
}

/// Replaces `path` durably with what `fill` writes (buffered), mode `mode`.
pub fn write_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let dir = parent(path);
    let tmp = temp_path(path);
    let written = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(256 * 1024, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        // The mode given to open() is narrowed by the umask; the file's own
        // mode is what was asked.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Fsyncs a directory, so that the names created, renamed or removed in it
/// are on disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `.<name>.tmp-<pid>-<n>` beside `path`: unique within and across processes;
/// a leftover of a killed process is recognisable by its prefix.
fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Whether `name` is a temporary file of [`write`] (for cleaning up after a
/// killed process).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_write_replaces_the_file_with_its_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write(&path, 0o600, b"one").expect("write");
        write(&path, 0o640, b"two").expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_its_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write(&path, 0o600, b"old").expect("write");
        let err = write_with(&path, 0o600, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .expect_err("fails");
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(fs::read(&path).expect("read"), b"old");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
        assert!(is_temp_name(
            &temp_path(&path)
                .file_name()
                .expect("name")
                .to_string_lossy()
        ));
    }
}
