//! Who holds the client end of a Workload API connection.
//!
//! `unix:path` and `unix:sha256` describe the program the *connecting* process runs. A
//! connection is a file descriptor, though, and descriptors are inherited by children
//! and can be passed to other processes: a process can connect, fork a child that keeps
//! the socket, and exec a trusted program, after which the child's requests arrive on a
//! connection whose peer runs the trusted program. So binary selectors are granted only
//! on a connection that the peer holds and no other process does:
//!
//! 1. [`peer_inode`] asks the kernel (`NETLINK_SOCK_DIAG`, `UNIX_DIAG` with
//!    `UDIAG_SHOW_PEER`) for the inode of the socket at the other end of ours;
//! 2. [`holders`] scans the descriptor tables of every thread of every process in
//!    `/proc` for `socket:[<inode>]`. Every process, not only those of the peer's uid: a
//!    descriptor passed to another user's process is shared all the same. A table the
//!    agent may not read, of a process that runs with the peer's uid as any of its uids
//!    (real, effective, saved, filesystem; a non-dumpable process's directory is
//!    root-owned, its status is not), makes the answer [`Holders::Unknown`], which callers
//!    treat as shared (fail closed). Unreadable tables of other users' processes are
//!    skipped: code the peer controls does not run there, and an agent with the shipped
//!    privileges (`CAP_SYS_PTRACE`) can read every table an unprivileged user can make.
//!    For a root peer every unreadable table is skipped: root controls every process.
//!
//! Limits (see docs/workload-attestation.md): a descriptor in flight inside an
//! `SCM_RIGHTS` message sits in a socket buffer, in no process's table, so a scan cannot
//! see it; the scan is not atomic, so a descriptor moved between processes while it runs
//! can be missed; processes in a pid namespace the agent cannot see are not scanned.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{OFlag, readlinkat};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};
use nix::sys::stat::Mode;

/// `SOCK_DIAG_BY_FAMILY` from linux/sock_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR` from linux/netlink.h.
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// `UDIAG_SHOW_PEER` from linux/unix_diag.h.
const UDIAG_SHOW_PEER: u32 = 0x04;
/// `UNIX_DIAG_PEER` attribute type.
const UNIX_DIAG_PEER: u16 = 2;
/// Length of `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// Length of `struct unix_diag_msg`.
const UNIX_DIAG_MSG: usize = 16;

/// Past this many descriptors the scan gives up (and the answer is [`Holders::Unknown`]):
/// a bound on the work one request can cause.
pub const MAX_SCANNED_DESCRIPTORS: usize = 1_000_000;

/// The inode of the socket at the other end of `socket` (a connected Unix stream socket of
/// ours), as `NETLINK_SOCK_DIAG` reports it.
pub fn peer_inode(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let ino = std::fs::File::from(socket.try_clone_to_owned()?)
        .metadata()?
        .ino();
    peer_inode_of(ino)
}

