//! Phase `worker`: join the Kubernetes cluster as a node, by itself. The
//! join material (API endpoint, cluster CA, a fresh bootstrap token) comes
//! from any control-plane node's join service; the kubelet then
//! TLS-bootstraps its client certificate with the token.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::fsutil::{self, PUBLIC_MODE, SECRET_MODE};
use crate::join::{Material, Purpose, WorkerMaterial};
use crate::k8s::{self, Credentials};
use crate::services::{self, Unit};
use crate::wait::{self, Backoff, Poll};

use super::{container_runtime, control_plane};
use crate::containerd;

pub const PHASE: &str = "worker";
pub const KUBELET: &str = "kubelet";
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/kubernetes/bootstrap-kubelet.conf";
pub const KUBECONFIG: &str = "/etc/kubernetes/kubelet.conf";
pub const CA_FILE: &str = "/etc/kubernetes/pki/ca.crt";
pub const ROOT_DIR: &str = "/var/lib/kubelet";
pub const CONFIG_FILE: &str = "/var/lib/kubelet/config.yaml";
pub const CERT_DIR: &str = "/var/lib/kubelet/pki";
pub const CLIENT_CERT: &str = "/var/lib/kubelet/pki/kubelet-client-current.pem";
/// Workers may boot long before the control plane is up.
const JOIN_WAIT: Duration = Duration::from_secs(900);
const REGISTER_WAIT: Duration = Duration::from_secs(300);
const API_VERSION_WAIT: Duration = Duration::from_secs(120);

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![super::node::PHASE],
        steps: vec![
            Box::new(KubeletBinary),
            Box::new(FetchJoinMaterial),
            Box::new(VersionSkew),
            Box::new(KubeletConfig),
            Box::new(StartKubelet),
        ],
    }
}

fn joined(ctx: &Context) -> bool {
    ctx.paths.host(CLIENT_CERT).exists()
}

/// The API server this node was told about, from its bootstrap kubeconfig.
fn api_server(ctx: &Context) -> Result<String, StepError> {
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

#[async_trait]
impl Step for FetchJoinMaterial {
    fn name(&self) -> &'static str {
        "worker-join-material"
    }
    fn summary(&self) -> &'static str {
        "fetch API endpoint, cluster CA and a bootstrap token from a control-plane node's join service; write bootstrap-kubelet.conf"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        // A kubelet with its own certificate needs no token any more.
        Ok(joined(ctx)
            || (ctx.paths.host(BOOTSTRAP_KUBECONFIG).exists() && ctx.paths.host(CA_FILE).exists()))
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
        let kubeconfig = k8s::render_kubeconfig(
            &ctx.config.cluster.name,
            &api_server,
            &ca_pem,
            "kubelet-bootstrap",
            Credentials::Token(&bootstrap_token),
        );
        fsutil::write_atomic(
            &ctx.paths.host(BOOTSTRAP_KUBECONFIG),
            kubeconfig.as_bytes(),
            SECRET_MODE,
        )?;
        tracing::info!(%api_server, %token_expires, "join material in place");
        Ok(Outcome::Done)
    }
}

/// `kubelet --version` → `v1.31.0`.
async fn kubelet_version(binary: &std::path::Path) -> Result<String, StepError> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .map_err(|e| {
            StepError::Precondition(format!("cannot run {} --version: {e}", binary.display()))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
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
/// CRI socket and the cgroup driver containerd was configured with. Its
/// endpoints listen on the node's own address, so several nodes can share
/// one machine's loopback in tests and the lab.
pub fn render_kubelet_config(ctx: &Context) -> String {
    let net = &ctx.config.cluster.networking;
    let dns = std::net::Ipv4Addr::from(u32::from(net.service_cidr.network()) + 10);
    let config = serde_json::json!({
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
    serde_json::to_string_pretty(&config).expect("serialisable") + "\n"
}

pub fn render_kubelet_unit(
    paths: &crate::paths::HostPaths,
    node: &crate::config::NodeSpec,
) -> Unit {
    let p = |x: &str| paths.host(x).to_string_lossy().into_owned();
    control_plane::component_unit(
        paths,
        KUBELET,
        vec![
            format!("--bootstrap-kubeconfig={}", p(BOOTSTRAP_KUBECONFIG)),
            format!("--kubeconfig={}", p(KUBECONFIG)),
            format!("--config={}", p(CONFIG_FILE)),
            format!("--cert-dir={}", p(CERT_DIR)),
            format!("--root-dir={}", p(ROOT_DIR)),
            format!("--hostname-override={}", node.name),
            format!("--node-ip={}", node.ip),
        ],
        vec![container_runtime::UNIT.to_string()],
        // The kubeconfig and certificates are the kubelet's own: it
        // rotates them itself.
        &[paths.host(CONFIG_FILE), paths.host(CA_FILE)],
    )
}

struct KubeletConfig;

#[async_trait]
impl Step for KubeletConfig {
    fn name(&self) -> &'static str {
        "kubelet-config"
    }
    fn summary(&self) -> &'static str {
        "write the kubelet configuration and install and enable kubelet.service"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let unit = render_kubelet_unit(&ctx.paths, &ctx.node);
        Ok(super::read_text(&ctx.paths.host(CONFIG_FILE))?.as_deref()
            == Some(render_kubelet_config(ctx).as_str())
            && services::unit_installed(&ctx.paths, &unit)?
            && services::unit_enabled(&ctx.paths, &unit))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        kubelet_binary(ctx)?;
        fsutil::write_atomic(
            &ctx.paths.host(CONFIG_FILE),
            render_kubelet_config(ctx).as_bytes(),
            PUBLIC_MODE,
        )?;
        let unit = render_kubelet_unit(&ctx.paths, &ctx.node);
        services::install_unit(&ctx.paths, &unit)?;
        ctx.services.daemon_reload().await?;
        ctx.services.enable(&unit.name).await?;
        Ok(Outcome::Done)
    }
}

struct StartKubelet;

impl StartKubelet {
    /// Registered: the kubelet holds its own client certificate and its
    /// Node object exists (asked with the kubelet's own identity).
    async fn registered(ctx: &Context) -> Result<(), String> {
        if !joined(ctx) {
            return Err("no client certificate yet".into());
        }
        let client = k8s::client_from_kubeconfig(&ctx.paths.host(KUBECONFIG))
            .await
            .map_err(|e| e.to_string())?;
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
        nodes
            .get(&ctx.node.name)
            .await
            .map(drop)
            .map_err(|e| format!("Node {}: {e}", ctx.node.name))
    }
}

#[async_trait]
impl Step for StartKubelet {
    fn name(&self) -> &'static str {
        "kubelet-start"
    }
    fn summary(&self) -> &'static str {
        "start the kubelet; wait until its client certificate is issued and its Node exists"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(ctx.services.state("kubelet.service").await?.active_state
            == services::ActiveState::Active
            && Self::registered(ctx).await.is_ok())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let what = format!(
            "the kubelet's client certificate and Node {}",
            ctx.node.name
        );
        super::start_until_ready(ctx, "kubelet.service", &what, REGISTER_WAIT, || async {
            match Self::registered(ctx).await {
                Ok(()) => Poll::Ready(()),
                Err(e) => Poll::Pending(e),
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
