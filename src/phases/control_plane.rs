//! Phase `control-plane`: kube-apiserver, kube-controller-manager and
//! kube-scheduler on every control-plane node, their kubeconfigs, and the
//! cluster objects joining nodes rely on.
//!
//! Each component's flags are in its unit's ExecStart: our units pass argv
//! verbatim (no `$VAR` expansion), so the rendered unit is the whole truth
//! of how the component runs, for systemd and the process backend alike.
//! `/etc/default/<component>` (optional, the operator's) can add
//! environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{ClusterConfig, NodeSpec};
use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::fsutil::{self, SECRET_MODE};
use crate::k8s::{self, Credentials};
use crate::paths::HostPaths;
use crate::pki::{self, CaKind, ClientCert, LeafKind, PkiPaths};
use crate::services::{self, ActiveState, RestartPolicy, ServiceSection, ServiceType, Unit};
use crate::wait::{self, Backoff, Poll};

pub const PHASE: &str = "control-plane";
pub const APISERVER: &str = "kube-apiserver";
pub const CONTROLLER_MANAGER: &str = "kube-controller-manager";
pub const SCHEDULER: &str = "kube-scheduler";
pub const COMPONENTS: [&str; 3] = [APISERVER, CONTROLLER_MANAGER, SCHEDULER];
pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
pub const CONTROLLER_MANAGER_CONF: &str = "/etc/kubernetes/controller-manager.conf";
pub const SCHEDULER_CONF: &str = "/etc/kubernetes/scheduler.conf";
/// The floating endpoint keeper's kubeconfig (`cluster-api-address.service`).
pub const API_ADDRESS_CONF: &str = "/etc/kubernetes/api-address.conf";
/// The operator's copy of admin.conf, in the state dir.
pub const OPERATOR_KUBECONFIG: &str = "admin.conf";
const READY_WAIT: Duration = Duration::from_secs(300);

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![super::etcd::PHASE],
        // The operator's copy lives in the state dir, which reset empties.
        owns: |paths, _| {
            [
                ADMIN_CONF,
                CONTROLLER_MANAGER_CONF,
                SCHEDULER_CONF,
                API_ADDRESS_CONF,
            ]
            .map(|p| paths.host(p))
            .to_vec()
        },
        steps: vec![
            Box::new(Binaries),
            Box::new(Kubeconfigs),
            Box::new(UnitConfig),
            Box::new(StartApiServer),
            Box::new(StartControllers),
            Box::new(ClusterObjects),
        ],
    }
}

/// `https://<this node's IP>:<API port>`: the local API server.
pub fn local_server(config: &ClusterConfig, node: &NodeSpec) -> String {
    format!(
        "https://{}:{}",
        node.ip, config.cluster.control_plane_endpoint.port
    )
}

/// `https://<control_plane_endpoint>`: what nodes and operators use.
pub fn endpoint_server(config: &ClusterConfig) -> String {
    format!("https://{}", config.cluster.control_plane_endpoint)
}

