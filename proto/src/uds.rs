//! The one piece of transport glue both binaries share: a gRPC channel over a Unix
//! socket (the admin socket, the Workload API socket).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Connects lazily-on-first-use to the Unix socket at `path`. The URI is a placeholder:
/// the Workload API standard says servers accept any `:authority`.
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

/// Binds a Unix socket at `path` with file mode `mode`, replacing a stale socket left by
/// an earlier run (but never another kind of file).
pub fn bind(path: &std::path::Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Parses `SPIFFE_ENDPOINT_SOCKET`-style addresses: `unix:///abs/path` or `unix:/abs/path`
/// (spec §5.5); a bare absolute path is accepted too.
pub fn socket_path_from_uri(raw: &str) -> Result<PathBuf, String> {
    let path = if let Some(rest) = raw.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return Err(format!(
                "\"{raw}\" names a host; write unix:///absolute/path"
            ));
        }
        rest
    } else if let Some(rest) = raw.strip_prefix("unix:") {
        rest
    } else if raw.starts_with("tcp:") {
        return Err(format!(
            "\"{raw}\": this agent serves the Workload API on a Unix socket only"
        ));
    } else {
        raw
    };
    if !path.starts_with('/') || path.contains(['?', '#']) {
        return Err(format!("\"{raw}\" is not an absolute unix socket path"));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::socket_path_from_uri as p;

    #[test]
    fn endpoint_addresses() {
        assert_eq!(
            p("unix:///run/a.sock").as_deref(),
            Ok(std::path::Path::new("/run/a.sock"))
        );
        assert_eq!(
            p("unix:/run/a.sock").as_deref(),
            Ok(std::path::Path::new("/run/a.sock"))
        );
        assert_eq!(
            p("/run/a.sock").as_deref(),
            Ok(std::path::Path::new("/run/a.sock"))
        );
        assert!(p("unix://host/x").is_err());
        assert!(p("unix:rel").is_err());
        assert!(p("tcp://127.0.0.1:1").is_err());
        assert!(p("unix:///a?b").is_err());
    }
}
