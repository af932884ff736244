//! The join service against hostile and broken clients and servers: a real
//! `cluster-agent serve-join` process on a loopback address, spoken to with
//! raw TLS and hand-written HTTP so every malformation can be sent. Every
//! refusal must be a 4xx with a reason and not one byte of material; the
//! client must refuse everything not sealed by the join secret for its
//! session. Then three masters form etcd fetching their CAs through it.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cluster_agent::join::keys::{ProofFields, random_nonce};
use cluster_agent::join::{
    EXPORTER_LABEL, JoinClient, JoinError, JoinKeys, Material, Purpose, SealedAnswer,
};
use cluster_agent::paths::HostPaths;
use cluster_agent::pki::{self, CaSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use support::etcd::{assert_converged, finish, spawn_run};
use support::{Cluster, text};

const NODES: &[(&str, &[&str])] = &[
    ("cp-1", &["control-plane"]),
    ("cp-2", &["control-plane"]),
    ("w-1", &["worker"]),
];
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// A serve-join process on cp-1 with generated CAs; killed on drop.
struct Service {
    c: Cluster,
    child: Child,
    addr: SocketAddr,
    secret: [u8; 32],
    log: std::path::PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn start() -> Service {
        let c = Cluster::new(NODES);
        let secret: [u8; 32] = rand::random();
        for n in ["cp-1", "cp-2", "w-1"] {
            c.write_join_secret(n, &secret);
        }
        let paths = HostPaths::new(&c.root("cp-1"), None, None);
        pki::ensure_cluster_cas(&paths, CaSource::Generate).unwrap();
        let log = c.root("cp-1").join("serve-join.log");
        let addr: SocketAddr = format!("{}:9443", ip(&c, "cp-1")).parse().unwrap();
        let child = c
            .agent("cp-1")
            .args(["serve-join", "--request-timeout"])
            .arg(REQUEST_TIMEOUT.as_secs_f64().to_string())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "serve-join never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
        Service {
            c,
            child,
            addr,
            secret,
            log,
        }
    }

    fn keys(&self) -> JoinKeys {
        JoinKeys::derive(&self.secret, "test")
    }

    fn ip(&self, node: &str) -> IpAddr {
        ip(&self.c, node)
    }

    fn ca_bundle(&self) -> pki::CaBundle {
        pki::read_shared_ca_bundle(&HostPaths::new(&self.c.root("cp-1"), None, None)).unwrap()
    }

    /// Every byte that must never leave the server unsealed or reach its log.
    fn secrets(&self) -> Vec<String> {
        let b = self.ca_bundle();
        let mut s: Vec<String> = [b.ca_key, b.front_proxy_ca_key, b.etcd_ca_key, b.sa_key]
            .iter()
            .map(|pem| pem.lines().nth(1).unwrap().to_string())
            .collect();
        s.push(B64.encode(self.secret));
        s.push(self.secret.iter().map(|b| format!("{b:02x}")).collect());
        s
    }
}

fn ip(c: &Cluster, node: &str) -> IpAddr {
    support::etcd::node_ip(c, node).parse().unwrap()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[derive(Debug)]
struct Exchange {
    status: u16,
    body: Vec<u8>,
}

impl Exchange {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw TLS 1.3 session to the service, from `from`.
struct Session {
    tls: TlsStream<TcpStream>,
    exporter: [u8; 32],
}

async fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

fn any_cert_client(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn session(s: &Service, from: &str) -> Session {
    let tcp = tcp_from(s.ip(from), s.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(s.addr.ip().into());
    let tls = any_cert_client(&[&rustls::version::TLS13])
        .connect(name, tcp)
        .await
        .unwrap();
    let mut exporter = [0u8; 32];
    tls.get_ref()
        .1
        .export_keying_material(&mut exporter, EXPORTER_LABEL, None)
        .unwrap();
    Session { tls, exporter }
}

/// A well-formed request body, with the knobs the cases turn.
struct Req<'a> {
    keys: &'a JoinKeys,
    node: &'a str,
    purpose: Purpose,
    timestamp: i64,
    nonce: [u8; 16],
}

impl<'a> Req<'a> {
    fn new(keys: &'a JoinKeys, node: &'a str, purpose: Purpose) -> Req<'a> {
        Req {
            keys,
            node,
            purpose,
            timestamp: now(),
            nonce: random_nonce(),
        }
    }

    fn json(&self, exporter: &[u8; 32]) -> serde_json::Value {
        let proof = self
            .keys
            .proof(
                exporter,
                &ProofFields {
                    node: self.node,
                    purpose: self.purpose,
                    timestamp: self.timestamp,
                    nonce: &self.nonce,
                },
            )
            .expect("the test holds the cluster's secret");
        serde_json::json!({
            "version": 1,
            "node": self.node,
            "purpose": self.purpose,
            "timestamp": self.timestamp,
            "nonce": B64.encode(self.nonce),
            "proof": B64.encode(proof.as_ref()),
        })
    }
}

fn post(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1/join HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Sends raw bytes, reads one response (status line, headers,
/// content-length body).
async fn exchange(session: &mut Session, raw: &[u8]) -> Exchange {
    session.tls.write_all(raw).await.unwrap();
    read_response(&mut session.tls).await.expect("a response")
}

async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<Exchange> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < header_end + len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Exchange {
        status,
        body: buf[header_end..].to_vec(),
    })
}

/// A refusal: the status, a JSON reason, and no secret byte.
fn assert_refused(s: &Service, case: &str, got: &Exchange, status: u16, reason_has: &str) {
    assert_eq!(got.status, status, "{case}: {}", got.text());
    let body: serde_json::Value = serde_json::from_slice(&got.body)
        .unwrap_or_else(|_| panic!("{case}: refusal is not JSON: {}", got.text()));
    let reason = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: no reason"));
    assert!(
        reason.contains(reason_has),
        "{case}: reason `{reason}` lacks `{reason_has}`"
    );
    assert!(body.get("sealed").is_none(), "{case}");
    assert_no_secret(s, case, &got.body);
}

fn assert_no_secret(s: &Service, case: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    assert!(!text.contains("PRIVATE KEY"), "{case}: key material sent");
    for secret in s.secrets() {
        assert!(!text.contains(&secret), "{case}: a secret was sent");
    }
}

/// Sends one JSON body on a fresh session from `from`.
async fn send_json(s: &Service, from: &str, body: impl FnOnce(&[u8; 32]) -> Vec<u8>) -> Exchange {
    let mut sess = session(s, from).await;
    let bytes = body(&sess.exporter);
    exchange(&mut sess, &post(&bytes)).await
}

fn open(keys: &JoinKeys, exporter: &[u8; 32], req: &Req<'_>, got: &Exchange) -> Option<Material> {
    let answer: SealedAnswer = serde_json::from_slice(&got.body).ok()?;
    let plain = keys.open(
        exporter,
        &req.nonce,
        req.node,
        req.purpose,
        &answer.nonce,
        &answer.sealed,
    )?;
    serde_json::from_slice(&plain).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_a_4xx_and_no_secret_byte() {
    let s = Service::start();
    let keys = s.keys();

    // The baseline every case deviates from: a listed master, from its own
    // address, with the cluster's secret, is served.
    let mut sess = session(&s, "cp-2").await;
    let good = Req::new(&keys, "cp-2", Purpose::ControlPlane);
    let good_body = post(&serde_json::to_vec(&good.json(&sess.exporter)).unwrap());
    let got = exchange(&mut sess, &good_body).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_no_secret(&s, "sealed answer", &got.body);
    match open(&keys, &sess.exporter, &good, &got) {
        Some(Material::ControlPlane { cas }) => assert_eq!(cas, s.ca_bundle()),
        other => panic!("baseline: {other:?}"),
    }
    // 1. The same request again on the same session: a replay.
    let replay = exchange(&mut sess, &good_body).await;
    assert_refused(&s, "replay on the same session", &replay, 401, "replay");
    // 2. The captured body on a new session: bound to the old exporter.
    let captured = serde_json::to_vec(&good.json(&sess.exporter)).unwrap();
    let got = send_json(&s, "cp-2", |_| captured.clone()).await;
    assert_refused(
        &s,
        "replay on another session",
        &got,
        401,
        "proof does not verify",
    );

    let wrong_keys = JoinKeys::derive(&[0x55; 32], "test");
    let other_cluster = JoinKeys::derive(&s.secret, "other");
    type Case = (
        &'static str,
        u16,
        &'static str,
        Box<dyn Fn(&[u8; 32]) -> Vec<u8> + Send>,
    );
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let k = Arc::new(JoinKeys::derive(&s.secret, "test"));
    let w = Arc::new(wrong_keys);
    let oc = Arc::new(other_cluster);
    let with = |keys: Arc<JoinKeys>,
                node: &'static str,
                purpose: Purpose,
                f: fn(&mut Req<'_>),
                edit: fn(&mut serde_json::Value)| {
        Box::new(move |e: &[u8; 32]| {
            let mut r = Req::new(&keys, node, purpose);
            f(&mut r);
            let mut v = r.json(e);
            edit(&mut v);
            serde_json::to_vec(&v).unwrap()
        }) as Box<dyn Fn(&[u8; 32]) -> Vec<u8> + Send>
    };
    let cases: Vec<Case> = vec![
        (
            "3. wrong join secret",
            401,
            "proof does not verify",
            with(w.clone(), "cp-2", Purpose::ControlPlane, |_| {}, |_| {}),
        ),
        (
            "4. right secret, other cluster name",
            401,
            "proof does not verify",
            with(oc.clone(), "cp-2", Purpose::ControlPlane, |_| {}, |_| {}),
        ),
        (
            "5. expired timestamp",
            401,
            "clock",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |r| r.timestamp -= 3600,
                |_| {},
            ),
        ),
        (
            "6. timestamp from the future",
            401,
            "clock",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |r| r.timestamp += 3600,
                |_| {},
            ),
        ),
        (
            "6b. timestamp i64::MIN, properly signed",
            401,
            "clock",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |r| r.timestamp = i64::MIN,
                |_| {},
            ),
        ),
        (
            "6c. timestamp i64::MAX, properly signed",
            401,
            "clock",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |r| r.timestamp = i64::MAX,
                |_| {},
            ),
        ),
        (
            "6d. timestamp i64::MIN with a forged proof",
            401,
            "proof does not verify",
            with(
                w.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |r| r.timestamp = i64::MIN,
                |_| {},
            ),
        ),
        (
            "7. proof with one bit flipped",
            401,
            "proof does not verify",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| {
                    let mut p = B64.decode(v["proof"].as_str().unwrap()).unwrap();
                    p[5] ^= 0x10;
                    v["proof"] = B64.encode(p).into();
                },
            ),
        ),
        (
            "8. empty proof",
            401,
            "proof does not verify",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| v["proof"] = "".into(),
            ),
        ),
        (
            "9. node swapped after signing",
            401,
            "proof does not verify",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| v["node"] = "cp-1".into(),
            ),
        ),
        (
            "10. purpose swapped after signing",
            401,
            "proof does not verify",
            with(
                k.clone(),
                "w-1",
                Purpose::Worker,
                |_| {},
                |v| v["purpose"] = "control-plane".into(),
            ),
        ),
        (
            "11. unknown node with a valid proof",
            403,
            "not listed",
            with(k.clone(), "ghost", Purpose::Worker, |_| {}, |_| {}),
        ),
        (
            "12. listed node from another node's address",
            403,
            "came from",
            with(k.clone(), "w-1", Purpose::Worker, |_| {}, |_| {}),
        ),
        (
            "13. worker asking for control-plane material",
            403,
            "no role",
            with(k.clone(), "w-1", Purpose::ControlPlane, |_| {}, |_| {}),
        ),
        (
            "14. malformed JSON",
            400,
            "not a join request",
            Box::new(|_| b"{\"version\": 1,".to_vec()),
        ),
        (
            "15. empty body",
            400,
            "not a join request",
            Box::new(|_| Vec::new()),
        ),
        (
            "16. JSON of the wrong shape",
            400,
            "not a join request",
            Box::new(|_| b"[1,2,3]".to_vec()),
        ),
        (
            "17. unknown field",
            400,
            "not a join request",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| v["admin"] = true.into(),
            ),
        ),
        (
            "18. unknown protocol version",
            400,
            "protocol version",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| v["version"] = 2.into(),
            ),
        ),
        (
            "19. unknown purpose",
            400,
            "not a join request",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| v["purpose"] = "root-ca".into(),
            ),
        ),
        (
            "20. nonce of the wrong length",
            400,
            "nonce",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| v["nonce"] = B64.encode([1u8; 8]).into(),
            ),
        ),
        (
            "21. nonce not base64",
            400,
            "nonce",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| v["nonce"] = "!!!!".into(),
            ),
        ),
        (
            "22. timestamp as a string",
            400,
            "not a join request",
            with(
                k.clone(),
                "cp-2",
                Purpose::ControlPlane,
                |_| {},
                |v| v["timestamp"] = "now".into(),
            ),
        ),
        (
            "23. body over the limit",
            413,
            "too large",
            Box::new(move |_| json(serde_json::json!({"pad": "x".repeat(5000)}))),
        ),
    ];
    for (case, status, reason, body) in cases {
        // Every case comes from cp-2's address (so case 12 is w-1 asking
        // from there) except the worker's own request for master material.
        let from = if case.starts_with("13.") {
            "w-1"
        } else {
            "cp-2"
        };
        let got = send_json(&s, from, |e| body(e)).await;
        assert_refused(&s, case, &got, status, reason);
    }

    // 24. A declared length far over the limit is refused before reading.
    let mut sess = session(&s, "cp-2").await;
    let got = exchange(
        &mut sess,
        b"POST /v1/join HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n",
    )
    .await;
    assert_refused(
        &s,
        "24. declared length over the limit",
        &got,
        413,
        "too large",
    );

    // 25. Chunked body that never ends below the limit.
    let mut sess = session(&s, "cp-2").await;
    let mut raw =
        b"POST /v1/join HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(format!("800\r\n{}\r\n", "a".repeat(0x800)).as_bytes());
    }
    let got = exchange(&mut sess, &raw).await;
    assert_refused(
        &s,
        "25. chunked body over the limit",
        &got,
        413,
        "too large",
    );

    // 26. A client that announces a body and then stalls.
    let mut sess = session(&s, "cp-2").await;
    let started = Instant::now();
    let got = exchange(
        &mut sess,
        b"POST /v1/join HTTP/1.1\r\nhost: x\r\ncontent-length: 300\r\n\r\n{\"version\":",
    )
    .await;
    assert_refused(&s, "26. slow body", &got, 408, "too slow");
    assert!(
        started.elapsed() < REQUEST_TIMEOUT * 3,
        "{:?}",
        started.elapsed()
    );

    // 27. Headers that never end: the connection is closed, nothing served.
    let mut sess = session(&s, "cp-2").await;
    sess.tls
        .write_all(b"POST /v1/join HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let got = read_response(&mut sess.tls).await;
    assert!(
        got.as_ref().is_none_or(|g| g.status == 408),
        "27. slow headers: {got:?}"
    );
    assert!(
        started.elapsed() < REQUEST_TIMEOUT * 3,
        "{:?}",
        started.elapsed()
    );

    // 28. A client that connects and never says hello.
    let mut tcp = tcp_from(s.ip("cp-2"), s.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tcp.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "28. silent client got bytes");
    assert!(
        started.elapsed() < REQUEST_TIMEOUT * 3,
        "{:?}",
        started.elapsed()
    );

    // 29. Wrong method and unknown path.
    let mut sess = session(&s, "cp-2").await;
    let got = exchange(&mut sess, b"GET /v1/join HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(got.status, 405, "29. GET: {}", got.text());
    let got = exchange(&mut sess, b"GET /v1/secrets HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(got.status, 404, "29. unknown path: {}", got.text());
    assert_no_secret(&s, "29", &got.body);

    // 30. Plain HTTP to the TLS port: no HTTP answer at all.
    let mut tcp = tcp_from(s.ip("cp-2"), s.addr).await.unwrap();
    let body = serde_json::to_vec(&good.json(&[0u8; 32])).unwrap();
    tcp.write_all(&post(&body)).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "30. plaintext answered: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_no_secret(&s, "30", &got);

    // 31. A TLS 1.2-only client cannot even connect (the exporter binding
    // needs TLS 1.3).
    let tcp = tcp_from(s.ip("cp-2"), s.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(s.addr.ip().into());
    assert!(
        any_cert_client(&[&rustls::version::TLS12])
            .connect(name, tcp)
            .await
            .is_err(),
        "31"
    );

    // 32. The secret never reached the log, though every case above did.
    let log = std::fs::read(&s.log).unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("join refused"),
        "log: nothing logged?"
    );
    assert_no_secret(&s, "32. serve-join log", &log);
    for (n, line) in String::from_utf8_lossy(&log).lines().enumerate() {
        assert!(
            !line.contains("\"proof\""),
            "log line {n} holds a proof: {line}"
        );
    }
}

/// A man in the middle that terminates the client's TLS with its own
/// certificate and relays to the real server on a session of its own. It
/// does not hold the join secret.
async fn relay(listener: TcpListener, upstream: SocketAddr, from: IpAddr, tamper: bool) {
    let cert = rcgen::generate_simple_self_signed(vec!["mitm".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut client_side) = acceptor.accept(tcp).await else {
            continue;
        };
        let mut request = Vec::new();
        let mut chunk = [0u8; 8192];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") || !request.ends_with(b"}") {
            let n = client_side.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            request.extend_from_slice(&chunk[..n]);
        }
        let tcp = tcp_from(from, upstream).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(upstream.ip().into());
        let mut server_side = any_cert_client(&[&rustls::version::TLS13])
            .connect(name, tcp)
            .await
            .unwrap();
        server_side.write_all(&request).await.unwrap();
        let Some(mut got) = read_response(&mut server_side).await else {
            continue;
        };
        if tamper && got.status == 200 {
            let mut answer: SealedAnswer = serde_json::from_slice(&got.body).unwrap();
            let mut raw = B64.decode(&answer.sealed).unwrap();
            raw[10] ^= 1;
            answer.sealed = B64.encode(raw);
            got.body = serde_json::to_vec(&answer).unwrap();
        }
        let head = format!(
            "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            got.status,
            got.body.len()
        );
        let _ = client_side.write_all(head.as_bytes()).await;
        let _ = client_side.write_all(&got.body).await;
        let _ = client_side.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_trusts_only_answers_sealed_for_its_own_session() {
    let s = Service::start();
    let cp2 = JoinClient::new(s.keys(), "cp-2", s.ip("cp-2"));

    // The real service: the CA bundle, decrypted.
    match cp2.request(s.addr, Purpose::ControlPlane).await.unwrap() {
        Material::ControlPlane { cas } => assert_eq!(cas, s.ca_bundle()),
        other => panic!("{other:?}"),
    }

    // 33. A relaying man in the middle: the server sees a proof made for
    // another session and refuses; the client gets nothing.
    let mitm = TcpListener::bind(SocketAddr::new(s.ip("w-1"), 9444))
        .await
        .unwrap();
    let mitm_addr = mitm.local_addr().unwrap();
    tokio::spawn(relay(mitm, s.addr, s.ip("cp-2"), false));
    match cp2.request(mitm_addr, Purpose::ControlPlane).await {
        Err(JoinError::Refused {
            status: 401,
            reason,
            ..
        }) => {
            assert!(reason.contains("another TLS session"), "{reason}")
        }
        other => panic!("33. relay: {other:?}"),
    }

    // 34. A server that does not hold the join secret cannot make the
    // client accept anything, even a well-formed sealed answer.
    let impostor_keys = JoinKeys::derive(&[0x77; 32], "test");
    let impostor = TcpListener::bind(SocketAddr::new(s.ip("w-1"), 9445))
        .await
        .unwrap();
    let impostor_addr = impostor.local_addr().unwrap();
    tokio::spawn(impostor_server(impostor, impostor_keys, false));
    match cp2.request(impostor_addr, Purpose::ControlPlane).await {
        Err(JoinError::Unauthenticated { .. }) => {}
        other => panic!("34. impostor: {other:?}"),
    }

    // 35. A ciphertext altered in flight (by a party that holds the
    // secret, the strongest case) does not open.
    let tamperer = TcpListener::bind(SocketAddr::new(s.ip("w-1"), 9446))
        .await
        .unwrap();
    let tamperer_addr = tamperer.local_addr().unwrap();
    tokio::spawn(impostor_server(tamperer, s.keys(), true));
    match cp2.request(tamperer_addr, Purpose::ControlPlane).await {
        Err(JoinError::Unauthenticated { .. }) => {}
        other => panic!("35. tampered: {other:?}"),
    }

    // 36. A worker-only node holds just the worker secret: it cannot even
    // form a request for the CA keys.
    let worker_secret = JoinKeys::worker_secret(&s.secret, "test");
    let w1 = JoinClient::new(
        JoinKeys::derive_worker_only(&worker_secret, "test"),
        "w-1",
        s.ip("w-1"),
    );
    match w1.request(s.addr, Purpose::ControlPlane).await {
        Err(JoinError::NotEntitled { purpose }) => assert_eq!(purpose, Purpose::ControlPlane),
        other => panic!("36. worker secret: {other:?}"),
    }

    // 37. fetch() goes on to the next server after failures and says why
    // when all fail.
    let started = Instant::now();
    let err = cp2
        .fetch(
            &[impostor_addr, mitm_addr],
            Purpose::ControlPlane,
            Duration::from_millis(300),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(err, JoinError::NoServer { .. }), "{err}");
    assert!(err.to_string().contains("failed authentication"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    match cp2
        .fetch(
            &[impostor_addr, s.addr],
            Purpose::ControlPlane,
            Duration::from_secs(10),
            |_| {},
        )
        .await
        .unwrap()
    {
        Material::ControlPlane { cas } => assert_eq!(cas, s.ca_bundle()),
        other => panic!("{other:?}"),
    }
}

/// Answers every request with material sealed under `keys` for the
/// request's own session, optionally altered.
async fn impostor_server(listener: TcpListener, keys: JoinKeys, tamper: bool) {
    let cert = rcgen::generate_simple_self_signed(vec!["impostor".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut tls) = acceptor.accept(tcp).await else {
            continue;
        };
        let mut exporter = [0u8; 32];
        tls.get_ref()
            .1
            .export_keying_material(&mut exporter, EXPORTER_LABEL, None)
            .unwrap();
        let mut request = Vec::new();
        let mut chunk = [0u8; 8192];
        while !request.ends_with(b"}") {
            let n = tls.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            request.extend_from_slice(&chunk[..n]);
        }
        let start = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let req: serde_json::Value = serde_json::from_slice(&request[start..]).unwrap();
        let nonce: [u8; 16] = B64
            .decode(req["nonce"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let forged = serde_json::to_vec(&serde_json::json!({
            "purpose": "control-plane",
            "cas": {"ca_crt": "forged", "ca_key": "forged", "front_proxy_ca_crt": "", "front_proxy_ca_key": "",
                    "etcd_ca_crt": "", "etcd_ca_key": "", "sa_key": "", "sa_pub": ""}
        }))
        .unwrap();
        let (n, mut sealed) = keys
            .seal(
                &exporter,
                &nonce,
                req["node"].as_str().unwrap(),
                Purpose::ControlPlane,
                &forged,
            )
            .unwrap();
        if tamper {
            let mut raw = B64.decode(&sealed).unwrap();
            raw[3] ^= 0x40;
            sealed = B64.encode(raw);
        }
        let body = serde_json::to_vec(&SealedAnswer {
            version: 1,
            nonce: n,
            sealed,
        })
        .unwrap();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = tls.write_all(head.as_bytes()).await;
        let _ = tls.write_all(&body).await;
        let _ = tls.shutdown().await;
    }
}

#[test]
fn a_join_secret_others_can_read_stops_the_service_with_exit_2() {
    let c = Cluster::new(NODES);
    let secret = c.config_dir("cp-1").join("secrets/join-secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = c.agent("cp-1").arg("serve-join").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));
    std::fs::remove_file(&secret).unwrap();
    let out = c.agent("cp-1").arg("serve-join").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("join-secret"), "{}", text(&out));
}

/// The additional masters have no CA material of their own: they fetch it
/// from cp-1's join service, and all three end up with one CA set.
#[test]
fn masters_get_the_cluster_cas_through_the_join_service() {
    let c = Cluster::isolated(&[
        ("cp-1", &["control-plane"]),
        ("cp-2", &["control-plane"]),
        ("cp-3", &["control-plane"]),
    ]);
    let children: Vec<_> = ["cp-3", "cp-2", "cp-1"]
        .iter()
        .map(|n| (*n, spawn_run(&c, n, None)))
        .collect();
    for (node, child) in children {
        finish(node, child);
    }
    assert_converged(&c, &["cp-1", "cp-2", "cp-3"]);
    let bundle =
        |n: &str| pki::read_shared_ca_bundle(&HostPaths::new(&c.root(n), None, None)).unwrap();
    assert_eq!(bundle("cp-2"), bundle("cp-1"));
    assert_eq!(bundle("cp-3"), bundle("cp-1"));
    for n in ["cp-2", "cp-3"] {
        let key = c.root(n).join("etc/kubernetes/pki/ca.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600,
            "{n}"
        );
        let ca = c.root("cp-1").join("etc/kubernetes/pki/ca.crt");
        let leaf = c.root(n).join("etc/kubernetes/pki/apiserver.crt");
        let out = std::process::Command::new(support::require_tool("openssl", "openssl"))
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca)
            .arg(&leaf)
            .output()
            .unwrap();
        assert!(out.status.success(), "{n}: {}", text(&out));
    }
    // Each master now serves the others too.
    for n in ["cp-1", "cp-2", "cp-3"] {
        let journal = c.journal(n);
        let outcome = support::journal_outcome(&journal);
        assert!(
            outcome
                .iter()
                .any(|(step, status)| step == "join-service-start" && status == "done"),
            "{n}: {outcome:?}"
        );
    }
}
