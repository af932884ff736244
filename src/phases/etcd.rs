//! Phase `etcd` on control-plane nodes: shared CAs, this node's
//! certificates, then etcd itself — founded as a single member by
//! master-first, joined as learner → promoted by everyone else. Never a
//! second cluster, never a member added twice.

use std::time::Duration;

use async_trait::async_trait;

use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::etcd::topology::{self, EtcdRecord, Formation};
use crate::etcd::{EtcdClient, EtcdError, Member, member_id_hex};
use crate::join::{Material, Purpose};
use crate::pki::{self, CaSource};
use crate::role::Role;
use crate::services;
use crate::state::Marker;
use crate::wait::{self, Backoff, Poll};

pub const PHASE: &str = "etcd";
/// Shared CA material for joining control-plane nodes, until the join
/// service delivers it over the network.
pub const CA_IMPORT_DIR: &str = "pki";
pub const RECORD_FILE: &str = "etcd-bootstrap.json";
/// How long a joiner waits for an existing healthy cluster.
const CLUSTER_WAIT: Duration = Duration::from_secs(600);
/// How long a membership change may be refused as transient (strict
/// reconfiguration check, one-learner limit) before we give up.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(300);
const READY_WAIT: Duration = Duration::from_secs(120);
/// A peer whose etcd port does not accept a TCP connection in this time is
/// taken as not running etcd.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The unit `etcd-config` installs, as on a first boot: master-first founds,
/// the others join with every control-plane node in `ETCD_INITIAL_CLUSTER`.
pub fn rendered_units(
    paths: &crate::paths::HostPaths,
    config: &crate::config::ClusterConfig,
    node: &crate::config::NodeSpec,
    role: Role,
) -> Vec<services::Unit> {
    let (formation, initial_cluster) = match role {
        Role::MasterFirst => (
            Formation::New,
            topology::founding_initial_cluster(config, node),
        ),
        Role::MasterAdditional => (
            Formation::Join,
            crate::role::ordered_nodes(config, crate::config::NodeRole::ControlPlane)
                .into_iter()
                .map(|n| format!("{}={}", n.name, topology::peer_url(config, n)))
                .collect::<Vec<_>>()
                .join(","),
        ),
        Role::Worker => return Vec::new(),
    };
    let record = EtcdRecord {
        formation,
        initial_cluster,
        member_id: None,
    };
    vec![topology::render_unit(paths, config, node, &record)]
}

/// etcd's data and this node's own certificates (`pki-certs`); the shared
/// CAs and the service-account key stay: they are the cluster's, every
/// control-plane node holds the same, and they let this node rejoin.
fn owns(
    paths: &crate::paths::HostPaths,
    _: Option<&crate::config::NodeSpec>,
) -> Vec<std::path::PathBuf> {
    let pki = pki::PkiPaths::new(paths);
    std::iter::once(topology::data_dir(paths))
        .chain(pki::LeafKind::ALL.into_iter().flat_map(|leaf| {
            let pair = pki.leaf(leaf);
            [pair.cert, pair.key]
        }))
        .collect()
}

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![super::node::PHASE],
        owns,
        steps: vec![
            Box::new(Discover),
            Box::new(PkiCas),
            Box::new(PkiCerts),
            Box::new(MemberAdd),
            Box::new(Configure),
            Box::new(Start),
            Box::new(Promote::default()),
        ],
    }
}

fn record_path(ctx: &Context) -> std::path::PathBuf {
    ctx.paths.state_file(RECORD_FILE)
}

fn load_record(ctx: &Context) -> Result<Option<EtcdRecord>, StepError> {
    super::load_record(&record_path(ctx))
}

fn require_record(ctx: &Context) -> Result<EtcdRecord, StepError> {
    load_record(ctx)?.ok_or_else(|| StepError::Precondition(format!(
        "{} is missing although etcd-discover completed; run `cluster-agent reset` on this node",
        record_path(ctx).display()
    )))
}

fn save_record(ctx: &Context, record: &EtcdRecord) -> Result<(), StepError> {
    super::save_record(&record_path(ctx), record)
}

fn my_peer_url(ctx: &Context) -> String {
    topology::peer_url(&ctx.config, &ctx.node)
}

async fn connect(ctx: &Context, endpoints: &[String]) -> Result<EtcdClient, StepError> {
    Ok(EtcdClient::connect(endpoints, &topology::agent_tls(&ctx.paths)).await?)
}

