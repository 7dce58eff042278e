//! The Unix workload attestor: a pinned [`Process`] and `/proc` in, `unix:*` selectors out.
//!
//! The agent pins each Workload API caller with a pidfd when it accepts the connection
//! ([`Process::of_socket`], taking its `SO_PEERCRED` credentials) and hands it to
//! [`UnixAttestor::attest`], which returns the selectors exactly as SPIRE's unix attestor
//! writes them, in two groups:
//!
//! | selector                             | source                                          |
//! |--------------------------------------|-------------------------------------------------|
//! | `unix:uid:<uid>`                     | peer credentials                                |
//! | `unix:user:<name>`                   | passwd entry of the uid, if any                 |
//! | `unix:gid:<gid>`                     | peer credentials                                |
//! | `unix:group:<name>`                  | group entry of the gid, if any                  |
//! | `unix:supplementary_gid:<gid>`       | `Groups:` line of `/proc/<pid>/status`          |
//! | `unix:supplementary_group:<name>`    | group entry of each supplementary gid, if any   |
//! | `unix:path:<path>` (binary)          | `readlink /proc/<pid>/exe`, only when that path in the agent's own mount namespace is the very file the process executes (same device and inode) |
//! | `unix:sha256:<hex>` (binary)         | SHA-256 of the file opened via `/proc/<pid>/exe` |
//!
//! The binary selectors ([`Attestation::binary`]) describe the program of the process that
//! connected; whether the process making a request is that process is a property of the
//! connection, which the agent checks before it grants them (see
//! [`sharing`](crate::workload::sharing)).
//!
//! Path and digest are omitted when the executable was deleted (the kernel shows its link as
//! `... (deleted)`), and the digest alone when the executable is larger than
//! [`UnixAttestorConfig::max_hash_bytes`], when no entry asks for one, or when the caller's
//! user used up its hashing budget ([`AttestError::HashBudget`]). A value that is not a valid
//! selector (say a path longer than 1024 bytes) is omitted too: no entry could require it. The
//! digest is computed from the file the process actually runs (opened through the `exe` magic
//! link), so replacing the file at the path cannot fool it.
//!
//! Pid reuse: everything is read through one open handle on `/proc/<pid>`, and afterwards
//! the pidfd must still name a live process with the start time that directory shows
//! ([`AttestError::Replaced`] otherwise). The executable link is read again after
//! everything else, so a process that executed another program meanwhile is reported as
//! [`AttestError::ProcessChanged`]. The effective uid and gid in `/proc/<pid>/status` must
//! still be the ones the peer connected with ([`AttestError::CredentialsChanged`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lanyard_proto::Selector;
use nix::unistd::{Gid, Group, Uid, User};
use tracing::debug;

pub use crate::workload::process::PeerCredentials;
use crate::workload::process::{FileId, ProcDir, Process};

/// The selector type every selector of this attestor carries.
pub const SELECTOR_KIND: &str = "unix";

/// Default for [`UnixAttestorConfig::max_hash_bytes`]: 128 MiB.
pub const DEFAULT_MAX_HASH_BYTES: u64 = 128 * 1024 * 1024;

/// Default for [`UnixAttestorConfig::hash_budget_bytes`]: 1 GiB per user per minute, eight
/// of the largest executables the attestor hashes.
pub const DEFAULT_HASH_BUDGET_BYTES: u64 = 1024 * 1024 * 1024;

/// The window of the hashing budget.
pub const HASH_BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// How many executable digests are remembered.
const HASH_CACHE_CAPACITY: usize = 1024;
/// How long a uid/gid to name resolution (or its absence) is trusted.
const NAME_CACHE_TTL: Duration = Duration::from_secs(30);
/// How many uid (and, separately, gid) names are remembered.
const NAME_CACHE_CAPACITY: usize = 4096;
/// How many users' hashing budgets are tracked at once.
const BUDGET_CAPACITY: usize = 4096;
/// What the kernel appends to the `exe` link of a process whose executable was unlinked.
const DELETED_SUFFIX: &[u8] = b" (deleted)";
/// Read buffer for hashing executables.
const HASH_BUFFER_BYTES: usize = 64 * 1024;

