//! The process behind a Workload API connection, pinned by a pidfd.
//!
//! A pid is only a number: the process that connected can exit and another one, even one
//! of the same user running a trusted binary, can be given the same pid (the kernel
//! recycles pids; ~32k forks wrap them around in seconds). A pidfd is a handle on one
//! process that never refers to another one. The agent takes it at accept time:
//!
//! - `SO_PEERPIDFD` (Linux 6.5 and later) gives a pidfd of the very process that called
//!   `connect`, so nothing can come in between;
//! - on older kernels it falls back to `pidfd_open` on the `SO_PEERCRED` pid, which pins
//!   whatever process has that pid at accept time. A pid recycled between `connect` and
//!   `accept` is not caught there, only a later one (and a change of user, since the
//!   credentials must match). [`pidfd_support`] tells which one this kernel gives.
//!
//! Every attestation reads `/proc/<pid>` through one directory handle ([`ProcDir`]) and
//! afterwards [`Process::confirm`]s that the pidfd's process is still alive and that the
//! directory belongs to it (same start time): two live processes never share a pid, so
//! the directory read was that process's own.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::Mode;

use crate::workload::unix::AttestError;

/// The credentials of a Workload API caller as the kernel reports them for the socket
/// (`SO_PEERCRED`, recorded at `connect`). Never built from anything the caller says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Where the pidfd of a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PidfdSource {
    /// `SO_PEERPIDFD`: the process that connected, whatever happened to its pid since.
    Peer,
    /// `pidfd_open` on the `SO_PEERCRED` pid (kernels before 6.5, or a process that is
    /// not a socket peer, such as `debug-selectors --pid`).
    Opened,
}

impl std::fmt::Display for PidfdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PidfdSource::Peer => "SO_PEERPIDFD",
            PidfdSource::Opened => "pidfd_open on the SO_PEERCRED pid",
        })
    }
}