/// Is anything listening on a peer's etcd client port? Needs no
/// credentials, so it works before this node has any PKI (a re-imaged
/// master-first). Only a node that founded or joined a cluster runs etcd.
async fn peer_etcd_listening(ctx: &Context) -> Option<String> {
    let urls = topology::peer_client_urls(&ctx.config, &ctx.node);
    let addrs = urls
        .iter()
        .map(|u| u.trim_start_matches("https://").to_string());
    let found = super::first_listening(addrs, PROBE_TIMEOUT).await?;
    urls.into_iter()
        .find(|u| u.trim_start_matches("https://") == found)
}

struct Discover;

#[async_trait]
impl Step for Discover {
    fn name(&self) -> &'static str {
        "etcd-discover"
    }
    fn summary(&self) -> &'static str {
        "decide: found a single-member cluster (master-first, no etcd on peers) or join one"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(load_record(ctx)?.is_some())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let formation = match ctx.role {
            Role::MasterFirst => {
                ctx.progress
                    .waiting("a probe of the other control-plane nodes' etcd");
                match peer_etcd_listening(ctx).await {
                    Some(url) => {
                        tracing::warn!(peer = %url, "etcd already runs on a peer: joining that cluster instead of founding a second one");
                        Formation::Join
                    }
                    None => Formation::New,
                }
            }
            Role::MasterAdditional => Formation::Join,
            Role::Worker => {
                return Err(StepError::Precondition(
                    "etcd runs only on control-plane nodes".into(),
                ));
            }
        };
        let initial_cluster = match formation {
            Formation::New => topology::founding_initial_cluster(&ctx.config, &ctx.node),
            // Known only once etcd has accepted the member.
            Formation::Join => String::new(),
        };
        save_record(
            ctx,
            &EtcdRecord {
                formation,
                initial_cluster,
                member_id: None,
            },
        )?;
        Ok(Outcome::Done)
    }
}

struct PkiCas;

#[async_trait]
impl Step for PkiCas {
    fn name(&self) -> &'static str {
        "pki-ca"
    }
    fn summary(&self) -> &'static str {
        "put the cluster, front-proxy and etcd CAs and the service-account key in place"
    }
    async fn check(&self, _ctx: &Context) -> Result<bool, StepError> {
        // ensure_cluster_cas is itself check-then-act and cheap.
        Ok(false)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let record = require_record(ctx)?;
        // An operator who brings the cluster's own CAs puts them here; they
        // take precedence over generating or fetching.
        let import_dir = ctx.paths.config_dir().join(CA_IMPORT_DIR);
        let fetched;
        let source = if import_dir.is_dir() {
            CaSource::Import(&import_dir)
        } else if record.formation == Formation::New {
            CaSource::Generate
        } else if pki::read_shared_ca_bundle(&ctx.paths).is_ok() {
            // A node that rejoins (re-imaged master-first, after `reset`)
            // and still holds the whole, consistent shared material.
            tracing::info!("joining with the shared CA material already on this node");
            return Ok(Outcome::Done);
        } else {
            fetched = fetch_cas(ctx).await?;
            CaSource::Bundle(&fetched)
        };
        let report = pki::ensure_cluster_cas(&ctx.paths, source)?;
        tracing::info!(?report, "cluster CAs in place");
        Ok(Outcome::Done)
    }
}

/// The shared CA material from any other control-plane node's join
/// service, authenticated and decrypted with the join secret.
async fn fetch_cas(ctx: &Context) -> Result<pki::CaBundle, StepError> {
    super::fetch_join_material(ctx, Purpose::ControlPlane, MEMBERSHIP_WAIT, |m| match m {
        Material::ControlPlane { cas } => Some(cas),
        _ => None,
    })
    .await
}

struct PkiCerts;

#[async_trait]
impl Step for PkiCerts {
    fn name(&self) -> &'static str {
        "pki-certs"
    }
    fn summary(&self) -> &'static str {
        "issue or renew this node's etcd, apiserver and client certificates"
    }
    async fn check(&self, _ctx: &Context) -> Result<bool, StepError> {
        // ensure_node_certs keeps valid leaves and only re-issues bad ones.
        Ok(false)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let report = pki::ensure_node_certs(&ctx.paths, &ctx.config, &ctx.node, false)?;
        tracing::info!(?report, "node certificates in place");
        Ok(Outcome::Done)
    }
}

/// A client bound to one healthy peer, and the member list it sees.
async fn healthy_peer(
    ctx: &Context,
    endpoint: String,
) -> Result<(EtcdClient, Vec<Member>), StepError> {
    let mut client = connect(ctx, std::slice::from_ref(&endpoint)).await?;
    client.check_health().await?;
    let members = client.members().await?;
    Ok((client, members))
}

