//! The agent's own identity: its X509-SVID, private key and the trust bundle, kept in
//! `data_dir` (key 0600) so a restart needs no new join token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lanyard_daemon::fs::{FsError, PrivateDir};

use lanyard_proto::{SpiffeId, svid};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use zeroize::Zeroizing;

/// A private key with its PKCS#8 DER, zeroized on drop; `Debug` shows only its length.
pub struct PrivateKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({} bytes)", self.0.len())
    }
}

impl PrivateKey {
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }
}

/// A fresh P-256 key and a CSR for it naming `id` (when given) as its URI SAN.
pub fn key_and_csr(id: Option<&SpiffeId>) -> Result<(PrivateKey, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(id) = id {
        params.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into()?)];
    }
    let csr = params.serialize_request(&key)?;
    Ok((
        PrivateKey(Zeroizing::new(key.serialize_der())),
        csr.der().to_vec(),
    ))
}

/// The trust domain's CA certificates, DER.
pub type Bundle = Vec<Vec<u8>>;

/// The agent's SVID as held in memory.
#[derive(Debug)]
pub struct AgentSvid {
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub key: PrivateKey,
    pub not_before: i64,
    pub not_after: i64,
}

/// Errors reading or writing the stored identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("data_dir cannot store the agent's identity, so the join token was not used: {0}")]
    NotWritable(FsError),
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

const SVID_FILE: &str = "agent_svid.pem";
const KEY_FILE: &str = "agent_svid.key";
const BUNDLE_FILE: &str = "bundle.pem";

/// The stored identity in the agent's (checked, private) data directory.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    dir: Arc<PrivateDir>,
}

fn pem_all(label: &str, ders: &[Vec<u8>]) -> String {
    lanyard_daemon::output::pem_all(label, ders.iter().map(Vec::as_slice))
}

impl IdentityFiles {
    pub fn new(dir: Arc<PrivateDir>) -> Self {
        IdentityFiles { dir }
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join(BUNDLE_FILE)
    }

    /// Loads the stored SVID and bundle, if both exist. An expired SVID is returned
    /// too; the caller decides (it cannot be renewed, so a join token is needed).
    pub fn load(&self) -> Result<Option<(AgentSvid, Bundle)>, IdentityError> {
        let (Some(svid_pem), Some(key_pem)) =
            (self.dir.read(SVID_FILE)?, self.dir.read_secret(KEY_FILE)?)
        else {
            return Ok(None);
        };
        let (svid_path, key_path, bundle_path) = (
            self.dir.join(SVID_FILE),
            self.dir.join(KEY_FILE),
            self.bundle_path(),
        );
        let corrupt = |p: &Path, reason: String| IdentityError::Corrupt {
            path: p.to_path_buf(),
            reason,
        };
        let chain: Vec<Vec<u8>> = pem::parse_many(&svid_pem)
            .map_err(|e| corrupt(&svid_path, e.to_string()))?
            .into_iter()
            .map(pem::Pem::into_contents)
            .collect();
        let leaf = chain
            .first()
            .ok_or_else(|| corrupt(&svid_path, "no certificate".into()))?;
        let info = svid::check_leaf(leaf, None).map_err(|e| corrupt(&svid_path, e.to_string()))?;
        let key = pem::parse(&*key_pem).map_err(|e| corrupt(&key_path, e.to_string()))?;
        let key = PrivateKey(Zeroizing::new(key.into_contents()));
        // A crash between writing the key and the certificate must not go unnoticed.
        let key_public = rcgen::KeyPair::try_from(key.pkcs8_der())
            .map_err(|e| corrupt(&key_path, e.to_string()))?
            .public_key_raw()
            .to_vec();
        let leaf_public = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
            .map_err(|e| corrupt(&svid_path, e.to_string()))?;
        if key_public != leaf_public {
            return Err(corrupt(
                &key_path,
                "the key does not match agent_svid.pem".into(),
            ));
        }
        let bundle_pem = self
            .dir
            .read(BUNDLE_FILE)?
            .ok_or_else(|| corrupt(&bundle_path, "missing".into()))?;
        let bundle: Vec<Vec<u8>> = pem::parse_many(&bundle_pem)
            .map_err(|e| corrupt(&bundle_path, e.to_string()))?
            .into_iter()
            .map(pem::Pem::into_contents)
            .collect();
        if bundle.is_empty() {
            return Err(corrupt(&bundle_path, "no certificate".into()));
        }
        Ok(Some((
            AgentSvid {
                spiffe_id: info.spiffe_id,
                chain,
                key,
                not_before: info.not_before,
                not_after: info.not_after,
            },
            bundle,
        )))
    }

    /// Stores the SVID (key 0600) and bundle, each file replaced atomically.
    pub fn store(&self, svid: &AgentSvid, bundle: &[Vec<u8>]) -> Result<(), IdentityError> {
        let key_pem = Zeroizing::new(lanyard_daemon::output::pem(
            "PRIVATE KEY",
            svid.key.pkcs8_der(),
        ));
        self.dir.write_atomic(KEY_FILE, key_pem.as_bytes())?;
        self.dir
            .write_atomic(SVID_FILE, pem_all("CERTIFICATE", &svid.chain).as_bytes())?;
        self.dir
            .write_atomic(BUNDLE_FILE, pem_all("CERTIFICATE", bundle).as_bytes())?;
        Ok(())
    }

    /// Proves the directory can take the identity files now, before a join token (which
    /// cannot be had twice) is spent: a probe as large as the files is written, synced
    /// and removed, so a read-only or full data_dir fails here.
    pub fn check_writable(&self) -> Result<(), IdentityError> {
        const PROBE: &str = ".identity-probe";
        let written = self.dir.write_atomic(PROBE, &[0u8; 16 * 1024]);
        let removed = self.dir.remove(PROBE);
        written.and(removed).map_err(IdentityError::NotWritable)
    }

    /// Whether an identity is stored (both the certificate and the key).
    pub fn exists(&self) -> Result<bool, IdentityError> {
        Ok(self.dir.exists(SVID_FILE)? && self.dir.exists(KEY_FILE)?)
    }

    /// Forgets the stored SVID (after the server says this agent is no longer known).
    pub fn forget(&self) {
        let _ = self.dir.remove(SVID_FILE);
        let _ = self.dir.remove(KEY_FILE);
    }
}
