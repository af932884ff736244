//! Phase `kube-proxy`: every Kubernetes node runs kube-proxy in iptables
//! mode, so that ClusterIP Services answer from the node and from its pods.
//!
//! Its identity is `system:kube-proxy`, which Kubernetes' bootstrap RBAC
//! binds to `system:node-proxier`. A master's certificate is issued with
//! its others from the cluster CA it holds (`kube-proxy.conf` comes with
//! the control-plane phase's kubeconfigs). A worker holds no CA key: it
//! makes a key that never leaves it and asks for the certificate with a
//! CSR under its kubelet's identity, which the join service's approver
//! grants to listed nodes and the controller-manager signs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::fsutil::{self, PUBLIC_MODE, SECRET_MODE};
use crate::k8s::csr::Answer;
use crate::k8s::{self, Credentials};
use crate::pki::{self, KUBE_PROXY_USER};
use crate::role::Role;
use crate::services::{self, ActiveState, Unit};
use crate::wait::{self, Backoff, Poll};

use super::{control_plane, kubelet};

pub const PHASE: &str = "kube-proxy";
pub const KUBE_PROXY: &str = "kube-proxy";
pub const UNIT: &str = "kube-proxy.service";
pub const KUBECONFIG: &str = "/etc/kubernetes/kube-proxy.conf";
pub const STATE_DIR: &str = "/var/lib/kube-proxy";
pub const CONFIG_FILE: &str = "/var/lib/kube-proxy/config.json";
/// A worker's requested certificate and its key.
const CERT_FILE: &str = "/var/lib/kube-proxy/pki/kube-proxy.crt";
const KEY_FILE: &str = "/var/lib/kube-proxy/pki/kube-proxy.key";
/// Marked before kube-proxy's config or unit changes, cleared once the
/// running kube-proxy was restarted on them.
const RESTART: super::RestartDue = super::RestartDue("kube-proxy");
pub const HEALTHZ_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 10249;
/// The approver acts within a second and the signer at once; longer means
/// no master's join service is approving.
const CERT_WAIT: Duration = Duration::from_secs(120);
/// The first sync lists every Service and EndpointSlice.
const READY_WAIT: Duration = Duration::from_secs(120);
/// In a network namespace other than the host's the conntrack table size
/// is the host's to set, and kube-proxy exits when it cannot write it.
const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

pub fn phase(role: Role) -> Phase {
    let mut steps: Vec<Box<dyn Step>> = vec![Box::new(Binary)];
    if role == Role::Worker {
        steps.push(Box::new(WorkerCredentials));
    }
    steps.push(Box::new(Config));
    steps.push(Box::new(Start));
    Phase {
        name: PHASE,
        // The kubelet's identity asks for a worker's certificate; a
        // master's kube-proxy.conf is written with its other kubeconfigs.
        requires: vec![super::node::PHASE, kubelet::PHASE],
        owns: |paths, _| [KUBECONFIG, STATE_DIR].map(|p| paths.host(p)).to_vec(),
        steps,
    }
}

/// Why this node runs no kube-proxy, `None` when it does.
fn not_run(ctx: &Context) -> Option<String> {
    if ctx.node.ip.is_loopback() {
        // Nodes that share the host's loopback share its iptables too: one
        // kube-proxy's rules would be rewritten by the next.
        return Some(format!(
            "node address {} is a loopback address: nodes sharing one host's network \
             share its iptables, so this node runs no kube-proxy",
            ctx.node.ip
        ));
    }
    if ctx.paths.find_binary(KUBE_PROXY).is_none() {
        return Some(format!(
            "kube-proxy not found in {}: this image runs no kube-proxy, and ClusterIP \
             Services do not answer on this node",
            ctx.paths.binary_dirs()
        ));
    }
    None
}

struct Binary;

#[async_trait]
impl Step for Binary {
    fn name(&self) -> &'static str {
        "kube-proxy-binary"
    }
    fn summary(&self) -> &'static str {
        "find kube-proxy in the image (/opt/bin, /usr/bin); nodes on a loopback address run none"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(not_run(ctx).is_none())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        Ok(match not_run(ctx) {
            Some(why) => Outcome::SkipRest(why),
            None => Outcome::Done,
        })
    }
}

