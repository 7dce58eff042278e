//! One running instance per data directory and per socket: an exclusive `flock` held for
//! the life of the process. The kernel drops it when the process dies, however it dies,
//! so a stale lock never needs cleaning up, and whoever holds it may remove a stale socket.

use std::fs::File;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::fs::{FsError, PrivateDir};

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another process already uses {what} (it holds the lock {path}); stop it first, or choose another {what}"
    )]
    Held { what: String, path: PathBuf },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: Errno },
}

/// An exclusive lock, released when dropped (or when the process exits).
#[derive(Debug)]
pub struct InstanceLock {
    path: PathBuf,
    _lock: Flock<File>,
}

impl InstanceLock {
    /// Takes the lock file `name` in `dir` without waiting; `what` names the resource for
    /// the error ("data_dir /var/lib/lanyard/agent").
    pub fn acquire(
        dir: &PrivateDir,
        name: &str,
        what: impl Into<String>,
    ) -> Result<Self, LockError> {
        let path = dir.join(name);
        let file = dir.open_lock_file(name)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(InstanceLock { path, _lock: lock }),
            Err((_, Errno::EWOULDBLOCK)) => Err(LockError::Held {
                what: what.into(),
                path,
            }),
            Err((_, source)) => Err(LockError::Lock { path, source }),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::DirMode;

    #[test]
    fn second_holder_is_refused_until_the_first_lets_go() {
        let root = tempfile::tempdir().expect("tmp");
        let dir =
            PrivateDir::open_or_create(&root.path().join("d"), DirMode::Private).expect("dir");
        let first = InstanceLock::acquire(&dir, "lock", "data_dir d").expect("first");
        let err = InstanceLock::acquire(&dir, "lock", "data_dir d").expect_err("second");
        assert!(
            err.to_string()
                .starts_with("another process already uses data_dir d"),
            "{err}"
        );
        drop(first);
        InstanceLock::acquire(&dir, "lock", "data_dir d").expect("free again");
    }
}
