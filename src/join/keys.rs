//! The keys both ends derive from the join secret, and the two operations
//! that use them: the client's proof (HMAC-SHA256) and the server's sealed
//! answer (ChaCha20-Poly1305). Both cover the TLS exporter value, so neither
//! is worth anything outside the session it was made for.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::{aead, hkdf, hmac};

use super::{EXPORTER_LEN, JoinError, NONCE_LEN, Purpose};
use crate::config::{ClusterConfig, JOIN_SECRET_FILE, NodeRole, NodeSpec};
use crate::paths::HostPaths;

/// `gen-join-secret` writes 32 bytes; anything shorter is not one of ours
/// and too weak to stand in for it.
pub const MIN_SECRET_LEN: usize = 32;
const HKDF_SALT: &[u8] = b"cluster-agent join v1";
const PROOF_CONTEXT: &[u8] = b"cluster-agent-join-v1 request\0";
const SEAL_CONTEXT: &[u8] = b"cluster-agent-join-v1 answer\0";

pub type Exporter = [u8; EXPORTER_LEN];
pub type Nonce = [u8; NONCE_LEN];

/// The two keys of one secret: the client's proof, the server's seal.
struct KeySet {
    proof: hmac::Key,
    seal: aead::LessSafeKey,
}

impl KeySet {
    fn derive(secret: &[u8], cluster_name: &str) -> KeySet {
        KeySet {
            proof: hmac::Key::new(
                hmac::HMAC_SHA256,
                &expand(secret, cluster_name, b"request proof"),
            ),
            seal: aead::LessSafeKey::new(
                aead::UnboundKey::new(
                    &aead::CHACHA20_POLY1305,
                    &expand(secret, cluster_name, b"answer seal"),
                )
                .expect("a 32-byte key fits ChaCha20-Poly1305"),
            ),
        }
    }
}

/// 32 bytes of HKDF-SHA256 from `secret`, per cluster name and label: one
/// secret reused by mistake for two clusters still gives each its own keys.
fn expand(secret: &[u8], cluster_name: &str, label: &[u8]) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
    let info = [cluster_name.as_bytes(), b"\0", label];
    let mut out = [0u8; 32];
    prk.expand(&info, Len(32))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 output of 32 bytes is always valid");
    out
}

/// Keys derived from the join secret. The cluster's secret is held by the
/// nodes that serve (control-plane and ceph-mon nodes); worker-only nodes
/// hold only the *worker secret* derived from it (`render ignition` ships
/// them that), which gives the worker-purpose keys and nothing else. So a
/// compromised worker cannot even form a request for CA or Ceph keys.
pub struct JoinKeys {
    worker: KeySet,
    /// `None` on a worker-only node.
    cluster: Option<KeySet>,
}

