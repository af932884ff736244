//! Phase `kubelet`: every Kubernetes node, master or worker, runs a
//! kubelet and is a Node that can run pods.
//!
//! A worker joins by itself: the join material (API endpoint, cluster CA, a
//! fresh bootstrap token) comes from any control-plane node's join service,
//! and the kubelet TLS-bootstraps its client certificate with the token. A
//! master's kubelet uses the `system:node:<name>` certificate the agent
//! issued with the master's other certificates from the cluster CA it
//! holds (its `kubelet.conf` is written by the control-plane phase): a
//! master needs no token, cannot be refused by its own API server, and is
//! a Node as soon as its API server answers. It registers with the
//! control-plane NoSchedule taint, and the agent, as the admin, sets the
//! role label a kubelet may not set on itself.
//!
//! Then the node's pod network ([`crate::podnet`]): the CNI config for the
//! pod CIDR the controller-manager gave the Node, and the route keeper;
//! the phase is done when the Node is Ready.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::fsutil::{self, PUBLIC_MODE, SECRET_MODE};
use crate::join::{Material, Purpose, WorkerMaterial};
use crate::k8s::node::Readiness;
use crate::k8s::{self, Credentials};
use crate::podnet;
use crate::role::Role;
use crate::services::{self, ActiveState, Unit};
use crate::wait::{self, Backoff, Poll};

use super::{api_balancer, container_runtime, control_plane};
use crate::containerd;

pub const PHASE: &str = "kubelet";
pub const KUBELET: &str = "kubelet";
pub const UNIT: &str = "kubelet.service";
pub const ROUTES_UNIT: &str = "cluster-pod-routes.service";
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/kubernetes/bootstrap-kubelet.conf";
pub const KUBECONFIG: &str = "/etc/kubernetes/kubelet.conf";
pub const CA_FILE: &str = "/etc/kubernetes/pki/ca.crt";
pub const ROOT_DIR: &str = "/var/lib/kubelet";
pub const CONFIG_FILE: &str = "/var/lib/kubelet/config.yaml";
pub const CERT_DIR: &str = "/var/lib/kubelet/pki";
pub const CLIENT_CERT: &str = "/var/lib/kubelet/pki/kubelet-client-current.pem";
/// Marked before the kubelet's config or unit changes, cleared once the
/// running kubelet was restarted on them.
const RESTART: super::RestartDue = super::RestartDue("kubelet");
/// When the bootstrap token in `bootstrap-kubelet.conf` expires (RFC 3339),
/// in the state dir: a token that expired before the kubelet used it is
/// replaced, not kept for good.
const TOKEN_RECORD: &str = "bootstrap-token.json";
/// A token this close to expiry is fetched anew: the kubelet needs a few
/// seconds with it.
const TOKEN_MARGIN: time::Duration = time::Duration::minutes(1);
/// Workers may boot long before the control plane is up.
const JOIN_WAIT: Duration = Duration::from_secs(900);
const REGISTER_WAIT: Duration = Duration::from_secs(300);
const API_VERSION_WAIT: Duration = Duration::from_secs(120);
/// The controller-manager allocates a pod CIDR within seconds of the Node
/// appearing; a longer wait means node IPAM is off or the range is full.
const POD_CIDR_WAIT: Duration = Duration::from_secs(120);
const ROUTES_WAIT: Duration = Duration::from_secs(60);
const READY_WAIT: Duration = Duration::from_secs(300);

/// The kubelet's state, certificates and pod volumes (reset unmounts them
/// first), its kubeconfigs, the pod network's config and address leases,
/// and the balancer's and keeper's views: the next run joins again from
/// scratch.
fn owns(paths: &crate::paths::HostPaths, _: Option<&crate::config::NodeSpec>) -> Vec<PathBuf> {
    [
        ROOT_DIR,
        KUBECONFIG,
        BOOTSTRAP_KUBECONFIG,
        podnet::CONFLIST_FILE,
        podnet::IPAM_DIR,
        crate::balancer::VIEW_FILE,
        crate::floating::VIEW_FILE,
    ]
    .map(|p| paths.host(p))
    .to_vec()
}