/// The inode of the peer of the Unix socket with inode `ino` (in the agent's network
/// namespace).
pub fn peer_inode_of(ino: u64) -> io::Result<u64> {
    let ino32 = u32::try_from(ino)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket inode over 32 bits"))?;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    sendto(
        fd.as_raw_fd(),
        &request(ino32, 1),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = [0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    parse_reply(&buf[..n], ino32)
}

/// A `SOCK_DIAG_BY_FAMILY` request for the Unix socket `ino`, asking for its peer.
fn request(ino: u32, seq: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(NLMSG_HDR + 24);
    msg.extend_from_slice(&((NLMSG_HDR + 24) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct unix_diag_req
    msg.push(libc_af_unix());
    msg.push(0); // sdiag_protocol
    msg.extend_from_slice(&0u16.to_ne_bytes()); // pad
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: any
    msg.extend_from_slice(&ino.to_ne_bytes());
    msg.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    // udiag_cookie: INET_DIAG_NOCOOKIE, "do not check".
    msg.extend_from_slice(&u32::MAX.to_ne_bytes());
    msg.extend_from_slice(&u32::MAX.to_ne_bytes());
    msg
}

fn libc_af_unix() -> u8 {
    AddressFamily::Unix as i32 as u8
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed sock_diag reply: {what}"),
    )
}

/// The `UNIX_DIAG_PEER` attribute of the reply about `ino`.
fn parse_reply(reply: &[u8], ino: u32) -> io::Result<u64> {
    let len = u32_at(reply, 0).ok_or_else(|| malformed("short header"))? as usize;
    let kind = u16_at(reply, 4).ok_or_else(|| malformed("short header"))?;
    let msg = reply
        .get(..len)
        .filter(|m| m.len() >= NLMSG_HDR)
        .ok_or_else(|| malformed("length"))?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(msg, NLMSG_HDR).ok_or_else(|| malformed("short error"))? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(malformed("unexpected message type"));
    }
    let body = &msg[NLMSG_HDR..];
    if u32_at(body, 4) != Some(ino) {
        return Err(malformed("reply about another socket"));
    }
    let mut attrs = body.get(UNIX_DIAG_MSG..).unwrap_or_default();
    while attrs.len() >= 4 {
        let alen = u16_at(attrs, 0).unwrap_or(0) as usize;
        let atype = u16_at(attrs, 2).unwrap_or(0);
        if alen < 4 || alen > attrs.len() {
            return Err(malformed("attribute length"));
        }
        if atype == UNIX_DIAG_PEER {
            return u32_at(attrs, 4)
                .map(u64::from)
                .ok_or_else(|| malformed("short peer attribute"));
        }
        attrs = attrs.get(alen.next_multiple_of(4)..).unwrap_or_default();
    }
    Err(io::Error::new(
        io::ErrorKind::NotConnected,
        "the socket has no peer",
    ))
}

/// Who holds a socket, as far as the descriptor tables in `/proc` show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holders {
    /// Held by the peer process (any of its threads) and by no other process.
    OnlyPeer,
    /// Another process holds it too.
    Shared { pid: i32 },
    /// The peer process itself does not hold it (it passed it on or closed it).
    NotHeldByPeer,
    /// Some table could not be read, or there were too many to scan: nothing is proven.
    Unknown { reason: String },
}

/// Scans every thread's descriptor table under `proc_root` for `socket:[inode]`, the
/// client end of a connection whose peer process is `peer_pid`.
pub fn holders(proc_root: &Path, inode: u64, peer_pid: i32, peer_uid: u32) -> Holders {
    let target = format!("socket:[{inode}]");
    let mut scan = Scan {
        target: target.as_bytes(),
        peer_uid,
        scanned: 0,
    };
    // The peer first: a connection it does not hold is decided without the full scan.
    match scan.process(proc_root, peer_pid) {
        Ok(true) => {}
        Ok(false) => return Holders::NotHeldByPeer,
        Err(reason) => return Holders::Unknown { reason },
    }
    let entries = match std::fs::read_dir(proc_root) {
        Ok(entries) => entries,
        Err(e) => {
            return Holders::Unknown {
                reason: format!("listing {}: {e}", proc_root.display()),
            };
        }
    };
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let Some(pid) = pid_of(&entry.file_name()) else {
            continue;
        };
        if pid == peer_pid {
            continue;
        }
        match scan.process(proc_root, pid) {
            Ok(true) => return Holders::Shared { pid },
            Ok(false) => {}
            Err(reason) => return Holders::Unknown { reason },
        }
    }
    Holders::OnlyPeer
}

fn pid_of(name: &OsStr) -> Option<i32> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

struct Scan<'a> {
    target: &'a [u8],
    peer_uid: u32,
    scanned: usize,
}

/// Why a table could not be read.
enum Unreadable {
    /// Permissions: it matters only for a process the peer's user may control.
    Denied(String),
    /// Too much to scan: nothing is proven.
    TooMany(String),
}