fn file(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The API server talks to its own etcd member only, as kubeadm's stacked
/// control plane does: a list of every master would include members that
/// are still learners (which refuse client requests) or not yet started,
/// and this master's own member is promoted before this phase runs.
fn etcd_server(config: &ClusterConfig, node: &NodeSpec) -> String {
    crate::etcd::topology::client_url(config, node)
}

fn kubeconfig_path(paths: &HostPaths, client: ClientCert) -> PathBuf {
    paths.host(match client {
        ClientCert::Admin => ADMIN_CONF,
        ClientCert::ControllerManager => CONTROLLER_MANAGER_CONF,
        ClientCert::Scheduler => SCHEDULER_CONF,
        ClientCert::Kubelet => super::kubelet::KUBECONFIG,
        ClientCert::KubeProxy => super::kube_proxy::KUBECONFIG,
        ClientCert::ApiAddress => API_ADDRESS_CONF,
    })
}

/// The three components' units, as `control-plane-config` installs them.
pub fn render_units(paths: &HostPaths, config: &ClusterConfig, node: &NodeSpec) -> Vec<Unit> {
    let pki = PkiPaths::new(paths);
    let ca = pki.ca(CaKind::Cluster);
    let front_proxy_ca = pki.ca(CaKind::FrontProxy);
    let leaf = |kind| pki.leaf(kind);
    let net = &config.cluster.networking;
    let apiserver = vec![
        format!("--advertise-address={}", node.ip),
        format!("--bind-address={}", node.ip),
        format!(
            "--secure-port={}",
            config.cluster.control_plane_endpoint.port
        ),
        "--allow-privileged=true".into(),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--enable-bootstrap-token-auth=true".into(),
        format!("--client-ca-file={}", file(&ca.cert)),
        format!("--tls-cert-file={}", file(&leaf(LeafKind::ApiServer).cert)),
        format!(
            "--tls-private-key-file={}",
            file(&leaf(LeafKind::ApiServer).key)
        ),
        format!("--etcd-servers={}", etcd_server(config, node)),
        format!("--etcd-cafile={}", file(&pki.ca(CaKind::Etcd).cert)),
        format!(
            "--etcd-certfile={}",
            file(&leaf(LeafKind::ApiServerEtcdClient).cert)
        ),
        format!(
            "--etcd-keyfile={}",
            file(&leaf(LeafKind::ApiServerEtcdClient).key)
        ),
        format!(
            "--kubelet-client-certificate={}",
            file(&leaf(LeafKind::ApiServerKubeletClient).cert)
        ),
        format!(
            "--kubelet-client-key={}",
            file(&leaf(LeafKind::ApiServerKubeletClient).key)
        ),
        "--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname".into(),
        format!(
            "--proxy-client-cert-file={}",
            file(&leaf(LeafKind::FrontProxyClient).cert)
        ),
        format!(
            "--proxy-client-key-file={}",
            file(&leaf(LeafKind::FrontProxyClient).key)
        ),
        "--requestheader-allowed-names=front-proxy-client".into(),
        format!(
            "--requestheader-client-ca-file={}",
            file(&front_proxy_ca.cert)
        ),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-username-headers=X-Remote-User".into(),
        format!(
            "--service-account-issuer=https://kubernetes.default.svc.{}",
            net.dns_domain
        ),
        format!("--service-account-key-file={}", file(&pki.sa_pub())),
        format!("--service-account-signing-key-file={}", file(&pki.sa_key())),
        format!("--service-cluster-ip-range={}", net.service_cidr),
    ];
    let controller_manager_conf = file(&kubeconfig_path(paths, ClientCert::ControllerManager));
    let controller_manager = vec![
        format!("--kubeconfig={controller_manager_conf}"),
        format!("--authentication-kubeconfig={controller_manager_conf}"),
        format!("--authorization-kubeconfig={controller_manager_conf}"),
        "--bind-address=127.0.0.1".into(),
        format!("--client-ca-file={}", file(&ca.cert)),
        format!("--cluster-name={}", config.cluster.name),
        format!("--cluster-cidr={}", net.pod_cidr),
        "--allocate-node-cidrs=true".into(),
        format!("--cluster-signing-cert-file={}", file(&ca.cert)),
        format!("--cluster-signing-key-file={}", file(&ca.key)),
        "--controllers=*,bootstrapsigner,tokencleaner".into(),
        "--leader-elect=true".into(),
        format!(
            "--requestheader-client-ca-file={}",
            file(&front_proxy_ca.cert)
        ),
        format!("--root-ca-file={}", file(&ca.cert)),
        format!("--service-account-private-key-file={}", file(&pki.sa_key())),
        format!("--service-cluster-ip-range={}", net.service_cidr),
        "--use-service-account-credentials=true".into(),
    ];
    let scheduler_conf = file(&kubeconfig_path(paths, ClientCert::Scheduler));
    let scheduler = vec![
        format!("--kubeconfig={scheduler_conf}"),
        format!("--authentication-kubeconfig={scheduler_conf}"),
        format!("--authorization-kubeconfig={scheduler_conf}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=true".into(),
    ];
    [
        (APISERVER, apiserver, vec!["etcd.service".to_string()]),
        (
            CONTROLLER_MANAGER,
            controller_manager,
            vec![format!("{APISERVER}.service")],
        ),
        (SCHEDULER, scheduler, vec![format!("{APISERVER}.service")]),
    ]
    .into_iter()
    .map(|(name, flags, after)| {
        let inputs = flag_files(&flags);
        component_unit(paths, name, flags, after, &inputs)
    })
    .collect()
}

/// The environment variable that carries [`inputs_digest`] in a unit.
pub const INPUTS_DIGEST_VAR: &str = "CLUSTER_AGENT_INPUTS_SHA256";

/// SHA-256 over the contents of the files a component reads at start
/// (certificates, keys, kubeconfigs, its config file). It is part of the
/// rendered unit, so a renewed certificate changes the unit and the
/// running component is restarted to load it, the way a checksum
/// annotation rolls a Deployment when its ConfigMap changes. Files that do
/// not exist yet count as absent.
pub fn inputs_digest(inputs: &[PathBuf]) -> String {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for path in inputs {
        digest.update(path.as_os_str().as_encoded_bytes());
        match std::fs::read(path) {
            Ok(bytes) => {
                digest.update(&(bytes.len() as u64).to_le_bytes());
                digest.update(&bytes);
            }
            Err(_) => digest.update(b"absent"),
        }
    }
    digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every absolute path a flag names (`--x=/path`): what a control-plane
/// component reads at start.
fn flag_files(flags: &[String]) -> Vec<PathBuf> {
    flags
        .iter()
        .filter_map(|f| f.split_once('=').map(|(_, v)| PathBuf::from(v)))
        .filter(|p| p.is_absolute())
        .collect()
}

/// A long-running component unit; shared with the worker's kubelet.
/// `inputs` are the files whose change must restart it.
pub fn component_unit(
    paths: &HostPaths,
    name: &str,
    flags: Vec<String>,
    after: Vec<String>,
    inputs: &[PathBuf],
) -> Unit {
    let environment = [(INPUTS_DIGEST_VAR.to_string(), inputs_digest(inputs))].into();
    let mut exec_start = vec![file(&paths.binary(name))];
    exec_start.extend(flags);
    let mut wants = vec!["network-online.target".to_string()];
    wants.extend(after.iter().cloned());
    let mut after_all = vec!["network-online.target".to_string()];
    after_all.extend(after);
    Unit {
        name: format!("{name}.service"),
        description: format!("Kubernetes {name}"),
        after: after_all,
        wants,
        requires: vec![],
        service: ServiceSection {
            type_: ServiceType::Simple,
            exec_start,
            environment,
            environment_file: Some(services::EnvironmentFile {
                path: paths.host(format!("/etc/default/{name}")),
                optional: true,
                vars: Default::default(),
            }),
            working_directory: None,
            restart: Some(RestartPolicy::Always),
            restart_sec: Some(Duration::from_secs(5)),
            timeout_start_sec: None,
            timeout_stop_sec: None,
            limit_nofile: Some(65536),
        },
        install: services::InstallSection {
            wanted_by: vec!["multi-user.target".into()],
        },
        systemd_only: Vec::new(),
    }
}

struct Binaries;

#[async_trait]
impl Step for Binaries {
    fn name(&self) -> &'static str {
        "control-plane-binaries"
    }
    fn summary(&self) -> &'static str {
        "find kube-apiserver, kube-controller-manager and kube-scheduler in the image (/opt/bin, /usr/bin)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(COMPONENTS
            .iter()
            .all(|c| ctx.paths.find_binary(c).is_some()))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let missing: Vec<&str> = COMPONENTS
            .iter()
            .copied()
            .filter(|c| ctx.paths.find_binary(c).is_none())
            .collect();
        let looked = ctx.paths.binary_dirs();
        if missing.len() == COMPONENTS.len() {
            // An image without Kubernetes (etcd and storage only): etcd is
            // formed and stays recorded; an image with the binaries
            // finishes the phase on the next run.
            return Ok(Outcome::SkipRest(format!(
                "no Kubernetes control-plane binaries in {looked}: this image cannot run the \
                 control plane; etcd is formed; install them and run `cluster-agent run` again"
            )));
        }
        if missing.is_empty() {
            return Ok(Outcome::Done);
        }
        Err(StepError::Precondition(format!(
            "{} missing from {looked} while the other control-plane binaries are there; \
             the image is incomplete",
            missing.join(", ")
        )))
    }
}

