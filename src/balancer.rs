//! The node-local API balancer (`cluster-api-balancer.service`, the
//! `api-balancer` subcommand): a TCP proxy on a loopback address of every
//! Kubernetes node that forwards to whichever control-plane API servers
//! pass their health checks, so the kubelet, kube-proxy and the agent keep
//! their API when any one master dies. TLS passes through untouched: the
//! client still authenticates the API server, and the API server the
//! client.
//!
//! Every backend is checked with `GET /readyz` over TLS pinned to the
//! cluster CA. A backend is sent new connections only while its last check
//! passed (or before its first check, so a node does not wait a check
//! interval at boot); a connect that fails takes it out at once. When a
//! backend stops answering at the transport level (refused, timed out, TLS
//! broken), the connections already proxied to it are closed as well:
//! after a power cut nothing would ever reset them, and a kubelet would sit
//! on a dead HTTP/2 connection for its ~45 s ping timeout. A backend that
//! answers but is not ready keeps its open connections (watches on it still
//! work) and gets no new ones.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{ClusterConfig, NodeSpec};

/// The balancer's port on the node's loopback (Talos' KubePrism uses the
/// same one).
pub const PORT: u16 = 7445;

/// The balancer's view, rewritten on every change, for `status`.
pub const VIEW_FILE: &str = "/run/cluster-agent/api-balancer.json";

/// How often every backend's `/readyz` is asked. With [`CHECK_TIMEOUT`]
/// it bounds how long a silently dead master keeps its connections.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// A master on the same rack answers a SYN in well under a millisecond;
/// one that does not answer in this long is treated as down.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Where `node`'s balancer listens: 127.0.0.1, or the node's own address
/// when that is itself a loopback address (nodes sharing one host's
/// loopback in the tests and the lab, which would otherwise collide on
/// 127.0.0.1). The API server certificate carries both.
pub fn listen_addr(node: &NodeSpec) -> SocketAddr {
    let ip = if node.ip.is_loopback() {
        node.ip
    } else {
        Ipv4Addr::LOCALHOST
    };
    SocketAddr::new(IpAddr::V4(ip), PORT)
}

/// The URL `node`'s kubelet, kube-proxy and agent reach the API at.
pub fn server_url(node: &NodeSpec) -> String {
    format!("https://{}", listen_addr(node))
}

/// Every control-plane node's API server as cluster.yaml lists them.
pub fn configured_backends(config: &ClusterConfig) -> Vec<SocketAddr> {
    config
        .nodes
        .iter()
        .filter(|n| n.is_control_plane())
        .map(|n| SocketAddr::new(IpAddr::V4(n.ip), config.cluster.control_plane_endpoint.port))
        .collect()
}

/// What the balancer last learned about a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "kebab-case")]
pub enum Health {
    /// Not checked yet: tried, after the ready ones.
    Unknown,
    /// Its last `/readyz` answered 200.
    Ready,
    /// It answered, but not ready: no new connections.
    NotReady(String),
    /// It did not answer (refused, timed out, TLS failed): no new
    /// connections, and its open ones were closed.
    Unreachable(String),
}

/// Where the balancer heard of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    ClusterYaml,
    /// The `kubernetes` Service's EndpointSlice in the API.
    EndpointSlice,
}

/// One backend as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub address: SocketAddr,
    #[serde(flatten)]
    pub health: Health,
    /// RFC 3339: when `health` last changed.
    pub since: String,
    pub source: Source,
    pub connections: usize,
}

/// The balancer's whole view, written for `status` on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub listen: SocketAddr,
    pub backends: Vec<BackendView>,
}

struct Backend {
    health: Health,
    since: SystemTime,
    source: Source,
    connections: Arc<AtomicUsize>,
    /// Bumped to close every connection proxied to this backend.
    cut: watch::Sender<u64>,
    checker: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.checker.abort();
        self.cut.send_modify(|n| *n += 1);
    }
}

struct Shared {
    listen: SocketAddr,
    backends: Mutex<BTreeMap<SocketAddr, Backend>>,
    /// Round-robin position among the ready backends.
    next: AtomicUsize,
    checks: reqwest::Client,
    /// Bumped on every change of the view.
    changes: watch::Sender<u64>,
    /// Connections closed for want of a backend since the last log line.
    refused: AtomicUsize,
    last_refusal_log: Mutex<Option<std::time::Instant>>,
}

/// A running balancer; clones share it.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

/// The outcome of one `/readyz`.
enum Verdict {
    Ready,
    NotReady(String),
    Unreachable(String),
}

impl Balancer {
    /// A balancer that forwards to backends whose certificates chain to
    /// `ca_pem`, whose view names `listen` (the address [`Self::serve`]'s listener is bound to).
    pub fn new(listen: SocketAddr, ca_pem: &str) -> Result<Balancer, String> {
        let checks = crate::k8s::pinned_client(ca_pem, CHECK_TIMEOUT)?;
        Ok(Balancer {
            shared: Arc::new(Shared {
                listen,
                backends: Mutex::new(BTreeMap::new()),
                next: AtomicUsize::new(0),
                checks,
                changes: watch::channel(0).0,
                refused: AtomicUsize::new(0),
                last_refusal_log: Mutex::new(None),
            }),
        })
    }

