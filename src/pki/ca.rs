//! The cluster-wide secrets: three CAs and the service-account key pair.
//!
//! They are created once, on the first control-plane node, and copied to the
//! others. An existing one is never replaced: a missing half is re-created
//! only when it can be derived from the other half (a cert from its key, a
//! public key from its private key), which is exactly the state a crash
//! between the two writes leaves behind (keys are written first).

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{KeyPair, PublicKeyData};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::cert::{
    CertInfo, generate_key, parse_cert, parse_key, read_optional, self_signed_ca, write_cert,
    write_key,
};
use super::error::PkiError;
use super::layout::{CaKind, PkiPaths};
use super::{CA_VALIDITY, CaSource};
use crate::fsutil::{self, PUBLIC_MODE, SECRET_MODE};
use crate::paths::HostPaths;

/// One piece of shared CA material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CaItem {
    Ca(CaKind),
    ServiceAccountKey,
}

impl fmt::Display for CaItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaItem::Ca(kind) => kind.fmt(f),
            CaItem::ServiceAccountKey => f.write_str("service-account key pair"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaOutcome {
    /// Present and valid; untouched.
    Kept,
    /// Created here (only ever when neither half existed).
    Generated,
    /// Copied from the import source (wholly or the missing half).
    Imported,
    /// The public half was missing and was re-derived from the private key
    /// (the state a crash between the two writes leaves).
    Repaired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaReport {
    pub items: Vec<(CaItem, CaOutcome)>,
}

impl CaReport {
    pub fn outcome(&self, item: CaItem) -> Option<CaOutcome> {
        self.items.iter().find(|(i, _)| *i == item).map(|(_, o)| *o)
    }

    /// True when nothing was written.
    pub fn unchanged(&self) -> bool {
        self.items.iter().all(|(_, o)| *o == CaOutcome::Kept)
    }
}

/// The CA material every control-plane node shares, as PEM text, for the
/// join service to encrypt and ship. Its `Debug` leaves the keys out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaBundle {
    pub ca_crt: String,
    pub ca_key: String,
    pub front_proxy_ca_crt: String,
    pub front_proxy_ca_key: String,
    pub etcd_ca_crt: String,
    pub etcd_ca_key: String,
    pub sa_key: String,
    pub sa_pub: String,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("ca_crt", &self.ca_crt)
            .field("front_proxy_ca_crt", &self.front_proxy_ca_crt)
            .field("etcd_ca_crt", &self.etcd_ca_crt)
            .field("sa_pub", &self.sa_pub)
            .finish_non_exhaustive()
    }
}

impl CaBundle {
    /// `(cert, key)` PEM of one CA.
    pub fn ca(&self, kind: CaKind) -> (&str, &str) {
        match kind {
            CaKind::Cluster => (&self.ca_crt, &self.ca_key),
            CaKind::FrontProxy => (&self.front_proxy_ca_crt, &self.front_proxy_ca_key),
            CaKind::Etcd => (&self.etcd_ca_crt, &self.etcd_ca_key),
        }
    }

    /// Reads a directory laid out like the PKI dir. Checks nothing but
    /// presence; [`CaBundle::validate`] checks the content.
    pub fn read_dir(dir: &Path) -> Result<CaBundle, PkiError> {
        let layout = PkiPaths::at(dir);
        let read = |path: PathBuf| -> Result<String, PkiError> {
            let bytes = read_optional(&path)?.ok_or_else(|| PkiError::ImportIncomplete {
                what: format!("CA material in {}", dir.display()),
                missing: path.clone(),
            })?;
            String::from_utf8(bytes).map_err(|_| PkiError::BadCert {
                path,
                reason: "not UTF-8 text".into(),
            })
        };
        let pair = |kind: CaKind| -> Result<(String, String), PkiError> {
            let paths = layout.ca(kind);
            Ok((read(paths.cert)?, read(paths.key)?))
        };
        let (ca_crt, ca_key) = pair(CaKind::Cluster)?;
        let (front_proxy_ca_crt, front_proxy_ca_key) = pair(CaKind::FrontProxy)?;
        let (etcd_ca_crt, etcd_ca_key) = pair(CaKind::Etcd)?;
        Ok(CaBundle {
            ca_crt,
            ca_key,
            front_proxy_ca_crt,
            front_proxy_ca_key,
            etcd_ca_crt,
            etcd_ca_key,
            sa_key: read(layout.sa_key())?,
            sa_pub: read(layout.sa_pub())?,
        })
    }