impl std::fmt::Debug for JoinKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinKeys(..)")
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl JoinKeys {
    /// From the cluster's join secret: every purpose.
    pub fn derive(secret: &[u8], cluster_name: &str) -> JoinKeys {
        JoinKeys {
            worker: KeySet::derive(&Self::worker_secret(secret, cluster_name), cluster_name),
            cluster: Some(KeySet::derive(secret, cluster_name)),
        }
    }

    /// From a worker secret: the `worker` purpose only.
    pub fn derive_worker_only(worker_secret: &[u8], cluster_name: &str) -> JoinKeys {
        JoinKeys {
            worker: KeySet::derive(worker_secret, cluster_name),
            cluster: None,
        }
    }

    /// What a worker-only node holds instead of the cluster's secret.
    pub fn worker_secret(secret: &[u8], cluster_name: &str) -> [u8; 32] {
        expand(secret, cluster_name, b"worker secret")
    }

    /// Whether `node` holds the worker secret rather than the cluster's.
    pub fn holds_worker_secret(node: &NodeSpec) -> bool {
        !node.is_control_plane() && !node.has_role(NodeRole::CephMon)
    }

    /// Reads `<config-dir>/secrets/join-secret` and derives the keys this
    /// node's roles call for. A secret others can read is refused: it would
    /// let any local user join machines to the cluster.
    pub fn load(
        paths: &HostPaths,
        config: &ClusterConfig,
        node: &NodeSpec,
    ) -> Result<JoinKeys, JoinError> {
        let path = paths.config_dir().join(JOIN_SECRET_FILE);
        let read_err = |source| JoinError::SecretRead {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(JoinError::SecretExposed { path, mode });
        }
        let secret = std::fs::read(&path).map_err(read_err)?;
        check_len(&secret, &path)?;
        let name = &config.cluster.name;
        Ok(if Self::holds_worker_secret(node) {
            JoinKeys::derive_worker_only(&secret, name)
        } else {
            JoinKeys::derive(&secret, name)
        })
    }

    fn keys(&self, purpose: Purpose) -> Option<&KeySet> {
        match purpose {
            Purpose::Worker => Some(&self.worker),
            Purpose::ControlPlane | Purpose::CephMon => self.cluster.as_ref(),
        }
    }

    /// The client's proof over everything the server acts on; `None` when
    /// this node's secret does not cover `purpose`.
    pub fn proof(&self, exporter: &Exporter, fields: &ProofFields<'_>) -> Option<hmac::Tag> {
        let keys = self.keys(fields.purpose)?;
        Some(hmac::sign(&keys.proof, &fields.message(exporter)))
    }

    /// Constant-time check of a proof (ring's `hmac::verify`).
    pub fn verify_proof(
        &self,
        exporter: &Exporter,
        fields: &ProofFields<'_>,
        proof: &[u8],
    ) -> bool {
        self.keys(fields.purpose)
            .is_some_and(|k| hmac::verify(&k.proof, &fields.message(exporter), proof).is_ok())
    }

    /// Seals `plaintext` for the client that sent `request_nonce` on this
    /// session. Returns (AEAD nonce, ciphertext+tag), both base64.
    pub fn seal(
        &self,
        exporter: &Exporter,
        request_nonce: &Nonce,
        node: &str,
        purpose: Purpose,
        plaintext: &[u8],
    ) -> Option<(String, String)> {
        let keys = self.keys(purpose)?;
        let mut nonce = [0u8; aead::NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .expect("the OS random source failed");
        let aad = seal_aad(exporter, request_nonce, node, purpose);
        let mut data = plaintext.to_vec();
        keys.seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut data,
            )
            .expect("ChaCha20-Poly1305 seals any length we send");
        Some((B64.encode(nonce), B64.encode(data)))
    }

    /// Opens an answer; `None` for anything not sealed by a holder of the
    /// join secret for exactly this session, nonce, node and purpose.
    pub fn open(
        &self,
        exporter: &Exporter,
        request_nonce: &Nonce,
        node: &str,
        purpose: Purpose,
        nonce_b64: &str,
        sealed_b64: &str,
    ) -> Option<Vec<u8>> {
        let keys = self.keys(purpose)?;
        let nonce: [u8; aead::NONCE_LEN] = B64.decode(nonce_b64).ok()?.try_into().ok()?;
        let mut data = B64.decode(sealed_b64).ok()?;
        let aad = seal_aad(exporter, request_nonce, node, purpose);
        let plain = keys
            .seal
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut data,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

fn check_len(secret: &[u8], path: &Path) -> Result<(), JoinError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(JoinError::SecretInvalid {
            path: path.to_path_buf(),
            reason: format!("{} bytes, at least {MIN_SECRET_LEN} needed", secret.len()),
        });
    }
    Ok(())
}

/// The request fields a proof covers.
pub struct ProofFields<'a> {
    pub node: &'a str,
    pub purpose: Purpose,
    pub timestamp: i64,
    pub nonce: &'a Nonce,
}

impl ProofFields<'_> {
    fn message(&self, exporter: &Exporter) -> Vec<u8> {
        let mut m = Vec::with_capacity(128);
        m.extend_from_slice(PROOF_CONTEXT);
        m.extend_from_slice(exporter);
        put(&mut m, self.node.as_bytes());
        put(&mut m, self.purpose.as_str().as_bytes());
        m.extend_from_slice(&self.timestamp.to_be_bytes());
        m.extend_from_slice(self.nonce);
        m
    }
}

fn seal_aad(exporter: &Exporter, request_nonce: &Nonce, node: &str, purpose: Purpose) -> Vec<u8> {
    let mut aad = Vec::with_capacity(128);
    aad.extend_from_slice(SEAL_CONTEXT);
    aad.extend_from_slice(exporter);
    aad.extend_from_slice(request_nonce);
    put(&mut aad, node.as_bytes());
    put(&mut aad, purpose.as_str().as_bytes());
    aad
}

/// Length-prefixed, so no two field lists encode to the same bytes.
fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

