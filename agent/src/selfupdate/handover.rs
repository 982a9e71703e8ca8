//! The file-system and process steps of an agent update (docs/agent-update.md):
//! the two binary slots and the link the supervisor starts, writing a new binary
//! into a slot, and probing it before anything depends on it. Each step is
//! durable on its own (temporary file, fsync, rename, fsync of the directory),
//! so a power cut leaves either the old or the new file, never a mix.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::BinarySlot;

/// Where the agent's binaries live on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The directory of `agent.a` and `agent.b`.
    pub binary_dir: PathBuf,
    /// The path the supervisor starts (the unit's ExecStart): a symbolic link to
    /// one slot, or, on a device flashed before agent releases, the binary itself.
    pub link: PathBuf,
}

impl Layout {
    /// The file of `slot`.
    pub fn slot_path(&self, slot: BinarySlot) -> PathBuf {
        self.binary_dir.join(slot.file_name())
    }

    /// The slot the binary at `exe` (this process's `/proc/self/exe`) is, if it
    /// is one of this layout's slots.
    pub fn slot_of(&self, exe: &Path) -> Option<BinarySlot> {
        let dir = std::fs::canonicalize(&self.binary_dir).ok()?;
        let exe = std::fs::canonicalize(exe).ok()?;
        if exe.parent()? != dir {
            return None;
        }
        BinarySlot::from_file_name(exe.file_name()?.to_str()?)
    }

    /// The slot the link names now (None: not a link into the binary directory).
    pub fn link_target(&self) -> Option<BinarySlot> {
        let target = std::fs::read_link(&self.link).ok()?;
        let target = if target.is_relative() {
            self.link.parent()?.join(target)
        } else {
            target
        };
        self.slot_of(&target)
    }

    /// Writes `slot` from `binary` (at most `max_len` bytes), executable, durably;
    /// what the slot held before is replaced only once the new file is whole.
    pub fn write_slot(
        &self,
        slot: BinarySlot,
        binary: &mut dyn Read,
        max_len: u64,
    ) -> io::Result<PathBuf> {
        std::fs::create_dir_all(&self.binary_dir)?;
        let path = self.slot_path(slot);
        edgefleet_shared::durable::write_with(&path, 0o755, |w| {
            let copied = io::copy(&mut binary.take(max_len + 1), w)?;
            if copied > max_len {
                return Err(io::Error::other(format!(
                    "the binary is over {max_len} bytes"
                )));
            }
            w.flush()
        })?;
        Ok(path)
    }

    /// Points the link at `slot` in one step: a new link beside it, renamed over
    /// it, then the directory synced. Whatever starts the link afterwards starts
    /// that slot; before the rename, the old target.
    pub fn switch_link(&self, slot: BinarySlot) -> io::Result<()> {
        let dir = self
            .link
            .parent()
            .ok_or_else(|| io::Error::other("the link has no directory"))?;
        let name = self
            .link
            .file_name()
            .ok_or_else(|| io::Error::other("the link has no file name"))?;
        let tmp = dir.join(format!(".{}.next", name.to_string_lossy()));
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::os::unix::fs::symlink(self.slot_path(slot), &tmp)?;
        std::fs::rename(&tmp, &self.link)?;
        edgefleet_shared::durable::sync_dir(dir)
    }

    /// A device flashed before agent releases runs a plain file at the link's
    /// path. Copies `exe` (the running binary) into slot A and points the link
    /// at it, so that the old binary has a slot to come back to. Returns A.
    pub fn adopt(&self, exe: &Path) -> io::Result<BinarySlot> {
        let mut file = std::fs::File::open(exe)?;
        let len = file.metadata()?.len();
        self.write_slot(BinarySlot::A, &mut file, len)?;
        self.switch_link(BinarySlot::A)?;
        Ok(BinarySlot::A)
    }
}

/// Why a new binary failed its probe. Nothing depends on it yet when this is
/// returned: the running agent goes on as before.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// It could not be started at all (wrong architecture, not executable).
    #[error("the new binary does not start: {0}")]
    Start(io::Error),
    /// It did not answer within the time allowed.
    #[error("the new binary did not answer `{step}` within {seconds} s")]
    Timeout {
        /// The probe step.
        step: &'static str,
        /// The time allowed.
        seconds: u64,
    },
    /// `--version` answered something else than the release's version.
    #[error("the new binary says it is {got:?}, the release says {expected}")]
    Version {
        /// The release's version.
        expected: String,
        /// What the binary printed.
        got: String,
    },
    /// `config check` refused the running configuration.
    #[error("the new binary refuses the current configuration: {0}")]
    Config(String),
}