fn ca_pem(ctx: &Context) -> Result<String, StepError> {
    let path = PkiPaths::new(&ctx.paths).ca(CaKind::Cluster).cert;
    super::read_text(&path)?
        .ok_or_else(|| StepError::Precondition(format!("{} is missing", path.display())))
}

/// `(path, text)` of every kubeconfig this node gets, the operator's copy in
/// the state dir included.
fn kubeconfigs(ctx: &Context) -> Result<Vec<(PathBuf, String)>, StepError> {
    let mut out = Vec::new();
    for client in ClientCert::ALL {
        let creds = pki::read_client_credentials(&ctx.paths, client)?;
        let node_user = format!("system:node:{}", ctx.node.name);
        let user = match client {
            ClientCert::Admin => "kubernetes-admin",
            ClientCert::ControllerManager => "system:kube-controller-manager",
            ClientCert::Scheduler => "system:kube-scheduler",
            ClientCert::Kubelet => &node_user,
            ClientCert::KubeProxy => crate::pki::KUBE_PROXY_USER,
            ClientCert::ApiAddress => crate::pki::API_ADDRESS_USER,
        };
        let render = |server: &str| {
            k8s::render_kubeconfig(
                &ctx.config.cluster.name,
                server,
                &creds.ca_pem,
                user,
                Credentials::ClientCert {
                    cert_pem: &creds.cert_pem,
                    key_pem: &creds.key_pem,
                },
            )
        };
        // The agent's own steps on a master (admin.conf), the
        // controller-manager and the scheduler talk to the API server next
        // to them: it is up before anything else here, and with it gone
        // another master's lead. The kubelet and kube-proxy go through the
        // node's balancer, so the Node stays Ready while its own API
        // server is down. Operators reach the cluster through its endpoint.
        // So does the floating endpoint's keeper: a restart of this node's
        // API server (a renewed certificate, an upgrade) must not move the
        // address, and the holder forwards to every API server anyway.
        let server = match client {
            ClientCert::Kubelet | ClientCert::KubeProxy | ClientCert::ApiAddress => {
                crate::balancer::server_url(&ctx.node)
            }
            ClientCert::Admin | ClientCert::ControllerManager | ClientCert::Scheduler => {
                local_server(&ctx.config, &ctx.node)
            }
        };
        if client == ClientCert::Admin {
            out.push((
                ctx.paths.state_file(OPERATOR_KUBECONFIG),
                render(&endpoint_server(&ctx.config)),
            ));
        }
        out.push((kubeconfig_path(&ctx.paths, client), render(&server)));
    }
    Ok(out)
}