/// Waits for a cluster reachable through any peer to answer a member list.
/// Peers are probed one by one, concurrently: a client balanced over all of
/// them would send some calls to peers that are not up yet.
async fn wait_for_cluster(ctx: &Context) -> Result<(EtcdClient, Vec<Member>), StepError> {
    let endpoints = topology::peer_client_urls(&ctx.config, &ctx.node);
    if endpoints.is_empty() {
        return Err(StepError::Precondition(
            "this node must join an etcd cluster, but no other control-plane node is configured"
                .into(),
        ));
    }
    ctx.progress.waiting(&format!(
        "a healthy etcd cluster at {}",
        endpoints.join(", ")
    ));
    let endpoints = &endpoints;
    Ok(wait::poll_until(
        "an existing etcd cluster to answer",
        CLUSTER_WAIT,
        Backoff::remote(Duration::from_secs(1)),
        || async move {
            let probes = endpoints
                .iter()
                .map(|e| Box::pin(healthy_peer(ctx, e.clone())));
            match futures_util::future::select_ok(probes).await {
                Ok((found, _)) => Poll::Ready(found),
                Err(e) => Poll::Pending(crate::error_chain(&e)),
            }
        },
    )
    .await?)
}

/// Retries a membership change while etcd calls the refusal transient.
async fn retry_membership<T, F, Fut>(what: &str, mut call: F) -> Result<T, StepError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EtcdError>>,
{
    let outcome = wait::poll_until(what, MEMBERSHIP_WAIT, Backoff::contended(), || {
        let attempt = call();
        async move {
            match attempt.await {
                Err(e) if e.is_retryable() => Poll::Pending(e.to_string()),
                done => Poll::Ready(done),
            }
        }
    })
    .await?;
    Ok(outcome?)
}

/// etcd checks a member add against the view of the member that
/// receives it, which must have been connected to every voter for 5 s. A
/// member can go on believing a restarted peer is disconnected while their
/// streams are in fact up (etcd-io/etcd#14523), and then refuses every add
/// as "unhealthy cluster", for good: seen on real nodes when a joining
/// master lost power right after being added. Once one member has refused
/// well past the 5 s etcd itself needs, the add goes through the next voter.
const REFUSING_MEMBER_AFTER: Duration = Duration::from_secs(10);

async fn add_learner(
    ctx: &Context,
    client: &EtcdClient,
    members: &[Member],
    peer_url: &str,
) -> Result<(u64, Vec<Member>), StepError> {
    let voters: Vec<&Member> = members
        .iter()
        .filter(|m| m.started() && !m.is_learner)
        .collect();
    // The client asked now, the voter to try next, since when it refuses.
    let state = std::sync::Mutex::new((client.clone(), 0, None::<std::time::Instant>));
    let state = &state;
    let voters = &voters;
    retry_membership("etcd to accept the learner", || async move {
        let mut asked = lock(state).0.clone();
        let result = asked.add_learner(peer_url).await;
        if let Err(e) = &result
            && e.is_too_many_learners()
            && let Ok(now) = asked.members().await
        {
            // Say whose learner blocks this one: the journal and `status`
            // show it, so an operator can tell a slow joiner from a dead one.
            ctx.progress.waiting(&blocking_learners(&now));
        }
        if let Err(e) = &result
            && e.is_unhealthy_cluster()
        {
            let next = {
                let mut s = lock(state);
                let since = *s.2.get_or_insert_with(std::time::Instant::now);
                (since.elapsed() >= REFUSING_MEMBER_AFTER && !voters.is_empty()).then(|| {
                    s.1 = (s.1 + 1) % voters.len();
                    s.2 = None;
                    voters[s.1]
                })
            };
            if let Some(voter) = next {
                tracing::warn!(
                    "etcd has refused this member add as \"unhealthy cluster\" for \
                     {REFUSING_MEMBER_AFTER:?} (etcd-io/etcd#14523); asking member {} instead",
                    voter.name
                );
                match connect(ctx, &voter.client_urls).await {
                    Ok(client) => lock(state).0 = client,
                    Err(e) => tracing::warn!("{}", crate::error_chain(&e)),
                }
            }
        }
        result
    })
    .await
}