pub fn phase(role: Role) -> Phase {
    let master = role != Role::Worker;
    let mut steps: Vec<Box<dyn Step>> = vec![Box::new(KubeletBinary)];
    if !master {
        steps.push(Box::new(FetchJoinMaterial));
    }
    // Everything after it reaches the API through it.
    steps.push(Box::new(api_balancer::ApiBalancer));
    if master {
        // It renews its Lease through the balancer.
        steps.push(Box::new(super::api_address::ApiAddress));
    }
    if !master {
        steps.push(Box::new(VersionSkew));
    }
    steps.push(Box::new(KubeletConfig));
    steps.push(Box::new(StartKubelet));
    if master {
        steps.push(Box::new(ControlPlaneRole));
    }
    steps.push(Box::new(PodNetwork));
    steps.push(Box::new(PodRoutes));
    steps.push(Box::new(NodeReady));
    let mut requires = vec![super::node::PHASE, container_runtime::PHASE];
    if master {
        // kubelet.conf comes with the master's other kubeconfigs.
        requires.push(control_plane::PHASE);
    }
    Phase {
        name: PHASE,
        requires,
        steps,
        owns,
    }
}

fn is_master(ctx: &Context) -> bool {
    ctx.role != Role::Worker
}

/// The kubelet holds credentials of its own: a master's from the agent, a
/// worker's once its client CSR was approved.
fn joined(ctx: &Context) -> bool {
    if is_master(ctx) {
        ctx.paths.host(KUBECONFIG).exists()
    } else {
        ctx.paths.host(CLIENT_CERT).exists()
    }
}

/// A client with the kubelet's own identity (`system:node:<name>`).
pub(super) async fn node_client(ctx: &Context) -> Result<kube::Client, k8s::K8sError> {
    k8s::client_from_kubeconfig(&ctx.paths.host(KUBECONFIG)).await
}

/// The API server this node was told about, from its bootstrap kubeconfig.
pub(super) fn api_server(ctx: &Context) -> Result<String, StepError> {
    let path = ctx.paths.host(BOOTSTRAP_KUBECONFIG);
    let corrupt = |reason: String| StepError::Corrupt {
        path: path.clone(),
        reason,
    };
    kube::config::Kubeconfig::read_from(&path)
        .map_err(|e| corrupt(e.to_string()))?
        .clusters
        .into_iter()
        .find_map(|c| c.cluster?.server)
        .ok_or_else(|| corrupt("no cluster server".into()))
}

struct FetchJoinMaterial;

#[derive(serde::Serialize, serde::Deserialize)]
struct TokenRecord {
    /// RFC 3339, as the join service sent it.
    expires: String,
}

impl FetchJoinMaterial {
    /// The bootstrap token on disk is still usable for a while.
    fn token_fresh(ctx: &Context) -> Result<bool, StepError> {
        let Some(record) = super::load_record::<TokenRecord>(&ctx.paths.state_file(TOKEN_RECORD))?
        else {
            return Ok(false);
        };
        let expires = time::OffsetDateTime::parse(
            &record.expires,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| StepError::Corrupt {
            path: ctx.paths.state_file(TOKEN_RECORD),
            reason: format!("expiry {:?}: {e}", record.expires),
        })?;
        Ok(expires - time::OffsetDateTime::now_utc() > TOKEN_MARGIN)
    }
}