/// Settings of the [`UnixAttestor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixAttestorConfig {
    /// Executables larger than this get no `unix:sha256` selector (hashing them on every new
    /// binary would cost too much); their `unix:path` selector is still produced.
    pub max_hash_bytes: u64,
    /// Bytes of executables the attestor hashes for one user per [`HASH_BUDGET_WINDOW`]
    /// (digests served from the cache cost nothing). A workload whose executable keeps
    /// changing would otherwise make the agent re-hash it on every request.
    pub hash_budget_bytes: u64,
    /// Where procfs is mounted; `/proc` except in tests.
    pub proc_root: PathBuf,
}

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            max_hash_bytes: DEFAULT_MAX_HASH_BYTES,
            hash_budget_bytes: DEFAULT_HASH_BUDGET_BYTES,
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
    /// The kernel did not answer a question about the socket or the process.
    #[error("{what}: {source}")]
    Socket {
        what: &'static str,
        source: io::Error,
    },
    /// The process exited before its directory could even be opened.
    #[error("process {pid} exited before it could be attested")]
    ProcessGone { pid: i32 },
    /// The process the connection was pinned to exited, or its pid now names another
    /// process: whatever was read does not describe the caller.
    #[error("process {pid}: the calling process exited or was replaced during attestation")]
    Replaced { pid: i32 },
    /// The process executed another program while it was being attested.
    #[error("process {pid} changed while it was being attested (it executed another program)")]
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
    /// The caller's user had the agent hash more executable bytes than its budget allows.
    #[error(
        "uid {uid} had the agent hash more than {budget_mib} MiB of new or changed executables in the last minute; retry later"
    )]
    HashBudget { uid: u32, budget_mib: u64 },
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

/// What attestation found: the credential selectors, which hold for any request on the
/// connection, and the binary selectors, which describe the program the connecting process
/// runs and are only as good as the connection check the agent makes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attestation {
    /// `unix:uid`, `user`, `gid`, `group`, `supplementary_gid`, `supplementary_group`; sorted.
    pub credentials: Vec<Selector>,
    /// `unix:path` and `unix:sha256`; sorted.
    pub binary: Vec<Selector>,
    /// The file the process executes (device and inode), when it could be opened.
    pub exe: Option<FileId>,
}

impl Attestation {
    /// Credential and binary selectors together, sorted.
    pub fn all(&self) -> Vec<Selector> {
        let mut all: Vec<Selector> = self
            .credentials
            .iter()
            .chain(&self.binary)
            .cloned()
            .collect();
        all.sort();
        all
    }
}

/// Whether a `unix:sha256` selector is wanted: hashing is only worth its cost when some
/// registration entry names a digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Digest {
    Wanted,
    NotWanted,
}

/// The Unix workload attestor. Cheap to share behind an `Arc`; `attest` is synchronous and
/// blocking (it reads `/proc` and may hash an executable), so call it from `spawn_blocking`.
pub struct UnixAttestor {
    config: UnixAttestorConfig,
    hashes: Mutex<HashCache>,
    budget: Mutex<HashBudget>,
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
            budget: Mutex::new(HashBudget::new(config.hash_budget_bytes)),
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

    /// The `unix:*` selectors of `process`. May read and hash the whole executable: call
    /// it where blocking is fine.
    pub fn attest(&self, process: &Process, digest: Digest) -> Result<Attestation, AttestError> {
        match self.attest_inner(process, digest, true)? {
            Some(attestation) => Ok(attestation),
            None => Err(AttestError::ExecutableChanged { pid: process.pid() }),
        }
    }

