//! The Unix workload attestor: peer credentials and `/proc` in, `unix:*` selectors out.
//!
//! The agent takes the pid, uid and gid of a Workload API caller from the socket
//! (`SO_PEERCRED`, so the kernel vouches for them) and hands them to
//! [`UnixAttestor::attest`], which returns the selectors exactly as SPIRE's unix attestor
//! writes them:
//!
//! | selector                             | source                                          |
//! |--------------------------------------|-------------------------------------------------|
//! | `unix:uid:<uid>`                     | peer credentials                                |
//! | `unix:user:<name>`                   | passwd entry of the uid, if any                 |
//! | `unix:gid:<gid>`                     | peer credentials                                |
//! | `unix:group:<name>`                  | group entry of the gid, if any                  |
//! | `unix:supplementary_gid:<gid>`       | `Groups:` line of `/proc/<pid>/status`          |
//! | `unix:supplementary_group:<name>`    | group entry of each supplementary gid, if any   |
//! | `unix:path:<path>`                   | `readlink /proc/<pid>/exe`                      |
//! | `unix:sha256:<hex>`                  | SHA-256 of the file opened via `/proc/<pid>/exe` |
//!
//! Path and digest are omitted when the executable was deleted (the kernel shows its link as
//! `... (deleted)`), and the digest alone when the executable is larger than
//! [`UnixAttestorConfig::max_hash_bytes`]. A value that is not a valid selector (say a path longer
//! than 1024 bytes) is omitted too: no entry could require it. The digest is computed from the file the process
//! actually runs (opened through the `exe` magic link), so replacing the file at the path cannot
//! fool it.
//!
//! Pid reuse: everything is read through one open handle on `/proc/<pid>`, which the kernel ties
//! to that very process (once it exits, reads through the handle fail even if the pid is reused),
//! and the executable link is read again after everything else, so a process that exited or
//! executed another program meanwhile is reported as [`AttestError::ProcessGone`] or
//! [`AttestError::ProcessChanged`]. The effective uid and gid in
//! `/proc/<pid>/status` must still be the ones the peer connected with
//! ([`AttestError::CredentialsChanged`]), which also catches a pid recycled by another user's
//! process before attestation started.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lanyard_proto::Selector;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Group, Uid, User};
use tracing::debug;

/// The selector type every selector of this attestor carries.
pub const SELECTOR_KIND: &str = "unix";

/// Default for [`UnixAttestorConfig::max_hash_bytes`]: 128 MiB.
pub const DEFAULT_MAX_HASH_BYTES: u64 = 128 * 1024 * 1024;

/// How many executable digests are remembered.
const HASH_CACHE_CAPACITY: usize = 1024;
/// How long a uid/gid to name resolution (or its absence) is trusted.
const NAME_CACHE_TTL: Duration = Duration::from_secs(30);
/// How many uid (and, separately, gid) names are remembered.
const NAME_CACHE_CAPACITY: usize = 4096;
/// What the kernel appends to the `exe` link of a process whose executable was unlinked.
const DELETED_SUFFIX: &[u8] = b" (deleted)";
/// Read buffer for hashing executables.
const HASH_BUFFER_BYTES: usize = 64 * 1024;