#[async_trait]
impl Step for FetchJoinMaterial {
    fn name(&self) -> &'static str {
        "worker-join-material"
    }
    fn summary(&self) -> &'static str {
        "fetch API endpoint, cluster CA and a bootstrap token from a control-plane node's join service; write bootstrap-kubelet.conf"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        // A kubelet with its own certificate needs no token any more; one
        // without needs a token that has not expired.
        Ok(joined(ctx)
            || (ctx.paths.host(BOOTSTRAP_KUBECONFIG).exists()
                && ctx.paths.host(CA_FILE).exists()
                && Self::token_fresh(ctx)?))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let WorkerMaterial {
            api_server,
            ca_pem,
            bootstrap_token,
            token_expires,
        } = super::fetch_join_material(ctx, Purpose::Worker, JOIN_WAIT, |m| match m {
            Material::Worker(worker) => Some(worker),
            _ => None,
        })
        .await?;
        fsutil::write_atomic(&ctx.paths.host(CA_FILE), ca_pem.as_bytes(), PUBLIC_MODE)?;
        // Not the endpoint the join service named: the node's balancer,
        // which reaches every master (the endpoint may be one of them).
        let kubeconfig = k8s::render_kubeconfig(
            &ctx.config.cluster.name,
            &crate::balancer::server_url(&ctx.node),
            &ca_pem,
            "kubelet-bootstrap",
            Credentials::Token(&bootstrap_token),
        );
        fsutil::write_atomic(
            &ctx.paths.host(BOOTSTRAP_KUBECONFIG),
            kubeconfig.as_bytes(),
            SECRET_MODE,
        )?;
        // After the kubeconfig: a crash between the two leaves no record,
        // and the next run fetches again.
        super::save_record(
            &ctx.paths.state_file(TOKEN_RECORD),
            &TokenRecord {
                expires: token_expires.clone(),
            },
        )?;
        tracing::info!(endpoint = %api_server, %token_expires, "join material in place");
        Ok(Outcome::Done)
    }
}

/// `kubelet --version` → `v1.31.0`.
async fn kubelet_version(binary: &std::path::Path) -> Result<String, StepError> {
    let text = super::version_output(binary).await?;
    text.split_whitespace()
        .find(|w| k8s::minor_version(w).is_some())
        .map(str::to_string)
        .ok_or_else(|| {
            StepError::Precondition(format!(
                "{} --version printed no version: {}",
                binary.display(),
                text.trim()
            ))
        })
}

fn kubelet_binary(ctx: &Context) -> Result<PathBuf, StepError> {
    ctx.paths.find_binary(KUBELET).ok_or_else(|| {
        StepError::Precondition(format!(
            "kubelet not found in {}: this image cannot join Kubernetes",
            ctx.paths.binary_dirs()
        ))
    })
}

struct KubeletBinary;

#[async_trait]
impl Step for KubeletBinary {
    fn name(&self) -> &'static str {
        "kubelet-binary"
    }
    fn summary(&self) -> &'static str {
        "find the kubelet in the image (/opt/bin, /usr/bin)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(ctx.paths.find_binary(KUBELET).is_some())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        // An image without Kubernetes (a storage-only node): nothing to
        // join; an image with a kubelet finishes the phase on the next run.
        Ok(match kubelet_binary(ctx) {
            Ok(_) => Outcome::Done,
            Err(e) => Outcome::SkipRest(e.to_string()),
        })
    }
}

struct VersionSkew;

#[async_trait]
impl Step for VersionSkew {
    fn name(&self) -> &'static str {
        "kubelet-version-skew"
    }
    fn summary(&self) -> &'static str {
        "refuse a kubelet newer than the API server (/version, else cluster.yaml's k8s_version)"
    }
    async fn check(&self, _ctx: &Context) -> Result<bool, StepError> {
        // A preflight: it runs every time, since the image or the cluster
        // may have changed since.
        Ok(false)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let kubelet = kubelet_version(&kubelet_binary(ctx)?).await?;
        let ca = super::read_text(&ctx.paths.host(CA_FILE))?.unwrap_or_default();
        let server = api_server(ctx)?;
        // The join service answered, so a control plane is coming up: give
        // its API server a while to answer before trusting cluster.yaml.
        ctx.progress.waiting(&format!("{server}/version"));
        let asked = wait::poll_until(
            &format!("{server}/version"),
            API_VERSION_WAIT,
            Backoff::remote(Duration::from_secs(2)),
            || async {
                match k8s::server_version(&server, &ca).await {
                    Ok(v) => Poll::Ready(v),
                    Err(e) => Poll::Pending(e.to_string()),
                }
            },
        )
        .await;
        let (cluster, source) = match asked {
            Ok(v) => (v, "the API server's /version"),
            Err(e) => {
                tracing::warn!("API version unknown ({e}); using cluster.yaml's k8s_version");
                (
                    ctx.config.cluster.k8s_version.clone(),
                    "cluster.yaml's k8s_version",
                )
            }
        };
        skew_allowed(&kubelet, &cluster, source).map_err(StepError::Precondition)?;
        tracing::info!(%kubelet, %cluster, "version skew allowed");
        Ok(Outcome::Done)
    }
}

