//! Unix sockets: gRPC channels to a daemon's socket, and listeners bound only by the
//! process that holds the socket's instance lock.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::fs::PrivateDir;
use crate::lock::InstanceLock;

/// Connects to the Unix socket at `path`. The URI is a placeholder: the Workload API
/// standard says servers accept any `:authority`.
pub async fn channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
}

/// Binds the socket `name` in `dir` with file mode `mode`. A socket left there by an
/// earlier run is removed first; `_lock` (the socket's instance lock) proves no live
/// process still serves on it. Any other kind of file in the way is an error.
pub fn bind(
    dir: &PrivateDir,
    name: &str,
    mode: u32,
    _lock: &InstanceLock,
) -> std::io::Result<tokio::net::UnixListener> {
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(&path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The lock file that guards the socket `name`: `<name>.lock` beside it.
pub fn lock_name(name: &str) -> String {
    format!("{name}.lock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::DirMode;

    #[tokio::test]
    async fn binds_over_a_stale_socket_but_not_over_a_file() {
        let root = tempfile::tempdir().expect("tmp");
        let dir =
            PrivateDir::open_or_create(&root.path().join("run"), DirMode::Searchable).expect("dir");
        let lock = InstanceLock::acquire(&dir, &lock_name("api.sock"), "socket").expect("lock");
        let first = bind(&dir, "api.sock", 0o777, &lock).expect("bind");
        drop(first);
        // The socket file is left behind; the lock holder may replace it.
        let second = bind(&dir, "api.sock", 0o777, &lock).expect("rebind");
        let mode = std::fs::metadata(dir.join("api.sock"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o777);
        drop(second);
        std::fs::remove_file(dir.join("api.sock")).expect("rm");
        std::fs::write(dir.join("api.sock"), b"not a socket").expect("file");
        let err = bind(&dir, "api.sock", 0o777, &lock).expect_err("file in the way");
        assert!(err.to_string().contains("not a socket"), "{err}");
    }
}
