//! The joining side: ask the running nodes, one after another, until one
//! answers with material sealed by the join secret for this very session.
//!
//! The server's certificate is not checked against anything: at this point
//! the node has no CA to check it with, and trusting whatever certificate
//! comes first would be trust on first use. Instead nothing the server sends
//! is used until its seal opens, which only a holder of the join secret can
//! produce and only for this TLS session (its exporter value is in the
//! associated data), so a man in the middle can neither read the request's
//! proof into a session of its own nor forge or relay an answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

use super::keys::{Exporter, ProofFields, random_nonce};
use super::{
    EXPORTER_LABEL, EXPORTER_LEN, JOIN_PATH, JoinError, JoinKeys, JoinRequest, Material,
    PROTOCOL_VERSION, Purpose, Refusal, SealedAnswer, now_unix,
};
use crate::wait::Backoff;

/// Answers carry PEM bundles of a few KiB; anything past this is not ours.
const MAX_ANSWER_BYTES: usize = 256 * 1024;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// One node's client of the join service.
pub struct JoinClient {
    keys: JoinKeys,
    node: String,
    /// Requests leave from the node's own address: the server checks it
    /// against cluster.yaml.
    source: IpAddr,
    tls: TlsConnector,
}

impl JoinClient {
    pub fn new(keys: JoinKeys, node: &str, source: IpAddr) -> JoinClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(SealDecides {
            provider: provider.clone(),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        JoinClient {
            keys,
            node: node.to_string(),
            source,
            tls: TlsConnector::from(Arc::new(config)),
        }
    }

    /// One exchange with one server.
    pub async fn request(
        &self,
        server: SocketAddr,
        purpose: Purpose,
    ) -> Result<Material, JoinError> {
        let exchange = async { self.connect(server).await?.request(purpose).await };
        tokio::time::timeout(ATTEMPT_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(JoinError::Server {
                    server: server.to_string(),
                    reason: format!("no answer within {ATTEMPT_TIMEOUT:?}"),
                })
            })
    }

    /// Asks `servers` in turn (each node starting at a random one, so a rack
    /// of nodes spreads over them), with jittered backoff between rounds,
    /// until one serves or `deadline` passes. `on_wait` is told once, after
    /// the first round fails, what the node is waiting for.
    pub async fn fetch(
        &self,
        servers: &[SocketAddr],
        purpose: Purpose,
        deadline: Duration,
        on_wait: impl Fn(&str),
    ) -> Result<Material, JoinError> {
        let started = Instant::now();
        let mut backoff = Backoff::remote(Duration::from_secs(5));
        let offset = rand::random_range(0..servers.len().max(1));
        let mut told = false;
        loop {
            let mut failures = Vec::new();
            for server in servers.iter().cycle().skip(offset).take(servers.len()) {
                match self.request(*server, purpose).await {
                    Ok(material) => return Ok(material),
                    Err(e) => {
                        tracing::debug!(%server, "join attempt failed: {e}");
                        failures.push(e.to_string());
                    }
                }
            }
            let elapsed = started.elapsed();
            if elapsed >= deadline {
                return Err(JoinError::NoServer {
                    purpose,
                    waited: elapsed,
                    failures: failures.join("; "),
                });
            }
            if !told {
                on_wait(&format!(
                    "{purpose} material from a join service ({})",
                    failures.join("; ")
                ));
                told = true;
            }
            tokio::time::sleep(backoff.next_delay().min(deadline - elapsed)).await;
        }
    }

    /// A TLS session to `server` that can carry several requests (each
    /// with its own nonce); a booting node needs one, load tests many.
    pub async fn connect(&self, server: SocketAddr) -> Result<JoinSession<'_>, JoinError> {
        let fail = |reason: String| JoinError::Server {
            server: server.to_string(),
            reason,
        };
        let socket = match server {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| fail(format!("socket: {e}")))?;
        socket.bind(SocketAddr::new(self.source, 0)).map_err(|e| {
            fail(format!(
                "cannot send from this node's address {}: {e}",
                self.source
            ))
        })?;
        let tcp = socket
            .connect(server)
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::IpAddress(server.ip().into());
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS handshake: {e}")))?;
        let mut exporter: Exporter = [0u8; EXPORTER_LEN];
        tls.get_ref()
            .1
            .export_keying_material(&mut exporter, EXPORTER_LABEL, None)
            .map_err(|e| fail(format!("TLS exporter: {e}")))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail(format!("HTTP: {e}")))?;
        Ok(JoinSession {
            client: self,
            server,
            exporter,
            sender,
            driver: tokio::spawn(connection),
        })
    }
}

pub struct JoinSession<'c> {
    client: &'c JoinClient,
    server: SocketAddr,
    exporter: Exporter,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl Drop for JoinSession<'_> {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl JoinSession<'_> {
    pub async fn request(&mut self, purpose: Purpose) -> Result<Material, JoinError> {
        let server = self.server;
        let exporter = self.exporter;
        let me = &self.client.node;
        let fail = |reason: String| JoinError::Server {
            server: server.to_string(),
            reason,
        };
        let nonce = random_nonce();
        let timestamp = now_unix();
        let Some(proof) = self.client.keys.proof(
            &exporter,
            &ProofFields {
                node: me,
                purpose,
                timestamp,
                nonce: &nonce,
            },
        ) else {
            return Err(JoinError::NotEntitled { purpose });
        };
        let body = serde_json::to_vec(&JoinRequest {
            version: PROTOCOL_VERSION,
            node: me.clone(),
            purpose,
            timestamp,
            nonce: B64.encode(nonce),
            proof: B64.encode(proof.as_ref()),
        })
        .expect("request serialises");

        let request = Request::builder()
            .method(Method::POST)
            .uri(JOIN_PATH)
            .header(HOST, server.to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static request is valid");
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| fail(format!("HTTP: {e}")))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| fail(format!("reading the answer: {e}")))?
            .to_bytes();

        if !status.is_success() {
            // Unauthenticated, so only shown, never acted on.
            let reason = serde_json::from_slice::<Refusal>(&bytes)
                .map(|r| r.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(JoinError::Refused {
                server: server.to_string(),
                status: status.as_u16(),
                reason,
            });
        }
        let unauthenticated = || JoinError::Unauthenticated {
            server: server.to_string(),
        };
        let answer: SealedAnswer = serde_json::from_slice(&bytes).map_err(|_| unauthenticated())?;
        let plain = self
            .client
            .keys
            .open(
                &exporter,
                &nonce,
                me,
                purpose,
                &answer.nonce,
                &answer.sealed,
            )
            .ok_or_else(unauthenticated)?;
        let material: Material = serde_json::from_slice(&plain)
            .map_err(|e| fail(format!("authenticated answer is not valid material: {e}")))?;
        if material.purpose() != purpose {
            return Err(fail(format!(
                "asked for {purpose} material, got {}",
                material.purpose()
            )));
        }
        Ok(material)
    }
}

/// Lets any certificate through the handshake, because the seal decides
/// (module docs). The handshake signature is still verified, so the peer at
/// least holds the key of the certificate it showed.
#[derive(Debug)]
struct SealDecides {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SealDecides {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not spoken here".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
