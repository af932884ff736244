//! `serve-join`'s HTTPS server. Each connection's TLS exporter value is
//! taken right after the handshake; every request on that connection must
//! carry a proof over it, and every answer is sealed to it.
//!
//! Refusals are a status and a reason, never material: 400 (not our
//! protocol), 401 (proof, clock or replay), 403 (a listed node asking from
//! the wrong address or for what its roles do not need), 404/405, 408 (too
//! slow), 413 (too large), 503 (this node does not have the material yet).

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::keys::{Exporter, Nonce, ProofFields};
use super::{
    EXPORTER_LABEL, EXPORTER_LEN, HEALTH_PATH, JOIN_PATH, JoinError, JoinKeys, JoinRequest,
    MAX_CLOCK_SKEW_SECS, MAX_REQUEST_BYTES, Material, NONCE_LEN, PROTOCOL_VERSION, Purpose,
    Refusal, SealedAnswer, WorkerMaterial, now_unix,
};
use crate::config::{ClusterConfig, NodeRole, NodeSpec};
use crate::paths::HostPaths;
use crate::pki::{self, CaBundle};

/// Limits that keep one client (or a thousand) from exhausting the server.
#[derive(Debug, Clone)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// From the first byte of a request's headers to its last body byte.
    pub request_timeout: Duration,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// A connection is closed after this many requests; also bounds the
    /// per-connection replay set.
    pub max_requests_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_requests_per_connection: 64,
        }
    }
}

/// Why a node cannot be served the material it is entitled to right now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Where the material comes from; the server decides who gets it.
#[async_trait]
pub trait MaterialSource: Send + Sync {
    async fn material(&self, node: &NodeSpec, purpose: Purpose) -> Result<Material, Unavailable>;
}

/// A bootstrap token that is valid for a while yet.
#[derive(Clone)]
pub struct IssuedToken {
    pub token: String,
    /// RFC 3339.
    pub expires: String,
}

/// Mints or reuses bootstrap tokens in the cluster.
#[async_trait]
pub trait BootstrapTokens: Send + Sync {
    async fn current(&self) -> Result<IssuedToken, Unavailable>;
}

/// The material on this control-plane node's disk. CA material is re-read
/// at most every [`HostMaterial::CA_REFRESH`]: it changes only when an
/// operator rotates it, and re-parsing eight PEM files per join would cost
/// more than the rest of the exchange.
pub struct HostMaterial {
    paths: HostPaths,
    config: Arc<ClusterConfig>,
    tokens: Option<Arc<dyn BootstrapTokens>>,
    cas: Mutex<Option<(Instant, CaBundle)>>,
}

impl HostMaterial {
    const CA_REFRESH: Duration = Duration::from_secs(30);

    pub fn new(
        paths: HostPaths,
        config: Arc<ClusterConfig>,
        tokens: Option<Arc<dyn BootstrapTokens>>,
    ) -> HostMaterial {
        HostMaterial {
            paths,
            config,
            tokens,
            cas: Mutex::new(None),
        }
    }

    fn cas(&self) -> Result<CaBundle, Unavailable> {
        let mut cached = self.cas.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, bundle)) = cached.as_ref()
            && at.elapsed() < Self::CA_REFRESH
        {
            return Ok(bundle.clone());
        }
        let bundle = pki::read_shared_ca_bundle(&self.paths).map_err(|e| {
            Unavailable(format!(
                "this node has no usable cluster CA yet ({})",
                crate::error_chain(&e)
            ))
        })?;
        *cached = Some((Instant::now(), bundle.clone()));
        Ok(bundle)
    }
}