/// The credentials of a Workload API caller as the kernel reports them for the socket
/// (`SO_PEERCRED`). Never built from anything the caller says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Settings of the [`UnixAttestor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixAttestorConfig {
    /// Executables larger than this get no `unix:sha256` selector (hashing them on every new
    /// binary would cost too much); their `unix:path` selector is still produced.
    pub max_hash_bytes: u64,
    /// Where procfs is mounted; `/proc` except in tests.
    pub proc_root: PathBuf,
}

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            max_hash_bytes: DEFAULT_MAX_HASH_BYTES,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// Why a process could not be attested. Every variant names the process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The socket reported a pid that cannot name a process here; the kernel reports 0 for a
    /// peer in a pid namespace the agent cannot see.
    #[error(
        "peer pid {pid} does not name a process visible to the agent (is the workload in another pid namespace?)"
    )]
    InvalidPid { pid: i32 },
    /// The process exited before (or while) it was attested.
    #[error("process {pid} exited before it could be attested")]
    ProcessGone { pid: i32 },
    /// The process changed while it was being attested: its pid now belongs to another process,
    /// or it executed another program.
    #[error(
        "process {pid} changed while it was being attested (its pid was reused or it executed another program)"
    )]
    ProcessChanged { pid: i32 },
    /// The process no longer runs with the effective uid/gid it connected with.
    #[error(
        "process {pid} now runs as uid {proc_uid} gid {proc_gid}, not as uid {peer_uid} gid {peer_gid} it connected with"
    )]
    CredentialsChanged {
        pid: i32,
        peer_uid: u32,
        peer_gid: u32,
        proc_uid: u32,
        proc_gid: u32,
    },
    /// The executable file was modified while it was being hashed.
    #[error("the executable of process {pid} changed while it was being hashed")]
    ExecutableChanged { pid: i32 },
    /// A file under `/proc/<pid>` could not be read for a reason other than the process exiting
    /// (typically permissions: the agent may not inspect another user's process).
    #[error("reading {}: {source}", .path.display())]
    Proc {
        pid: i32,
        path: PathBuf,
        source: io::Error,
    },
    /// A file under `/proc/<pid>` did not have the expected format.
    #[error("parsing {}: {reason}", .path.display())]
    Parse {
        pid: i32,
        path: PathBuf,
        reason: &'static str,
    },
}

/// The Unix workload attestor. Cheap to share behind an `Arc`; `attest` is synchronous and
/// blocking (it reads `/proc` and may hash an executable), so call it from `spawn_blocking`.
pub struct UnixAttestor {
    config: UnixAttestorConfig,
    hashes: Mutex<HashCache>,
    users: Mutex<NameCache>,
    groups: Mutex<NameCache>,
    #[cfg(test)]
    stats: TestStats,
}

impl fmt::Debug for UnixAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixAttestor")
            .field("config", &self.config)
            .field("cached_digests", &self.cache_len())
            .finish_non_exhaustive()
    }
}

impl UnixAttestor {
    pub fn new(config: UnixAttestorConfig) -> Self {
        Self {
            config,
            hashes: Mutex::new(HashCache::new(HASH_CACHE_CAPACITY)),
            users: Mutex::new(NameCache::default()),
            groups: Mutex::new(NameCache::default()),
            #[cfg(test)]
            stats: TestStats::default(),
        }
    }

    pub fn config(&self) -> &UnixAttestorConfig {
        &self.config
    }

    /// How many executable digests are cached.
    pub fn cache_len(&self) -> usize {
        lock(&self.hashes).entries.len()
    }

    /// The sorted `unix:*` selectors of the process behind `peer`. May read and hash
    /// the whole executable: call it where blocking is fine.
    pub fn attest(&self, peer: &PeerCredentials) -> Result<Vec<Selector>, AttestError> {
        match self.attest_inner(peer, true)? {
            Some(selectors) => Ok(selectors),
            None => Err(AttestError::ExecutableChanged { pid: peer.pid }),
        }
    }

    /// Like [`attest`](Self::attest), but only if the executable's digest is already
    /// cached: `Ok(None)` means it would have to be hashed. This path only reads small
    /// /proc files, so the Workload API runs it inline and keeps `attest` on a blocking
    /// thread for executables it has not seen.
    pub fn attest_cached(
        &self,
        peer: &PeerCredentials,
    ) -> Result<Option<Vec<Selector>>, AttestError> {
        self.attest_inner(peer, false)
    }

