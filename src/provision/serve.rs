//! `serve`'s HTTP and HTTPS server: Matchbox's endpoints (`/boot.ipxe`,
//! `/ipxe`, `/ignition`, `/assets/`) for the machines of one config dir.
//!
//! A node's Ignition config carries the join secret, so it never travels in
//! plaintext and is not handed to whoever asks:
//! - Over HTTP, `/ignition` answers a pointer ([`ignition::pointer`]): the
//!   HTTPS address of the real config, the CA of this run's certificate and
//!   the config's SHA-512. Ignition follows it, trusting only that CA.
//! - Over HTTPS, the config goes only to a source whose link-layer address
//!   in this machine's neighbour table is the MAC asked for (the machine is
//!   on the segment and is who it says), and, once one source has fetched
//!   it, to that source alone until the operator re-arms the node
//!   (SIGHUP). A second machine asking for a config already fetched is
//!   refused loudly: either a machine re-booted with another address, or
//!   something on the segment is harvesting secrets.
//! - Both listeners are bound to the interface their address is on, and
//!   the neighbour entry must be on that interface, inside its network: a
//!   host on another network of the bootstrap machine (its Wi-Fi, a VM
//!   bridge) cannot pass the check by routing to the address.
//! - No source is exempt, loopback included (any local user could bind
//!   127.0.0.1): the operator has `render ignition`.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{Bundle, ignition, ipxe};
use crate::config::MacAddr;
use crate::pki::{self, San};

/// The kernel's IPv4 neighbour table: IP, HW type, flags, HW address, mask,
/// device.
pub const NEIGHBOUR_TABLE: &str = "/proc/net/arp";
/// `ATF_COM`: the entry is resolved.
const ARP_COMPLETE: u32 = 0x2;
const MAX_CONNECTIONS: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than any bootstrap; a new `serve` makes a new one.
const CERT_VALIDITY: time::Duration = time::Duration::days(7);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "--{flag} {addr} is not a concrete IPv4 address and port; give the address the machines reach this one by on their segment (it goes into their iPXE scripts and the TLS certificate)"
    )]
    NotConcrete {
        flag: &'static str,
        addr: SocketAddr,
    },
    #[error("--{flag} {addr}: {source}")]
    Interface {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: crate::hostnet::HostNetError,
    },
    #[error("the assets directory {}: {source}", path.display())]
    Assets {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making this run's TLS certificate: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listening on {addr}: {source} (is another serve or Matchbox running?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where `serve` listens and what it hands out.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub tls_listen: SocketAddr,
    pub assets: PathBuf,
    pub kernel: String,
    pub initrd: String,
    pub neighbour_table: PathBuf,
}

/// The interface a listener's address is on, and its networks: where the
/// machines must be.
#[derive(Debug, Clone)]
struct Segment {
    interface: String,
    networks: Vec<ipnet::Ipv4Net>,
}

impl Segment {
    fn of(flag: &'static str, addr: SocketAddr) -> Result<(Ipv4Addr, Segment), ServeError> {
        let ip = match addr.ip().to_canonical() {
            IpAddr::V4(ip) if !ip.is_unspecified() && addr.port() != 0 => ip,
            _ => return Err(ServeError::NotConcrete { flag, addr }),
        };
        let interface = crate::hostnet::interface_with(ip)
            .map_err(|source| ServeError::Interface { flag, addr, source })?
            .name;
        let networks = crate::hostnet::ipv4_networks(&interface)
            .map_err(|source| ServeError::Interface { flag, addr, source })?;
        Ok((
            ip,
            Segment {
                interface,
                networks,
            },
        ))
    }
}

/// A machine cluster.yaml lists by MAC: its node, and both answers, made
/// once at start (hashing a config per request would let any client on
/// the segment burn CPU at will).
struct Machine {
    node: String,
    config: Bytes,
    pointer: Bytes,
}

/// Who fetched a node's config first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Binding {
    source: IpAddr,
    mac: MacAddr,
}