#[async_trait]
impl MaterialSource for HostMaterial {
    async fn material(&self, _node: &NodeSpec, purpose: Purpose) -> Result<Material, Unavailable> {
        match purpose {
            Purpose::ControlPlane => Ok(Material::ControlPlane { cas: self.cas()? }),
            Purpose::Worker => {
                let tokens = self.tokens.as_ref().ok_or_else(|| {
                    Unavailable(
                        "this node runs no Kubernetes API to mint bootstrap tokens with".into(),
                    )
                })?;
                let ca_pem = self.cas()?.ca_crt;
                let token = tokens.current().await?;
                Ok(Material::Worker(WorkerMaterial {
                    api_server: format!("https://{}", self.config.cluster.control_plane_endpoint),
                    ca_pem,
                    bootstrap_token: token.token,
                    token_expires: token.expires,
                }))
            }
            Purpose::CephMon => match crate::phases::ceph::read_bootstrap(&self.paths) {
                Ok(Some(bootstrap)) => Ok(Material::CephMon(bootstrap)),
                Ok(None) => Err(Unavailable(
                    "this node's Ceph monitor is not seeded yet".into(),
                )),
                Err(e) => Err(Unavailable(format!(
                    "this node's Ceph record is unreadable: {}",
                    crate::error_chain(&e)
                ))),
            },
        }
    }
}

pub struct JoinServer {
    keys: JoinKeys,
    config: Arc<ClusterConfig>,
    source: Arc<dyn MaterialSource>,
    limits: Limits,
    tls: TlsAcceptor,
}

/// Per connection: who is on the other end and which nonces it has used.
struct Connection {
    peer: IpAddr,
    exporter: Exporter,
    seen: Mutex<HashSet<Nonce>>,
}

enum Answer {
    Sealed(SealedAnswer),
    Refused(StatusCode, String),
    Text(StatusCode, &'static str),
}

impl JoinServer {
    /// The server's certificate is made fresh at every start and never
    /// written anywhere: clients do not trust it, they trust the sealed
    /// answer bound to the TLS session (see the module docs), so there is
    /// no serving key to protect, rotate or leak.
    pub fn new(
        keys: JoinKeys,
        config: Arc<ClusterConfig>,
        source: Arc<dyn MaterialSource>,
        limits: Limits,
        server_names: Vec<String>,
    ) -> Result<JoinServer, JoinError> {
        let cert = rcgen::generate_simple_self_signed(server_names)
            .map_err(|e| JoinError::Tls(format!("generating the serving certificate: {e}")))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        // TLS 1.3 only: its exporter is bound to the full handshake, which
        // is what the proofs rely on.
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| JoinError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| JoinError::Tls(e.to_string()))?;
        Ok(JoinServer {
            keys,
            config,
            source,
            limits,
            tls: TlsAcceptor::from(Arc::new(tls)),
        })
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let max = self.limits.max_connections;
        crate::listener::accept_until(listener, max, shutdown, |stream, peer| {
            self.clone().connection(stream, peer)
        })
        .await;
    }