    /// Like [`attest`](Self::attest), but only if no executable has to be hashed:
    /// `Ok(None)` means it would have to be. This path only reads small /proc files, so
    /// the Workload API runs it inline and keeps `attest` on a blocking thread for
    /// executables it has not seen.
    pub fn attest_cached(
        &self,
        process: &Process,
        digest: Digest,
    ) -> Result<Option<Attestation>, AttestError> {
        self.attest_inner(process, digest, false)
    }

    fn attest_inner(
        &self,
        process: &Process,
        digest: Digest,
        may_hash: bool,
    ) -> Result<Option<Attestation>, AttestError> {
        let peer = process.creds();
        let pid = peer.pid;
        let dir = process.dir()?;

        let status = dir.status().map_err(|e| replaced_if_gone(e, pid))?;
        if status.euid != peer.uid || status.egid != peer.gid {
            // Checked after confirming it is still the same process: a recycled pid of
            // another user is "replaced", not "changed credentials".
            process.confirm(&dir)?;
            return Err(AttestError::CredentialsChanged {
                pid,
                peer_uid: peer.uid,
                peer_gid: peer.gid,
                proc_uid: status.euid,
                proc_gid: status.egid,
            });
        }
        let exe = match self.executable(&dir, peer.uid, digest, may_hash) {
            Ok(Some(exe)) => exe,
            Ok(None) => return Ok(None),
            Err(e) => return Err(replaced_if_gone(e, pid)),
        };

        let mut credentials = Vec::with_capacity(4 + 2 * status.groups.len());
        credentials.push(format!("uid:{}", peer.uid));
        if let Some(name) = self.user_name(peer.uid) {
            credentials.push(format!("user:{name}"));
        }
        credentials.push(format!("gid:{}", peer.gid));
        if let Some(name) = self.group_name(peer.gid) {
            credentials.push(format!("group:{name}"));
        }
        for &gid in &status.groups {
            credentials.push(format!("supplementary_gid:{gid}"));
            if let Some(name) = self.group_name(gid) {
                credentials.push(format!("supplementary_group:{name}"));
            }
        }
        let mut binary = Vec::with_capacity(2);
        if let Some(path) = &exe.path {
            binary.push(format!("path:{path}"));
        }
        if let Some(digest) = &exe.sha256 {
            binary.push(format!("sha256:{}", hex::encode(digest)));
        }

        // Everything above must describe one and the same process image: a new program
        // run by the same process (execve) shows as a changed link; then the pidfd must
        // still name the live process whose directory was read.
        let link_now = dir.exe_link().map_err(|e| replaced_if_gone(e, pid))?;
        process.confirm(&dir)?;
        if link_now != exe.link {
            return Err(AttestError::ProcessChanged { pid });
        }

        Ok(Some(Attestation {
            credentials: selectors(pid, credentials),
            binary: selectors(pid, binary),
            exe: exe.id,
        }))
    }

    /// Path and digest of the executable the process runs; `None` when the digest is not
    /// cached and `may_hash` is false.
    fn executable(
        &self,
        process: &ProcDir,
        uid: u32,
        digest: Digest,
        may_hash: bool,
    ) -> Result<Option<Executable>, AttestError> {
        let pid = process.pid;
        let link = process.exe_link()?;
        let file = process.open_file("exe")?;
        let meta = file.metadata().map_err(|e| process.error("exe", e))?;
        let id = Some(FileId::of(&meta));
        if link.as_bytes().ends_with(DELETED_SUFFIX) || meta.nlink() == 0 {
            debug!(pid, exe = ?link, "executable was deleted; omitting unix:path and unix:sha256");
            return Ok(Some(Executable {
                link,
                id,
                path: None,
                sha256: None,
            }));
        }
        let path = match link.to_str() {
            Some(path) if path.starts_with('/') => same_file_here(pid, path, &meta),
            _ => {
                debug!(pid, exe = ?link, "executable path is not an absolute UTF-8 path; omitting unix:path");
                None
            }
        };
        if digest == Digest::NotWanted {
            return Ok(Some(Executable {
                link,
                id,
                path,
                sha256: None,
            }));
        }
        Ok(match self.sha256(process, uid, file, &meta, may_hash)? {
            Digested::Known(sha256) => Some(Executable {
                link,
                id,
                path,
                sha256,
            }),
            Digested::NotCached => None,
        })
    }