    /// Makes the backend set `configured` ∪ `learned`: new ones start
    /// unchecked, gone ones are dropped with their connections.
    pub fn set_backends(&self, configured: &[SocketAddr], learned: &[SocketAddr]) {
        let mut desired: BTreeMap<SocketAddr, Source> = learned
            .iter()
            .map(|a| (*a, Source::EndpointSlice))
            .collect();
        desired.extend(configured.iter().map(|a| (*a, Source::ClusterYaml)));
        let mut backends = self.shared.lock();
        let before = backends.len();
        backends.retain(|addr, _| desired.contains_key(addr));
        let mut changed = backends.len() != before;
        for (addr, source) in desired {
            if let Some(backend) = backends.get_mut(&addr) {
                changed |= backend.source != source;
                backend.source = source;
                continue;
            }
            tracing::info!(backend = %addr, ?source, "API server added");
            let checker = tokio::spawn(check_loop(Arc::downgrade(&self.shared), addr));
            backends.insert(
                addr,
                Backend {
                    health: Health::Unknown,
                    since: SystemTime::now(),
                    source,
                    connections: Arc::default(),
                    cut: watch::channel(0).0,
                    checker,
                },
            );
            changed = true;
        }
        drop(backends);
        if changed {
            self.shared.changes.send_modify(|n| *n += 1);
        }
    }

