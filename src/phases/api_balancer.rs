//! Step `api-balancer` of the kubelet phase: `cluster-api-balancer.service`
//! ([`crate::balancer`]) on every Kubernetes node, before anything there
//! talks to the API. The kubelet, kube-proxy, the route keeper and the
//! agent's own steps reach the API through it, so they keep working when
//! any one master goes away. It is part of the kubelet phase because on a
//! worker it needs the cluster CA the join material brings, and everything
//! after that needs it.

use std::time::Duration;

use async_trait::async_trait;

use crate::engine::{Context, Outcome, Step, StepError};
use crate::paths::HostPaths;
use crate::services::{self, ActiveState, RestartPolicy, ServiceSection, ServiceType, Unit};

pub const UNIT: &str = "cluster-api-balancer.service";
const START_WAIT: Duration = Duration::from_secs(30);

/// A long-running `cluster-agent <subcommand>` unit (`Type=notify`,
/// restarted whenever it exits, but not after a configuration error, exit
/// 2): the route keeper and the balancer.
pub(super) fn agent_daemon_unit(
    paths: &HostPaths,
    node: &crate::config::NodeSpec,
    agent: &std::path::Path,
    name: &str,
    description: &str,
    subcommand: &str,
    hardening: &[(&str, &str, String)],
) -> Unit {
    let systemd_only = [
        ("Unit", "StartLimitIntervalSec", "0"),
        ("Service", "NotifyAccess", "main"),
        ("Service", "RestartPreventExitStatus", "2"),
    ]
    .iter()
    .map(|(s, k, v)| (s.to_string(), k.to_string(), v.to_string()))
    .chain(
        hardening
            .iter()
            .map(|(s, k, v)| (s.to_string(), k.to_string(), v.clone())),
    )
    .collect();
    Unit {
        name: name.into(),
        description: description.into(),
        after: vec!["network-online.target".into()],
        wants: vec!["network-online.target".into()],
        requires: vec![],
        service: ServiceSection {
            type_: ServiceType::Notify,
            exec_start: super::join_service::agent_command(paths, node, agent, subcommand),
            environment: Default::default(),
            environment_file: None,
            working_directory: None,
            restart: Some(RestartPolicy::Always),
            restart_sec: Some(Duration::from_secs(1)),
            timeout_start_sec: Some(Duration::from_secs(120)),
            timeout_stop_sec: None,
            limit_nofile: None,
        },
        install: services::InstallSection {
            wanted_by: vec!["multi-user.target".into()],
        },
        systemd_only,
    }
}

/// The sandbox of an agent daemon that needs nothing from the system but
/// the network, read access, its view in [`VIEW_DIR`] and `capabilities`
/// (a systemd capability list, empty for none); `families` are the socket
/// address families it may use.
pub(super) fn sandboxed(
    paths: &HostPaths,
    capabilities: &'static str,
    families: &'static str,
) -> Vec<(&'static str, &'static str, String)> {
    let view_dir = paths.host(VIEW_DIR).to_string_lossy().into_owned();
    let fixed = [
        ("Service", "CapabilityBoundingSet", capabilities),
        ("Service", "NoNewPrivileges", "yes"),
        ("Service", "ProtectSystem", "strict"),
        ("Service", "ProtectHome", "yes"),
        ("Service", "PrivateTmp", "yes"),
        ("Service", "PrivateDevices", "yes"),
        ("Service", "ProtectKernelTunables", "yes"),
        ("Service", "ProtectKernelModules", "yes"),
        ("Service", "ProtectKernelLogs", "yes"),
        ("Service", "ProtectClock", "yes"),
        ("Service", "ProtectHostname", "yes"),
        ("Service", "ProtectProc", "invisible"),
        ("Service", "PrivateMounts", "yes"),
        ("Service", "RestrictRealtime", "yes"),
        ("Service", "RestrictSUIDSGID", "yes"),
        ("Service", "SystemCallFilter", "@system-service"),
        ("Service", "SystemCallFilter", "~@privileged @resources"),
        ("Service", "SystemCallErrorNumber", "EPERM"),
        ("Service", "UMask", "0022"),
        ("Service", "ProtectControlGroups", "yes"),
        ("Service", "RestrictAddressFamilies", families),
        ("Service", "RestrictNamespaces", "yes"),
        ("Service", "LockPersonality", "yes"),
        ("Service", "MemoryDenyWriteExecute", "yes"),
        ("Service", "SystemCallArchitectures", "native"),
        // systemd makes /run/cluster-agent before it sets up the sandbox
        // (on a freshly booted node nothing else has yet, and
        // ReadWritePaths= of a missing directory fails the start), and
        // keeps it when the unit stops: the units share it.
        ("Service", "RuntimeDirectory", "cluster-agent"),
        ("Service", "RuntimeDirectoryPreserve", "yes"),
    ];
    fixed
        .into_iter()
        .map(|(s, k, v)| (s, k, v.to_string()))
        .chain([("Service", "ReadWritePaths", view_dir)])
        .collect()
}