    fn attest_inner(
        &self,
        peer: &PeerCredentials,
        may_hash: bool,
    ) -> Result<Option<Vec<Selector>>, AttestError> {
        let pid = peer.pid;
        if pid <= 0 {
            return Err(AttestError::InvalidPid { pid });
        }
        let process = ProcDir::open(&self.config, pid)?;

        let status = process.status()?;
        if status.euid != peer.uid || status.egid != peer.gid {
            return Err(AttestError::CredentialsChanged {
                pid,
                peer_uid: peer.uid,
                peer_gid: peer.gid,
                proc_uid: status.euid,
                proc_gid: status.egid,
            });
        }
        let Some(exe) = self.executable(&process, may_hash)? else {
            return Ok(None);
        };

        let mut values = Vec::with_capacity(6 + 2 * status.groups.len());
        values.push(format!("uid:{}", peer.uid));
        if let Some(name) = self.user_name(peer.uid) {
            values.push(format!("user:{name}"));
        }
        values.push(format!("gid:{}", peer.gid));
        if let Some(name) = self.group_name(peer.gid) {
            values.push(format!("group:{name}"));
        }
        for &gid in &status.groups {
            values.push(format!("supplementary_gid:{gid}"));
            if let Some(name) = self.group_name(gid) {
                values.push(format!("supplementary_group:{name}"));
            }
        }
        if let Some(path) = &exe.path {
            values.push(format!("path:{path}"));
        }
        if let Some(digest) = &exe.sha256 {
            values.push(format!("sha256:{}", hex::encode(digest)));
        }

        // Everything above must describe one and the same process image. Reads through
        // the open /proc/<pid> handle fail once that process is gone, even if the pid is
        // reused; a new program run by the same process (execve) shows as a changed link.
        if process.exe_link()? != exe.link {
            return Err(AttestError::ProcessChanged { pid });
        }

        // A value that is not a valid selector (a path over 1024 bytes or with a control
        // character, say) cannot appear in any entry either, so omitting it never changes which
        // entries match.
        let mut selectors: Vec<Selector> = values
            .into_iter()
            .filter_map(|value| match Selector::new(SELECTOR_KIND, value.as_str()) {
                Ok(selector) => Some(selector),
                Err(error) => {
                    debug!(pid, value, %error, "omitting a value that is not a valid selector");
                    None
                }
            })
            .collect();
        selectors.sort();
        selectors.dedup();
        Ok(Some(selectors))
    }

    /// Path and digest of the executable the process runs; `None` when the digest is not
    /// cached and `may_hash` is false.
    fn executable(
        &self,
        process: &ProcDir,
        may_hash: bool,
    ) -> Result<Option<Executable>, AttestError> {
        let pid = process.pid;
        let link = process.exe_link()?;
        let file = process.open_file("exe")?;
        let meta = file.metadata().map_err(|e| process.error("exe", e))?;
        if link.as_bytes().ends_with(DELETED_SUFFIX) || meta.nlink() == 0 {
            debug!(pid, exe = ?link, "executable was deleted; omitting unix:path and unix:sha256");
            return Ok(Some(Executable {
                link,
                path: None,
                sha256: None,
            }));
        }
        let path = match link.to_str() {
            Some(path) if path.starts_with('/') => Some(path.to_owned()),
            _ => {
                debug!(pid, exe = ?link, "executable path is not an absolute UTF-8 path; omitting unix:path");
                None
            }
        };
        Ok(match self.sha256(process, file, &meta, may_hash)? {
            Digest::Known(sha256) => Some(Executable { link, path, sha256 }),
            Digest::NotCached => None,
        })
    }

    /// The SHA-256 of the opened executable, from the cache when its identity is known.
    fn sha256(
        &self,
        process: &ProcDir,
        mut file: File,
        meta: &Metadata,
        may_hash: bool,
    ) -> Result<Digest, AttestError> {
        let pid = process.pid;
        if !meta.is_file() {
            debug!(
                pid,
                "executable is not a regular file; omitting unix:sha256"
            );
            return Ok(Digest::Known(None));
        }
        let size = meta.len();
        if size > self.config.max_hash_bytes {
            debug!(
                pid,
                size,
                max_hash_bytes = self.config.max_hash_bytes,
                "executable is too large to hash; omitting unix:sha256"
            );
            return Ok(Digest::Known(None));
        }
        let key = FileKey::of(meta);
        if let Some(digest) = lock(&self.hashes).get(&key) {
            #[cfg(test)]
            self.stats
                .hash_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Digest::Known(Some(digest)));
        }
        if !may_hash {
            return Ok(Digest::NotCached);
        }