pub struct BootServer {
    options: ServeOptions,
    assets: PathBuf,
    plain: Segment,
    secure: Segment,
    machines: HashMap<MacAddr, Machine>,
    tls: TlsAcceptor,
    bindings: Mutex<HashMap<String, Binding>>,
}

/// Large reads for assets hundreds of MB long: each read is a trip to the
/// blocking pool.
const ASSET_CHUNK: usize = 256 * 1024;
const IGNITION_TYPE: &str = "application/vnd.coreos.ignition+json";
const REFUSED: &str = "refused; the reason is in serve's log on the bootstrap machine\n";

type Body = BoxBody<Bytes, std::io::Error>;

enum Answer {
    Text(StatusCode, String),
    Content(&'static str, Bytes),
    File(tokio::fs::File, u64),
}

/// What one request was about, for its log line.
#[derive(Default)]
struct Subject<'a> {
    mac: Option<MacAddr>,
    node: Option<&'a str>,
}

impl BootServer {
    pub fn new(bundle: &Bundle, options: ServeOptions) -> Result<BootServer, ServeError> {
        let (_, plain) = Segment::of("listen", options.listen)?;
        let (tls_ip, secure) = Segment::of("tls-listen", options.tls_listen)?;
        let assets = options
            .assets
            .canonicalize()
            .map_err(|source| ServeError::Assets {
                path: options.assets.clone(),
                source,
            })?;
        let identity = pki::ephemeral_serving(
            "cluster-agent serve",
            BTreeSet::from([San::Ip(IpAddr::V4(tls_ip))]),
            CERT_VALIDITY,
        )?;
        let chain = [identity.cert_pem.as_str(), identity.ca_pem.as_str()]
            .iter()
            .map(|pem| {
                rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
                    .map_err(|e| rustls::Error::General(e.to_string()))
            })
            .collect::<Result<Vec<CertificateDer<'static>>, _>>()?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der));
        // TLS 1.2 as well as 1.3: firmware and initramfs fetchers lag.
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let mut machines = HashMap::new();
        for node in &bundle.config.nodes {
            let config = Bytes::from(ignition::to_json(&bundle.ignition(node)));
            for mac in &node.mac_addresses {
                let url = format!(
                    "https://{}/ignition?mac={}",
                    options.tls_listen,
                    ipxe::mac_hyphens(mac)
                );
                let pointer = ignition::pointer(&url, &config, &identity.ca_pem);
                machines.insert(
                    *mac,
                    Machine {
                        node: node.name.clone(),
                        config: config.clone(),
                        pointer: Bytes::from(ignition::to_json(&pointer)),
                    },
                );
            }
        }
        Ok(BootServer {
            options,
            assets,
            plain,
            secure,
            machines,
            tls: TlsAcceptor::from(Arc::new(tls)),
            bindings: Mutex::new(HashMap::new()),
        })
    }

    /// Binds both listeners, each to the interface its address is on, so
    /// that a busy port fails `serve` at once.
    pub fn bind(&self) -> Result<(TcpListener, TcpListener), ServeError> {
        let bind = |addr: SocketAddr, segment: &Segment| {
            let error = |source| ServeError::Bind { addr, source };
            let socket = tokio::net::TcpSocket::new_v4().map_err(error)?;
            socket.set_reuseaddr(true).map_err(error)?;
            socket
                .bind_device(Some(segment.interface.as_bytes()))
                .map_err(error)?;
            socket.bind(addr).map_err(error)?;
            socket.listen(1024).map_err(error)
        };
        Ok((
            bind(self.options.listen, &self.plain)?,
            bind(self.options.tls_listen, &self.secure)?,
        ))
    }

    /// The assets cluster.provisioning names that the directory lacks.
    pub fn missing_assets(&self) -> Vec<String> {
        [&self.options.kernel, &self.options.initrd]
            .into_iter()
            .filter(|name| self.resolve_asset(Path::new(name)).is_none())
            .cloned()
            .collect()
    }

