//! The trust domain's certificate authority: a self-signed P-256 root created on first
//! start, its key persisted 0600 in `data_dir`, and X509-SVID signing that follows the
//! X509-SVID standard's profile exactly. Time comes from the server's [`Clock`].

use std::path::PathBuf;
use std::time::Duration;

use lanyard_daemon::fs::{FsError, PrivateDir};
use lanyard_proto::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

use crate::clock::SharedClock;

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
    #[error("the CA expired at {}; rotate it", lanyard_daemon::output::rfc3339(*.0))]
    Expired(i64),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// Why a CSR was refused: each rule of [`VerifiedCsr::parse`] has its variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    #[error("CSR is not a valid DER-encoded PKCS#10 request")]
    Malformed,
    #[error("CSR key is not an elliptic-curve key (its algorithm is {0}); use ECDSA P-256")]
    NotEcKey(String),
    #[error("CSR key is on curve {0}; it must be P-256 (prime256v1)")]
    Curve(String),
    #[error(
        "CSR key is not an uncompressed P-256 point (65 bytes starting 0x04); it has {0} bytes"
    )]
    Point(usize),
    #[error(
        "CSR signature algorithm is not supported for a P-256 key; sign with ecdsa-with-SHA256"
    )]
    SignatureAlgorithm,
    #[error("CSR signature does not verify")]
    Signature,
    #[error("CSR must carry at most one URI SAN; it has {0}")]
    UriCount(usize),
    #[error("CSR's URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(String),
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

/// Checks the SubjectPublicKeyInfo itself (never the signature algorithm, which says
/// nothing about the key): id-ecPublicKey on prime256v1, a 65-byte uncompressed point.
fn check_spki(der: &[u8]) -> Result<(), CsrError> {
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CsrError::NotEcKey(spki.algorithm.algorithm.to_id_string()));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .ok_or_else(|| CsrError::Curve("(none named)".into()))?;
    if curve != OID_EC_P256 {
        let name = match curve.to_id_string().as_str() {
            "1.3.132.0.34" => "secp384r1 (P-384)".to_string(),
            "1.3.132.0.35" => "secp521r1 (P-521)".to_string(),
            "1.3.132.0.10" => "secp256k1".to_string(),
            other => other.to_string(),
        };
        return Err(CsrError::Curve(name));
    }
    let point = &spki.subject_public_key.data;
    if point.len() != 65 || point[0] != 0x04 {
        return Err(CsrError::Point(point.len()));
    }
    Ok(())
}