/// A kubelet may be as new as its API server, never newer (Kubernetes'
/// version-skew policy); `source` says where the cluster's version came
/// from, for the message.
fn skew_allowed(kubelet: &str, cluster: &str, source: &str) -> Result<(), String> {
    let (Some(k), Some(c)) = (k8s::minor_version(kubelet), k8s::minor_version(cluster)) else {
        return Err(format!(
            "cannot compare kubelet {kubelet} with cluster {cluster}"
        ));
    };
    if k > c {
        return Err(format!(
            "kubelet {kubelet} is newer than the cluster ({cluster}, from {source}); \
             a kubelet may not be newer than its API server: use an image with kubelet \
             {}.{} or older, or upgrade the control plane first",
            c.0, c.1
        ));
    }
    Ok(())
}

/// The kubelet's configuration file (`KubeletConfiguration`, JSON being
/// YAML): cluster DNS at the tenth service IP as kubeadm does, client CA,
/// certificate rotation and serving certificates through CSRs, containerd's
/// CRI socket and the cgroup driver containerd was configured with, and the
/// operator's hard eviction thresholds over the kubelet's defaults. Its
/// endpoints listen on the node's own address, so several nodes can share
/// one machine's loopback in tests and the lab.
pub fn render_kubelet_config(ctx: &Context) -> String {
    let net = &ctx.config.cluster.networking;
    let dns = std::net::Ipv4Addr::from(u32::from(net.service_cidr.network()) + 10);
    let mut config = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": ctx.node.ip.to_string(),
        "healthzBindAddress": ctx.node.ip.to_string(),
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": ctx.paths.host(CA_FILE)},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": containerd::cgroup_driver(&ctx.paths).as_str(),
        "containerRuntimeEndpoint": containerd::cri_endpoint(&ctx.paths),
        "clusterDNS": [dns.to_string()],
        "clusterDomain": net.dns_domain,
        "rotateCertificates": true,
        "serverTLSBootstrap": true,
        "staticPodPath": ctx.paths.host("/etc/kubernetes/manifests"),
    });
    if let Some(root) = containerd::pod_cgroup_root(&ctx.paths, &ctx.node.name) {
        config["cgroupRoot"] = root.into();
    }
    let eviction_hard = &ctx.config.cluster.kubelet.eviction_hard;
    if !eviction_hard.is_empty() {
        config["evictionHard"] = serde_json::json!(eviction_hard);
        // Without it, every signal not listed would drop to 0 (off).
        config["mergeDefaultEvictionSettings"] = true.into();
    }
    serde_json::to_string_pretty(&config).expect("serialisable") + "\n"
}

/// `kubelet.service`. A worker's kubelet bootstraps its client certificate
/// with the token in `bootstrap-kubelet.conf`; a master's starts with the
/// agent's `kubelet.conf` (part of its inputs, so a reissued certificate
/// restarts it) and registers with the control-plane taint.
pub fn render_kubelet_unit(
    paths: &crate::paths::HostPaths,
    node: &crate::config::NodeSpec,
) -> Unit {
    let p = |x: &str| paths.host(x).to_string_lossy().into_owned();
    let master = node.is_control_plane();
    let mut flags = Vec::new();
    if !master {
        flags.push(format!(
            "--bootstrap-kubeconfig={}",
            p(BOOTSTRAP_KUBECONFIG)
        ));
    }
    flags.extend([
        format!("--kubeconfig={}", p(KUBECONFIG)),
        format!("--config={}", p(CONFIG_FILE)),
        format!("--cert-dir={}", p(CERT_DIR)),
        format!("--root-dir={}", p(ROOT_DIR)),
        format!("--hostname-override={}", node.name),
        format!("--node-ip={}", node.ip),
    ]);
    // The worker's kubeconfig and certificates are the kubelet's own: it
    // rotates them itself.
    let mut inputs = vec![paths.host(CONFIG_FILE), paths.host(CA_FILE)];
    if master {
        flags.push(format!(
            "--register-with-taints={}",
            k8s::node::CONTROL_PLANE_TAINT
        ));
        inputs.push(paths.host(KUBECONFIG));
    }
    control_plane::component_unit(
        paths,
        KUBELET,
        flags,
        vec![container_runtime::UNIT.to_string()],
        &inputs,
    )
}