    /// Forgets who fetched which config: every node may be served again,
    /// once, to the first on-link machine with its MAC.
    pub fn rearm(&self) {
        let cleared: Vec<String> = self.lock_bindings().drain().map(|(node, _)| node).collect();
        tracing::info!(nodes = %cleared.join(", "), "re-armed every node's config");
    }

    fn lock_bindings(&self) -> std::sync::MutexGuard<'_, HashMap<String, Binding>> {
        self.bindings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves both listeners until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        (http, https): (TcpListener, TcpListener),
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let (stop, stopped) = tokio::sync::watch::channel(());
        let listen = |listener, tls| {
            let server = self.clone();
            let mut stopped = stopped.clone();
            crate::listener::accept_until(
                listener,
                MAX_CONNECTIONS,
                async move {
                    let _ = stopped.changed().await;
                },
                move |stream, peer| server.clone().connection(stream, peer, tls),
            )
        };
        let signal = async move {
            shutdown.await;
            let _ = stop.send(());
        };
        tokio::join!(listen(http, false), listen(https, true), signal);
    }

    async fn connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        tls: bool,
    ) {
        let _ = stream.set_nodelay(true);
        let peer = peer.ip().to_canonical();
        let server = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.respond(req, peer, tls).await) }
        });
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(16 * 1024)
            .clone();
        let result = if tls {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(stream)).await {
                Ok(Ok(stream)) => http.serve_connection(TokioIo::new(stream), service).await,
                // Warnings: a machine whose clock or TLS stack the
                // certificate does not suit fails here and nowhere else.
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        } else {
            http.serve_connection(TokioIo::new(stream), service).await
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }

    async fn respond(&self, req: Request<Incoming>, peer: IpAddr, tls: bool) -> Response<Body> {
        let mut subject = Subject::default();
        let path = req.uri().path().to_string();
        // A HEAD for a config would bind the node without handing it over.
        let allowed = match *req.method() {
            Method::GET => true,
            Method::HEAD => !(tls && path == "/ignition"),
            _ => false,
        };
        let answer = if !allowed {
            Answer::Text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            )
        } else {
            self.answer(&path, req.uri().query(), peer, tls, &mut subject)
                .await
        };
        let (status, content_type, length, body): (StatusCode, &str, u64, Body) = match answer {
            Answer::Text(status, text) => {
                let length = text.len() as u64;
                (
                    status,
                    "text/plain; charset=utf-8",
                    length,
                    full(Bytes::from(text)),
                )
            }
            Answer::Content(kind, bytes) => (StatusCode::OK, kind, bytes.len() as u64, full(bytes)),
            Answer::File(file, length) => {
                let stream = tokio_util::io::ReaderStream::with_capacity(file, ASSET_CHUNK);
                let frames = futures_util::StreamExt::map(stream, |chunk| chunk.map(Frame::data));
                (
                    StatusCode::OK,
                    "application/octet-stream",
                    length,
                    StreamBody::new(frames).boxed(),
                )
            }
        };
        tracing::info!(
            method = %req.method(),
            path,
            mac = subject.mac.map(|m| m.to_string()).unwrap_or_default(),
            node = subject.node.unwrap_or_default(),
            source = %peer,
            scheme = if tls { "https" } else { "http" },
            status = status.as_u16(),
            "request"
        );
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, content_type)
            .header(CONTENT_LENGTH, length)
            .body(body)
            .expect("static headers are valid")
    }

    async fn answer<'s>(
        &'s self,
        path: &str,
        query: Option<&str>,
        peer: IpAddr,
        tls: bool,
        subject: &mut Subject<'s>,
    ) -> Answer {
        let not_found = || Answer::Text(StatusCode::NOT_FOUND, "not found\n".into());
        match path {
            "/boot.ipxe" => Answer::Content(
                "text/plain",
                Bytes::from_static(ipxe::BOOT_SCRIPT.as_bytes()),
            ),
            "/ipxe" | "/ignition" => {
                let (mac, machine) = match self.machine_of(query, subject) {
                    Ok(found) => found,
                    Err(refusal) => return refusal,
                };
                if path == "/ipxe" {
                    Answer::Content("text/plain", Bytes::from(self.ipxe_script(&mac)))
                } else if tls {
                    self.config_for(machine, mac, peer)
                } else {
                    Answer::Content(IGNITION_TYPE, machine.pointer.clone())
                }
            }
            _ => match path.strip_prefix("/assets/").and_then(asset_path) {
                Some(relative) => self.asset(relative).await.unwrap_or_else(not_found),
                None => not_found(),
            },
        }
    }

    /// The machine the request's `mac` names, or the refusal to send.
    fn machine_of<'s>(
        &'s self,
        query: Option<&str>,
        subject: &mut Subject<'s>,
    ) -> Result<(MacAddr, &'s Machine), Answer> {
        let asked = query_param(query.unwrap_or_default(), "mac");
        let Some(mac) = asked.as_deref().and_then(MacAddr::parse) else {
            return Err(Answer::Text(
                StatusCode::BAD_REQUEST,
                "expected ?mac=aa-bb-cc-dd-ee-ff\n".into(),
            ));
        };
        subject.mac = Some(mac);
        let Some(machine) = self.machines.get(&mac) else {
            tracing::warn!(%mac, "no node in cluster.yaml has this MAC; add it to the node's mac_addresses to provision that machine");
            return Err(Answer::Text(
                StatusCode::NOT_FOUND,
                format!("no node has MAC {mac}\n"),
            ));
        };
        subject.node = Some(&machine.node);
        Ok((mac, machine))
    }

    fn ipxe_script(&self, mac: &MacAddr) -> String {
        let base = format!("http://{}", self.options.listen);
        ipxe::node_script(
            &format!("{base}/assets"),
            &self.options.kernel,
            &self.options.initrd,
            &format!("{base}/ignition?mac={}", ipxe::mac_hyphens(mac)),
        )
    }

    fn config_for(&self, machine: &Machine, mac: MacAddr, peer: IpAddr) -> Answer {
        let node = machine.node.as_str();
        // The reason goes to the operator's log only: the requester learns
        // nothing about who fetched first or what this server sees.
        let refuse = |status: StatusCode, reason: String| {
            tracing::warn!(node, %mac, source = %peer, "config refused: {reason}");
            Answer::Text(status, REFUSED.into())
        };
        let IpAddr::V4(source) = peer else {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "{peer} is not an IPv4 source, whose link-layer address this server checks; provision over IPv4"
                ),
            );
        };
        let segment = &self.secure;
        if !segment.networks.iter().any(|n| n.contains(&source)) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "{source} is not on {}'s networks; serve must be on the nodes' own L2 segment",
                    segment.interface
                ),
            );
        }
        match link_address(&self.options.neighbour_table, source) {
            Err(e) => {
                return refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading {}: {e}", self.options.neighbour_table.display()),
                );
            }
            Ok(Some(entry)) if entry.mac == mac && entry.device == segment.interface => {}
            Ok(Some(entry)) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "{source} is {} on {}, not {mac} on {}: a machine may only fetch its own config, from the segment",
                        entry.mac, entry.device, segment.interface
                    ),
                );
            }
            Ok(None) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "{source} is not a neighbour of this machine (no resolved entry in {}); serve must be on the nodes' own L2 segment",
                        self.options.neighbour_table.display()
                    ),
                );
            }
        }
        let asking = Binding { source: peer, mac };
        let mut bindings = self.lock_bindings();
        match bindings.get(node).copied() {
            Some(first) if first != asking => {
                drop(bindings);
                refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "node {node}'s config was already fetched by {} ({}); if that machine re-booted with another address, re-arm with SIGHUP (or restart serve)",
                        first.source, first.mac
                    ),
                )
            }
            Some(_) => Answer::Content(IGNITION_TYPE, machine.config.clone()),
            None => {
                bindings.insert(node.to_string(), asking);
                tracing::info!(node, %mac, source = %peer, "config fetched; it is now served to this machine only, until SIGHUP");
                Answer::Content(IGNITION_TYPE, machine.config.clone())
            }
        }
    }

    /// `relative` inside the assets directory: symlinks may point within
    /// it (Matchbox's `current`), never out of it; only regular files.
    fn resolve_asset(&self, relative: &Path) -> Option<PathBuf> {
        let path = self.assets.join(relative).canonicalize().ok()?;
        (path.starts_with(&self.assets) && path.is_file()).then_some(path)
    }

    async fn asset(&self, relative: PathBuf) -> Option<Answer> {
        // A few metadata reads on a local directory: not worth a trip to
        // the blocking pool.
        let path = self.resolve_asset(&relative)?;
        // O_NOFOLLOW and the type of what was opened, not of the name: a
        // component swapped for a symlink after the check, or a FIFO that
        // would block a reader forever, is refused.
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&path)
            .await
            .ok()?;
        let meta = file.metadata().await.ok()?;
        meta.is_file().then(|| Answer::File(file, meta.len()))
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A request path below `/assets/` as a relative path of plain components
/// (the rule cluster.yaml's asset names follow), or `None`.
fn asset_path(rest: &str) -> Option<PathBuf> {
    crate::config::values::asset_path(rest)
        .ok()
        .map(PathBuf::from)
}