    async fn connection(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let tls = match tokio::time::timeout(self.limits.handshake_timeout, self.tls.accept(stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let mut exporter = [0u8; EXPORTER_LEN];
        if let Err(e) = tls
            .get_ref()
            .1
            .export_keying_material(&mut exporter, EXPORTER_LABEL, None)
        {
            tracing::warn!(%peer, error = %e, "no TLS exporter; closing");
            return;
        }
        let conn = Arc::new(Connection {
            peer: canonical_ip(peer.ip()),
            exporter,
            seen: Mutex::new(HashSet::new()),
        });
        let server = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let server = server.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(server.respond(&conn, req).await) }
        });
        let result = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.request_timeout)
            .max_buf_size(16 * 1024)
            .serve_connection(TokioIo::new(tls), service)
            .await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }

    async fn respond(&self, conn: &Connection, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let answer = match (req.method(), req.uri().path()) {
            (&Method::POST, JOIN_PATH) => self.join(conn, req).await,
            (&Method::GET, HEALTH_PATH) => Answer::Text(StatusCode::OK, "ok\n"),
            (_, JOIN_PATH | HEALTH_PATH) => {
                Answer::Text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => Answer::Text(StatusCode::NOT_FOUND, "not found\n"),
        };
        let (status, body, close) = match answer {
            Answer::Sealed(sealed) => (
                StatusCode::OK,
                serde_json::to_vec(&sealed).expect("serialisable"),
                false,
            ),
            Answer::Refused(status, reason) => {
                tracing::warn!(peer = %conn.peer, status = status.as_u16(), "join refused: {reason}");
                (
                    status,
                    serde_json::to_vec(&Refusal { error: reason }).expect("serialisable"),
                    // A client that broke the protocol gets no second try on
                    // the same connection.
                    status != StatusCode::SERVICE_UNAVAILABLE,
                )
            }
            Answer::Text(status, text) => (status, text.as_bytes().to_vec(), false),
        };
        let close = close || self.requests_used(conn) >= self.limits.max_requests_per_connection;
        let mut response = Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "application/json");
        if close {
            response = response.header(hyper::header::CONNECTION, "close");
        }
        response
            .body(Full::new(Bytes::from(body)))
            .expect("static headers are valid")
    }

    fn requests_used(&self, conn: &Connection) -> usize {
        conn.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn join(&self, conn: &Connection, req: Request<Incoming>) -> Answer {
        let refuse = |status: StatusCode, reason: &str| Answer::Refused(status, reason.to_string());
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BYTES as u64) {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        }
        let body = Limited::new(req.into_body(), MAX_REQUEST_BYTES);
        let bytes = match tokio::time::timeout(self.limits.request_timeout, body.collect()).await {
            Err(_) => return refuse(StatusCode::REQUEST_TIMEOUT, "request body too slow"),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            Ok(Err(_)) => return refuse(StatusCode::BAD_REQUEST, "unreadable request body"),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        let request: JoinRequest = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                return Answer::Refused(
                    StatusCode::BAD_REQUEST,
                    format!("not a join request: {e}"),
                );
            }
        };
        if request.version != PROTOCOL_VERSION {
            return Answer::Refused(
                StatusCode::BAD_REQUEST,
                format!(
                    "protocol version {} is not spoken here (this server speaks {PROTOCOL_VERSION})",
                    request.version
                ),
            );
        }
        let (Some(nonce), Some(proof)) = (
            decode_fixed::<NONCE_LEN>(&request.nonce),
            B64.decode(&request.proof).ok(),
        ) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "nonce or proof is not valid base64 of the right length",
            );
        };
        let fields = ProofFields {
            node: &request.node,
            purpose: request.purpose,
            timestamp: request.timestamp,
            nonce: &nonce,
        };
        // Before anything that depends on who the client claims to be: an
        // unauthenticated client learns nothing about the node list.
        if !self.keys.verify_proof(&conn.exporter, &fields, &proof) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "proof does not verify: wrong join secret, wrong cluster name, or a request made for another TLS session",
            );
        }
        // After the proof, which covers the timestamp: only a holder of the
        // secret learns how far off its clock is. `abs_diff`, since any i64
        // may arrive (i64::MIN has no absolute value).
        let skew = now_unix().abs_diff(request.timestamp);
        if skew > MAX_CLOCK_SKEW_SECS.unsigned_abs() {
            return Answer::Refused(
                StatusCode::UNAUTHORIZED,
                format!(
                    "request timestamp is {skew} s away from this server's clock (at most {MAX_CLOCK_SKEW_SECS} s); check NTP on both machines"
                ),
            );
        }
        if !conn
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(nonce)
        {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "nonce already used on this connection (replay)",
            );
        }
        let Some(node) = self.config.node(&request.node) else {
            return Answer::Refused(
                StatusCode::FORBIDDEN,
                format!("node {} is not listed in cluster.yaml", request.node),
            );
        };
        if IpAddr::V4(node.ip) != conn.peer {
            return Answer::Refused(
                StatusCode::FORBIDDEN,
                format!(
                    "node {} is listed with address {}, but this request came from {}",
                    node.name, node.ip, conn.peer
                ),
            );
        }
        if !entitled(node, request.purpose) {
            return Answer::Refused(
                StatusCode::FORBIDDEN,
                format!(
                    "node {} has no role that needs {} material",
                    node.name, request.purpose
                ),
            );
        }
        let material = match self.source.material(node, request.purpose).await {
            Ok(m) => m,
            Err(why) => return Answer::Refused(StatusCode::SERVICE_UNAVAILABLE, why.0),
        };
        let plain = serde_json::to_vec(&material).expect("material serialises");
        let Some((aead_nonce, sealed)) =
            self.keys
                .seal(&conn.exporter, &nonce, &node.name, request.purpose, &plain)
        else {
            // A server holds the cluster's secret (serve-join runs only on
            // control-plane and ceph-mon nodes), so this is a worker secret
            // on a node configured otherwise.
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node holds only a worker join secret",
            );
        };
        tracing::info!(node = %node.name, purpose = %request.purpose, "served join material");
        Answer::Sealed(SealedAnswer {
            version: PROTOCOL_VERSION,
            nonce: aead_nonce,
            sealed,
        })
    }
}