pub fn random_nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
        .expect("the OS random source failed");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7u8; 32];

    fn fields(nonce: &Nonce) -> ProofFields<'_> {
        ProofFields {
            node: "w-1",
            purpose: Purpose::Worker,
            timestamp: 1_700_000_000,
            nonce,
        }
    }

    #[test]
    fn proof_binds_secret_cluster_session_and_every_field() {
        let keys = JoinKeys::derive(&SECRET, "prod");
        let nonce = [1u8; NONCE_LEN];
        let exporter = [2u8; EXPORTER_LEN];
        let tag = keys.proof(&exporter, &fields(&nonce)).unwrap();
        assert!(keys.verify_proof(&exporter, &fields(&nonce), tag.as_ref()));

        let other_session = [3u8; EXPORTER_LEN];
        assert!(!keys.verify_proof(&other_session, &fields(&nonce), tag.as_ref()));
        let other_cluster = JoinKeys::derive(&SECRET, "staging");
        assert!(!other_cluster.verify_proof(&exporter, &fields(&nonce), tag.as_ref()));
        let other_secret = JoinKeys::derive(&[8u8; 32], "prod");
        assert!(!other_secret.verify_proof(&exporter, &fields(&nonce), tag.as_ref()));
        let changed = [
            ProofFields {
                node: "w-2",
                ..fields(&nonce)
            },
            ProofFields {
                purpose: Purpose::ControlPlane,
                ..fields(&nonce)
            },
            ProofFields {
                timestamp: 1_700_000_001,
                ..fields(&nonce)
            },
            ProofFields {
                nonce: &[9u8; NONCE_LEN],
                ..fields(&nonce)
            },
        ];
        for f in &changed {
            assert!(!keys.verify_proof(&exporter, f, tag.as_ref()));
        }
        assert!(!keys.verify_proof(&exporter, &fields(&nonce), &tag.as_ref()[..31]));
    }

    #[test]
    fn sealed_answer_opens_only_for_its_session_nonce_node_and_purpose() {
        let keys = JoinKeys::derive(&SECRET, "prod");
        let exporter = [2u8; EXPORTER_LEN];
        let nonce = [1u8; NONCE_LEN];
        let (n, sealed) = keys
            .seal(&exporter, &nonce, "w-1", Purpose::Worker, b"material")
            .unwrap();
        assert_eq!(
            keys.open(&exporter, &nonce, "w-1", Purpose::Worker, &n, &sealed)
                .as_deref(),
            Some(&b"material"[..])
        );
        assert!(
            keys.open(
                &[0u8; EXPORTER_LEN],
                &nonce,
                "w-1",
                Purpose::Worker,
                &n,
                &sealed
            )
            .is_none()
        );
        assert!(
            keys.open(
                &exporter,
                &[0u8; NONCE_LEN],
                "w-1",
                Purpose::Worker,
                &n,
                &sealed
            )
            .is_none()
        );
        assert!(
            keys.open(&exporter, &nonce, "w-2", Purpose::Worker, &n, &sealed)
                .is_none()
        );
        assert!(
            keys.open(&exporter, &nonce, "w-1", Purpose::ControlPlane, &n, &sealed)
                .is_none()
        );
        let mut raw = B64.decode(&sealed).unwrap();
        raw[0] ^= 1;
        assert!(
            keys.open(
                &exporter,
                &nonce,
                "w-1",
                Purpose::Worker,
                &n,
                &B64.encode(raw)
            )
            .is_none()
        );
        let other = JoinKeys::derive(&[8u8; 32], "prod");
        assert!(
            other
                .open(&exporter, &nonce, "w-1", Purpose::Worker, &n, &sealed)
                .is_none()
        );
    }

    #[test]
    fn short_secret_is_refused() {
        let err = check_len(&[1u8; 16], Path::new("/s")).unwrap_err();
        assert!(err.to_string().contains("16 bytes"), "{err}");
    }

    #[test]
    fn the_worker_secret_opens_worker_requests_only() {
        let cluster = JoinKeys::derive(&SECRET, "prod");
        let worker =
            JoinKeys::derive_worker_only(&JoinKeys::worker_secret(&SECRET, "prod"), "prod");
        let exporter = [2u8; EXPORTER_LEN];
        let nonce = [1u8; NONCE_LEN];
        let as_worker = fields(&nonce);
        let tag = worker.proof(&exporter, &as_worker).unwrap();
        assert!(cluster.verify_proof(&exporter, &as_worker, tag.as_ref()));
        let (n, sealed) = cluster
            .seal(&exporter, &nonce, "w-1", Purpose::Worker, b"m")
            .unwrap();
        assert!(
            worker
                .open(&exporter, &nonce, "w-1", Purpose::Worker, &n, &sealed)
                .is_some()
        );
        for purpose in [Purpose::ControlPlane, Purpose::CephMon] {
            let f = ProofFields {
                purpose,
                ..fields(&nonce)
            };
            assert!(worker.proof(&exporter, &f).is_none(), "{purpose}");
            // Nor can a worker key pass for the cluster's.
            let forged = hmac::sign(&worker.worker.proof, &f.message(&exporter));
            assert!(
                !cluster.verify_proof(&exporter, &f, forged.as_ref()),
                "{purpose}"
            );
        }
        // The cluster secret itself is not derivable from the worker's.
        assert_ne!(JoinKeys::worker_secret(&SECRET, "prod"), SECRET);
    }
}
