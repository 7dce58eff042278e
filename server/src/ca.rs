//! The trust domain's certificate authority: a self-signed P-256 root created on first
//! start, its key persisted 0600 in `data_dir`, and X509-SVID signing that follows the
//! profile of spec/spiffe.md §2 exactly.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_daemon::fs::{FsError, PrivateDir};
use lanyard_proto::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateSigningRequestDer;
use zeroize::Zeroizing;

/// notBefore is backdated this much so a verifier whose clock is slightly behind still
/// accepts a fresh SVID (SPIRE uses the same 10 s).
const BACKDATE: Duration = Duration::from_secs(10);

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("CA key file {0} does not hold a P-256 PKCS#8 key")]
    BadKey(PathBuf),
    #[error("CA certificate {path} is unusable: {reason}")]
    BadCert { path: PathBuf, reason: String },
    #[error("CSR is not a valid PKCS#10 request with a verifying signature")]
    BadCsr,
    #[error("CSR key must be ECDSA P-256 (signed with SHA-256)")]
    CsrAlgorithm,
    #[error("CSR must carry at most one URI SAN; it has {0}")]
    CsrUriCount(usize),
    #[error("CSR's URI SAN is not a valid SPIFFE ID: {0}")]
    CsrBadId(String),
    #[error("CSR asks for {asked}, but the entry is {expected}")]
    CsrIdMismatch { asked: String, expected: String },
    #[error("CSR reuses a key that is not fresh")]
    CsrKeyReused,
    #[error("the CA expired; rotate it")]
    Expired,
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// The CA's files in `data_dir`.
const KEY_FILE: &str = "ca.key";
const CERT_FILE: &str = "ca.pem";

/// A signed X509-SVID: the leaf followed by the chain up to (not including) the root.
#[derive(Debug, Clone)]
pub struct SignedSvid {
    pub chain: Vec<Vec<u8>>,
    pub serial_hex: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// What a CSR asks for, after its signature was verified.
#[derive(Debug)]
pub struct VerifiedCsr {
    /// The single URI SAN, if the CSR names one (agent CSRs need not).
    pub spiffe_id: Option<SpiffeId>,
    params: CertificateSigningRequestParams,
}

impl VerifiedCsr {
    /// Parses a DER CSR and verifies its self-signature, that its key is P-256 and that
    /// it names at most one URI SAN, a valid SPIFFE ID.
    pub fn parse(der: &[u8]) -> Result<Self, CaError> {
        let csr_der = CertificateSigningRequestDer::from(der);
        let params =
            CertificateSigningRequestParams::from_der(&csr_der).map_err(|_| CaError::BadCsr)?;
        if params.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::CsrAlgorithm);
        }
        let uris: Vec<&str> = params
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        let spiffe_id = match uris.as_slice() {
            [] => None,
            [uri] => Some(
                SpiffeId::parse(uri).map_err(|e| CaError::CsrBadId(format!("\"{uri}\": {e}")))?,
            ),
            more => return Err(CaError::CsrUriCount(more.len())),
        };
        Ok(VerifiedCsr { spiffe_id, params })
    }

    /// The CSR's public key (the SubjectPublicKeyInfo bit string contents).
    pub fn public_key(&self) -> &rcgen::PublicKey {
        &self.params.public_key
    }
}

/// The certificate authority. Cheap to share behind an `Arc`.
pub struct Ca {
    trust_domain: TrustDomain,
    cert_der: Vec<u8>,
    not_after: i64,
    issuer: Issuer<'static, KeyPair>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn offset(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl Ca {
    /// Loads the CA from `dir` (`ca.key`, `ca.pem`), or creates a new one valid for
    /// `ttl` if there is none or the stored one has expired. Returns the CA and whether
    /// it was created.
    pub fn load_or_create(
        dir: &PrivateDir,
        trust_domain: &TrustDomain,
        ttl: Duration,
    ) -> Result<(Self, bool), CaError> {
        if let (Some(key_pem), Some(cert_pem)) = (dir.read_secret(KEY_FILE)?, dir.read(CERT_FILE)?)
        {
            let ca = Self::load(dir, &key_pem, &cert_pem, trust_domain)?;
            if ca.not_after > now_unix() {
                return Ok((ca, false));
            }
            tracing::warn!(path = %dir.join(CERT_FILE).display(), "stored CA has expired; creating a new one");
        }
        let ca = Self::create(trust_domain, ttl)?;
        let key = KeyPairPem::from(ca.issuer.key());
        dir.write_atomic(KEY_FILE, key.0.as_bytes())?;
        dir.write_atomic(
            CERT_FILE,
            lanyard_daemon::output::pem("CERTIFICATE", &ca.cert_der).as_bytes(),
        )?;
        Ok((ca, true))
    }