/// The `SO_PEERCRED` credentials of a connected Unix socket's peer.
pub fn peer_credentials(socket: BorrowedFd<'_>) -> Result<PeerCredentials, AttestError> {
    let cred =
        getsockopt(&socket, sockopt::PeerCredentials).map_err(|errno| AttestError::Socket {
            what: "SO_PEERCRED",
            source: errno.into(),
        })?;
    Ok(PeerCredentials {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

/// Which pidfd source this kernel offers for socket peers: probed once on a socket pair.
pub fn pidfd_support() -> PidfdSource {
    let pair = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    );
    match pair {
        Ok((a, _b)) if getsockopt(&a, sockopt::PeerPidfd).is_ok() => PidfdSource::Peer,
        _ => PidfdSource::Opened,
    }
}

/// A file's identity: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// A process pinned by a pidfd, with the credentials it connected with (or, for a
/// process named by pid, that it ran with when it was opened).
#[derive(Debug)]
pub struct Process {
    creds: PeerCredentials,
    pidfd: OwnedFd,
    source: PidfdSource,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot at which it was forked.
    start_time: u64,
    /// The executable it ran when the agent first looked (at accept time); a different
    /// one later means it executed another program after connecting.
    first_exe: Option<FileId>,
    proc_root: PathBuf,
}

impl Process {
    /// The peer of an accepted Unix socket: its `SO_PEERCRED` credentials and a pidfd
    /// (`SO_PEERPIDFD`, else `pidfd_open` on the pid), its start time and executable.
    pub fn of_socket(socket: BorrowedFd<'_>, proc_root: &Path) -> Result<Self, AttestError> {
        Self::of_peer(peer_credentials(socket)?, socket, proc_root)
    }

    /// Like [`of_socket`](Self::of_socket), with the credentials already read.
    pub fn of_peer(
        creds: PeerCredentials,
        socket: BorrowedFd<'_>,
        proc_root: &Path,
    ) -> Result<Self, AttestError> {
        if creds.pid <= 0 {
            return Err(AttestError::InvalidPid { pid: creds.pid });
        }
        match getsockopt(&socket, sockopt::PeerPidfd) {
            Ok(pidfd) => Self::pin(creds, pidfd, PidfdSource::Peer, proc_root),
            Err(Errno::ENOPROTOOPT | Errno::EINVAL) => Self::open_pid(creds, proc_root),
            // The peer already exited.
            Err(Errno::ESRCH) => Err(AttestError::Replaced { pid: creds.pid }),
            Err(errno) => Err(AttestError::Socket {
                what: "SO_PEERPIDFD",
                source: errno.into(),
            }),
        }
    }

    /// A process named by its pid (not a socket peer): pinned with `pidfd_open`, its
    /// credentials read from `/proc/<pid>/status` through the same handle.
    pub fn by_pid(pid: i32, proc_root: &Path) -> Result<Self, AttestError> {
        if pid <= 0 {
            return Err(AttestError::InvalidPid { pid });
        }
        let pidfd = pidfd_open(pid)?;
        let dir = ProcDir::open(proc_root, pid)?;
        let status = dir.status()?;
        let creds = PeerCredentials {
            pid,
            uid: status.euid,
            gid: status.egid,
        };
        Self::pin_with(creds, pidfd, PidfdSource::Opened, proc_root, &dir)
    }

    /// Pins the socket peer `creds` with `pidfd_open` on its pid.
    fn open_pid(creds: PeerCredentials, proc_root: &Path) -> Result<Self, AttestError> {
        let pidfd = pidfd_open(creds.pid)?;
        Self::pin(creds, pidfd, PidfdSource::Opened, proc_root)
    }

    /// Builds a process from a pidfd of `creds.pid` (in tests: of any live process, with a
    /// fake `/proc` under `proc_root`).
    pub fn pin(
        creds: PeerCredentials,
        pidfd: OwnedFd,
        source: PidfdSource,
        proc_root: &Path,
    ) -> Result<Self, AttestError> {
        let dir = ProcDir::open(proc_root, creds.pid)?;
        Self::pin_with(creds, pidfd, source, proc_root, &dir)
    }

    fn pin_with(
        creds: PeerCredentials,
        pidfd: OwnedFd,
        source: PidfdSource,
        proc_root: &Path,
        dir: &ProcDir,
    ) -> Result<Self, AttestError> {
        let start_time = dir.start_time()?;
        // Best effort: a process whose executable the agent may not inspect simply gets
        // no binary selectors later.
        let first_exe = dir.exe_id().ok();
        let process = Process {
            creds,
            pidfd,
            source,
            start_time,
            first_exe,
            proc_root: proc_root.to_path_buf(),
        };
        process.confirm(dir)?;
        Ok(process)
    }

    pub fn creds(&self) -> PeerCredentials {
        self.creds
    }

    pub fn pid(&self) -> i32 {
        self.creds.pid
    }

    pub fn source(&self) -> PidfdSource {
        self.source
    }

    /// The executable it ran when it was pinned.
    pub fn first_exe(&self) -> Option<FileId> {
        self.first_exe
    }

    /// The pidfd: readable once the process has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// Opens `/proc/<pid>` for one attestation.
    pub(crate) fn dir(&self) -> Result<ProcDir, AttestError> {
        ProcDir::open(&self.proc_root, self.creds.pid).map_err(|e| match e {
            AttestError::ProcessGone { pid } => AttestError::Replaced { pid },
            other => other,
        })
    }

    /// Whether the process has exited (its pidfd polls readable).
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => false,
            Ok(_) => true,
            // A pidfd that cannot be polled proves nothing: treat it as gone.
            Err(_) => true,
        }
    }

    /// Confirms, after reading through `dir`, that the pidfd's process is still alive and
    /// that `dir` is its directory: else [`AttestError::Replaced`].
    pub(crate) fn confirm(&self, dir: &ProcDir) -> Result<(), AttestError> {
        let replaced = AttestError::Replaced {
            pid: self.creds.pid,
        };
        let start_time = match dir.start_time() {
            Ok(t) => t,
            Err(AttestError::ProcessGone { .. }) => return Err(replaced),
            Err(e) => return Err(e),
        };
        if start_time != self.start_time || self.has_exited() {
            return Err(replaced);
        }
        Ok(())
    }
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, AttestError> {
    let raw = rustix::process::Pid::from_raw(pid).ok_or(AttestError::InvalidPid { pid })?;
    rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).map_err(|errno| {
        if errno == rustix::io::Errno::SRCH {
            AttestError::Replaced { pid }
        } else {
            AttestError::Socket {
                what: "pidfd_open",
                source: errno.into(),
            }
        }
    })
}

