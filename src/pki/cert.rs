//! Reading certificates and keys from disk, and the few rcgen calls that
//! create them. Everything above this file deals in [`CertInfo`] and
//! [`KeyPair`], never in DER.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::error::{PkiError, gen_err};
use crate::fsutil::{self, PUBLIC_MODE, SECRET_MODE};

/// Issued certs start this far in the past so that a node whose clock is a
/// little behind accepts them at once (kubeadm backdates by the same amount).
const BACKDATE: Duration = Duration::minutes(5);

/// A subject alternative name, normalised for comparison.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum San {
    Dns(String),
    Ip(IpAddr),
}

impl San {
    pub fn dns(name: &str) -> San {
        San::Dns(name.to_ascii_lowercase())
    }

    /// An IP literal becomes an IP SAN, anything else a DNS SAN: an endpoint
    /// host may be either.
    pub fn host(host: &str) -> San {
        match host.parse::<IpAddr>() {
            Ok(ip) => San::Ip(ip),
            Err(_) => San::dns(host),
        }
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(name) => write!(f, "DNS:{name}"),
            San::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// What we check about an existing certificate.
#[derive(Debug, Clone)]
pub(crate) struct CertInfo {
    pub der: Vec<u8>,
    pub common_name: Option<String>,
    pub organizations: Vec<String>,
    pub not_after: OffsetDateTime,
    pub sans: BTreeSet<San>,
    pub server_auth: bool,
    pub client_auth: bool,
    pub is_ca: bool,
    pub key_cert_sign: bool,
    pub spki_der: Vec<u8>,
}

impl CertInfo {
    pub fn parse_pem(pem: &[u8]) -> Result<CertInfo, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
        if pem.label != "CERTIFICATE" {
            return Err(format!("PEM block is {:?}, not CERTIFICATE", pem.label));
        }
        let (_, cert) = X509Certificate::from_der(&pem.contents).map_err(|e| e.to_string())?;
        let ext_err = |e: x509_parser::error::X509Error| format!("bad extension: {e}");

        let mut sans = BTreeSet::new();
        if let Some(ext) = cert.subject_alternative_name().map_err(ext_err)? {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => {
                        sans.insert(San::dns(dns));
                    }
                    GeneralName::IPAddress(bytes) => {
                        sans.insert(San::Ip(ip_from_bytes(bytes)?));
                    }
                    // Names we never issue still count: they make the set
                    // differ from the wanted one, so the cert is re-issued.
                    other => {
                        sans.insert(San::Dns(format!("<unsupported {other}>")));
                    }
                }
            }
        }
        let (server_auth, client_auth) = match cert.extended_key_usage().map_err(ext_err)? {
            Some(eku) => (eku.value.server_auth, eku.value.client_auth),
            None => (false, false),
        };
        let key_cert_sign = cert
            .key_usage()
            .map_err(ext_err)?
            .is_some_and(|ku| ku.value.key_cert_sign());
        let attr_strings =
            |iter: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
                iter.filter_map(|a| a.as_str().ok().map(str::to_owned))
                    .collect::<Vec<_>>()
            };
        let subject = cert.subject();
        Ok(CertInfo {
            common_name: attr_strings(&mut subject.iter_common_name())
                .into_iter()
                .next(),
            organizations: attr_strings(&mut subject.iter_organization()),
            not_after: cert.validity().not_after.to_datetime(),
            sans,
            server_auth,
            client_auth,
            is_ca: cert.is_ca(),
            key_cert_sign,
            spki_der: cert.public_key().raw.to_vec(),
            der: pem.contents.clone(),
        })
    }

    pub fn matches_key(&self, key: &KeyPair) -> bool {
        self.spki_der == key.subject_public_key_info()
    }

    /// True when `issuer` signed this certificate, by signature, not by name:
    /// a CA re-created with the same name must not be taken for the old one.
    pub fn signed_by(&self, issuer: &CertInfo) -> bool {
        let (Ok((_, cert)), Ok((_, ca))) = (
            X509Certificate::from_der(&self.der),
            X509Certificate::from_der(&issuer.der),
        ) else {
            return false;
        };
        cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(format!("IP SAN of {} bytes", bytes.len()))
    }
}