    /// Writes the bundle as a PKI-like directory (keys 0600), e.g. for an
    /// operator's offline backup. Overwrites; use [`ensure_cluster_cas`] with
    /// [`CaSource::Bundle`] to install into a node's PKI dir safely.
    pub fn write_dir(&self, dir: &Path) -> Result<(), PkiError> {
        let layout = PkiPaths::at(dir);
        for kind in CaKind::ALL {
            let (cert, key) = self.ca(kind);
            let paths = layout.ca(kind);
            fsutil::write_atomic(&paths.key, key.as_bytes(), SECRET_MODE)?;
            fsutil::write_atomic(&paths.cert, cert.as_bytes(), PUBLIC_MODE)?;
        }
        fsutil::write_atomic(&layout.sa_key(), self.sa_key.as_bytes(), SECRET_MODE)?;
        fsutil::write_atomic(&layout.sa_pub(), self.sa_pub.as_bytes(), PUBLIC_MODE)?;
        Ok(())
    }

    /// Checks that every cert is a CA, unexpired, and matches its key, and
    /// that the SA keys belong together. `origin` only names the source in
    /// error messages.
    pub fn validate(&self, origin: &Path) -> Result<(), PkiError> {
        self.parsed(origin, OffsetDateTime::now_utc()).map(drop)
    }

    fn parsed(&self, origin: &Path, now: OffsetDateTime) -> Result<ParsedBundle, PkiError> {
        let layout = PkiPaths::at(origin);
        let mut cas = Vec::new();
        for kind in CaKind::ALL {
            let (cert, key) = self.ca(kind);
            let paths = layout.ca(kind);
            let (info, key) = check_ca_pair(
                kind,
                &paths.cert,
                &paths.key,
                cert.as_bytes(),
                key.as_bytes(),
                now,
            )?;
            cas.push((kind, info, key));
        }
        let sa_key = parse_key(&layout.sa_key(), self.sa_key.as_bytes())?;
        let sa_pub = parse_public_key(&layout.sa_pub(), self.sa_pub.as_bytes())?;
        if sa_pub != sa_key.subject_public_key_info() {
            return Err(PkiError::SaKeyMismatch {
                public: layout.sa_pub(),
                key: layout.sa_key(),
            });
        }
        Ok(ParsedBundle { cas, sa_key })
    }
}

struct ParsedBundle {
    cas: Vec<(CaKind, CertInfo, KeyPair)>,
    sa_key: KeyPair,
}

/// A CA loaded from disk and checked, ready to sign.
pub(crate) struct LoadedCa {
    pub cert_pem: String,
    pub info: CertInfo,
    pub key: KeyPair,
}

pub(crate) fn load_ca(
    pki: &PkiPaths,
    kind: CaKind,
    now: OffsetDateTime,
) -> Result<LoadedCa, PkiError> {
    let paths = pki.ca(kind);
    let cert = read_optional(&paths.cert)?.ok_or_else(|| PkiError::CaMissing {
        ca: kind,
        cert: paths.cert.clone(),
    })?;
    let key = read_optional(&paths.key)?.ok_or_else(|| PkiError::CaKeyMissing {
        ca: kind,
        cert: paths.cert.clone(),
        key: paths.key.clone(),
    })?;
    let (info, key) = check_ca_pair(kind, &paths.cert, &paths.key, &cert, &key, now)?;
    Ok(LoadedCa {
        cert_pem: String::from_utf8_lossy(&cert).into_owned(),
        info,
        key,
    })
}

fn check_ca_pair(
    kind: CaKind,
    cert_path: &Path,
    key_path: &Path,
    cert: &[u8],
    key: &[u8],
    now: OffsetDateTime,
) -> Result<(CertInfo, KeyPair), PkiError> {
    let info = parse_cert(cert_path, cert)?;
    let not_a_ca = |reason: &str| PkiError::NotACa {
        ca: kind,
        cert: cert_path.to_path_buf(),
        reason: reason.into(),
    };
    if !info.is_ca {
        return Err(not_a_ca("basicConstraints CA:TRUE is missing"));
    }
    if !info.key_cert_sign {
        return Err(not_a_ca("keyUsage keyCertSign is missing"));
    }
    if info.not_after <= now {
        return Err(PkiError::CaExpired {
            ca: kind,
            cert: cert_path.to_path_buf(),
            not_after: info.not_after,
        });
    }
    let key = parse_key(key_path, key)?;
    if !info.matches_key(&key) {
        return Err(PkiError::CaKeyMismatch {
            ca: kind,
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        });
    }
    Ok((info, key))
}