/// `cluster-pod-routes.service`: `cluster-agent pod-routes`, the keeper of
/// the routes to the other nodes' pod CIDRs, for as long as the node runs.
pub fn render_routes_unit(
    paths: &crate::paths::HostPaths,
    node: &crate::config::NodeSpec,
    agent: &std::path::Path,
) -> Unit {
    let mut unit = api_balancer::agent_daemon_unit(
        paths,
        node,
        agent,
        ROUTES_UNIT,
        "cluster-agent pod routes: a route to every other node's pod CIDR",
        "pod-routes",
        &[],
    );
    unit.after.push(UNIT.into());
    unit
}

struct KubeletConfig;

#[async_trait]
impl Step for KubeletConfig {
    fn name(&self) -> &'static str {
        "kubelet-config"
    }
    fn summary(&self) -> &'static str {
        "write the kubelet configuration and install and enable kubelet.service (restarted when it changed)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let unit = render_kubelet_unit(&ctx.paths, &ctx.node);
        Ok(!RESTART.pending(ctx)
            && super::read_text(&ctx.paths.host(CONFIG_FILE))?.as_deref()
                == Some(render_kubelet_config(ctx).as_str())
            && services::unit_installed(&ctx.paths, &unit)?
            && services::unit_enabled(&ctx.paths, &unit))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        kubelet_binary(ctx)?;
        let config = render_kubelet_config(ctx);
        // The unit carries the digest of its inputs: a kubelet running with
        // an older config or certificate picks up the new ones.
        let config_changes =
            super::read_text(&ctx.paths.host(CONFIG_FILE))?.as_deref() != Some(config.as_str());
        if config_changes
            || !services::unit_installed(&ctx.paths, &render_kubelet_unit(&ctx.paths, &ctx.node))?
        {
            RESTART.mark(ctx)?;
        }
        fsutil::write_atomic(&ctx.paths.host(CONFIG_FILE), config.as_bytes(), PUBLIC_MODE)?;
        let unit = render_kubelet_unit(&ctx.paths, &ctx.node);
        services::install_unit(&ctx.paths, &unit)?;
        ctx.services.daemon_reload().await?;
        ctx.services.enable(&unit.name).await?;
        RESTART.settle(ctx, UNIT).await?;
        Ok(Outcome::Done)
    }
}

struct StartKubelet;

impl StartKubelet {
    /// Registered: the kubelet holds its own credentials and its Node
    /// object exists (asked with the kubelet's own identity).
    async fn registered(ctx: &Context) -> Result<(), String> {
        if !joined(ctx) {
            return Err("no client certificate yet".into());
        }
        let client = node_client(ctx).await.map_err(|e| e.to_string())?;
        k8s::node::get(&client, &ctx.node.name)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Step for StartKubelet {
    fn name(&self) -> &'static str {
        "kubelet-start"
    }
    fn summary(&self) -> &'static str {
        "start the kubelet; wait until it holds its client certificate and its Node exists"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(
            ctx.services.state(UNIT).await?.active_state == ActiveState::Active
                && Self::registered(ctx).await.is_ok(),
        )
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        // cgroups live in memory: after a reboot the pods' root is gone.
        if let Some(root) = containerd::pod_cgroup_root(&ctx.paths, &ctx.node.name) {
            containerd::ensure_cgroup(&root).map_err(|e| {
                StepError::Precondition(format!("cannot create the pods' cgroup {root}: {e}"))
            })?;
        }
        let what = format!(
            "the kubelet's client certificate and Node {}",
            ctx.node.name
        );
        super::start_until_ready(ctx, UNIT, &what, REGISTER_WAIT, || async {
            match Self::registered(ctx).await {
                Ok(()) => Poll::Ready(()),
                Err(e) => Poll::Pending(e),
            }
        })
        .await?;
        Ok(Outcome::Done)
    }
}