/// Reads a file, `None` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PkiError> {
    fsutil::read_optional(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn parse_cert(path: &Path, pem: &[u8]) -> Result<CertInfo, PkiError> {
    CertInfo::parse_pem(pem).map_err(|reason| PkiError::BadCert {
        path: path.to_path_buf(),
        reason,
    })
}

pub(crate) fn parse_key(path: &Path, pem: &[u8]) -> Result<KeyPair, PkiError> {
    let bad = |reason: String| PkiError::BadKey {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(pem).map_err(|_| bad("not UTF-8 text".into()))?;
    KeyPair::from_pem(text).map_err(|e| bad(e.to_string()))
}

pub(crate) fn write_cert(path: &Path, pem: &str) -> Result<(), PkiError> {
    Ok(fsutil::write_atomic(path, pem.as_bytes(), PUBLIC_MODE)?)
}

pub(crate) fn write_key(path: &Path, pem: &str) -> Result<(), PkiError> {
    Ok(fsutil::write_atomic(path, pem.as_bytes(), SECRET_MODE)?)
}

/// ECDSA P-256: small, fast, accepted by kube-apiserver, etcd and kubelet.
pub(crate) fn generate_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(gen_err(format!("key for {what}")))
}

/// RSA 2048, for a server whose own checks accept no other key type
/// (Ceph's dashboard verifies its key with pyOpenSSL's RSA-only check).
pub(crate) fn generate_rsa_key(what: &str) -> Result<KeyPair, PkiError> {
    use rsa::pkcs8::EncodePrivateKey;
    let failed = |reason: String| PkiError::RsaKey {
        what: what.to_string(),
        reason,
    };
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
        .map_err(|e| failed(e.to_string()))?;
    let pem = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| failed(e.to_string()))?;
    KeyPair::from_pem(&pem).map_err(gen_err(format!("RSA key for {what}")))
}

/// Serials must differ between two certs of one issuer even when the key is
/// reused on re-issue, and rcgen's default serial is derived from the key.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and of fixed length, so the DER encoding is never surprising.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn self_signed_ca(
    common_name: &str,
    key: &KeyPair,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial());
    let cert = params
        .self_signed(key)
        .map_err(gen_err(format!("CA certificate {common_name}")))?;
    Ok(cert.pem())
}

/// What a leaf certificate must say; also what an existing one is checked
/// against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeafProfile {
    pub common_name: String,
    pub organizations: Vec<String>,
    pub sans: BTreeSet<San>,
    pub server_auth: bool,
    pub client_auth: bool,
}

pub(crate) fn issue_leaf(
    profile: &LeafProfile,
    key: &KeyPair,
    ca_cert_pem: &str,
    ca_key: &KeyPair,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<String, PkiError> {
    let what = || format!("certificate {}", profile.common_name);
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(gen_err(what()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    for org in &profile.organizations {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org.as_str());
    }
    params
        .distinguished_name
        .push(DnType::CommonName, profile.common_name.as_str());
    params.subject_alt_names = profile
        .sans
        .iter()
        .map(|san| match san {
            San::Dns(name) => Ok(SanType::DnsName(name.clone().try_into()?)),
            San::Ip(ip) => Ok(SanType::IpAddress(*ip)),
        })
        .collect::<Result<_, rcgen::Error>>()
        .map_err(gen_err(what()))?;
    // An explicit CA:FALSE, like Go-issued leaves, so no verifier has to
    // guess what a cert without basicConstraints may do.
    params.is_ca = IsCa::ExplicitNoCa;
    // No keyEncipherment: that is for RSA key transport, and these are EC keys.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if profile.server_auth {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if profile.client_auth {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(key, &issuer).map_err(gen_err(what()))?;
    Ok(cert.pem())
}

/// A certificate signing request for a client identity with `common_name`
/// and no organisation or SANs, signed with `key`.
pub(crate) fn client_request(common_name: &str, key: &KeyPair) -> Result<String, PkiError> {
    let what = || format!("certificate request {common_name}");
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(gen_err(what()))
}
