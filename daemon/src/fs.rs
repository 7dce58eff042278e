//! Directories and files a daemon keeps secrets in, never trusted as found.
//!
//! A [`PrivateDir`] is opened once (`O_DIRECTORY | O_NOFOLLOW`) and checked through that
//! descriptor: it must be owned by the daemon's uid and give group and others nothing
//! ([`DirMode::Private`]) or at most read and search ([`DirMode::Searchable`], for a
//! socket directory every user must reach). Its parents must not be replaceable by
//! anyone else (owned by root or the daemon, not writable by group or others unless
//! sticky, like `/tmp`), as OpenSSH's `StrictModes` requires of `~/.ssh`. Every file
//! inside is then opened relative to the directory's descriptor with `O_NOFOLLOW`, so a
//! symlink planted at a file name is refused rather than followed, and written
//! atomically: an exclusive (`O_EXCL`) temporary file with mode 0600, fsync, `renameat`,
//! fsync of the directory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};
use zeroize::Zeroizing;

/// Why a directory or file was refused or could not be used. Each names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is a symbolic link; it must be the real {kind} itself")]
    Symlink { path: PathBuf, kind: &'static str },
    #[error("{path} is not a {kind}")]
    WrongKind { path: PathBuf, kind: &'static str },
    #[error(
        "{path} is owned by uid {owner}, not by uid {me} that runs this daemon (chown it, or choose another path)"
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} has mode {mode:04o}; it must not be {what} (chmod {fix:o} {path})")]
    Mode {
        path: PathBuf,
        mode: u32,
        what: &'static str,
        fix: u32,
    },
    #[error(
        "{path} sits in {parent}, which uid {owner} or other users can write to (mode {mode:04o}); use a directory only root or this daemon can change"
    )]
    UnsafeParent {
        path: PathBuf,
        parent: PathBuf,
        owner: u32,
        mode: u32,
    },
}

/// Who besides the owner may look into a [`PrivateDir`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirMode {
    /// 0700: data directories (keys, datastore) and the admin socket's directory.
    Private,
    /// 0755: a socket directory every local user must be able to search.
    Searchable,
}

impl DirMode {
    fn create_mode(self) -> u32 {
        match self {
            DirMode::Private => 0o700,
            DirMode::Searchable => 0o755,
        }
    }

    /// The permission bits group and others must not have.
    fn forbidden(self) -> u32 {
        match self {
            DirMode::Private => 0o077,
            DirMode::Searchable => 0o022,
        }
    }
}

/// The effective uid of this process.
pub fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Makes every file and directory this process creates private unless it says
/// otherwise (the Workload API socket is made connectable explicitly). Daemons call
/// this first, so even files created by libraries (SQLite's WAL) are 0600.
pub fn set_private_umask() {
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FsError + '_ {
    move |source| FsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn errno(path: &Path) -> impl FnOnce(Errno) -> FsError + '_ {
    move |e| FsError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Checks that no one but root and this daemon can replace `path` by renaming something
/// in one of its parents.
fn check_parents(path: &Path) -> Result<(), FsError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(io(path))?.join(path)
    };
    let me = my_uid();
    for parent in absolute.ancestors().skip(1) {
        let meta = std::fs::metadata(parent).map_err(io(parent))?;
        let mode = meta.mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        let owner_ok = meta.uid() == 0 || meta.uid() == me;
        if !owner_ok || (mode & 0o022 != 0 && !sticky) {
            return Err(FsError::UnsafeParent {
                path: path.to_path_buf(),
                parent: parent.to_path_buf(),
                owner: meta.uid(),
                mode,
            });
        }
    }
    Ok(())
}