/// What a joiner waits for while etcd refuses a second learner.
fn blocking_learners(members: &[Member]) -> String {
    let learners: Vec<String> = members
        .iter()
        .filter(|m| m.is_learner)
        .map(|m| {
            let who = if m.started() {
                format!("{} (started, not yet promoted)", m.name)
            } else {
                "a node that has not started its etcd".to_string()
            };
            format!(
                "member {} at {}, {who}",
                member_id_hex(m.id),
                m.peer_urls.join(",")
            )
        })
        .collect();
    format!(
        "another joiner's learner to be promoted (etcd admits one learner at a time): {}; \
         if its node is gone for good, remove it with `etcdctl member remove <id>`",
        if learners.is_empty() {
            "none listed any more".to_string()
        } else {
            learners.join("; ")
        }
    )
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct MemberAdd;

#[async_trait]
impl Step for MemberAdd {
    fn name(&self) -> &'static str {
        "etcd-member-add"
    }
    fn summary(&self) -> &'static str {
        "joiners: add this node as a learner (reusing a member added before a crash)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let record = require_record(ctx)?;
        Ok(record.formation == Formation::New || record.member_id.is_some())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let mut record = require_record(ctx)?;
        let (client, members) = wait_for_cluster(ctx).await?;
        let peer_url = my_peer_url(ctx);
        let existing = members
            .iter()
            .find(|m| m.peer_urls.contains(&peer_url))
            .cloned();
        let reuse = match existing {
            // Added before a crash and never started, or started with the
            // data dir we still hold: the same member, continue with it.
            Some(m) if !m.started() || topology::has_local_member(&ctx.paths) => Some(m),
            // Started once but its data is gone (re-imaged): that member can
            // never come back; replace it.
            Some(stale) => {
                tracing::warn!(member = %member_id_hex(stale.id), "removing this node's old etcd member, whose data dir is gone");
                ctx.progress
                    .waiting("removal of this node's stale etcd member");
                retry_membership("removal of the stale member", || {
                    let mut c = client.clone();
                    async move { c.remove(stale.id).await }
                })
                .await?;
                None
            }
            None => None,
        };
        let (id, members) = match reuse {
            Some(m) => (m.id, members),
            None => {
                ctx.progress
                    .waiting("etcd to accept this node as a learner");
                add_learner(ctx, &client, &members, &peer_url).await?
            }
        };
        record.initial_cluster =
            topology::initial_cluster_for_join(&members, &ctx.node.name, &peer_url);
        record.member_id = Some(member_id_hex(id));
        save_record(ctx, &record)?;
        ctx.progress
            .store()
            .write_marker(Marker::EtcdMemberId, &member_id_hex(id))?;
        Ok(Outcome::Done)
    }
}

struct Configure;

#[async_trait]
impl Step for Configure {
    fn name(&self) -> &'static str {
        "etcd-config"
    }
    fn summary(&self) -> &'static str {
        "render the etcd unit and environment file (TLS with client-cert auth for clients and peers)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let unit = topology::render_unit(&ctx.paths, &ctx.config, &ctx.node, &require_record(ctx)?);
        Ok(services::unit_installed(&ctx.paths, &unit)?
            && services::unit_enabled(&ctx.paths, &unit))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let unit = topology::render_unit(&ctx.paths, &ctx.config, &ctx.node, &require_record(ctx)?);
        if ctx.paths.find_binary(topology::ETCD_BINARY).is_none() {
            return Err(StepError::Precondition(format!(
                "etcd is not in {}; this image must ship etcd",
                ctx.paths.binary_dirs()
            )));
        }
        services::install_unit(&ctx.paths, &unit)?;
        ctx.services.daemon_reload().await?;
        // etcd must come back after a reboot on its own, before the agent
        // (and whatever else) needs it.
        ctx.services.enable(topology::UNIT_NAME).await?;
        Ok(Outcome::Done)
    }
}

/// The local member answers and has a leader; returns its member id.
async fn local_ready(ctx: &Context) -> Result<u64, StepError> {
    let mut client = connect(ctx, &[topology::client_url(&ctx.config, &ctx.node)]).await?;
    Ok(client.local_member_with_leader().await?)
}

struct Start;

impl Start {
    /// The running member must be the one this node recorded; anything else
    /// means the data dir belongs to another member (or cluster).
    fn verify_identity(ctx: &Context, running: u64) -> Result<(), StepError> {
        let recorded = require_record(ctx)?.member_id;
        match recorded {
            Some(hex) if hex != member_id_hex(running) => Err(StepError::Precondition(format!(
                "the etcd data dir {dir} belongs to member {}, but this node was added as member {hex}; \
                 stop etcd, move {dir} aside, run `cluster-agent reset --yes` on this node and run it again",
                member_id_hex(running),
                dir = topology::data_dir(&ctx.paths).display(),
            ))),
            _ => Ok(()),
        }
    }