    /// The SHA-256 of the opened executable, from the cache when its identity is known.
    fn sha256(
        &self,
        process: &ProcDir,
        uid: u32,
        mut file: File,
        meta: &Metadata,
        may_hash: bool,
    ) -> Result<Digested, AttestError> {
        let pid = process.pid;
        if !meta.is_file() {
            debug!(
                pid,
                "executable is not a regular file; omitting unix:sha256"
            );
            return Ok(Digested::Known(None));
        }
        let size = meta.len();
        if size > self.config.max_hash_bytes {
            debug!(
                pid,
                size,
                max_hash_bytes = self.config.max_hash_bytes,
                "executable is too large to hash; omitting unix:sha256"
            );
            return Ok(Digested::Known(None));
        }
        let key = FileKey::of(meta);
        if let Some(digest) = lock(&self.hashes).get(&key) {
            #[cfg(test)]
            self.stats
                .hash_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Digested::Known(Some(digest)));
        }
        if !may_hash {
            return Ok(Digested::NotCached);
        }
        if !lock(&self.budget).charge(uid, size, Instant::now()) {
            return Err(AttestError::HashBudget {
                uid,
                budget_mib: self.config.hash_budget_bytes / (1024 * 1024),
            });
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
        Ok(Digested::Known(Some(digest)))
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

/// A read that failed because the process is gone means the pinned process exited.
fn replaced_if_gone(e: AttestError, pid: i32) -> AttestError {
    match e {
        AttestError::ProcessGone { .. } => AttestError::Replaced { pid },
        other => other,
    }
}

/// `path` when it names, in the agent's own mount namespace, the very file the process
/// executes. The link text is the path in the caller's namespace: a user + mount
/// namespace can bind-mount any file over a trusted path there, and a private /tmp or
/// /home (as the shipped systemd unit gives the agent) shows other files or none.
fn same_file_here(pid: i32, path: &str, exe: &Metadata) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(here) if here.dev() == exe.dev() && here.ino() == exe.ino() => Some(path.to_owned()),
        Ok(_) => {
            debug!(
                pid,
                path,
                "the path names another file in the agent's mount namespace; omitting unix:path"
            );
            None
        }
        Err(error) => {
            debug!(pid, path, %error, "the path does not resolve in the agent's mount namespace; omitting unix:path");
            None
        }
    }
}

/// Valid selectors of this attestor from `values`, sorted. A value that is not a valid
/// selector (a path over 1024 bytes or with a control character, say) cannot appear in
/// any entry either, so omitting it never changes which entries match.
fn selectors(pid: i32, values: Vec<String>) -> Vec<Selector> {
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
    selectors
}

/// What the digest cache knows about an executable.
enum Digested {
    /// The digest, or `None` when the file gets no `unix:sha256` selector.
    Known(Option<[u8; 32]>),
    /// Not cached, and hashing was not allowed.
    NotCached,
}

/// What the attestor learned about the executable of a process.
struct Executable {
    /// The raw `exe` link, compared again at the end of attestation.
    link: OsString,
    id: Option<FileId>,
    path: Option<String>,
    sha256: Option<[u8; 32]>,
}

/// Bytes hashed per user in the current window. A fixed window is coarse but cheap, and
/// the bound it gives (at most twice the budget across a window edge) is what matters.
struct HashBudget {
    budget: u64,
    used: HashMap<u32, (Instant, u64)>,
}

impl HashBudget {
    fn new(budget: u64) -> Self {
        HashBudget {
            budget,
            used: HashMap::new(),
        }
    }