/// DER SubjectPublicKeyInfo of a `PUBLIC KEY` PEM.
fn parse_public_key(path: &Path, pem: &[u8]) -> Result<Vec<u8>, PkiError> {
    let bad = |reason: String| PkiError::BadKey {
        path: path.to_path_buf(),
        reason,
    };
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| bad(e.to_string()))?;
    if block.label != "PUBLIC KEY" {
        return Err(bad(format!(
            "PEM block is {:?}, not PUBLIC KEY",
            block.label
        )));
    }
    Ok(block.contents)
}

pub(crate) fn ensure_cluster_cas_at(
    paths: &HostPaths,
    source: CaSource<'_>,
    now: OffsetDateTime,
) -> Result<CaReport, PkiError> {
    let pki = PkiPaths::new(paths);
    let mut items = Vec::new();
    match source {
        CaSource::Generate => {
            for kind in CaKind::ALL {
                items.push((CaItem::Ca(kind), generate_ca(&pki, kind, now)?));
            }
            items.push((CaItem::ServiceAccountKey, generate_sa(&pki)?));
        }
        CaSource::Import(dir) => {
            let bundle = CaBundle::read_dir(dir)?;
            import_bundle(&pki, &bundle, dir, now, &mut items)?;
        }
        CaSource::Bundle(bundle) => {
            import_bundle(&pki, bundle, Path::new("<CA bundle>"), now, &mut items)?;
        }
    }
    Ok(CaReport { items })
}

fn generate_ca(pki: &PkiPaths, kind: CaKind, now: OffsetDateTime) -> Result<CaOutcome, PkiError> {
    let paths = pki.ca(kind);
    let cert = read_optional(&paths.cert)?;
    let key = read_optional(&paths.key)?;
    match (cert, key) {
        (Some(cert), Some(key)) => {
            check_ca_pair(kind, &paths.cert, &paths.key, &cert, &key, now)?;
            Ok(CaOutcome::Kept)
        }
        (Some(_), None) => Err(PkiError::CaKeyMissing {
            ca: kind,
            cert: paths.cert,
            key: paths.key,
        }),
        (None, Some(key)) => {
            // No cert was ever written for this key, so nothing can have
            // been signed by it yet: giving it a cert is safe.
            let key = parse_key(&paths.key, &key)?;
            let cert = self_signed_ca(kind.common_name(), &key, now, CA_VALIDITY)?;
            write_cert(&paths.cert, &cert)?;
            Ok(CaOutcome::Repaired)
        }
        (None, None) => {
            let key = generate_key(&kind.to_string())?;
            let cert = self_signed_ca(kind.common_name(), &key, now, CA_VALIDITY)?;
            write_key(&paths.key, &key.serialize_pem())?;
            write_cert(&paths.cert, &cert)?;
            Ok(CaOutcome::Generated)
        }
    }
}

fn generate_sa(pki: &PkiPaths) -> Result<CaOutcome, PkiError> {
    let (key_path, pub_path) = (pki.sa_key(), pki.sa_pub());
    let key = read_optional(&key_path)?;
    let public = read_optional(&pub_path)?;
    match (key, public) {
        (Some(key), Some(public)) => {
            let key = parse_key(&key_path, &key)?;
            if parse_public_key(&pub_path, &public)? != key.subject_public_key_info() {
                return Err(PkiError::SaKeyMismatch {
                    public: pub_path,
                    key: key_path,
                });
            }
            Ok(CaOutcome::Kept)
        }
        (Some(key), None) => {
            let key = parse_key(&key_path, &key)?;
            write_cert(&pub_path, &key.public_key_pem())?;
            Ok(CaOutcome::Repaired)
        }
        (None, Some(_)) => Err(PkiError::SaKeyMissing {
            public: pub_path,
            key: key_path,
        }),
        (None, None) => {
            let key = generate_key("the service-account key")?;
            write_key(&key_path, &key.serialize_pem())?;
            write_cert(&pub_path, &key.public_key_pem())?;
            Ok(CaOutcome::Generated)
        }
    }
}