impl Scan<'_> {
    /// Whether any thread of process `pid` holds the target. A process that exited
    /// meanwhile holds nothing.
    fn process(&mut self, proc_root: &Path, pid: i32) -> Result<bool, String> {
        let dir = proc_root.join(pid.to_string());
        match self.tables(&dir) {
            Ok(held) => Ok(held),
            Err(Unreadable::TooMany(reason)) => Err(reason),
            // Root can take any process's descriptors (and the agent's keys) anyway: for
            // a root peer an unreadable table proves nothing either way, and is skipped.
            Err(Unreadable::Denied(_)) if self.peer_uid == 0 => Ok(false),
            Err(Unreadable::Denied(reason)) => match runs_as(&dir, self.peer_uid) {
                Ok(false) => Ok(false),
                Ok(true) => Err(reason),
                Err(e) if is_gone(&e) => Ok(false),
                Err(e) => Err(format!("{reason}, and reading its status: {e}")),
            },
        }
    }

    fn tables(&mut self, dir: &Path) -> Result<bool, Unreadable> {
        let tasks = dir.join("task");
        let entries = match std::fs::read_dir(&tasks) {
            Ok(entries) => entries,
            Err(e) if is_gone(&e) => return Ok(false),
            Err(e) => {
                return Err(Unreadable::Denied(format!(
                    "listing {}: {e}",
                    tasks.display()
                )));
            }
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            if pid_of(&entry.file_name()).is_none() {
                continue;
            }
            if self.table(&entry.path().join("fd"))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the descriptor table at `fd_dir` holds the target.
    fn table(&mut self, fd_dir: &Path) -> Result<bool, Unreadable> {
        let mut dir = match Dir::open(
            fd_dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(dir) => dir,
            Err(Errno::ENOENT | Errno::ESRCH) => return Ok(false),
            Err(errno) => {
                return Err(Unreadable::Denied(format!(
                    "listing {}: {errno}",
                    fd_dir.display()
                )));
            }
        };
        let dir_fd: BorrowedFd<'_> = dir.as_fd();
        // `Dir::iter` borrows the Dir mutably; the fd stays valid for readlinkat.
        let dir_fd = dir_fd
            .try_clone_to_owned()
            .map_err(|e| Unreadable::Denied(e.to_string()))?;
        for entry in dir.iter() {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_bytes();
            if name.first() == Some(&b'.') {
                continue;
            }
            self.scanned += 1;
            if self.scanned > MAX_SCANNED_DESCRIPTORS {
                return Err(Unreadable::TooMany(format!(
                    "more than {MAX_SCANNED_DESCRIPTORS} open descriptors to scan"
                )));
            }
            match readlinkat(dir_fd.as_fd(), entry.file_name()) {
                Ok(link) if link.as_bytes() == self.target => return Ok(true),
                Ok(_) | Err(Errno::ENOENT | Errno::ESRCH) => {}
                Err(errno) => {
                    return Err(Unreadable::Denied(format!(
                        "reading {}: {errno}",
                        fd_dir.display()
                    )));
                }
            }
        }
        Ok(false)
    }
}

/// Whether the process at `dir` has `uid` as its real, effective, saved or filesystem uid
/// (`status` is readable even where the descriptor table is not).
fn runs_as(dir: &Path, uid: u32) -> io::Result<bool> {
    let status = std::fs::read_to_string(dir.join("status"))?;
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .ok_or_else(|| malformed("no Uid line in status"))?;
    Ok(uids
        .split_ascii_whitespace()
        .any(|id| id.parse::<u32>().ok() == Some(uid)))
}

fn is_gone(e: &io::Error) -> bool {
    crate::workload::process::is_gone(e)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::process::Command;

    use super::*;

    fn me() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn the_kernel_names_the_peer_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).expect("bind");
        let client = UnixStream::connect(&path).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let client_ino = client.as_fd().try_clone_to_owned().map(std::fs::File::from);
        let client_ino = client_ino.expect("dup").metadata().expect("stat").ino();
        assert_eq!(peer_inode(server.as_fd()).expect("diag"), client_ino);
        // A socket without a peer is an error, not a guess.
        drop(client);
        let err = peer_inode(listener.as_fd()).expect_err("listener has no peer");
        assert!(
            matches!(err.kind(), io::ErrorKind::NotConnected)
                || err.raw_os_error() == Some(Errno::ENOENT as i32),
            "{err:?}"
        );
    }

    #[test]
    fn a_socket_held_only_by_this_process_is_only_peer() {
        let (a, b) = UnixStream::pair().expect("pair");
        let peer = peer_inode(a.as_fd()).expect("diag");
        assert_eq!(
            holders(Path::new("/proc"), peer, me(), 65534),
            Holders::OnlyPeer
        );
        // Not held by the process we claim is the peer.
        let mut child = Command::new("sleep").arg("30").spawn().expect("spawn");
        let child_pid = child.id() as i32;
        assert_eq!(
            holders(Path::new("/proc"), peer, child_pid, 65534),
            Holders::NotHeldByPeer,
            "decided from the claimed peer's own table"
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
        drop(b);
    }

    #[test]
    fn an_inherited_socket_is_shared() {
        let (a, b) = UnixStream::pair().expect("pair");
        let peer = peer_inode(a.as_fd()).expect("diag");
        // The child inherits `b` (CLOEXEC cleared), as a forked child would.
        nix::fcntl::fcntl(
            &b,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .expect("clear cloexec");
        let mut child = Command::new("sleep").arg("30").spawn().expect("spawn");
        let child_pid = child.id() as i32;
        let seen = holders(Path::new("/proc"), peer, me(), 65534);
        child.kill().expect("kill");
        child.wait().expect("wait");
        // Usually the child; another test's child spawned meanwhile inherits `b` too.
        assert!(
            matches!(seen, Holders::Shared { pid } if pid != me()),
            "{seen:?} (child {child_pid})"
        );
    }

    /// A fake /proc: process 100 (the peer) holds socket 777; process 200 runs as uid
    /// 1000 with a table the agent cannot read.
    fn fake_proc() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tmp");
        let table = |pid: u32| root.path().join(format!("{pid}/task/{pid}/fd"));
        std::fs::create_dir_all(table(100)).expect("dir");
        std::os::unix::fs::symlink("socket:[777]", table(100).join("3")).expect("link");
        std::os::unix::fs::symlink("/dev/null", table(100).join("0")).expect("link");
        std::fs::create_dir_all(root.path().join("200/task/200")).expect("dir");
        std::fs::write(table(200), b"not a directory").expect("unreadable table");
        std::fs::write(
            root.path().join("200/status"),
            "Name:\tx\nUid:\t1000\t1000\t1000\t1000\n",
        )
        .expect("status");
        root
    }

    #[test]
    fn an_unreadable_table_of_the_peers_user_proves_nothing() {
        let root = fake_proc();
        let seen = holders(root.path(), 777, 100, 1000);
        assert!(
            matches!(&seen, Holders::Unknown { reason } if reason.contains("200/task/200/fd")),
            "{seen:?}"
        );
        // Another user's unreadable process cannot run the peer's code: skipped. For a
        // root peer, too (root controls every process anyway).
        assert_eq!(holders(root.path(), 777, 100, 2000), Holders::OnlyPeer);
        assert_eq!(holders(root.path(), 777, 100, 0), Holders::OnlyPeer);
        // A second holder anywhere makes it shared.
        let third = root.path().join("300/task/300/fd");
        std::fs::create_dir_all(&third).expect("dir");
        std::os::unix::fs::symlink("socket:[777]", third.join("9")).expect("link");
        assert_eq!(
            holders(root.path(), 777, 100, 2000),
            Holders::Shared { pid: 300 }
        );
        assert_eq!(
            holders(root.path(), 777, 300, 2000),
            Holders::Shared { pid: 100 }
        );
        assert_eq!(holders(root.path(), 778, 100, 2000), Holders::NotHeldByPeer);
    }

    #[test]
    fn replies_are_parsed_strictly() {
        let req = request(77, 1);
        assert_eq!(req.len(), 40);
        assert_eq!(u32_at(&req, 0), Some(40));
        assert_eq!(u32_at(&req, NLMSG_HDR + 8), Some(77));
        // A reply with a peer attribute.
        let mut reply = Vec::new();
        reply.extend_from_slice(&((NLMSG_HDR + UNIX_DIAG_MSG + 8) as u32).to_ne_bytes());
        reply.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        reply.extend_from_slice(&[0; 10]);
        reply.extend_from_slice(&[1, 1, 1, 0]);
        reply.extend_from_slice(&77u32.to_ne_bytes());
        reply.extend_from_slice(&[0; 8]);
        reply.extend_from_slice(&8u16.to_ne_bytes());
        reply.extend_from_slice(&UNIX_DIAG_PEER.to_ne_bytes());
        reply.extend_from_slice(&99u32.to_ne_bytes());
        assert_eq!(parse_reply(&reply, 77).expect("peer"), 99);
        assert!(parse_reply(&reply, 78).is_err(), "about another socket");
        assert!(parse_reply(&reply[..10], 77).is_err(), "truncated");
        // An error reply carries -errno.
        let mut err = Vec::new();
        err.extend_from_slice(&((NLMSG_HDR + 4) as u32).to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-(Errno::ENOENT as i32)).to_ne_bytes());
        assert_eq!(
            parse_reply(&err, 77).expect_err("error").raw_os_error(),
            Some(Errno::ENOENT as i32)
        );
    }
}