impl VerifiedCsr {
    /// Parses a DER CSR and checks that its key is an uncompressed P-256 point, that its
    /// self-signature verifies, and that it names at most one URI SAN, a valid SPIFFE ID.
    pub fn parse(der: &[u8]) -> Result<Self, CsrError> {
        check_spki(der)?;
        let csr_der = CertificateSigningRequestDer::from(der);
        let params = CertificateSigningRequestParams::from_der(&csr_der).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => CsrError::Signature,
            rcgen::Error::UnsupportedSignatureAlgorithm => CsrError::SignatureAlgorithm,
            _ => CsrError::Malformed,
        })?;
        // The key is P-256 (checked above); rcgen names its algorithm after the CSR's
        // signature, which must then be ecdsa-with-SHA256 for the SVID to be well formed.
        if params.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CsrError::SignatureAlgorithm);
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
            [uri] => {
                Some(SpiffeId::parse(uri).map_err(|e| CsrError::BadId(format!("\"{uri}\": {e}")))?)
            }
            more => return Err(CsrError::UriCount(more.len())),
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
    clock: SharedClock,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
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
        clock: SharedClock,
    ) -> Result<(Self, bool), CaError> {
        if let (Some(key_pem), Some(cert_pem)) = (dir.read_secret(KEY_FILE)?, dir.read(CERT_FILE)?)
        {
            let ca = Self::load(dir, &key_pem, &cert_pem, trust_domain, clock.clone())?;
            if ca.not_after > clock.now() {
                return Ok((ca, false));
            }
            tracing::warn!(path = %dir.join(CERT_FILE).display(), "stored CA has expired; creating a new one");
        }
        let ca = Self::create(trust_domain, ttl, clock)?;
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
        clock: SharedClock,
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
            clock,
        })
    }

    /// A new self-signed root: cA=true, keyUsage critical keyCertSign+cRLSign, URI SAN
    /// `spiffe://<td>` (a CA's ID has no path).
    pub fn create(
        trust_domain: &TrustDomain,
        ttl: Duration,
        clock: SharedClock,
    ) -> Result<Self, CaError> {
        let rng = SystemRandom::new();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = clock.now();
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
            clock,
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

    /// Whether the CA can no longer sign (its own notAfter has passed).
    pub fn is_expired(&self) -> bool {
        self.clock.now() >= self.not_after
    }

    /// Signs an X509-SVID for `id` over `public_key` valid for `ttl` (capped at the CA's
    /// own expiry), following the X509-SVID standard: one URI SAN, basicConstraints `30 00`, keyUsage
    /// critical digitalSignature (+keyEncipherment, keyAgreement), EKU serverAuth and
    /// clientAuth, 128-bit random serial, SKI and AKI.
    pub fn sign_svid(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<SignedSvid, CaError> {
        let now = self.clock.now();
        if now >= self.not_after {
            return Err(CaError::Expired(self.not_after));
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
    use crate::clock::ManualClock;
    use lanyard_proto::svid::{check_ca, check_leaf};

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").expect("td")
    }

    fn clock() -> SharedClock {
        ManualClock::starting_now()
    }

    fn csr_for(id: &str) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
        let csr = params.serialize_request(&key).expect("csr");
        (key, csr.der().to_vec())
    }

    /// DER TLV with definite length.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    /// AlgorithmIdentifier { ecdsa-with-SHA256 }.
    const ECDSA_WITH_SHA256: [u8; 12] = [
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
    ];

    /// The review's forgery: a P-384 key whose CSR is signed with ecdsa-with-SHA256, made
    /// by `openssl req` (ring signs P-384 only with SHA-384). A missing openssl fails the
    /// test loudly.
    fn p384_csr_signed_with_sha256(uri: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tmp");
        let key = dir.path().join("p384.pem");
        let csr = dir.path().join("csr.der");
        let run = |args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl must be installed for this test");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "ecparam".as_ref(),
            "-name".as_ref(),
            "secp384r1".as_ref(),
            "-genkey".as_ref(),
            "-noout".as_ref(),
            "-out".as_ref(),
            key.as_os_str(),
        ]);
        let san = format!("subjectAltName=URI:{uri}");
        run(&[
            "req".as_ref(),
            "-new".as_ref(),
            "-key".as_ref(),
            key.as_os_str(),
            "-sha256".as_ref(),
            "-subj".as_ref(),
            "/CN=forged".as_ref(),
            "-addext".as_ref(),
            san.as_ref(),
            "-outform".as_ref(),
            "DER".as_ref(),
            "-out".as_ref(),
            csr.as_os_str(),
        ]);
        std::fs::read(&csr).expect("csr")
    }

    /// A request info with a compressed P-256 point (33 bytes) and a junk signature.
    fn compressed_point_csr() -> Vec<u8> {
        let ec_alg = der(
            0x30,
            &[
                der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]),
                der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
            ]
            .concat(),
        );
        let mut point = vec![0u8, 0x02];
        point.extend([0x11; 32]);
        let spki = der(0x30, &[ec_alg, der(0x03, &point)].concat());
        let info = der(
            0x30,
            &[der(0x02, &[0]), der(0x30, &[]), spki, der(0xa0, &[])].concat(),
        );
        let sig = der(0x03, &[0, 0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]);
        der(0x30, &[info, ECDSA_WITH_SHA256.to_vec(), sig].concat())
    }

    #[test]
    fn root_and_leaf_follow_the_svid_profile() {
        let ca = Ca::create(&td(), Duration::from_secs(3600), clock()).expect("ca");
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
    fn signing_follows_the_injected_clock() {
        let clock = ManualClock::new(1_800_000_000);
        let ca = Ca::create(&td(), Duration::from_secs(3600), clock.clone()).expect("ca");
        assert_eq!(ca.not_after(), 1_800_003_600);
        let (_k, csr) = csr_for("spiffe://example.org/a");
        let csr = VerifiedCsr::parse(&csr).expect("csr");
        let id = csr.spiffe_id.clone().expect("id");
        clock.advance(100);
        let svid = ca
            .sign_svid(&id, csr.public_key(), Duration::from_secs(60), &[])
            .expect("sign");
        let info = check_leaf(&svid.chain[0], None).expect("leaf");
        assert_eq!(svid.not_after, 1_800_000_160);
        assert_eq!(info.not_after, 1_800_000_160);
        assert_eq!(info.not_before, 1_800_000_100 - 10, "backdated 10 s");
        assert!(!ca.is_expired());
        clock.advance(3500);
        assert!(ca.is_expired());
        let err = ca
            .sign_svid(&id, csr.public_key(), Duration::from_secs(60), &[])
            .expect_err("an expired CA does not sign");
        assert!(matches!(err, CaError::Expired(1_800_003_600)), "{err}");
        assert!(err.to_string().contains("2027-01-15T09:00:00Z"), "{err}");
    }

    #[test]
    fn serials_are_distinct() {
        let ca = Ca::create(&td(), Duration::from_secs(3600), clock()).expect("ca");
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
        assert_eq!(
            VerifiedCsr::parse(b"not a csr").expect_err("junk"),
            CsrError::Malformed
        );
        let (_k, mut csr) = csr_for("spiffe://example.org/a");
        let last = csr.len() - 1;
        csr[last] ^= 0x01; // break the signature
        assert_eq!(
            VerifiedCsr::parse(&csr).expect_err("broken signature"),
            CsrError::Signature
        );
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
        let err = VerifiedCsr::parse(ed_csr.der()).expect_err("ed25519");
        assert!(matches!(err, CsrError::NotEcKey(_)), "{err}");
        let mut two = CertificateParams::default();
        two.subject_alt_names = vec![
            SanType::URI("spiffe://example.org/a".try_into().expect("uri")),
            SanType::URI("spiffe://example.org/b".try_into().expect("uri")),
        ];
        let two = two.serialize_request(&key).expect("csr");
        assert_eq!(
            VerifiedCsr::parse(two.der()).expect_err("two URIs"),
            CsrError::UriCount(2)
        );
        let mut bad_id = CertificateParams::default();
        bad_id.subject_alt_names = vec![SanType::URI(
            "spiffe://Example.org/a".try_into().expect("uri"),
        )];
        let bad_id = bad_id.serialize_request(&key).expect("csr");
        assert!(matches!(
            VerifiedCsr::parse(bad_id.der()),
            Err(CsrError::BadId(_))
        ));
        assert_eq!(
            VerifiedCsr::parse(&compressed_point_csr()).expect_err("compressed point"),
            CsrError::Point(33)
        );
    }

    #[test]
    fn p384_key_signed_with_sha256_is_refused_by_its_key() {
        let forged = p384_csr_signed_with_sha256("spiffe://example.org/a");
        // The forgery is well formed and its signature verifies, so only a check of the
        // key itself can refuse it.
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&forged)
                .expect("forged CSR parses");
        parsed
            .verify_signature()
            .expect("the forged CSR's signature verifies");
        assert_eq!(
            parsed.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.10045.4.3.2",
            "ecdsa-with-SHA256"
        );
        let err = VerifiedCsr::parse(&forged).expect_err("P-384 key");
        assert_eq!(err, CsrError::Curve("secp384r1 (P-384)".into()));
        let text = err.to_string();
        assert!(text.contains("P-384") && text.contains("P-256"), "{text}");
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
            Ca::load_or_create(&dir, &td(), Duration::from_secs(3600), clock()).expect("create");
        assert!(created);
        let mode = fs::metadata(dir.join("ca.key"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) =
            Ca::load_or_create(&dir, &td(), Duration::from_secs(3600), clock()).expect("load");
        assert!(!created);
        assert_eq!(a.cert_der(), b.cert_der());
        // Once the stored CA has expired (by the clock), a new one replaces it.
        let later = ManualClock::new(a.not_after());
        let (c, created) =
            Ca::load_or_create(&dir, &td(), Duration::from_secs(3600), later).expect("renew");
        assert!(created);
        assert_ne!(c.cert_der(), a.cert_der());
        // A CA key others can read is refused.
        let key_path = dir.join("ca.key");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let refused = Ca::load_or_create(&dir, &td(), Duration::from_secs(3600), clock())
            .expect_err("a 0644 key is refused");
        assert!(refused.to_string().contains("chmod 600"), "{refused}");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).expect("chmod");
        // A symlink planted at ca.key is refused, never followed.
        fs::remove_file(&key_path).expect("rm");
        let victim = tmp.path().join("victim.key");
        fs::write(&victim, b"not a key").expect("victim");
        std::os::unix::fs::symlink(&victim, &key_path).expect("plant");
        let refused = Ca::load_or_create(&dir, &td(), Duration::from_secs(3600), clock())
            .expect_err("a symlinked ca.key is refused");
        assert!(refused.to_string().contains("symbolic link"), "{refused}");
        assert_eq!(fs::read(&victim).expect("victim"), b"not a key");
        // The reloaded CA signs leaves that chain to the same root.
        let (_k, csr) = csr_for("spiffe://example.org/a");
        let csr = VerifiedCsr::parse(&csr).expect("csr");
        let id = csr.spiffe_id.clone().expect("id");
        let svid = c
            .sign_svid(&id, csr.public_key(), Duration::from_secs(60), &[])
            .expect("sign");
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain[0]).expect("leaf");
        let (_, root) = x509_parser::parse_x509_certificate(c.cert_der()).expect("root");
        assert!(leaf.verify_signature(Some(root.public_key())).is_ok());
    }
}