fn import_bundle(
    pki: &PkiPaths,
    bundle: &CaBundle,
    origin: &Path,
    now: OffsetDateTime,
    items: &mut Vec<(CaItem, CaOutcome)>,
) -> Result<(), PkiError> {
    // Validate everything before writing anything, so a bad bundle leaves
    // the node as it was.
    let parsed = bundle.parsed(origin, now)?;
    let mut plan = Vec::new();
    for (kind, info, key) in &parsed.cas {
        plan.push((
            CaItem::Ca(*kind),
            plan_ca_import(pki, *kind, info, key, now)?,
        ));
    }
    plan.push((
        CaItem::ServiceAccountKey,
        plan_sa_import(pki, &parsed.sa_key)?,
    ));

    for (item, writes) in plan {
        let outcome = if writes.is_empty() {
            CaOutcome::Kept
        } else {
            CaOutcome::Imported
        };
        for write in writes {
            let (path, text) = match (item, write) {
                (CaItem::Ca(kind), Half::Key) => (pki.ca(kind).key, bundle.ca(kind).1),
                (CaItem::Ca(kind), Half::Public) => (pki.ca(kind).cert, bundle.ca(kind).0),
                (CaItem::ServiceAccountKey, Half::Key) => (pki.sa_key(), bundle.sa_key.as_str()),
                (CaItem::ServiceAccountKey, Half::Public) => (pki.sa_pub(), bundle.sa_pub.as_str()),
            };
            match write {
                Half::Key => write_key(&path, text)?,
                Half::Public => write_cert(&path, text)?,
            }
        }
        items.push((item, outcome));
    }
    Ok(())
}

/// Which files an import writes, private key always first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    Key,
    Public,
}

fn plan_ca_import(
    pki: &PkiPaths,
    kind: CaKind,
    imported: &CertInfo,
    imported_key: &KeyPair,
    now: OffsetDateTime,
) -> Result<Vec<Half>, PkiError> {
    let paths = pki.ca(kind);
    let conflict = || PkiError::CaConflict {
        ca: kind,
        local: paths.cert.clone(),
        local_dir: pki.dir().to_path_buf(),
    };
    let cert = read_optional(&paths.cert)?;
    let key = read_optional(&paths.key)?;
    match (cert, key) {
        (Some(cert), key) => {
            if parse_cert(&paths.cert, &cert)?.der != imported.der {
                return Err(conflict());
            }
            match key {
                Some(key) => {
                    check_ca_pair(kind, &paths.cert, &paths.key, &cert, &key, now)?;
                    Ok(vec![])
                }
                // The import holds the very key this cert needs.
                None => Ok(vec![Half::Key]),
            }
        }
        (None, Some(key)) => {
            let key = parse_key(&paths.key, &key)?;
            if key.subject_public_key_info() != imported_key.subject_public_key_info() {
                return Err(conflict());
            }
            Ok(vec![Half::Public])
        }
        (None, None) => Ok(vec![Half::Key, Half::Public]),
    }
}

fn plan_sa_import(pki: &PkiPaths, imported_key: &KeyPair) -> Result<Vec<Half>, PkiError> {
    let (key_path, pub_path) = (pki.sa_key(), pki.sa_pub());
    let wanted = imported_key.subject_public_key_info();
    let conflict = || PkiError::SaConflict {
        local: key_path.clone(),
    };
    let mut writes = Vec::new();
    match read_optional(&key_path)? {
        Some(key) => {
            if parse_key(&key_path, &key)?.subject_public_key_info() != wanted {
                return Err(conflict());
            }
        }
        None => writes.push(Half::Key),
    }
    match read_optional(&pub_path)? {
        Some(public) => {
            if parse_public_key(&pub_path, &public)? != wanted {
                return Err(if writes.is_empty() {
                    PkiError::SaKeyMismatch {
                        public: pub_path,
                        key: key_path,
                    }
                } else {
                    conflict()
                });
            }
        }
        None => writes.push(Half::Public),
    }
    Ok(writes)
}

pub(crate) fn read_shared_ca_bundle(paths: &HostPaths) -> Result<CaBundle, PkiError> {
    let pki = PkiPaths::new(paths);
    let bundle = CaBundle::read_dir(pki.dir())?;
    // Never ship material that a joining node would then refuse.
    bundle.parsed(pki.dir(), OffsetDateTime::now_utc())?;
    Ok(bundle)
}