fn query_param(query: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(&format!("http://query/?{query}"))
        .ok()?
        .query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// A resolved entry of the kernel's neighbour table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: MacAddr,
    pub device: String,
}

/// `source`'s resolved entry in the kernel's neighbour table.
pub fn link_address(table: &Path, source: Ipv4Addr) -> std::io::Result<Option<Neighbour>> {
    let text = std::fs::read_to_string(table)?;
    Ok(text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [ip, _kind, flags, link, _mask, device] = fields.as_slice() else {
            return None;
        };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        if ip.parse() != Ok(source) || flags & ARP_COMPLETE == 0 {
            return None;
        }
        Some(Neighbour {
            mac: MacAddr::parse(link)?,
            device: device.to_string(),
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_paths_stay_inside_the_directory() {
        assert_eq!(
            asset_path("flatcar/current/k.vmlinuz"),
            Some(PathBuf::from("flatcar/current/k.vmlinuz"))
        );
        for bad in [
            "",
            "a//b",
            "../etc/shadow",
            "a/../../b",
            "./a",
            "a/",
            "%2e%2e/x",
            "a\\b",
        ] {
            assert_eq!(asset_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_neighbour_table_gives_resolved_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("arp");
        std::fs::write(
            &table,
            "IP address       HW type     Flags       HW address            Mask     Device\n\
             10.0.0.7         0x1         0x2         52:54:00:aa:bb:01     *        br0\n\
             10.0.0.8         0x1         0x0         00:00:00:00:00:00     *        br0\n",
        )
        .unwrap();
        let entry = |ip: &str| link_address(&table, ip.parse().unwrap()).unwrap();
        assert_eq!(
            entry("10.0.0.7"),
            Some(Neighbour {
                mac: MacAddr::parse("52:54:00:aa:bb:01").unwrap(),
                device: "br0".into()
            })
        );
        assert_eq!(entry("10.0.0.8"), None);
        assert_eq!(entry("10.0.0.9"), None);
    }

    #[test]
    fn the_mac_comes_from_the_query_in_either_form() {
        assert_eq!(
            query_param("mac=52-54-00-AA-bb-01&x=1", "mac").as_deref(),
            Some("52-54-00-AA-bb-01")
        );
        assert_eq!(
            query_param("x=1&mac=52%3A54%3A00%3Aaa%3Abb%3A01", "mac").as_deref(),
            Some("52:54:00:aa:bb:01")
        );
        assert_eq!(query_param("", "mac"), None);
    }
}
