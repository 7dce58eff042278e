//! The one rustls crypto provider: ring, chosen explicitly everywhere so nothing falls
//! back to a default that would pull in aws-lc.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The ring provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default, for libraries that ask rustls for one.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