/// A client as the cluster admin, through this master's `admin.conf`.
async fn admin_client(ctx: &Context) -> Result<kube::Client, StepError> {
    Ok(k8s::client_from_kubeconfig(&ctx.paths.host(control_plane::ADMIN_CONF)).await?)
}

struct ControlPlaneRole;

#[async_trait]
impl Step for ControlPlaneRole {
    fn name(&self) -> &'static str {
        "node-role-label"
    }
    fn summary(&self) -> &'static str {
        "label this master's Node node-role.kubernetes.io/control-plane (a kubelet may not label itself so)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let client = node_client(ctx).await?;
        Ok(k8s::node::get(&client, &ctx.node.name)
            .await
            .is_ok_and(|n| k8s::node::has_control_plane_label(&n)))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let client = admin_client(ctx).await?;
        let what = format!("the control-plane label on Node {}", ctx.node.name);
        wait::poll_until(
            &what,
            REGISTER_WAIT,
            Backoff::remote(Duration::from_secs(2)),
            || async {
                match k8s::node::label_control_plane(&client, &ctx.node.name).await {
                    Ok(()) => Poll::Ready(()),
                    Err(e) => Poll::Pending(e.to_string()),
                }
            },
        )
        .await?;
        Ok(Outcome::Done)
    }
}

/// The Node's pod CIDR, once the controller-manager allocated it.
async fn allocated_pod_cidr(ctx: &Context) -> Result<ipnet::Ipv4Net, StepError> {
    let client = node_client(ctx).await?;
    let what = format!(
        "a pod CIDR for Node {} (controller-manager node IPAM)",
        ctx.node.name
    );
    ctx.progress.waiting(&what);
    Ok(wait::poll_until(
        &what,
        POD_CIDR_WAIT,
        Backoff::remote(Duration::from_secs(1)),
        || async {
            match k8s::node::get(&client, &ctx.node.name).await {
                Ok(node) => match k8s::node::pod_cidr(&node) {
                    Some(cidr) => Poll::Ready(cidr),
                    None => Poll::Pending("spec.podCIDR is not set yet".into()),
                },
                Err(e) => Poll::Pending(e.to_string()),
            }
        },
    )
    .await?)
}

/// Why the built-in pod network is not this node's, `None` when it is.
fn operator_cni(ctx: &Context) -> Option<String> {
    match &ctx.config.cluster.networking.cni {
        crate::config::Cni::BuiltIn => None,
        crate::config::Cni::Manifest(path) => Some(format!(
            "the pod network comes from {} (networking.cni.manifest): its installer configures this node",
            path.display()
        )),
    }
}

fn conflist_path(ctx: &Context) -> PathBuf {
    ctx.paths.host(podnet::CONFLIST_FILE)
}

struct PodNetwork;