/// Runs the new binary twice before it is trusted: `--version` must print
/// `edgefleet-agent <expected>` and `--config <config> config check` must accept
/// the configuration the agent runs with (an agent running on the defaults,
/// with no file, has none to check); each within `timeout`.
pub fn probe(
    binary: &Path,
    expected: &str,
    config: Option<&Path>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let out = run_bounded(Command::new(binary).arg("--version"), "--version", timeout)?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if said.strip_prefix("edgefleet-agent ") != Some(expected) {
        return Err(ProbeError::Version {
            expected: expected.to_owned(),
            got: said,
        });
    }
    let Some(config) = config else {
        return Ok(());
    };
    let mut check = Command::new(binary);
    check.arg("--config").arg(config).args(["config", "check"]);
    let out = run_bounded(&mut check, "config check", timeout)?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let text = if text.trim().is_empty() {
            String::from_utf8_lossy(&out.stdout)
        } else {
            text
        };
        return Err(ProbeError::Config(text.trim().chars().take(500).collect()));
    }
    Ok(())
}

/// What a running agent needs to hand the device over to a new binary of
/// itself ([`crate::daemon::DaemonSettings::self_update`]).
#[derive(Debug, Clone)]
pub struct HandOver {
    /// The slots and the link.
    pub layout: Layout,
    /// Seconds the new agent has to confirm.
    pub confirm_within_s: u32,
    /// The config file the agent runs with, for the probe's `config check`
    /// (none: the agent runs on the defaults).
    pub config: Option<PathBuf>,
    /// The local API's listening socket, passed to the new agent.
    pub listen_fd: Option<std::os::fd::RawFd>,
    /// Something restarts the agent when it exits (systemd, or
    /// `EDGEFLEET_SUPERVISED=1` from another supervisor), or the config says to
    /// update without (`self_update.unsupervised`).
    pub supervised: bool,
    /// The agent's arguments, given again to the new binary.
    pub args: Vec<std::ffi::OsString>,
}

/// Whether a supervisor restarts this process when it exits: systemd sets
/// `INVOCATION_ID` for every service it starts; another supervisor says so with
/// `EDGEFLEET_SUPERVISED=1` (docs/agent-update.md).
pub fn supervised(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    env("INVOCATION_ID").is_some_and(|v| !v.is_empty())
        || env(SUPERVISED_ENV).is_some_and(|v| v == "1")
}

/// The variable a supervisor other than systemd sets to say it restarts the agent.
pub const SUPERVISED_ENV: &str = "EDGEFLEET_SUPERVISED";

/// Why a new binary was not put in place.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// It failed its probe.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The bytes read back are not the release's binary.
    #[error("the binary read back has SHA-256 {got}, the release says {expected}")]
    Digest {
        /// The release's.
        expected: edgefleet_shared::Digest,
        /// The bytes'.
        got: edgefleet_shared::Digest,
    },
    /// A file operation failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A binary to put in place: `len` bytes at `offset` of a downloaded file,
/// whose SHA-256 must be `sha256`, reporting `version`.
#[derive(Debug)]
pub struct NewBinary<'a> {
    /// The file that holds it.
    pub source: &'a std::fs::File,
    /// Where it starts.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
    /// Its SHA-256, from the signed manifest.
    pub sha256: edgefleet_shared::Digest,
    /// The version it must report.
    pub version: &'a str,
}

/// Puts `new` into the slot the running agent (`exe`) is not on, checks its
/// bytes and probes it. A running binary outside the layout (a device flashed
/// before agent releases) is adopted into slot A first. Returns the running
/// slot and the path of the new binary; nothing depends on the new slot yet.
pub fn stage(
    layout: &Layout,
    exe: &Path,
    new: &NewBinary<'_>,
    config: Option<&Path>,
    timeout: Duration,
) -> Result<(BinarySlot, PathBuf), StageError> {
    use io::Seek as _;
    use sha2::Digest as _;
    let from = match layout.slot_of(exe) {
        Some(slot) => slot,
        None => layout.adopt(exe)?,
    };
    let mut file = new.source.try_clone()?;
    file.seek(io::SeekFrom::Start(new.offset))?;
    let mut reader = Hashing {
        inner: file.take(new.len),
        hasher: sha2::Sha256::new(),
    };
    let path = layout.write_slot(from.other(), &mut reader, new.len)?;
    let got = edgefleet_shared::Digest(reader.hasher.finalize().into());
    if got != new.sha256 {
        return Err(StageError::Digest {
            expected: new.sha256,
            got,
        });
    }
    probe(&path, new.version, config, timeout)?;
    Ok((from, path))
}

