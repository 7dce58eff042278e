//! The Workload API endpoint address, as clients read it from `SPIFFE_ENDPOINT_SOCKET`.

use std::path::PathBuf;

/// Parses `SPIFFE_ENDPOINT_SOCKET`-style addresses: `unix:///abs/path` or `unix:/abs/path`
/// (the SPIFFE Workload Endpoint standard); a bare absolute path is accepted too.
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