        // Hash without holding the lock; concurrent misses on one file just hash it twice.
        let (digest, read) = hash_file(&mut file, size).map_err(|e| process.error("exe", e))?;
        let after = file.metadata().map_err(|e| process.error("exe", e))?;
        if read != size || FileKey::of(&after) != key {
            return Err(AttestError::ExecutableChanged { pid });
        }
        #[cfg(test)]
        self.stats
            .hashes_computed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.hashes).insert(key, digest);
        Ok(Digest::Known(Some(digest)))
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        cached_name(&self.users, uid, |uid| {
            User::from_uid(Uid::from_raw(uid)).map(|user| user.map(|user| user.name))
        })
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        cached_name(&self.groups, gid, |gid| {
            Group::from_gid(Gid::from_raw(gid)).map(|group| group.map(|group| group.name))
        })
    }
}

/// What the attestor learned about the executable of a process.
/// What the digest cache knows about an executable.
enum Digest {
    /// The digest, or `None` when the file gets no `unix:sha256` selector.
    Known(Option<[u8; 32]>),
    /// Not cached, and hashing was not allowed.
    NotCached,
}

struct Executable {
    /// The raw `exe` link, compared again at the end of attestation.
    link: OsString,
    path: Option<String>,
    sha256: Option<[u8; 32]>,
}

/// An open handle on `/proc/<pid>`. Files opened relative to it belong to that process even if
/// the pid is reused: once the process is gone they fail with `ENOENT` or `ESRCH`.
struct ProcDir {
    pid: i32,
    path: PathBuf,
    dir: File,
}

impl ProcDir {
    fn open(config: &UnixAttestorConfig, pid: i32) -> Result<Self, AttestError> {
        let path = config.proc_root.join(pid.to_string());
        match File::open(&path) {
            Ok(dir) => Ok(Self { pid, path, dir }),
            Err(e) if is_gone(&e) => Err(AttestError::ProcessGone { pid }),
            Err(source) => Err(AttestError::Proc { pid, path, source }),
        }
    }

    fn error(&self, name: &str, source: io::Error) -> AttestError {
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

    fn parse_error(&self, name: &str, reason: &'static str) -> AttestError {
        AttestError::Parse {
            pid: self.pid,
            path: self.path.join(name),
            reason,
        }
    }

    fn open_file(&self, name: &str) -> Result<File, AttestError> {
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
    fn read(&self, name: &str) -> Result<Vec<u8>, AttestError> {
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

    fn status(&self) -> Result<Status, AttestError> {
        let status = self.read("status")?;
        parse_status(&status).map_err(|reason| self.parse_error("status", reason))
    }

    fn exe_link(&self) -> Result<OsString, AttestError> {
        readlinkat(self.dir.as_fd(), "exe").map_err(|errno| self.error("exe", errno.into()))
    }
}

/// Whether an error reading `/proc/<pid>` means the process is gone.
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == Errno::ENOENT as i32 || code == Errno::ESRCH as i32)
}

/// The parts of `/proc/<pid>/status` the attestor uses.
#[derive(Debug, PartialEq, Eq)]
struct Status {
    euid: u32,
    egid: u32,
    groups: Vec<u32>,
}

fn parse_status(status: &[u8]) -> Result<Status, &'static str> {
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

/// Hashes at most `size + 1` bytes of `file`, returning the digest and how many bytes were read
/// (more than `size` means the file grew).
fn hash_file(file: &mut File, size: u64) -> io::Result<([u8; 32], u64)> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut reader = file.take(size.saturating_add(1));
    let mut buffer = vec![0; HASH_BUFFER_BYTES];
    let mut read = 0u64;
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                context.update(&buffer[..n]);
                read += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut digest = [0; 32];
    digest.copy_from_slice(context.finish().as_ref());
    Ok((digest, read))
}

