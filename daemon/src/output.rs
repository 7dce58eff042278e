//! What CLI commands print: lines to stdout that end the process quietly when the reader
//! went away (`lanyard-server entry show | head`), times as RFC 3339 UTC, PEM with LF.

use std::io::Write;

/// Writes `args` and a newline to stdout. A closed pipe ends the process with status 0,
/// as ripgrep does: the reader has what it wanted. Any other write error is reported
/// on stderr and ends the process with status 1.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    if let Err(e) = written.and_then(|()| out.flush()) {
        exit_on_write_error(&e);
    }
}

/// Writes `text` as is (no newline added).
pub fn write_str(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        exit_on_write_error(&e);
    }
}

// The one sanctioned exit: the reader is gone, so nothing else can be said anyway.
#[allow(clippy::disallowed_methods)]
fn exit_on_write_error(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("cannot write to standard output: {e}");
    std::process::exit(1);
}

/// `println!` for CLI output, through [`write_line`].
#[macro_export]
macro_rules! outln {
    () => { $crate::output::write_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::output::write_line(format_args!($($arg)*)) };
}

/// Unix seconds as RFC 3339 UTC, `2026-12-03T17:15:51Z`.
pub fn rfc3339(unix_secs: i64) -> String {
    let secs = u64::try_from(unix_secs).unwrap_or(0);
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// One PEM block with LF line endings (the `pem` crate defaults to CRLF).
pub fn pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// PEM blocks for each of `ders`, concatenated.
pub fn pem_all<'a>(label: &str, ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    ders.into_iter().map(|der| pem(label, der)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_pem() {
        assert_eq!(rfc3339(1_796_318_151), "2026-12-03T17:15:51Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        let text = pem("CERTIFICATE", &[1, 2, 3]);
        assert!(!text.contains('\r'), "{text:?}");
        assert_eq!(
            text,
            "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n"
        );
        assert_eq!(
            pem_all("X", [&[1u8][..], &[2u8][..]])
                .matches("BEGIN X")
                .count(),
            2
        );
    }
}
