//! The floating endpoint (`floating_endpoint: true`): one master at a time
//! holds `control_plane_endpoint`'s address, chosen through a Lease
//! ([`crate::k8s::lease`]) renewed through the node's API balancer, so a
//! master keeps it while it reaches any API server backed by etcd's
//! quorum: a restart of its own API server does not move the address,
//! losing its network or power does. The holder adds the address to the interface with the node's address,
//! announces it with gratuitous ARP, and forwards what arrives on it to
//! every ready API server as the node-local balancer does (the API
//! servers listen on their node's address only). It gives the address up
//! when it cannot renew within [`RENEW_DEADLINE`] (before any other
//! master may take the Lease, [`LEASE_DURATION`] after its last renewal),
//! when another holds the Lease, and on SIGTERM, when it also releases
//! the Lease so the next master takes over at once.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::balancer::{Balancer, rfc3339};
use crate::hostnet::{self, HostNetError, Interface};
use crate::k8s::lease::{Elector, Standing};

/// How long another master waits, from when it saw the last renewal,
/// before it takes the address over.
pub const LEASE_DURATION: Duration = Duration::from_secs(3);
/// The holder gives the address up this long after its last successful
/// renewal began: a second before any other master may take it.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(2);
/// How often every master tries to renew or acquire.
pub const RETRY_PERIOD: Duration = Duration::from_millis(250);
/// One attempt's bound (less when the holder's deadline is nearer).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// The gratuitous ARP announcements after taking the address, from the
/// moment it is added: neighbours that missed one get the next.
const ANNOUNCEMENTS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];
/// Where the keeper writes what it sees, for `status`.
pub const VIEW_FILE: &str = "/run/cluster-agent/api-address.json";

/// What `status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// `control_plane_endpoint`.
    pub address: SocketAddr,
    pub interface: String,
    /// This node's name, the Lease's holder identity when it holds it.
    pub node: String,
    /// The holder as of the last attempt (`None`: nobody, or not known).
    pub holder: Option<String>,
    /// Whether this node has the address now.
    pub holding: bool,
    /// When `holder` last changed, as this node saw it (RFC 3339).
    pub since: String,
    /// Why the last attempt failed, until one succeeds.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FloatingError {
    #[error(transparent)]
    Network(#[from] HostNetError),
    #[error("cannot listen on the floating endpoint {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The address while this node has it.
struct Held {
    stop_proxy: oneshot::Sender<()>,
    announcer: tokio::task::JoinHandle<()>,
}

pub struct Keeper {
    pub address: SocketAddr,
    pub interface: Interface,
    pub node: String,
    pub elector: Elector,
    /// Forwards what arrives on the address; its backends are the
    /// masters'.
    pub proxy: Balancer,
}

impl Keeper {
    /// Campaigns until `shutdown`, calling `publish` with every changed
    /// view. Only a failure to use the network ends it early.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        mut publish: impl FnMut(&View),
    ) -> Result<(), FloatingError> {
        let ip = self.ip();
        // A keeper killed while holding the address left it behind.
        if hostnet::remove_address(&self.interface, ip)? {
            tracing::info!(address = %ip, "removed the floating address a previous keeper left");
        }
        let mut view = View {
            address: self.address,
            interface: self.interface.name.clone(),
            node: self.node.clone(),
            holder: None,
            holding: false,
            since: rfc3339(SystemTime::now()),
            error: None,
        };
        publish(&view);
        let mut held: Option<Held> = None;
        let mut renewed = Instant::now();
        let mut next = Instant::now();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep_until(next.into()) => {}
            }
            let started = Instant::now();
            next = started + RETRY_PERIOD;
            let bound = match held {
                Some(_) => (renewed + RENEW_DEADLINE).saturating_duration_since(started),
                None => ATTEMPT_TIMEOUT,
            }
            .min(ATTEMPT_TIMEOUT);
            let attempt = tokio::time::timeout(bound, self.elector.try_acquire_or_renew()).await;
            let mut seen = view.clone();
            match attempt {
                Ok(Ok(Standing::Holder)) => {
                    renewed = started;
                    seen.holder = Some(self.node.clone());
                    seen.error = None;
                    if held.is_none() {
                        held = Some(self.take().await?);
                        tracing::info!(address = %self.address, interface = %self.interface.name, "took the floating address");
                    }
                }
                Ok(Ok(Standing::Follower { holder })) => {
                    seen.holder = holder;
                    seen.error = None;
                    if let Some(h) = held.take() {
                        self.give_up(h, "another master holds the Lease")?;
                    }
                }
                Ok(Err(e)) => seen.error = Some(crate::error_chain(&e)),
                Err(_) => {
                    seen.error = Some(format!(
                        "no answer from this node's API server within {bound:?}"
                    ))
                }
            }
            if let Some(h) = held.take_if(|_| started.duration_since(renewed) >= RENEW_DEADLINE) {
                self.give_up(h, "could not renew the Lease in time")?;
                seen.holder = None;
            }
            seen.holding = held.is_some();
            if seen.holder != view.holder {
                seen.since = rfc3339(SystemTime::now());
            }
            if seen != view {
                if seen.error != view.error
                    && let Some(e) = &seen.error
                {
                    tracing::warn!("floating address Lease: {e}");
                }
                view = seen;
                publish(&view);
            }
        }
        if let Some(h) = held.take() {
            self.give_up(h, "stopping")?;
            view.holding = false;
            publish(&view);
            // The next master need not wait out the Lease.
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.elector.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("releasing the Lease: {}", crate::error_chain(&e)),
                Err(_) => tracing::warn!("releasing the Lease: no answer in time"),
            }
        }
        Ok(())
    }

    fn ip(&self) -> Ipv4Addr {
        match self.address {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => unreachable!("validation admits IPv4 floating endpoints only"),
        }
    }

    /// Adds the address, listens on it, announces it.
    async fn take(&self) -> Result<Held, FloatingError> {
        let ip = self.ip();
        hostnet::add_address(&self.interface, ip)?;
        let listener =
            TcpListener::bind(self.address)
                .await
                .map_err(|source| FloatingError::Listen {
                    address: self.address,
                    source,
                })?;
        let (stop_proxy, stopped) = oneshot::channel();
        let proxy = self.proxy.clone();
        tokio::spawn(async move {
            proxy
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
        });
        let interface = self.interface.clone();
        let announcer = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for offset in ANNOUNCEMENTS {
                tokio::time::sleep_until(start + offset).await;
                if let Err(e) = hostnet::announce(&interface, ip) {
                    tracing::warn!("{e}");
                }
            }
        });
        Ok(Held {
            stop_proxy,
            announcer,
        })
    }

    fn give_up(&self, held: Held, why: &str) -> Result<(), FloatingError> {
        // An announcement after the removal would pull traffic back here.
        held.announcer.abort();
        let _ = held.stop_proxy.send(());
        hostnet::remove_address(&self.interface, self.ip())?;
        tracing::info!(address = %self.address, "gave the floating address up: {why}");
        Ok(())
    }
}