    fn is_recorded(ctx: &Context, id: u64) -> Result<bool, StepError> {
        let hex = member_id_hex(id);
        Ok(
            require_record(ctx)?.member_id.as_deref() == Some(hex.as_str())
                && ctx
                    .progress
                    .store()
                    .read_marker(Marker::EtcdMemberId)?
                    .as_deref()
                    == Some(hex.as_str()),
        )
    }

    fn record_member(ctx: &Context, id: u64) -> Result<(), StepError> {
        let mut record = require_record(ctx)?;
        let hex = member_id_hex(id);
        if record.member_id.as_deref() != Some(hex.as_str()) {
            record.member_id = Some(hex.clone());
            save_record(ctx, &record)?;
        }
        let store = ctx.progress.store();
        if store.read_marker(Marker::EtcdMemberId)?.as_deref() != Some(hex.as_str()) {
            store.write_marker(Marker::EtcdMemberId, &hex)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Step for Start {
    fn name(&self) -> &'static str {
        "etcd-start"
    }
    fn summary(&self) -> &'static str {
        "start etcd and wait until this member answers with a leader; record its member id"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        match local_ready(ctx).await {
            Ok(id) => {
                Self::verify_identity(ctx, id)?;
                Self::is_recorded(ctx, id)
            }
            Err(_) => Ok(false),
        }
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        ctx.progress
            .waiting(&format!("{} to start", topology::UNIT_NAME));
        ctx.services.start(topology::UNIT_NAME).await?;
        let url = topology::client_url(&ctx.config, &ctx.node);
        ctx.progress
            .waiting(&format!("etcd at {url} to answer with a leader"));
        let id = wait::poll_until(
            &format!("etcd at {url} to answer with a leader"),
            READY_WAIT,
            Backoff::local(),
            || async {
                match local_ready(ctx).await {
                    Ok(id) => Poll::Ready(id),
                    Err(e) => Poll::Pending(crate::error_chain(&e)),
                }
            },
        )
        .await?;
        Self::verify_identity(ctx, id)?;
        Self::record_member(ctx, id)?;
        tracing::info!(member = %member_id_hex(id), "etcd member ready");
        Ok(Outcome::Done)
    }
}

/// Keeps the voting peer's client that `check` connected to, so `apply`
/// does not connect to and health-check the cluster a second time: on a
/// learner's join every round trip is on the critical path.
#[derive(Default)]
struct Promote {
    voter_peer: tokio::sync::Mutex<Option<EtcdClient>>,
}

type MemberList<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Member>, StepError>> + Send + 'a>,
>;

impl Promote {
    async fn is_voter(&self, ctx: &Context) -> Result<bool, StepError> {
        let id = require_record(ctx)?.member_id;
        // A voter answers itself; a learner refuses membership calls and
        // only a voting peer knows. Both are asked at once, the first member
        // list wins.
        let local: MemberList = Box::pin(async {
            let mut client = connect(ctx, &[topology::client_url(&ctx.config, &ctx.node)]).await?;
            Ok(client.members().await?)
        });
        let peers: MemberList = Box::pin(async {
            let (client, members) = wait_for_cluster(ctx).await?;
            *self.voter_peer.lock().await = Some(client);
            Ok(members)
        });
        let (members, _) = futures_util::future::select_ok([local, peers]).await?;
        Ok(members
            .iter()
            .any(|m| Some(member_id_hex(m.id)) == id && !m.is_learner))
    }
}

#[async_trait]
impl Step for Promote {
    fn name(&self) -> &'static str {
        "etcd-promote"
    }
    fn summary(&self) -> &'static str {
        "joiners: promote the learner to a voting member once it has caught up"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        if require_record(ctx)?.formation == Formation::New {
            return Ok(true);
        }
        self.is_voter(ctx).await
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let hex = require_record(ctx)?.member_id.ok_or_else(|| {
            StepError::Precondition("no member id recorded; run etcd-member-add first".into())
        })?;
        let id = u64::from_str_radix(&hex, 16).map_err(|_| StepError::Corrupt {
            path: record_path(ctx),
            reason: format!("member id {hex:?} is not hex"),
        })?;
        // A learner serves no membership calls: ask a voting peer.
        let cached = self.voter_peer.lock().await.take();
        let client = match cached {
            Some(client) => client,
            None => wait_for_cluster(ctx).await?.0,
        };
        ctx.progress
            .waiting("the learner to catch up with the leader");
        retry_membership("promotion of the learner", || {
            let mut c = client.clone();
            async move {
                match c.promote(id).await {
                    // Promoted just before a crash: already a voter.
                    Err(e) if e.is_already_voter() => Ok(()),
                    other => other,
                }
            }
        })
        .await?;
        Ok(Outcome::Done)
    }
}