struct Kubeconfigs;

#[async_trait]
impl Step for Kubeconfigs {
    fn name(&self) -> &'static str {
        "control-plane-kubeconfigs"
    }
    fn summary(&self) -> &'static str {
        "write admin.conf, controller-manager.conf, scheduler.conf, the master kubelet's kubelet.conf and kube-proxy.conf (0600) and the operator's admin.conf in the state dir"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        for (path, text) in kubeconfigs(ctx)? {
            if super::read_text(&path)?.as_deref() != Some(text.as_str()) {
                return Ok(false);
            }
        }
        Ok(true)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        for (path, text) in kubeconfigs(ctx)? {
            fsutil::write_atomic(&path, text.as_bytes(), SECRET_MODE)?;
        }
        Ok(Outcome::Done)
    }
}

struct UnitConfig;

#[async_trait]
impl Step for UnitConfig {
    fn name(&self) -> &'static str {
        "control-plane-config"
    }
    fn summary(&self) -> &'static str {
        "install and enable the kube-apiserver, kube-controller-manager and kube-scheduler units"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        if COMPONENTS.iter().any(|c| super::RestartDue(c).pending(ctx)) {
            return Ok(false);
        }
        for unit in render_units(&ctx.paths, &ctx.config, &ctx.node) {
            if !(services::unit_installed(&ctx.paths, &unit)?
                && services::unit_enabled(&ctx.paths, &unit))
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        for unit in render_units(&ctx.paths, &ctx.config, &ctx.node) {
            if !services::unit_installed(&ctx.paths, &unit)? {
                // Owed before the unit changes: a component already running
                // with other flags or inputs must pick the new ones up, even
                // when this run dies before restarting it.
                if let Some(component) = COMPONENTS
                    .iter()
                    .find(|c| format!("{c}.service") == unit.name)
                {
                    super::RestartDue(component).mark(ctx)?;
                }
                services::install_unit(&ctx.paths, &unit)?;
            }
        }
        ctx.services.daemon_reload().await?;
        for name in COMPONENTS {
            let unit = format!("{name}.service");
            ctx.services.enable(&unit).await?;
            super::RestartDue(name).settle(ctx, &unit).await?;
        }
        Ok(Outcome::Done)
    }
}