    pub fn view(&self) -> View {
        let backends = self.shared.lock();
        View {
            listen: self.shared.listen,
            backends: backends
                .iter()
                .map(|(addr, b)| BackendView {
                    address: *addr,
                    health: b.health.clone(),
                    since: rfc3339(b.since),
                    source: b.source,
                    connections: b.connections.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Wakes on every change of [`Self::view`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Accepts and proxies connections until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((client, _)) => {
                        tokio::spawn(self.shared.clone().proxy(client));
                    }
                    // Out of file descriptors, say: the next accept may
                    // succeed once connections close.
                    Err(e) => {
                        tracing::warn!("accepting a connection: {e}");
                        tokio::task::yield_now().await;
                    }
                },
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, Backend>> {
        self.backends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backends to try, in order: the ready ones from the round-robin
    /// position on, then the unchecked ones.
    fn candidates(&self) -> Vec<SocketAddr> {
        let backends = self.lock();
        let ready: Vec<SocketAddr> = backends
            .iter()
            .filter(|(_, b)| b.health == Health::Ready)
            .map(|(a, _)| *a)
            .collect();
        let unknown = backends
            .iter()
            .filter(|(_, b)| b.health == Health::Unknown)
            .map(|(a, _)| *a);
        let start = match ready.len() {
            0 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        ready[start..]
            .iter()
            .chain(&ready[..start])
            .copied()
            .chain(unknown)
            .collect()
    }

    fn record(&self, addr: SocketAddr, verdict: Verdict) {
        let health = match verdict {
            Verdict::Ready => Health::Ready,
            Verdict::NotReady(why) => Health::NotReady(why),
            Verdict::Unreachable(why) => Health::Unreachable(why),
        };
        let mut backends = self.lock();
        let Some(backend) = backends.get_mut(&addr) else {
            return;
        };
        if backend.health == health {
            return;
        }
        match &health {
            Health::Ready => tracing::info!(backend = %addr, "API server ready: in"),
            Health::NotReady(why) => {
                tracing::warn!(backend = %addr, "API server not ready: out ({why})");
            }
            Health::Unreachable(why) => {
                tracing::warn!(
                    backend = %addr,
                    connections = backend.connections.load(Ordering::Relaxed),
                    "API server unreachable: out, its connections closed ({why})"
                );
                backend.cut.send_modify(|n| *n += 1);
            }
            Health::Unknown => {}
        }
        backend.health = health;
        backend.since = SystemTime::now();
        drop(backends);
        self.changes.send_modify(|n| *n += 1);
    }

    async fn proxy(self: Arc<Self>, mut client: TcpStream) {
        let Some((addr, mut upstream)) = self.connect().await else {
            return;
        };
        let (connections, mut cut) = {
            let backends = self.lock();
            let Some(b) = backends.get(&addr) else {
                return;
            };
            (b.connections.clone(), b.cut.subscribe())
        };
        let _counted = Counted::new(self.clone(), connections);
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        tokio::select! {
            // Either side closing ends both; errors are the peers' business.
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            _ = cut.changed() => {}
        }
    }

    /// A connection to the first candidate that accepts one; every one
    /// that refuses is taken out on the spot.
    async fn connect(&self) -> Option<(SocketAddr, TcpStream)> {
        let candidates = self.candidates();
        for addr in &candidates {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Some((*addr, stream)),
                Ok(Err(e)) => self.record(*addr, Verdict::Unreachable(format!("connect: {e}"))),
                Err(_) => self.record(
                    *addr,
                    Verdict::Unreachable(format!("connect: no answer in {CONNECT_TIMEOUT:?}")),
                ),
            }
        }
        // Every client retries at once: one line a second tells the story.
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self
            .last_refusal_log
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
            *last = Some(std::time::Instant::now());
            self.refused.store(0, Ordering::Relaxed);
            tracing::warn!(
                tried = candidates.len(),
                refused,
                "no API server is ready: connections closed unforwarded"
            );
        }
        None
    }
}

async fn check_loop(shared: std::sync::Weak<Shared>, addr: SocketAddr) {
    let url = format!("https://{addr}/readyz");
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(client) = shared.upgrade().map(|s| s.checks.clone()) else {
            return;
        };
        let verdict = match client.get(&url).send().await {
            Ok(answer) if answer.status().is_success() => Verdict::Ready,
            Ok(answer) => Verdict::NotReady(format!("/readyz answered {}", answer.status())),
            Err(e) => Verdict::Unreachable(crate::error_chain(&e)),
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.record(addr, verdict);
    }
}

/// Counts a proxied connection for as long as it lives (the view shows
/// the count).
struct Counted {
    shared: Arc<Shared>,
    count: Arc<AtomicUsize>,
}

impl Counted {
    fn new(shared: Arc<Shared>, count: Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::Relaxed);
        shared.changes.send_modify(|n| *n += 1);
        Counted { shared, count }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.shared.changes.send_modify(|n| *n += 1);
    }
}

pub(crate) fn rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 6443))
    }

    fn balancer() -> Balancer {
        // No CA is needed for the selection logic: the checks go nowhere
        // (10.0.0.0/8 is not routed here) and the tests set health.
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        Balancer::new(SocketAddr::from(([127, 0, 0, 1], PORT)), &ca.cert.pem()).unwrap()
    }

    fn set(b: &Balancer, a: SocketAddr, health: Health) {
        b.shared.lock().get_mut(&a).unwrap().health = health;
    }

    #[tokio::test]
    async fn ready_backends_take_turns_and_unchecked_ones_come_last() {
        let b = balancer();
        b.set_backends(&[addr(1), addr(2), addr(3)], &[]);
        set(&b, addr(1), Health::Ready);
        set(&b, addr(3), Health::Ready);
        let firsts: Vec<_> = (0..4).map(|_| b.shared.candidates()).collect();
        assert_eq!(firsts[0], [addr(1), addr(3), addr(2)]);
        assert_eq!(firsts[1], [addr(3), addr(1), addr(2)]);
        assert_eq!(firsts[2], firsts[0]);
        set(&b, addr(2), Health::NotReady("/readyz answered 500".into()));
        set(&b, addr(3), Health::Unreachable("connect: refused".into()));
        // Neither a not-ready nor an unreachable backend is ever tried.
        assert_eq!(b.shared.candidates(), [addr(1)]);
        set(&b, addr(1), Health::NotReady("/readyz answered 500".into()));
        assert!(b.shared.candidates().is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_backend_has_its_connections_cut_a_not_ready_one_keeps_them() {
        let b = balancer();
        b.set_backends(&[addr(1)], &[]);
        let cut = b.shared.lock()[&addr(1)].cut.subscribe();
        b.shared.record(addr(1), Verdict::NotReady("500".into()));
        assert!(!cut.has_changed().unwrap());
        b.shared
            .record(addr(1), Verdict::Unreachable("timed out".into()));
        assert!(cut.has_changed().unwrap());
        let view = b.view();
        assert_eq!(
            view.backends[0].health,
            Health::Unreachable("timed out".into())
        );
    }

    #[tokio::test]
    async fn learned_backends_come_and_go_configured_ones_stay() {
        let b = balancer();
        b.set_backends(&[addr(1)], &[addr(1), addr(4)]);
        let sources: Vec<_> = b
            .view()
            .backends
            .iter()
            .map(|v| (v.address, v.source))
            .collect();
        assert_eq!(
            sources,
            [
                (addr(1), Source::ClusterYaml),
                (addr(4), Source::EndpointSlice)
            ]
        );
        let cut = b.shared.lock()[&addr(4)].cut.subscribe();
        b.set_backends(&[addr(1)], &[]);
        assert_eq!(b.view().backends.len(), 1);
        // A dropped backend's connections close with it.
        assert!(cut.has_changed().is_err() || cut.has_changed().unwrap());
    }

    #[test]
    fn the_view_reads_back() {
        let view = View {
            listen: SocketAddr::from(([127, 0, 0, 1], PORT)),
            backends: vec![BackendView {
                address: addr(1),
                health: Health::NotReady("/readyz answered 500".into()),
                since: "2026-12-03T12:00:00Z".into(),
                source: Source::ClusterYaml,
                connections: 2,
            }],
        };
        let text = serde_json::to_string(&view).unwrap();
        assert!(
            text.contains(r#""state":"not-ready","reason":"/readyz answered 500""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<View>(&text).unwrap(), view);
    }
}