/// The identity of an executable's content: a file with the same device, inode, size,
/// modification and change times has not been rewritten (writing a file updates its times, and
/// the kernel refuses to write to a file that is being executed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileKey {
    fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// Digests of executables by file identity, bounded; the oldest entry goes when it is full.
struct HashCache {
    capacity: usize,
    /// Digest and insertion sequence number.
    entries: HashMap<FileKey, ([u8; 32], u64)>,
    next_seq: u64,
}

impl HashCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: HashMap::new(),
            next_seq: 0,
        }
    }

    fn get(&self, key: &FileKey) -> Option<[u8; 32]> {
        self.entries.get(key).map(|(digest, _)| *digest)
    }

    fn insert(&mut self, key: FileKey, digest: [u8; 32]) {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            // Only reached on a miss with a full cache, right after hashing a whole file, so
            // scanning for the oldest entry costs nothing by comparison.
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, seq))| *seq)
                .map(|(key, _)| *key);
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (digest, self.next_seq));
        self.next_seq += 1;
    }
}

/// Names of uids or gids (or their absence), each trusted for [`NAME_CACHE_TTL`].
#[derive(Default)]
struct NameCache {
    entries: HashMap<u32, (Option<String>, Instant)>,
}

/// Looks `id` up in `cache`, resolving it with `resolve` (outside the lock) when it is missing
/// or stale. A failed resolution omits the name and is not cached.
fn cached_name(
    cache: &Mutex<NameCache>,
    id: u32,
    resolve: impl FnOnce(u32) -> nix::Result<Option<String>>,
) -> Option<String> {
    let now = Instant::now();
    if let Some((name, at)) = lock(cache).entries.get(&id)
        && now.saturating_duration_since(*at) < NAME_CACHE_TTL
    {
        return name.clone();
    }
    let name = match resolve(id) {
        Ok(name) => name,
        Err(errno) => {
            debug!(id, %errno, "resolving a user or group name failed; omitting it");
            return None;
        }
    };
    let mut cache = lock(cache);
    if cache.entries.len() >= NAME_CACHE_CAPACITY {
        cache
            .entries
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < NAME_CACHE_TTL);
        if cache.entries.len() >= NAME_CACHE_CAPACITY {
            cache.entries.clear();
        }
    }
    cache.entries.insert(id, (name.clone(), now));
    name
}

/// The caches hold no invariant a panic could break halfway, so a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[derive(Default)]
struct TestStats {
    hash_hits: std::sync::atomic::AtomicU64,
    hashes_computed: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::symlink;
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use nix::unistd::{getegid, geteuid};

    use super::*;

    fn strings(selectors: &[Selector]) -> Vec<String> {
        selectors.iter().map(ToString::to_string).collect()
    }

    fn me() -> PeerCredentials {
        PeerCredentials {
            pid: i32::try_from(std::process::id()).unwrap(),
            uid: geteuid().as_raw(),
            gid: getegid().as_raw(),
        }
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    }