/// The kubeconfig a worker's kube-proxy gets from its requested
/// certificate; `None` until the certificate is there.
fn worker_kubeconfig(ctx: &Context) -> Result<Option<String>, StepError> {
    let read = |p: &str| super::read_text(&ctx.paths.host(p));
    let (Some(cert), Some(key), Some(ca)) =
        (read(CERT_FILE)?, read(KEY_FILE)?, read(kubelet::CA_FILE)?)
    else {
        return Ok(None);
    };
    Ok(Some(k8s::render_kubeconfig(
        &ctx.config.cluster.name,
        &kubelet::api_server(ctx)?,
        &ca,
        KUBE_PROXY_USER,
        Credentials::ClientCert {
            cert_pem: &cert,
            key_pem: &key,
        },
    )))
}

struct WorkerCredentials;

impl WorkerCredentials {
    fn stale(ctx: &Context) -> Result<Option<String>, StepError> {
        Ok(pki::requested_client_stale(
            &ctx.paths.host(CERT_FILE),
            &ctx.paths.host(KEY_FILE),
            &ctx.paths.host(kubelet::CA_FILE),
            KUBE_PROXY_USER,
        )?)
    }
}

#[async_trait]
impl Step for WorkerCredentials {
    fn name(&self) -> &'static str {
        "kube-proxy-credentials"
    }
    fn summary(&self) -> &'static str {
        "ask for kube-proxy's system:kube-proxy client certificate with a CSR under the kubelet's identity (the key stays on the node); write kube-proxy.conf (0600)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        if Self::stale(ctx)?.is_some() {
            return Ok(false);
        }
        Ok(worker_kubeconfig(ctx)?.is_some_and(|text| {
            super::read_text(&ctx.paths.host(KUBECONFIG))
                .ok()
                .flatten()
                .as_deref()
                == Some(text.as_str())
        }))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        if let Some(why) = Self::stale(ctx)? {
            tracing::info!("requesting kube-proxy's client certificate: {why}");
            let (_, csr) = pki::client_request(&ctx.paths.host(KEY_FILE), KUBE_PROXY_USER)?;
            let client = kubelet::node_client(ctx).await?;
            let name =
                k8s::csr::create(&client, &format!("kube-proxy-{}-", ctx.node.name), &csr).await?;
            let what =
                format!("CertificateSigningRequest {name} (kube-proxy) to be approved and signed");
            ctx.progress.waiting(&what);
            let cert = wait::poll_until(
                &what,
                CERT_WAIT,
                Backoff::remote(Duration::from_secs(1)),
                || async {
                    match k8s::csr::answer(&client, &name).await {
                        Ok(Answer::Issued(pem)) => Poll::Ready(Ok(pem)),
                        Ok(Answer::Refused(why)) => Poll::Ready(Err(why)),
                        Ok(Answer::Pending) => Poll::Pending("not approved and signed yet".into()),
                        Err(e) => Poll::Pending(e.to_string()),
                    }
                },
            )
            .await?
            .map_err(|why| {
                StepError::Precondition(format!(
                    "kube-proxy's certificate request {name} was refused: {why}; \
                     see the join service's log on the masters"
                ))
            })?;
            fsutil::write_atomic(&ctx.paths.host(CERT_FILE), cert.as_bytes(), PUBLIC_MODE)?;
        }
        let text = worker_kubeconfig(ctx)?.ok_or_else(|| {
            StepError::Precondition("kube-proxy's certificate vanished while being written".into())
        })?;
        fsutil::write_atomic(&ctx.paths.host(KUBECONFIG), text.as_bytes(), SECRET_MODE)?;
        Ok(Outcome::Done)
    }
}

/// `KubeProxyConfiguration` (JSON being YAML): iptables mode, the pod
/// network's CIDR (traffic from outside it to a Service is masqueraded),
/// the Node's name, and every endpoint on the node's own address, so
/// nodes sharing a machine in tests and the lab never collide.
pub fn render_config(ctx: &Context) -> String {
    let ip = ctx.node.ip;
    let mut config = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": ctx.paths.host(KUBECONFIG)},
        "mode": "iptables",
        "clusterCIDR": ctx.config.cluster.networking.pod_cidr.to_string(),
        "hostnameOverride": ctx.node.name,
        "bindAddress": ip.to_string(),
        "healthzBindAddress": format!("{ip}:{HEALTHZ_PORT}"),
        "metricsBindAddress": format!("{ip}:{METRICS_PORT}"),
        // NodePorts on the node's primary address, not on every address
        // of the host (other nodes' in tests, a container's).
        "nodePortAddresses": ["primary"],
    });
    if !conntrack_max_writable() {
        // 0 leaves the table size alone.
        config["conntrack"] = serde_json::json!({"maxPerCore": 0});
    }
    serde_json::to_string_pretty(&config).expect("serialisable") + "\n"
}