    /// Charges `bytes` to `uid` at `now`; false (and nothing charged) when that would
    /// exceed its budget in the current window.
    fn charge(&mut self, uid: u32, bytes: u64, now: Instant) -> bool {
        if self.used.len() >= BUDGET_CAPACITY && !self.used.contains_key(&uid) {
            self.used
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < HASH_BUDGET_WINDOW);
        }
        let (start, used) = self.used.entry(uid).or_insert((now, 0));
        if now.saturating_duration_since(*start) >= HASH_BUDGET_WINDOW {
            *start = now;
            *used = 0;
        }
        match used.checked_add(bytes) {
            Some(total) if total <= self.budget => {
                *used = total;
                true
            }
            _ => false,
        }
    }
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

    use nix::errno::Errno;
    use nix::unistd::{getegid, geteuid};

    use super::*;
    use crate::workload::process::PidfdSource;

    fn strings(selectors: &[Selector]) -> Vec<String> {
        selectors.iter().map(ToString::to_string).collect()
    }

    fn my_pid() -> i32 {
        i32::try_from(std::process::id()).unwrap()
    }

    fn me() -> Process {
        Process::by_pid(my_pid(), Path::new("/proc")).unwrap()
    }

    fn my_pidfd() -> std::os::fd::OwnedFd {
        rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(my_pid()).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap()
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

    fn all(attestation: &Attestation) -> Vec<String> {
        strings(&attestation.all())
    }

    /// A fake `/proc/4242` under a temporary proc root. Processes made from it carry a
    /// pidfd of this test process (alive), so the pidfd checks pass while the fake
    /// directory tells the rest.
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
            let fake = Self { root };
            fake.set_start_time(1000);
            symlink(exe_target, dir.join("exe")).unwrap();
            fake
        }

        /// Writes `/proc/4242/stat` with start time `ticks`.
        fn set_start_time(&self, ticks: u64) {
            let stat = format!(
                "{} (fake prog) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {ticks} 1000 10 0\n",
                Self::PID
            );
            std::fs::write(self.root.path().join("4242/stat"), stat).unwrap();
        }

        fn process(&self, uid: u32, gid: u32) -> Process {
            self.process_with(uid, gid, my_pidfd())
        }

        fn process_with(&self, uid: u32, gid: u32, pidfd: std::os::fd::OwnedFd) -> Process {
            let creds = PeerCredentials {
                pid: Self::PID,
                uid,
                gid,
            };
            Process::pin(creds, pidfd, PidfdSource::Peer, self.root.path()).unwrap()
        }

        fn attestor(&self, max_hash_bytes: u64) -> UnixAttestor {
            UnixAttestor::new(UnixAttestorConfig {
                max_hash_bytes,
                proc_root: self.root.path().to_owned(),
                ..UnixAttestorConfig::default()
            })
        }
    }

    fn ids() -> (u32, u32) {
        (geteuid().as_raw(), getegid().as_raw())
    }

    #[test]
    fn attestor_is_send_sync_and_defaults_are_sane() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<UnixAttestor>();
        assert_send_sync::<Arc<UnixAttestor>>();
        assert_send_sync::<Process>();
        let config = UnixAttestorConfig::default();
        assert_eq!(config.max_hash_bytes, 128 * 1024 * 1024);
        assert_eq!(config.hash_budget_bytes, 1024 * 1024 * 1024);
        assert_eq!(config.proc_root, Path::new("/proc"));
    }

    #[test]
    fn attests_the_current_process() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let attestation = attestor.attest(&me(), Digest::Wanted).unwrap();
        let mut sorted = attestation.credentials.clone();
        sorted.sort();
        assert_eq!(attestation.credentials, sorted, "selectors come sorted");
        let (uid, gid) = ids();
        let credentials = strings(&attestation.credentials);
        let binary = strings(&attestation.binary);

        let exe = std::env::current_exe().unwrap();
        let expected_sha = sha256_hex(&std::fs::read(&exe).unwrap());
        assert_eq!(
            with_prefix(&credentials, "unix:uid:"),
            [format!("unix:uid:{uid}")]
        );
        assert_eq!(
            with_prefix(&credentials, "unix:gid:"),
            [format!("unix:gid:{gid}")]
        );
        assert_eq!(
            binary,
            [
                format!("unix:path:{}", exe.display()),
                format!("unix:sha256:{expected_sha}")
            ]
        );
        assert_eq!(
            attestation.exe,
            Some(FileId::of(&std::fs::metadata(&exe).unwrap()))
        );
        if let Ok(Some(user)) = User::from_uid(geteuid()) {
            assert!(credentials.contains(&format!("unix:user:{}", user.name)));
        }
        let mut groups: Vec<String> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| format!("unix:supplementary_gid:{}", g.as_raw()))
            .collect();
        for group in &groups {
            assert!(
                credentials.contains(group),
                "{group} missing from {credentials:?}"
            );
        }
        groups.sort();
        groups.dedup();
        assert_eq!(
            with_prefix(&credentials, "unix:supplementary_gid:").len(),
            groups.len()
        );
    }

    #[test]
    fn second_attestation_uses_the_digest_cache() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let first = attestor.attest(&me(), Digest::Wanted).unwrap();
        assert_eq!(attestor.cache_len(), 1);
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 1);
        assert_eq!(attestor.stats.hash_hits.load(Ordering::Relaxed), 0);

        let second = attestor.attest(&me(), Digest::Wanted).unwrap();
        assert_eq!(first, second);
        assert_eq!(attestor.cache_len(), 1);
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 1);
        assert_eq!(attestor.stats.hash_hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn cached_only_attestation_never_hashes() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        assert_eq!(
            attestor.attest_cached(&me(), Digest::Wanted).unwrap(),
            None,
            "digest not cached yet"
        );
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 0);
        let full = attestor.attest(&me(), Digest::Wanted).unwrap();
        assert_eq!(
            attestor.attest_cached(&me(), Digest::Wanted).unwrap(),
            Some(full)
        );
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn no_digest_is_computed_when_none_is_wanted() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let attestation = attestor
            .attest_cached(&me(), Digest::NotWanted)
            .unwrap()
            .expect("nothing to hash");
        let binary = strings(&attestation.binary);
        assert_eq!(with_prefix(&binary, "unix:path:").len(), 1);
        assert!(with_prefix(&binary, "unix:sha256:").is_empty());
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_pinned_process_that_exits_is_replaced_even_if_its_pid_comes_back() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let process = Process::by_pid(pid, Path::new("/proc")).unwrap();
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        attestor.attest(&process, Digest::NotWanted).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let err = attestor.attest(&process, Digest::NotWanted).unwrap_err();
        assert!(
            matches!(err, AttestError::Replaced { pid: p } if p == pid),
            "{err:?}"
        );
    }

    #[test]
    fn a_recycled_pid_in_a_fake_proc_is_refused() {
        // The directory at the pid now shows another start time: another process got the
        // pid, even though the pidfd's process is alive (here: elsewhere).
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, b"x").unwrap();
        let (uid, gid) = ids();
        let fake = FakeProc::new(uid, gid, "", &program);
        let process = fake.process(uid, gid);
        let attestor = fake.attestor(DEFAULT_MAX_HASH_BYTES);
        attestor.attest(&process, Digest::Wanted).unwrap();
        fake.set_start_time(2000);
        let err = attestor.attest(&process, Digest::Wanted).unwrap_err();
        assert!(
            matches!(err, AttestError::Replaced { pid: 4242 }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "process 4242: the calling process exited or was replaced during attestation"
        );

        // Same start time, but the pinned process exited: refused too.
        fake.set_start_time(1000);
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let process = fake.process_with(uid, gid, pidfd);
        attestor.attest(&process, Digest::Wanted).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let err = attestor.attest(&process, Digest::Wanted).unwrap_err();
        assert!(
            matches!(err, AttestError::Replaced { pid: 4242 }),
            "{err:?}"
        );
    }

    #[test]
    fn invalid_pids_are_rejected() {
        for pid in [0, -1] {
            let err = Process::by_pid(pid, Path::new("/proc")).unwrap_err();
            assert!(matches!(err, AttestError::InvalidPid { .. }), "{err:?}");
        }
    }

    #[test]
    fn small_max_hash_bytes_omits_only_the_digest() {
        let attestor = UnixAttestor::new(UnixAttestorConfig {
            max_hash_bytes: 1,
            ..UnixAttestorConfig::default()
        });
        let selectors = all(&attestor.attest(&me(), Digest::Wanted).unwrap());
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
        let process = Process::by_pid(i32::try_from(child.id()).unwrap(), Path::new("/proc"));
        let result = process.and_then(|p| attestor.attest(&p, Digest::Wanted));
        child.kill().unwrap();
        child.wait().unwrap();
        let attestation = result.unwrap();
        assert!(attestation.binary.is_empty(), "{:?}", attestation.binary);
        assert_eq!(
            with_prefix(&strings(&attestation.credentials), "unix:uid:").len(),
            1
        );
    }

    #[test]
    fn fake_process_yields_exactly_spire_selectors() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, b"#!/bin/false\nnot really a program\n").unwrap();
        // uid/gid 0 are root everywhere; 4000000000 is unknown nearly everywhere.
        let fake = FakeProc::new(0, 0, "0 4000000000 ", &program);
        let attestor = fake.attestor(DEFAULT_MAX_HASH_BYTES);
        let attestation = attestor
            .attest(&fake.process(0, 0), Digest::Wanted)
            .unwrap();
        let root_group = Group::from_gid(Gid::from_raw(0)).unwrap().unwrap().name;
        let mut expected = vec![
            "unix:uid:0".to_owned(),
            "unix:user:root".to_owned(),
            "unix:gid:0".to_owned(),
            format!("unix:group:{root_group}"),
            "unix:supplementary_gid:0".to_owned(),
            format!("unix:supplementary_group:{root_group}"),
            "unix:supplementary_gid:4000000000".to_owned(),
        ];
        expected.sort();
        assert_eq!(strings(&attestation.credentials), expected);
        assert_eq!(
            strings(&attestation.binary),
            [
                format!("unix:path:{}", program.display()),
                format!(
                    "unix:sha256:{}",
                    sha256_hex(b"#!/bin/false\nnot really a program\n")
                ),
            ]
        );
    }

    #[test]
    fn fake_process_with_deleted_suffix_has_no_path_or_digest() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program (deleted)");
        std::fs::write(&program, b"gone").unwrap();
        let (uid, gid) = ids();
        let fake = FakeProc::new(uid, gid, "", &program);
        let attestation = fake
            .attestor(DEFAULT_MAX_HASH_BYTES)
            .attest(&fake.process(uid, gid), Digest::Wanted)
            .unwrap();
        assert!(attestation.binary.is_empty(), "{:?}", attestation.binary);
        assert!(with_prefix(&all(&attestation), "unix:supplementary").is_empty());
    }

    #[test]
    fn max_hash_bytes_is_inclusive() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, b"12345").unwrap();
        let (uid, gid) = ids();
        let fake = FakeProc::new(uid, gid, "", &program);
        let at_limit = all(&fake
            .attestor(5)
            .attest(&fake.process(uid, gid), Digest::Wanted)
            .unwrap());
        assert_eq!(
            with_prefix(&at_limit, "unix:sha256:"),
            [format!("unix:sha256:{}", sha256_hex(b"12345"))]
        );
        let over_limit = all(&fake
            .attestor(4)
            .attest(&fake.process(uid, gid), Digest::Wanted)
            .unwrap());
        assert!(with_prefix(&over_limit, "unix:sha256:").is_empty());
        assert_eq!(with_prefix(&over_limit, "unix:path:").len(), 1);
    }

    #[test]
    fn an_executable_that_keeps_changing_exhausts_its_users_hash_budget() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, [0u8; 1000]).unwrap();
        let (uid, gid) = ids();
        let fake = FakeProc::new(uid, gid, "", &program);
        let attestor = UnixAttestor::new(UnixAttestorConfig {
            hash_budget_bytes: 2500,
            proc_root: fake.root.path().to_owned(),
            ..UnixAttestorConfig::default()
        });
        let process = fake.process(uid, gid);
        let touch = |n: u8| {
            // New content and times: a cache miss, a full re-hash.
            std::fs::write(&program, [n; 1000]).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        };
        attestor.attest(&process, Digest::Wanted).unwrap();
        touch(1);
        attestor.attest(&process, Digest::Wanted).unwrap();
        // Unchanged: served from the cache, costs nothing.
        attestor.attest(&process, Digest::Wanted).unwrap();
        touch(2);
        let err = attestor.attest(&process, Digest::Wanted).unwrap_err();
        assert!(
            matches!(err, AttestError::HashBudget { uid: u, .. } if u == uid),
            "{err:?}"
        );
        assert_eq!(attestor.stats.hashes_computed.load(Ordering::Relaxed), 2);
        assert!(err.to_string().contains("retry later"), "{err}");
        // Without a digest wanted, the same caller is still attested.
        attestor.attest(&process, Digest::NotWanted).unwrap();
    }

    #[test]
    fn the_hash_budget_is_per_user_and_per_window() {
        let mut budget = HashBudget::new(100);
        let t0 = Instant::now();
        assert!(budget.charge(1, 60, t0));
        assert!(!budget.charge(1, 41, t0), "over the budget");
        assert!(budget.charge(1, 40, t0), "exactly the budget");
        assert!(budget.charge(2, 100, t0), "another user has its own");
        assert!(!budget.charge(1, 1, t0 + Duration::from_secs(59)));
        assert!(
            budget.charge(1, 100, t0 + HASH_BUDGET_WINDOW),
            "a new window"
        );
        assert!(!budget.charge(3, 101, t0), "one file over the budget");
    }

    #[test]
    fn a_path_that_names_another_file_here_is_not_a_selector() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let meta_a = std::fs::metadata(&a).unwrap();
        let a_str = a.to_str().unwrap();
        assert_eq!(same_file_here(1, a_str, &meta_a).as_deref(), Some(a_str));
        // What a bind mount over the path in the caller's namespace looks like to us: the
        // path names one file here, the process executes another.
        assert_eq!(same_file_here(1, b.to_str().unwrap(), &meta_a), None);
        assert_eq!(same_file_here(1, "/nonexistent/path", &meta_a), None);
    }

    #[test]
    fn changed_credentials_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("program");
        std::fs::write(&program, b"x").unwrap();
        let fake = FakeProc::new(1000, 1000, "", &program);
        let err = fake
            .attestor(DEFAULT_MAX_HASH_BYTES)
            .attest(&fake.process(1001, 1000), Digest::Wanted)
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
        let (uid, gid) = ids();
        let fake = FakeProc::new(uid, gid, "", &program);
        let process = fake.process(uid, gid);
        let status = fake.root.path().join("4242/status");
        std::fs::remove_file(&status).unwrap();
        std::fs::create_dir(&status).unwrap();
        let err = fake
            .attestor(DEFAULT_MAX_HASH_BYTES)
            .attest(&process, Digest::Wanted)
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
            .attest(&process, Digest::Wanted)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("parsing {}: malformed Uid line", status.display())
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
            "process 9 changed while it was being attested (it executed another program)"
        );
    }
}