    fn with_prefix<'a>(selectors: &'a [String], prefix: &str) -> Vec<&'a str> {
        selectors
            .iter()
            .filter(|s| s.starts_with(prefix))
            .map(String::as_str)
            .collect()
    }

    /// A fake `/proc/4242` under a temporary proc root.
    struct FakeProc {
        root: tempfile::TempDir,
    }

    impl FakeProc {
        const PID: i32 = 4242;

        fn new(uid: u32, gid: u32, groups: &str, exe_target: &Path) -> Self {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join(Self::PID.to_string());
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(
                dir.join("status"),
                format!(
                    "Name:\tfake\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\nGroups:\t{groups}\n"
                ),
            )
            .unwrap();
            symlink(exe_target, dir.join("exe")).unwrap();
            Self { root }
        }

        fn attestor(&self, max_hash_bytes: u64) -> UnixAttestor {
            UnixAttestor::new(UnixAttestorConfig {
                max_hash_bytes,
                proc_root: self.root.path().to_owned(),
            })
        }
    }

    #[test]
    fn attestor_is_send_sync_and_defaults_are_sane() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<UnixAttestor>();
        assert_send_sync::<Arc<UnixAttestor>>();
        let config = UnixAttestorConfig::default();
        assert_eq!(config.max_hash_bytes, 128 * 1024 * 1024);
        assert_eq!(config.proc_root, Path::new("/proc"));
    }

    #[test]
    fn attests_the_current_process() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let peer = me();
        let selectors = attestor.attest(&peer).unwrap();
        let mut sorted = selectors.clone();
        sorted.sort();
        assert_eq!(selectors, sorted, "selectors come sorted");
        let selectors = strings(&selectors);

        let exe = std::env::current_exe().unwrap();
        let expected_sha = sha256_hex(&std::fs::read(&exe).unwrap());
        assert_eq!(
            with_prefix(&selectors, "unix:uid:"),
            [format!("unix:uid:{}", peer.uid)]
        );
        assert_eq!(
            with_prefix(&selectors, "unix:gid:"),
            [format!("unix:gid:{}", peer.gid)]
        );
        assert_eq!(
            with_prefix(&selectors, "unix:path:"),
            [format!("unix:path:{}", exe.display())]
        );
        assert_eq!(
            with_prefix(&selectors, "unix:sha256:"),
            [format!("unix:sha256:{expected_sha}")]
        );
        if let Ok(Some(user)) = User::from_uid(geteuid()) {
            assert!(selectors.contains(&format!("unix:user:{}", user.name)));
        }
        let groups: Vec<String> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| format!("unix:supplementary_gid:{}", g.as_raw()))
            .collect();
        for group in &groups {
            assert!(
                selectors.contains(group),
                "{group} missing from {selectors:?}"
            );
        }
        assert_eq!(with_prefix(&selectors, "unix:supplementary_gid:").len(), {
            let mut g = groups.clone();
            g.sort();
            g.dedup();
            g.len()
        });
    }

    #[test]
    fn second_attestation_uses_the_digest_cache() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let first = attestor.attest(&me()).unwrap();
        assert_eq!(attestor.cache_len(), 1);
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 1);
        assert_eq!(attestor.stats.hash_hits.load(Ordering::Relaxed), 0);

        let second = attestor.attest(&me()).unwrap();
        assert_eq!(first, second);
        assert_eq!(attestor.cache_len(), 1);
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 1);
        assert_eq!(attestor.stats.hash_hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn cached_only_attestation_never_hashes() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        assert_eq!(
            attestor.attest_cached(&me()).unwrap(),
            None,
            "digest not cached yet"
        );
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 0);
        let full = attestor.attest(&me()).unwrap();
        assert_eq!(attestor.attest_cached(&me()).unwrap(), Some(full));
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn exited_process_is_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        child.wait().unwrap();
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let err = attestor
            .attest(&PeerCredentials { pid, ..me() })
            .unwrap_err();
        assert!(
            matches!(err, AttestError::ProcessGone { pid: p } if p == pid),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("process {pid} exited before it could be attested")
        );
    }

    #[test]
    fn invalid_pids_are_rejected() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        for pid in [0, -1] {
            let err = attestor
                .attest(&PeerCredentials { pid, ..me() })
                .unwrap_err();
            assert!(matches!(err, AttestError::InvalidPid { .. }), "{err:?}");
        }
    }

    #[test]
    fn small_max_hash_bytes_omits_only_the_digest() {
        let attestor = UnixAttestor::new(UnixAttestorConfig {
            max_hash_bytes: 1,
            ..UnixAttestorConfig::default()
        });
        let selectors = strings(&attestor.attest(&me()).unwrap());
        assert!(with_prefix(&selectors, "unix:sha256:").is_empty());
        assert_eq!(with_prefix(&selectors, "unix:path:").len(), 1);
        assert_eq!(attestor.cache_len(), 0);
    }

    #[test]
    fn deleted_executable_has_no_path_or_digest() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleepy");
        std::fs::copy("/bin/sleep", &copy).unwrap();
        // Another test thread forking while the copy was open for writing makes exec fail
        // with ETXTBSY for a moment.
        let mut child = None;
        for _ in 0..50 {
            match Command::new(&copy).arg("30").spawn() {
                Ok(c) => {
                    child = Some(c);
                    break;
                }
                Err(e) if e.raw_os_error() == Some(Errno::ETXTBSY as i32) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("spawning {}: {e}", copy.display()),
            }
        }
        let mut child = child.unwrap();
        std::fs::remove_file(&copy).unwrap();

        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let peer = PeerCredentials {
            pid: i32::try_from(child.id()).unwrap(),
            ..me()
        };
        let result = attestor.attest(&peer);
        child.kill().unwrap();
        child.wait().unwrap();
        let selectors = strings(&result.unwrap());
        assert!(
            with_prefix(&selectors, "unix:path:").is_empty(),
            "{selectors:?}"
        );
        assert!(
            with_prefix(&selectors, "unix:sha256:").is_empty(),
            "{selectors:?}"
        );
        assert_eq!(with_prefix(&selectors, "unix:uid:").len(), 1);
    }

    #[test]
    fn fake_process_yields_exactly_spire_selectors() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, b"#!/bin/false\nnot really a program\n").unwrap();
        // uid/gid 0 are root everywhere; 4000000000 is unknown nearly everywhere.
        let fake = FakeProc::new(0, 0, "0 4000000000 ", &program);
        let attestor = fake.attestor(DEFAULT_MAX_HASH_BYTES);
        let peer = PeerCredentials {
            pid: FakeProc::PID,
            uid: 0,
            gid: 0,
        };
        let selectors = strings(&attestor.attest(&peer).unwrap());
        let root_group = Group::from_gid(Gid::from_raw(0)).unwrap().unwrap().name;
        let mut expected = vec![
            "unix:uid:0".to_owned(),
            "unix:user:root".to_owned(),
            "unix:gid:0".to_owned(),
            format!("unix:group:{root_group}"),
            "unix:supplementary_gid:0".to_owned(),
            format!("unix:supplementary_group:{root_group}"),
            "unix:supplementary_gid:4000000000".to_owned(),
            format!("unix:path:{}", program.display()),
            format!(
                "unix:sha256:{}",
                sha256_hex(b"#!/bin/false\nnot really a program\n")
            ),
        ];
        expected.sort();
        let mut got = selectors.clone();
        got.sort();
        assert_eq!(got, expected);
    }

    #[test]
    fn fake_process_with_deleted_suffix_has_no_path_or_digest() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program (deleted)");
        std::fs::write(&program, b"gone").unwrap();
        let peer = me();
        let fake = FakeProc::new(peer.uid, peer.gid, "", &program);
        let selectors = strings(
            &fake
                .attestor(DEFAULT_MAX_HASH_BYTES)
                .attest(&PeerCredentials {
                    pid: FakeProc::PID,
                    ..peer
                })
                .unwrap(),
        );
        assert!(
            with_prefix(&selectors, "unix:path:").is_empty(),
            "{selectors:?}"
        );
        assert!(
            with_prefix(&selectors, "unix:sha256:").is_empty(),
            "{selectors:?}"
        );
        assert!(with_prefix(&selectors, "unix:supplementary").is_empty());
    }

    #[test]
    fn max_hash_bytes_is_inclusive() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, b"12345").unwrap();
        let peer = PeerCredentials {
            pid: FakeProc::PID,
            ..me()
        };
        let fake = FakeProc::new(peer.uid, peer.gid, "", &program);
        let at_limit = strings(&fake.attestor(5).attest(&peer).unwrap());
        assert_eq!(
            with_prefix(&at_limit, "unix:sha256:"),
            [format!("unix:sha256:{}", sha256_hex(b"12345"))]
        );
        let over_limit = strings(&fake.attestor(4).attest(&peer).unwrap());
        assert!(with_prefix(&over_limit, "unix:sha256:").is_empty());
        assert_eq!(with_prefix(&over_limit, "unix:path:").len(), 1);
    }

    #[test]
    fn changed_credentials_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, b"x").unwrap();
        let fake = FakeProc::new(1000, 1000, "", &program);
        let err = fake
            .attestor(DEFAULT_MAX_HASH_BYTES)
            .attest(&PeerCredentials {
                pid: FakeProc::PID,
                uid: 1001,
                gid: 1000,
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                AttestError::CredentialsChanged {
                    pid: 4242,
                    peer_uid: 1001,
                    proc_uid: 1000,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn unreadable_proc_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, b"x").unwrap();
        let peer = PeerCredentials {
            pid: FakeProc::PID,
            ..me()
        };
        let fake = FakeProc::new(peer.uid, peer.gid, "", &program);
        let status = fake.root.path().join("4242/status");
        std::fs::remove_file(&status).unwrap();
        std::fs::create_dir(&status).unwrap();
        let err = fake
            .attestor(DEFAULT_MAX_HASH_BYTES)
            .attest(&peer)
            .unwrap_err();
        assert!(matches!(err, AttestError::Proc { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("reading {}: ", status.display())),
            "{err}"
        );

        std::fs::remove_dir(&status).unwrap();
        std::fs::write(&status, "Uid:\t1\n").unwrap();
        let err = fake
            .attestor(DEFAULT_MAX_HASH_BYTES)
            .attest(&peer)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("parsing {}: malformed Uid line", status.display())
        );
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
            parse_status(b"Uid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t\n")
                .unwrap()
                .groups,
            Vec::<u32>::new()
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
    fn hash_cache_is_bounded_and_evicts_the_oldest() {
        let key = |ino| FileKey {
            dev: 1,
            ino,
            size: 2,
            mtime: 3,
            mtime_nsec: 4,
            ctime: 5,
            ctime_nsec: 6,
        };
        let mut cache = HashCache::new(3);
        for ino in 0..3 {
            cache.insert(key(ino), [ino as u8; 32]);
        }
        cache.insert(key(1), [1; 32]);
        assert_eq!(cache.entries.len(), 3);
        cache.insert(key(3), [3; 32]);
        assert_eq!(cache.entries.len(), 3);
        assert_eq!(cache.get(&key(0)), None, "the oldest entry was evicted");
        assert_eq!(cache.get(&key(3)), Some([3; 32]));
        assert_eq!(cache.get(&key(2)), Some([2; 32]));
    }

    #[test]
    fn name_cache_resolves_once_within_the_ttl() {
        let cache = Mutex::new(NameCache::default());
        let calls = std::cell::Cell::new(0);
        let resolve = |id: u32| {
            calls.set(calls.get() + 1);
            Ok(Some(format!("name{id}")))
        };
        assert_eq!(cached_name(&cache, 7, resolve), Some("name7".to_owned()));
        assert_eq!(cached_name(&cache, 7, resolve), Some("name7".to_owned()));
        assert_eq!(calls.get(), 1);
        assert_eq!(cached_name(&cache, 8, |_| Ok(None)), None);
        assert_eq!(
            cached_name(&cache, 8, resolve),
            None,
            "absence is cached too"
        );
        assert_eq!(cached_name(&cache, 9, |_| Err(Errno::EIO)), None);
        assert_eq!(
            cached_name(&cache, 9, resolve),
            Some("name9".to_owned()),
            "failures are not cached"
        );
    }

    #[test]
    fn errors_read_as_one_sentence() {
        let err = AttestError::Proc {
            pid: 123,
            path: PathBuf::from("/proc/123/status"),
            source: io::Error::from_raw_os_error(Errno::EACCES as i32),
        };
        assert!(
            err.to_string()
                .starts_with("reading /proc/123/status: Permission denied"),
            "{err}"
        );
        assert_eq!(
            AttestError::ProcessChanged { pid: 9 }.to_string(),
            "process 9 changed while it was being attested (its pid was reused or it executed another program)"
        );
    }
}