/// An open handle on `/proc/<pid>`. Files opened relative to it belong to that process even
/// if the pid is reused: once the process is gone they fail with `ENOENT` or `ESRCH`.
pub(crate) struct ProcDir {
    pub(crate) pid: i32,
    path: PathBuf,
    dir: File,
}

impl ProcDir {
    pub(crate) fn open(proc_root: &Path, pid: i32) -> Result<Self, AttestError> {
        if pid <= 0 {
            return Err(AttestError::InvalidPid { pid });
        }
        let path = proc_root.join(pid.to_string());
        match File::open(&path) {
            Ok(dir) => Ok(Self { pid, path, dir }),
            Err(e) if is_gone(&e) => Err(AttestError::ProcessGone { pid }),
            Err(source) => Err(AttestError::Proc { pid, path, source }),
        }
    }

    pub(crate) fn error(&self, name: &str, source: io::Error) -> AttestError {
        if is_gone(&source) {
            AttestError::ProcessGone { pid: self.pid }
        } else {
            AttestError::Proc {
                pid: self.pid,
                path: self.path.join(name),
                source,
            }
        }
    }

    pub(crate) fn parse_error(&self, name: &str, reason: &'static str) -> AttestError {
        AttestError::Parse {
            pid: self.pid,
            path: self.path.join(name),
            reason,
        }
    }

    pub(crate) fn open_file(&self, name: &str) -> Result<File, AttestError> {
        openat(
            self.dir.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(|errno| self.error(name, errno.into()))
    }

    /// Reads a whole `/proc` file with plain `read`s (`read_to_end` would first `statx` and
    /// `lseek` for a size hint procfs does not have; this runs on every connection).
    pub(crate) fn read(&self, name: &str) -> Result<Vec<u8>, AttestError> {
        let mut file = self.open_file(name)?;
        let mut bytes = vec![0; 4096];
        let mut len = 0;
        loop {
            if len == bytes.len() {
                bytes.resize(len * 2, 0);
            }
            match file.read(&mut bytes[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.error(name, e)),
            }
        }
        bytes.truncate(len);
        Ok(bytes)
    }

    pub(crate) fn status(&self) -> Result<Status, AttestError> {
        let status = self.read("status")?;
        parse_status(&status).map_err(|reason| self.parse_error("status", reason))
    }

    pub(crate) fn start_time(&self) -> Result<u64, AttestError> {
        let stat = self.read("stat")?;
        parse_start_time(&stat).map_err(|reason| self.parse_error("stat", reason))
    }

    pub(crate) fn exe_link(&self) -> Result<OsString, AttestError> {
        readlinkat(self.dir.as_fd(), "exe").map_err(|errno| self.error("exe", errno.into()))
    }

    /// Device and inode of the executable (`stat` through the `exe` magic link).
    pub(crate) fn exe_id(&self) -> Result<FileId, AttestError> {
        let file = self.open_file("exe")?;
        let meta = file.metadata().map_err(|e| self.error("exe", e))?;
        Ok(FileId::of(&meta))
    }
}

/// Whether an error reading `/proc/<pid>` means the process is gone.
pub(crate) fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == Errno::ENOENT as i32 || code == Errno::ESRCH as i32)
}

/// The parts of `/proc/<pid>/status` the attestor uses.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) euid: u32,
    pub(crate) egid: u32,
    pub(crate) groups: Vec<u32>,
}