/// Where the balancer and the floating endpoint's keeper write their views.
pub const VIEW_DIR: &str = "/run/cluster-agent";

/// `cluster-api-balancer.service`. It only reads (the CA, cluster.yaml,
/// kube-proxy's kubeconfig) and listens on an unprivileged port, so it
/// runs with no capabilities and a read-only view of the system.
pub fn render_unit(
    paths: &HostPaths,
    node: &crate::config::NodeSpec,
    agent: &std::path::Path,
) -> Unit {
    agent_daemon_unit(
        paths,
        node,
        agent,
        UNIT,
        "cluster-agent API balancer: this node's way to every healthy kube-apiserver",
        "api-balancer",
        &sandboxed(paths, "", "AF_INET AF_INET6 AF_UNIX"),
    )
}

/// Installs, enables and (re)starts an agent daemon unit and waits for its
/// READY=1; a unit file that changed means a restart.
pub(super) async fn start_agent_daemon(
    ctx: &Context,
    unit: &Unit,
    wait: Duration,
) -> Result<(), StepError> {
    let changed = services::install_unit(&ctx.paths, unit)?;
    ctx.services.daemon_reload().await?;
    ctx.services.enable(&unit.name).await?;
    ctx.progress.waiting(&format!("{} to start", unit.name));
    let start = async {
        if changed {
            ctx.services.restart(&unit.name).await
        } else {
            ctx.services.start(&unit.name).await
        }
    };
    tokio::time::timeout(wait, start).await.map_err(|_| {
        StepError::Precondition(format!(
            "{} did not report ready within {wait:?}; see its log",
            unit.name
        ))
    })??;
    Ok(())
}

/// The unit is as rendered, enabled and running.
pub(super) async fn agent_daemon_running(ctx: &Context, unit: &Unit) -> Result<bool, StepError> {
    Ok(services::unit_installed(&ctx.paths, unit)?
        && services::unit_enabled(&ctx.paths, unit)
        && ctx.services.state(&unit.name).await?.active_state == ActiveState::Active)
}

pub struct ApiBalancer;

#[async_trait]
impl Step for ApiBalancer {
    fn name(&self) -> &'static str {
        "api-balancer"
    }
    fn summary(&self) -> &'static str {
        "install, enable and start cluster-api-balancer.service (127.0.0.1:7445 to every ready kube-apiserver)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let unit = render_unit(&ctx.paths, &ctx.node, &super::join_service::agent_path()?);
        agent_daemon_running(ctx, &unit).await
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let unit = render_unit(&ctx.paths, &ctx.node, &super::join_service::agent_path()?);
        start_agent_daemon(ctx, &unit, START_WAIT).await?;
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The sandbox opens [`super::VIEW_DIR`] only: both views must be in it.
    #[test]
    fn the_views_are_in_the_sandboxes_writable_directory() {
        for view in [crate::balancer::VIEW_FILE, crate::floating::VIEW_FILE] {
            assert_eq!(Path::new(view).parent(), Some(Path::new(super::VIEW_DIR)));
        }
    }
}