/// A reader that hashes what it reads.
struct Hashing<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Hands this process over to `binary` with the same arguments: the pending
/// `alarm(2)` of `deadline_s` seconds ends the new agent if it has not
/// confirmed by then, and the listening socket `listen_fd` stays open across
/// the exec (its number in [`LISTEN_FD_ENV`]). Returns only if the exec failed.
pub fn exec_new(
    binary: &Path,
    args: &[std::ffi::OsString],
    listen_fd: Option<std::os::fd::RawFd>,
    deadline_s: u32,
) -> io::Error {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(binary);
    cmd.args(args);
    match listen_fd {
        Some(fd) => {
            if let Err(e) = keep_open_across_exec(fd) {
                return e;
            }
            cmd.env(LISTEN_FD_ENV, fd.to_string());
        }
        None => {
            cmd.env_remove(LISTEN_FD_ENV);
        }
    }
    // SAFETY: alarm only arms this process's SIGALRM timer, which an exec keeps.
    #[allow(unsafe_code)]
    unsafe {
        libc::alarm(deadline_s);
    }
    let err = cmd.exec();
    // Still this binary: the deadline is off.
    // SAFETY: as above; alarm(0) cancels the timer.
    #[allow(unsafe_code)]
    unsafe {
        libc::alarm(0);
    }
    err
}

/// Clears `FD_CLOEXEC` on `fd`.
fn keep_open_across_exec(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number only reads and sets its flags; a
    // closed one fails with EBADF.
    #[allow(unsafe_code)]
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let set = unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Spawns `cmd`, trying again for up to 2 s while the kernel says the file is
/// busy: a file just written may still be open for writing in a child that
/// another thread forked meanwhile (until that child's exec closes it).
pub fn spawn_when_not_busy(cmd: &mut Command) -> io::Result<std::process::Child> {
    let started = Instant::now();
    loop {
        match cmd.spawn() {
            Err(e)
                if e.kind() == io::ErrorKind::ExecutableFileBusy
                    && started.elapsed() < Duration::from_secs(2) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Runs `cmd` with its output captured (at most 64 KiB kept); kills it after
/// `timeout`.
fn run_bounded(
    cmd: &mut Command,
    step: &'static str,
    timeout: Duration,
) -> Result<std::process::Output, ProbeError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LIB_BACKTRACE", "0");
    let mut child = spawn_when_not_busy(cmd).map_err(ProbeError::Start)?;
    let readers = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .map(|pipe| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(64 * 1024).read_to_end(&mut kept);
            }
            kept
        })
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait().map_err(ProbeError::Start)? {
            Some(status) => break status,
            None if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProbeError::Timeout {
                    step,
                    seconds: timeout.as_secs(),
                });
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let [stdout, stderr] = readers.map(|r| r.join().unwrap_or_default());
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// The environment variable that passes the local API's listening socket to
/// the agent an exec starts (docs/agent-update.md: the hand-over keeps the
/// socket, so requests wait in its backlog instead of being refused).
pub const LISTEN_FD_ENV: &str = "EDGEFLEET_LISTEN_FD";

/// The listening TCP socket an earlier agent passed in [`LISTEN_FD_ENV`], when
/// it is one: a descriptor of this process that is a listening stream socket on
/// a loopback address. Anything else is left alone (None), and the agent binds
/// as usual.
pub fn inherited_listener(value: Option<&str>) -> Option<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let fd: libc::c_int = value?.trim().parse().ok().filter(|fd| *fd > 2)?;
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`; on a
    // descriptor that is not a socket it fails and nothing is used.
    #[allow(unsafe_code)]
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &raw mut len,
        )
    } == 0;
    if !ok || listening == 0 {
        return None;
    }
    // SAFETY: the descriptor is open (getsockopt succeeded) and is a listening
    // socket nothing else in this process owns: it came through the exec.
    #[allow(unsafe_code)]
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    match listener.local_addr() {
        Ok(addr) if addr.ip().is_loopback() => Some(listener),
        _ => {
            // Not ours to close: give the descriptor back untouched.
            std::mem::forget(listener);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listening_loopback_socket_is_taken_over() {
        use std::os::fd::AsRawFd;
        assert!(inherited_listener(None).is_none());
        assert!(inherited_listener(Some("not a number")).is_none());
        assert!(
            inherited_listener(Some("1")).is_none(),
            "stdout is never taken"
        );
        let file = tempfile::tempfile().expect("file");
        assert!(inherited_listener(Some(&file.as_raw_fd().to_string())).is_none());
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(inherited_listener(Some(&a.as_raw_fd().to_string())).is_none());
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let fd = tcp.as_raw_fd();
        // The taken listener owns the descriptor from here: the original must
        // not close it too.
        std::mem::forget(tcp);
        let taken = inherited_listener(Some(&fd.to_string()));
        assert_eq!(taken.and_then(|l| l.local_addr().ok()), Some(addr));
    }
}