#[async_trait]
impl Step for PodNetwork {
    fn name(&self) -> &'static str {
        "pod-network"
    }
    fn summary(&self) -> &'static str {
        "write the bridge + host-local CNI config for the Node's pod CIDR (spec.podCIDR)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        if operator_cni(ctx).is_some() {
            return Ok(false);
        }
        let Some(text) = super::read_text(&conflist_path(ctx))? else {
            return Ok(false);
        };
        let client = node_client(ctx).await?;
        Ok(match k8s::node::get(&client, &ctx.node.name).await {
            Ok(node) => {
                let ipam = ctx.paths.host(podnet::IPAM_DIR);
                k8s::node::pod_cidr(&node).map(|c| podnet::render_conflist(c, &ipam)) == Some(text)
            }
            Err(_) => false,
        })
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        if let Some(why) = operator_cni(ctx) {
            return Ok(Outcome::Skipped(why));
        }
        let dirs: Vec<PathBuf> = containerd::CNI_BIN_DIRS
            .iter()
            .map(|d| ctx.paths.host(d))
            .collect();
        let missing = podnet::missing_plugins(&dirs);
        if !missing.is_empty() {
            return Err(StepError::Precondition(format!(
                "the CNI plugins {} are in none of {}: the image needs the CNI reference \
                 plugins (Debian: containernetworking-plugins)",
                missing.join(", "),
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let cidr = allocated_pod_cidr(ctx).await?;
        let text = podnet::render_conflist(cidr, &ctx.paths.host(podnet::IPAM_DIR));
        fsutil::write_atomic(&conflist_path(ctx), text.as_bytes(), PUBLIC_MODE)?;
        tracing::info!(pod_cidr = %cidr, "pod network configured");
        Ok(Outcome::Done)
    }
}

struct PodRoutes;

#[async_trait]
impl Step for PodRoutes {
    fn name(&self) -> &'static str {
        "pod-routes"
    }
    fn summary(&self) -> &'static str {
        "install, enable and start cluster-pod-routes.service (routes to every other node's pod CIDR, kept as Nodes come and go)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        if operator_cni(ctx).is_some() {
            return Ok(false);
        }
        let unit = render_routes_unit(&ctx.paths, &ctx.node, &super::join_service::agent_path()?);
        api_balancer::agent_daemon_running(ctx, &unit).await
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        if let Some(why) = operator_cni(ctx) {
            return Ok(Outcome::Skipped(why));
        }
        let unit = render_routes_unit(&ctx.paths, &ctx.node, &super::join_service::agent_path()?);
        // Type=notify: ready once the keeper has set the routes for the
        // Nodes it found.
        api_balancer::start_agent_daemon(ctx, &unit, ROUTES_WAIT).await?;
        Ok(Outcome::Done)
    }
}

struct NodeReady;

impl NodeReady {
    async fn readiness(ctx: &Context) -> Result<Readiness, String> {
        let client = node_client(ctx).await.map_err(|e| e.to_string())?;
        k8s::node::get(&client, &ctx.node.name)
            .await
            .map(|n| k8s::node::readiness(&n))
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Step for NodeReady {
    fn name(&self) -> &'static str {
        "node-ready"
    }
    fn summary(&self) -> &'static str {
        "wait until the Node's Ready condition is True (while waiting, the journal shows the kubelet's reason)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(Self::readiness(ctx).await == Ok(Readiness::Ready))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let what = format!("Node {} to be Ready", ctx.node.name);
        ctx.progress.waiting(&what);
        let shown = std::sync::Mutex::new(String::new());
        wait::poll_until(&what, READY_WAIT, Backoff::local(), || async {
            match Self::readiness(ctx).await {
                Ok(Readiness::Ready) => Poll::Ready(()),
                Ok(Readiness::NotReady(why)) | Err(why) => {
                    // The journal's waiting_for names the condition, so
                    // `status` shows why the node is not Ready yet.
                    let mut shown = shown.lock().unwrap_or_else(|p| p.into_inner());
                    if *shown != why {
                        ctx.progress.waiting(&format!("{what}: {why}"));
                        shown.clone_from(&why);
                    }
                    Poll::Pending(why)
                }
            }
        })
        .await?;
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::skew_allowed;

    #[test]
    fn a_kubelet_may_not_be_newer_than_its_api_server() {
        let api = "the API server's /version";
        assert!(skew_allowed("v1.34.4", "v1.34.4", api).is_ok());
        assert!(skew_allowed("v1.33.9", "v1.34.4", api).is_ok());
        assert!(skew_allowed("v1.34.0", "v1.34.4", api).is_ok());
        let refused = skew_allowed("v1.35.0", "v1.34.4", api).unwrap_err();
        assert!(
            refused.contains("kubelet v1.35.0 is newer than the cluster (v1.34.4, from the API server's /version)")
                && refused.contains("kubelet 1.34 or older"),
            "{refused}"
        );
        assert!(skew_allowed("v2.0.0", "1.34.4", "cluster.yaml").is_err());
        assert!(skew_allowed("garbage", "v1.34.4", api).is_err());
    }
}