/// A directory checked once and used through its descriptor from then on.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl PrivateDir {
    /// Opens `path`, creating it (and missing parents) if needed, and checks it and its
    /// parents as the module describes.
    pub fn open_or_create(path: &Path, mode: DirMode) -> Result<Self, FsError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        // Before creating anything: nothing may appear under an unsafe parent.
        check_parents(path)?;
        match nix::unistd::mkdir(path, Mode::from_bits_truncate(mode.create_mode())) {
            // The umask (0077 in the daemons) would narrow a searchable directory.
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.create_mode()))
                    .map_err(io(path))?;
            }
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno(path)(e)),
        }
        Self::open(path, mode)
    }

    /// Opens an existing directory and checks it.
    pub fn open(path: &Path, mode: DirMode) -> Result<Self, FsError> {
        check_parents(path)?;
        let fd = match nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR (or ELOOP).
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
                return Err(if is_link {
                    FsError::Symlink {
                        path: path.into(),
                        kind: "directory",
                    }
                } else {
                    FsError::WrongKind {
                        path: path.into(),
                        kind: "directory",
                    }
                });
            }
            Err(e) => return Err(errno(path)(e)),
        };
        // Checked through the descriptor: what was checked is what will be used.
        let meta = File::from(fd.try_clone().map_err(io(path))?)
            .metadata()
            .map_err(io(path))?;
        let me = my_uid();
        if meta.uid() != me {
            return Err(FsError::Owner {
                path: path.into(),
                owner: meta.uid(),
                me,
            });
        }
        let bits = meta.mode() & 0o7777;
        if bits & mode.forbidden() != 0 {
            return Err(FsError::Mode {
                path: path.into(),
                mode: bits,
                what: match mode {
                    DirMode::Private => "accessible to group or others",
                    DirMode::Searchable => "writable by group or others",
                },
                fix: mode.create_mode(),
            });
        }
        Ok(PrivateDir {
            path: path.to_path_buf(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` inside this directory (for messages and for libraries that
    /// open files by name).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn open_at(&self, name: &str, flags: OFlag, mode: u32) -> Result<Option<File>, FsError> {
        let path = self.join(name);
        match openat(
            self.fd.as_fd(),
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        ) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP) => Err(FsError::Symlink { path, kind: "file" }),
            Err(e) => Err(errno(&path)(e)),
        }
    }

    /// Checks an opened file: a regular file owned by this daemon, not writable by
    /// group or others, and with `secret` not readable by them either.
    fn check_file(&self, name: &str, file: &File, secret: bool) -> Result<(), FsError> {
        let path = self.join(name);
        let meta = file.metadata().map_err(io(&path))?;
        if !meta.is_file() {
            return Err(FsError::WrongKind {
                path,
                kind: "regular file",
            });
        }
        let me = my_uid();
        if meta.uid() != me {
            return Err(FsError::Owner {
                owner: meta.uid(),
                path,
                me,
            });
        }
        let bits = meta.mode() & 0o7777;
        let (forbidden, what) = if secret {
            (0o077, "readable by group or others")
        } else {
            (0o022, "writable by group or others")
        };
        if bits & forbidden != 0 {
            return Err(FsError::Mode {
                path,
                mode: bits,
                what,
                fix: 0o600,
            });
        }
        Ok(())
    }

    fn read_checked(
        &self,
        name: &str,
        secret: bool,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, FsError> {
        let Some(mut file) = self.open_at(name, OFlag::O_RDONLY, 0)? else {
            return Ok(None);
        };
        self.check_file(name, &file, secret)?;
        let mut bytes = Zeroizing::new(Vec::new());
        file.read_to_end(&mut bytes).map_err(io(&self.join(name)))?;
        Ok(Some(bytes))
    }

    /// Reads a file that holds no secret (a certificate); `None` if it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, FsError> {
        Ok(self.read_checked(name, false)?.map(|bytes| bytes.to_vec()))
    }

    /// Reads a secret (a private key): it must also be unreadable by group and others.
    /// The bytes are zeroized when dropped.
    pub fn read_secret(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, FsError> {
        self.read_checked(name, true)
    }

    /// Whether `name` exists (as anything, a symlink included).
    pub fn exists(&self, name: &str) -> Result<bool, FsError> {
        match nix::sys::stat::fstatat(
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(errno(&self.join(name))(e)),
        }
    }

    /// Replaces `name` with `bytes` atomically; the file has mode 0600.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), FsError> {
        let tmp = format!(".{name}.{}.tmp", random_suffix());
        let tmp_path = self.join(&tmp);
        let Some(mut file) = self.open_at(
            &tmp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            0o600,
        )?
        else {
            return Err(FsError::Io {
                path: tmp_path,
                source: std::io::ErrorKind::NotFound.into(),
            });
        };
        let written = file
            .write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(io(&tmp_path))
            .and_then(|()| {
                renameat(self.fd.as_fd(), tmp.as_str(), self.fd.as_fd(), name)
                    .map_err(errno(&self.join(name)))
            });
        if let Err(e) = written {
            let _ = unlinkat(self.fd.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        self.sync()
    }

    /// Makes sure `name` exists as an empty-or-existing private file (0600, ours, not a
    /// link), for libraries that open files by path (SQLite).
    pub fn ensure_private_file(&self, name: &str) -> Result<(), FsError> {
        let file = match self.open_at(name, OFlag::O_RDONLY, 0)? {
            Some(file) => file,
            None => self
                .open_at(
                    name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                    0o600,
                )?
                .ok_or_else(|| FsError::Io {
                    path: self.join(name),
                    source: std::io::ErrorKind::NotFound.into(),
                })?,
        };
        self.check_file(name, &file, true)
    }

    /// Opens (creating, 0600) a file that only serves as a lock.
    pub(crate) fn open_lock_file(&self, name: &str) -> Result<File, FsError> {
        let file = self
            .open_at(name, OFlag::O_RDWR | OFlag::O_CREAT, 0o600)?
            .ok_or_else(|| FsError::Io {
                path: self.join(name),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        self.check_file(name, &file, true)?;
        Ok(file)
    }

    /// Removes `name` if it exists.
    pub fn remove(&self, name: &str) -> Result<(), FsError> {
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => self.sync(),
            Err(e) => Err(errno(&self.join(name))(e)),
        }
    }

    /// Proves the directory is writable now (before spending something that cannot be
    /// had twice, like a join token) by writing and removing a probe file.
    pub fn check_writable(&self) -> Result<(), FsError> {
        let probe = ".write-probe";
        self.write_atomic(probe, b"")?;
        self.remove(probe)
    }

    fn sync(&self) -> Result<(), FsError> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(errno(&self.path))
    }
}

/// 64 random bits in hex, for temporary file names no one can predict.
fn random_suffix() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // Without OS randomness, fall back to the pid and time: O_EXCL still makes the
    // create safe, unpredictability only avoids a planted name causing an error.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = (u64::from(std::process::id()) << 32 | u64::from(nanos)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn creates_private_dirs_and_refuses_loose_ones() {
        let root = tmp();
        let path = root.path().join("a/data");
        let dir = PrivateDir::open_or_create(&path, DirMode::Private).expect("create");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o700
        );
        drop(dir);
        chmod(&path, 0o750);
        let err = PrivateDir::open_or_create(&path, DirMode::Private).expect_err("0750");
        assert!(err.to_string().contains("chmod 700"), "{err}");
        // A socket directory may be searchable by all, never writable.
        PrivateDir::open(&path, DirMode::Searchable).expect("0750 is searchable-only");
        chmod(&path, 0o777);
        let err = PrivateDir::open(&path, DirMode::Searchable).expect_err("0777");
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
    }

    #[test]
    fn refuses_symlinked_dirs_and_files() {
        let root = tmp();
        let real = root.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        chmod(&real, 0o700);
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = PrivateDir::open(&link, DirMode::Private).expect_err("link");
        assert!(matches!(err, FsError::Symlink { .. }), "{err}");

        let dir = PrivateDir::open(&real, DirMode::Private).expect("open");
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"keep").expect("victim");
        std::os::unix::fs::symlink(&victim, real.join("ca.key")).expect("plant");
        assert!(matches!(
            dir.read_secret("ca.key"),
            Err(FsError::Symlink { .. })
        ));
        // Writing replaces the link itself (rename over it), never the file it names.
        dir.write_atomic("ca.key", b"new").expect("write");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"keep");
        assert_eq!(
            dir.read_secret("ca.key")
                .expect("read")
                .expect("exists")
                .as_slice(),
            b"new"
        );
        // A planted temporary name cannot redirect the write either: names are random
        // and created with O_EXCL.
        assert!(dir.exists("ca.key").expect("exists"));
        assert!(!dir.exists("nothing").expect("exists"));
    }

    #[test]
    fn secrets_must_be_private_and_writes_are_0600() {
        let root = tmp();
        let dir =
            PrivateDir::open_or_create(&root.path().join("d"), DirMode::Private).expect("dir");
        dir.write_atomic("key", b"secret").expect("write");
        let path = dir.join("key");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o600
        );
        chmod(&path, 0o640);
        let err = dir.read_secret("key").expect_err("0640");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert!(
            dir.read("key")
                .expect("a certificate may be 0640")
                .is_some()
        );
        assert_eq!(dir.read("missing").expect("missing"), None);
        dir.ensure_private_file("db").expect("create");
        assert_eq!(
            std::fs::metadata(dir.join("db")).expect("meta").mode() & 0o777,
            0o600
        );
        dir.check_writable().expect("writable");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn parents_writable_by_others_are_refused() {
        let root = tmp();
        let open = root.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        chmod(&open, 0o777);
        let err = PrivateDir::open_or_create(&open.join("data"), DirMode::Private)
            .expect_err("world-writable parent");
        assert!(matches!(err, FsError::UnsafeParent { .. }), "{err}");
        assert!(
            !open.join("data").exists(),
            "nothing is created under an unsafe parent"
        );
        // Sticky, like /tmp, is fine: others cannot rename what they do not own.
        chmod(&open, 0o1777);
        PrivateDir::open_or_create(&open.join("data"), DirMode::Private).expect("sticky parent");
    }
}