struct StartApiServer;

#[async_trait]
impl Step for StartApiServer {
    fn name(&self) -> &'static str {
        "kube-apiserver-start"
    }
    fn summary(&self) -> &'static str {
        "start kube-apiserver and wait for /readyz over TLS pinned to the cluster CA"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let server = local_server(&ctx.config, &ctx.node);
        Ok(k8s::readyz(&server, &ca_pem(ctx)?).await.is_ok())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let server = local_server(&ctx.config, &ctx.node);
        let ca = ca_pem(ctx)?;
        let what = format!("{server}/readyz");
        let unit = format!("{APISERVER}.service");
        super::start_until_ready(ctx, &unit, &what, READY_WAIT, || async {
            match k8s::readyz(&server, &ca).await {
                Ok(()) => Poll::Ready(()),
                Err(e) => Poll::Pending(e.to_string()),
            }
        })
        .await?;
        Ok(Outcome::Done)
    }
}

struct StartControllers;

#[async_trait]
impl Step for StartControllers {
    fn name(&self) -> &'static str {
        "controllers-start"
    }
    fn summary(&self) -> &'static str {
        "start kube-controller-manager and kube-scheduler"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        for name in [CONTROLLER_MANAGER, SCHEDULER] {
            if ctx
                .services
                .state(&format!("{name}.service"))
                .await?
                .active_state
                != ActiveState::Active
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        for name in [CONTROLLER_MANAGER, SCHEDULER] {
            ctx.services.start(&format!("{name}.service")).await?;
        }
        Ok(Outcome::Done)
    }
}

struct ClusterObjects;

#[async_trait]
impl Step for ClusterObjects {
    fn name(&self) -> &'static str {
        "cluster-objects"
    }
    fn summary(&self) -> &'static str {
        "create the TLS-bootstrap RBAC bindings, the node agents' Node access, the floating endpoint's Lease Role and kube-public/cluster-info (kept when present)"
    }
    async fn check(&self, _ctx: &Context) -> Result<bool, StepError> {
        // Create-or-keep is itself idempotent and cheap.
        Ok(false)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let client =
            k8s::client_from_kubeconfig(&kubeconfig_path(&ctx.paths, ClientCert::Admin)).await?;
        let info = k8s::render_cluster_info(
            &ctx.config.cluster.name,
            &endpoint_server(&ctx.config),
            &ca_pem(ctx)?,
        );
        // The endpoint's API server may be one just starting, or briefly
        // without its etcd: retry what is retryable, fail on conflicts.
        let what = "the cluster objects to be created";
        wait::poll_until(
            what,
            READY_WAIT,
            Backoff::remote(Duration::from_secs(2)),
            || async {
                let result = async {
                    k8s::ensure_tls_bootstrap_rbac(&client).await?;
                    k8s::node::ensure_node_agent_rbac(&client).await?;
                    k8s::lease::ensure_rbac(&client).await?;
                    k8s::ensure_cluster_info(&client, &info).await
                }
                .await;
                match result {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(e @ k8s::K8sError::Conflict { .. }) => Poll::Ready(Err(e)),
                    Err(e) => Poll::Pending(e.to_string()),
                }
            },
        )
        .await??;
        Ok(Outcome::Done)
    }
}