/// Control-plane material is the cluster's root of trust: only nodes that
/// will run a control plane get it. Every listed node may join as a worker
/// (control-plane nodes run a kubelet too).
fn entitled(node: &NodeSpec, purpose: Purpose) -> bool {
    match purpose {
        Purpose::ControlPlane => node.has_role(NodeRole::ControlPlane),
        Purpose::CephMon => node.has_role(NodeRole::CephMon),
        Purpose::Worker => true,
    }
}

/// An IPv4 client reaching a dual-stack socket shows up as `::ffff:a.b.c.d`.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn decode_fixed<const N: usize>(text: &str) -> Option<[u8; N]> {
    B64.decode(text).ok()?.try_into().ok()
}

/// Bootstrap tokens from the cluster's API with the node's admin.conf:
/// one token is reused while it has more than half its lifetime left, so
/// every worker gets at least `ttl / 2` and the API sees one write per half
/// lifetime, not one per join.
pub struct ApiTokens {
    admin_conf: std::path::PathBuf,
    ttl: Duration,
    current: tokio::sync::Mutex<Option<crate::k8s::BootstrapToken>>,
}

impl ApiTokens {
    pub fn new(admin_conf: std::path::PathBuf, ttl: Duration) -> ApiTokens {
        ApiTokens {
            admin_conf,
            ttl,
            current: tokio::sync::Mutex::new(None),
        }
    }
}

#[async_trait]
impl BootstrapTokens for ApiTokens {
    async fn current(&self) -> Result<IssuedToken, Unavailable> {
        let renew_before = self.ttl / 2;
        // Held across the API calls: concurrent joins wait for one mint.
        let mut current = self.current.lock().await;
        let fresh_enough = |t: &crate::k8s::BootstrapToken| {
            t.expires - time::OffsetDateTime::now_utc()
                > time::Duration::try_from(renew_before).unwrap_or(time::Duration::ZERO)
        };
        if current.as_ref().is_none_or(|t| !fresh_enough(t)) {
            if !self.admin_conf.exists() {
                return Err(Unavailable(
                    "the Kubernetes control plane on this node is not up yet".into(),
                ));
            }
            let unavailable =
                |e: crate::k8s::K8sError| Unavailable(format!("cannot get a bootstrap token: {e}"));
            let client = crate::k8s::client_from_kubeconfig(&self.admin_conf)
                .await
                .map_err(unavailable)?;
            *current = Some(
                crate::k8s::ensure_bootstrap_token(&client, self.ttl, renew_before)
                    .await
                    .map_err(unavailable)?,
            );
        }
        let token = current.as_ref().expect("set above");
        Ok(IssuedToken {
            token: token.expose(),
            expires: token.expires_rfc3339(),
        })
    }
}