    fn load(
        dir: &PrivateDir,
        key_pem: &[u8],
        cert_pem: &[u8],
        trust_domain: &TrustDomain,
    ) -> Result<Self, CaError> {
        let (key_path, cert_path) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
        // read_secret already refused a key others can read, as ssh does.
        let key_pem = Zeroizing::new(String::from_utf8_lossy(key_pem).into_owned());
        let key = KeyPair::from_pem(&key_pem).map_err(|_| CaError::BadKey(key_path.clone()))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::BadKey(key_path));
        }
        let bad = |reason: String| CaError::BadCert {
            path: cert_path.clone(),
            reason,
        };
        let cert_der = pem::parse(cert_pem)
            .map_err(|e| bad(e.to_string()))?
            .into_contents();
        let not_after = lanyard_proto::svid::check_ca(&cert_der).map_err(|e| bad(e.to_string()))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| bad(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("it does not match ca.key".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Ca {
            trust_domain: trust_domain.clone(),
            cert_der,
            not_after,
            issuer,
            rng: SystemRandom::new(),
        })
    }

    /// A new self-signed root: cA=true, keyUsage critical keyCertSign+cRLSign, URI SAN
    /// `spiffe://<td>` (a CA's ID has no path).
    pub fn create(trust_domain: &TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        let rng = SystemRandom::new();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = now_unix();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "US");
        dn.push(DnType::OrganizationName, "Lanyard");
        dn.push(DnType::CommonName, format!("Lanyard CA {}", trust_domain));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(trust_domain.id_string().try_into()?)];
        params.not_before = offset(now - BACKDATE.as_secs() as i64);
        params.not_after = offset(now + ttl.as_secs() as i64);
        params.serial_number = Some(random_serial(&rng));
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().to_vec();
        let not_after = now + ttl.as_secs() as i64;
        let issuer = Issuer::new(params, key);
        Ok(Ca {
            trust_domain: trust_domain.clone(),
            cert_der,
            not_after,
            issuer,
            rng,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Signs an X509-SVID for `id` over `public_key` valid for `ttl` (capped at the CA's
    /// own expiry), following spec §2: one URI SAN, basicConstraints `30 00`, keyUsage
    /// critical digitalSignature (+keyEncipherment, keyAgreement), EKU serverAuth and
    /// clientAuth, 128-bit random serial, SKI and AKI.
    pub fn sign_svid(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<SignedSvid, CaError> {
        let now = now_unix();
        if now >= self.not_after {
            return Err(CaError::Expired);
        }
        let not_after = (now + ttl.as_secs() as i64).min(self.not_after);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "US");
        dn.push(DnType::OrganizationName, "Lanyard");
        // The first DNS name doubles as CommonName, where it fits (ub-common-name is 64).
        if let Some(first) = dns_names.first().filter(|d| d.len() <= 64) {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = std::iter::once(Ok(SanType::URI(id.as_str().try_into()?)))
            .chain(
                dns_names
                    .iter()
                    .map(|d| Ok(SanType::DnsName(d.as_str().try_into()?))),
            )
            .collect::<Result<_, rcgen::Error>>()?;
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset(now - BACKDATE.as_secs() as i64);
        params.not_after = offset(not_after);
        let serial = random_serial(&self.rng);
        let serial_hex = hex_trimmed(&serial.to_bytes());
        params.serial_number = Some(serial);
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(SignedSvid {
            chain: vec![cert.der().to_vec()],
            serial_hex,
            not_after,
        })
    }
}

/// 128 random bits. rcgen encodes them as a positive DER INTEGER (a 0x00 octet is
/// prepended when the top bit is set), so the serial is positive and at most 17 octets.
fn random_serial(rng: &SystemRandom) -> SerialNumber {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails if the OS has no entropy source; there is no safe fallback.
    if rng.fill(&mut bytes).is_err() {
        panic!("the operating system's random source failed");
    }
    SerialNumber::from_slice(&bytes)
}

/// Lowercase hex without leading zero octets, the form the datastore and logs use.
pub fn hex_trimmed(bytes: &[u8]) -> String {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    hex::encode(&bytes[start..])
}

/// The CA key as PEM, zeroized on drop.
struct KeyPairPem(Zeroizing<String>);

impl From<&KeyPair> for KeyPairPem {
    fn from(key: &KeyPair) -> Self {
        KeyPairPem(Zeroizing::new(key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanyard_proto::svid::{check_ca, check_leaf};

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").expect("td")
    }

    fn csr_for(id: &str) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
        let csr = params.serialize_request(&key).expect("csr");
        (key, csr.der().to_vec())
    }

    #[test]
    fn root_and_leaf_follow_the_svid_profile() {
        let ca = Ca::create(&td(), Duration::from_secs(3600)).expect("ca");
        assert_eq!(check_ca(ca.cert_der()).expect("ca profile"), ca.not_after());
        let (_key, csr) = csr_for("spiffe://example.org/web");
        let csr = VerifiedCsr::parse(&csr).expect("csr");
        let id = csr.spiffe_id.clone().expect("id");
        let svid = ca
            .sign_svid(
                &id,
                &csr.params.public_key,
                Duration::from_secs(7200),
                &["web.example.org".into()],
            )
            .expect("sign");
        let info = check_leaf(&svid.chain[0], Some(ca.not_after())).expect("leaf profile");
        assert_eq!(info.spiffe_id.as_str(), "spiffe://example.org/web");
        // A TTL longer than the CA's remaining life is capped at the CA's notAfter.
        assert_eq!(info.not_after, ca.not_after());
        assert_eq!(info.serial_hex, svid.serial_hex);
        assert!(
            svid.serial_hex.len() <= 32 && svid.serial_hex.len() >= 24,
            "128-bit serial"
        );
    }

    #[test]
    fn serials_are_distinct() {
        let ca = Ca::create(&td(), Duration::from_secs(3600)).expect("ca");
        let (_k, csr) = csr_for("spiffe://example.org/a");
        let csr = VerifiedCsr::parse(&csr).expect("csr");
        let id = csr.spiffe_id.clone().expect("id");
        let a = ca
            .sign_svid(&id, csr.public_key(), Duration::from_secs(60), &[])
            .expect("a");
        let b = ca
            .sign_svid(&id, csr.public_key(), Duration::from_secs(60), &[])
            .expect("b");
        assert_ne!(a.serial_hex, b.serial_hex);
    }

    #[test]
    fn bad_csrs_are_refused() {
        assert!(matches!(
            VerifiedCsr::parse(b"not a csr"),
            Err(CaError::BadCsr)
        ));
        let (_k, mut csr) = csr_for("spiffe://example.org/a");
        let last = csr.len() - 1;
        csr[last] ^= 0x01; // break the signature
        assert!(matches!(VerifiedCsr::parse(&csr), Err(CaError::BadCsr)));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let none = CertificateParams::default()
            .serialize_request(&key)
            .expect("csr");
        assert!(
            VerifiedCsr::parse(none.der())
                .expect("csr without SAN")
                .spiffe_id
                .is_none()
        );
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://example.org/a".try_into().expect("uri"),
        )];
        let ed_csr = p.serialize_request(&ed).expect("csr");
        assert!(matches!(
            VerifiedCsr::parse(ed_csr.der()),
            Err(CaError::CsrAlgorithm)
        ));
    }

    #[test]
    fn ca_persists_0600_and_reloads() {
        use std::fs;
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = PrivateDir::open_or_create(
            &tmp.path().join("data"),
            lanyard_daemon::fs::DirMode::Private,
        )
        .expect("dir");
        let (a, created) =
            Ca::load_or_create(&dir, &td(), Duration::from_secs(3600)).expect("create");
        assert!(created);
        let mode = fs::metadata(dir.join("ca.key"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) =
            Ca::load_or_create(&dir, &td(), Duration::from_secs(3600)).expect("load");
        assert!(!created);
        assert_eq!(a.cert_der(), b.cert_der());
        // A CA key others can read is refused.
        let key_path = dir.join("ca.key");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let refused = Ca::load_or_create(&dir, &td(), Duration::from_secs(3600))
            .expect_err("a 0644 key is refused");
        assert!(refused.to_string().contains("chmod 600"), "{refused}");
        // The reloaded CA signs leaves that chain to the same root.
        let (_k, csr) = csr_for("spiffe://example.org/a");
        let csr = VerifiedCsr::parse(&csr).expect("csr");
        let id = csr.spiffe_id.clone().expect("id");
        let svid = b
            .sign_svid(&id, csr.public_key(), Duration::from_secs(60), &[])
            .expect("sign");
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain[0]).expect("leaf");
        let (_, root) = x509_parser::parse_x509_certificate(a.cert_der()).expect("root");
        assert!(leaf.verify_signature(Some(root.public_key())).is_ok());
    }
}