pub(crate) fn parse_status(status: &[u8]) -> Result<Status, &'static str> {
    let (mut euid, mut egid, mut groups) = (None, None, None);
    for line in status.split(|&b| b == b'\n') {
        if let Some(ids) = line.strip_prefix(b"Uid:") {
            euid = Some(effective_id(ids).ok_or("malformed Uid line")?);
        } else if let Some(ids) = line.strip_prefix(b"Gid:") {
            egid = Some(effective_id(ids).ok_or("malformed Gid line")?);
        } else if let Some(ids) = line.strip_prefix(b"Groups:") {
            let ids = std::str::from_utf8(ids).map_err(|_| "malformed Groups line")?;
            let ids = ids
                .split_ascii_whitespace()
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .map_err(|_| "malformed Groups line")?;
            groups = Some(ids);
        }
    }
    Ok(Status {
        euid: euid.ok_or("no Uid line")?,
        egid: egid.ok_or("no Gid line")?,
        groups: groups.ok_or("no Groups line")?,
    })
}

/// The effective id (second of real, effective, saved, filesystem) of a `Uid:`/`Gid:` line.
fn effective_id(ids: &[u8]) -> Option<u32> {
    std::str::from_utf8(ids)
        .ok()?
        .split_ascii_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields are counted
/// from the last `)`.
pub(crate) fn parse_start_time(stat: &[u8]) -> Result<u64, &'static str> {
    let close = stat
        .iter()
        .rposition(|&b| b == b')')
        .ok_or("no command name")?;
    let rest = std::str::from_utf8(&stat[close + 1..]).map_err(|_| "not UTF-8 after the name")?;
    // Fields after the name start at 3 (state); starttime is field 22.
    rest.split_ascii_whitespace()
        .nth(22 - 3)
        .ok_or("too few fields")?
        .parse()
        .map_err(|_| "malformed starttime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_names() {
        let stat = b"4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        assert_eq!(parse_start_time(stat), Ok(987654));
        assert_eq!(parse_start_time(b"1 (x) S 1 2"), Err("too few fields"));
        assert_eq!(parse_start_time(b"no name"), Err("no command name"));
    }

    #[test]
    fn status_parser_reads_effective_ids_and_groups() {
        let status = b"Name:\tx\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nFDSize:\t64\nGroups:\t4 24 27 \nNStgid:\t1\n";
        assert_eq!(
            parse_status(status),
            Ok(Status {
                euid: 2,
                egid: 6,
                groups: vec![4, 24, 27]
            })
        );
        assert_eq!(
            parse_status(b"Uid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t\n").map(|s| s.groups),
            Ok(Vec::<u32>::new())
        );
        assert_eq!(
            parse_status(b"Uid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\n"),
            Err("no Groups line")
        );
        assert_eq!(
            parse_status(b"Uid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t1 x\n"),
            Err("malformed Groups line")
        );
    }

    #[test]
    fn the_socket_peer_is_pinned_with_its_own_pidfd() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let process = Process::of_socket(a.as_fd(), Path::new("/proc")).expect("peer");
        assert_eq!(process.pid(), std::process::id() as i32);
        assert_eq!(process.source(), pidfd_support());
        assert!(!process.has_exited());
        assert!(process.first_exe().is_some());
        let dir = process.dir().expect("dir");
        process.confirm(&dir).expect("still the same process");
        drop(b);
    }

    #[test]
    fn an_exited_process_is_replaced() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid = child.id() as i32;
        let process = Process::by_pid(pid, Path::new("/proc")).expect("pinned");
        assert_eq!(process.source(), PidfdSource::Opened);
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(process.has_exited());
        let err = process
            .dir()
            .and_then(|dir| process.confirm(&dir))
            .expect_err("gone");
        assert!(
            matches!(err, AttestError::Replaced { pid: p } if p == pid),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("process {pid}: the calling process exited or was replaced during attestation")
        );
    }
}