/// The kernel's, not a file of the node's: never under `--root`.
fn conntrack_max_writable() -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(CONNTRACK_MAX)
        .is_ok()
}

/// `kube-proxy.service`; its configuration and kubeconfig are its inputs,
/// so a renewed certificate restarts it.
pub fn render_unit(paths: &crate::paths::HostPaths) -> Unit {
    let inputs: Vec<PathBuf> = [CONFIG_FILE, KUBECONFIG].map(|p| paths.host(p)).to_vec();
    control_plane::component_unit(
        paths,
        KUBE_PROXY,
        vec![format!("--config={}", paths.host(CONFIG_FILE).display())],
        vec![],
        &inputs,
    )
}

struct Config;

#[async_trait]
impl Step for Config {
    fn name(&self) -> &'static str {
        "kube-proxy-config"
    }
    fn summary(&self) -> &'static str {
        "write kube-proxy's configuration (iptables mode, cluster CIDR, node name) and install and enable kube-proxy.service (restarted when it changed)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let unit = render_unit(&ctx.paths);
        Ok(!RESTART.pending(ctx)
            && super::read_text(&ctx.paths.host(CONFIG_FILE))?.as_deref()
                == Some(render_config(ctx).as_str())
            && services::unit_installed(&ctx.paths, &unit)?
            && services::unit_enabled(&ctx.paths, &unit))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        if !ctx.paths.host(KUBECONFIG).exists() {
            return Err(StepError::Precondition(format!(
                "{} is missing: run the agent again (it is written with a master's kubeconfigs, \
                 or from a worker's requested certificate)",
                ctx.paths.host(KUBECONFIG).display()
            )));
        }
        let config = render_config(ctx);
        let config_changes =
            super::read_text(&ctx.paths.host(CONFIG_FILE))?.as_deref() != Some(config.as_str());
        if config_changes || !services::unit_installed(&ctx.paths, &render_unit(&ctx.paths))? {
            RESTART.mark(ctx)?;
        }
        fsutil::write_atomic(&ctx.paths.host(CONFIG_FILE), config.as_bytes(), PUBLIC_MODE)?;
        let unit = render_unit(&ctx.paths);
        services::install_unit(&ctx.paths, &unit)?;
        ctx.services.daemon_reload().await?;
        ctx.services.enable(&unit.name).await?;
        RESTART.settle(ctx, UNIT).await?;
        Ok(Outcome::Done)
    }
}

fn healthz_url(ctx: &Context) -> String {
    format!("http://{}:{HEALTHZ_PORT}/healthz", ctx.node.ip)
}

struct Start;

#[async_trait]
impl Step for Start {
    fn name(&self) -> &'static str {
        "kube-proxy-start"
    }
    fn summary(&self) -> &'static str {
        "start kube-proxy; wait until its /healthz says the Service rules are synced"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(
            ctx.services.state(UNIT).await?.active_state == ActiveState::Active
                && k8s::http_ok(&healthz_url(ctx)).await.is_ok(),
        )
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let url = healthz_url(ctx);
        let what = format!("kube-proxy's first sync of the Service rules ({url})");
        super::start_until_ready(ctx, UNIT, &what, READY_WAIT, || async {
            match k8s::http_ok(&url).await {
                Ok(()) => Poll::Ready(()),
                Err(e) => Poll::Pending(e.to_string()),
            }
        })
        .await?;
        Ok(Outcome::Done)
    }
}

/// Where reset finds what this phase left besides its unit.
/// `kube-proxy --cleanup` removes the Service rules kube-proxy left in
/// iptables (stopping it leaves them, and they would keep DNATing to pods
/// that are gone).
pub fn cleanup_command(binary: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary);
    command.arg("--cleanup");
    command
}
