//! Phase `join-service`: every control-plane and ceph-mon node runs
//! `cluster-agent serve-join`, so the nodes after it (additional masters,
//! workers, monitors) can fetch what they need from any of them. It needs
//! only the `node` phase and serves what is on disk, answering "not yet"
//! until then: a master whose API server cannot start still lets the other
//! masters form etcd, and monitors grow without any Kubernetes.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::NodeSpec;
use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::paths::{DEFAULT_CONFIG_DIR, DEFAULT_STATE_DIR, HostPaths};
use crate::services::{self, ActiveState, Unit};
use crate::wait::{self, Backoff, Poll};

pub const PHASE: &str = "join-service";
pub const UNIT_NAME: &str = "cluster-join.service";
/// The unit as shipped in the image; everything but ExecStart comes from it.
const SHIPPED_UNIT: &str = include_str!("../../systemd/cluster-join.service");
/// Where the Flatcar image installs the agent (the shipped units' ExecStart).
pub const IMAGE_AGENT: &str = "/usr/bin/cluster-agent";
const LISTEN_WAIT: Duration = Duration::from_secs(30);

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![super::node::PHASE],
        steps: vec![Box::new(StartJoinService)],
        owns: crate::engine::owns_nothing,
    }
}

/// The shipped unit with ExecStart pointing at this agent and at this
/// node's paths, so the process backend (tests, the lab) serves the same
/// root the agent bootstraps. On a real node it is the shipped command plus
/// `--node`.
pub fn render_unit(paths: &HostPaths, node: &NodeSpec, agent: &Path) -> Unit {
    let mut unit = services::parse_unit(UNIT_NAME, SHIPPED_UNIT, Path::new(UNIT_NAME))
        .expect("systemd/cluster-join.service is covered by tests/systemd_units.rs");
    unit.service.exec_start = agent_command(paths, node, agent, "serve-join");
    unit
}

/// `agent [--root R] [--config-dir C] [--state-dir S] --node NAME
/// <subcommand>`: how a unit runs the agent itself, against the same paths
/// as the run that installs it (the defaults are left out, so a real
/// node's command line is the shipped one).
pub fn agent_command(
    paths: &HostPaths,
    node: &NodeSpec,
    agent: &Path,
    subcommand: &str,
) -> Vec<String> {
    let mut argv = vec![agent.to_string_lossy().into_owned()];
    let mut flag = |name: &str, value: &Path, default: &str| {
        if value != Path::new(default) {
            argv.push(name.to_string());
            argv.push(value.to_string_lossy().into_owned());
        }
    };
    flag("--root", paths.root(), "/");
    flag("--config-dir", paths.config_dir(), DEFAULT_CONFIG_DIR);
    flag("--state-dir", paths.state_dir(), DEFAULT_STATE_DIR);
    argv.extend(["--node".into(), node.name.clone(), subcommand.into()]);
    argv
}

/// This agent's own binary, for the units that run it.
pub fn agent_path() -> Result<std::path::PathBuf, StepError> {
    std::env::current_exe().map_err(|e| {
        StepError::Precondition(format!(
            "cannot tell where this cluster-agent binary is: {e}"
        ))
    })
}

struct StartJoinService;

impl StartJoinService {
    async fn listening(ctx: &Context) -> Result<(), String> {
        let addr = (ctx.node.ip, ctx.config.cluster.bootstrap.join_port);
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map(drop)
        .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Step for StartJoinService {
    fn name(&self) -> &'static str {
        "join-service-start"
    }
    fn summary(&self) -> &'static str {
        "install, enable and start cluster-join.service (serve-join) on this control-plane node"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let unit = render_unit(&ctx.paths, &ctx.node, &agent_path()?);
        Ok(services::unit_installed(&ctx.paths, &unit)?
            && services::unit_enabled(&ctx.paths, &unit)
            && ctx.services.state(UNIT_NAME).await?.active_state == ActiveState::Active
            && Self::listening(ctx).await.is_ok())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let unit = render_unit(&ctx.paths, &ctx.node, &agent_path()?);
        let changed = services::install_unit(&ctx.paths, &unit)?;
        ctx.services.daemon_reload().await?;
        ctx.services.enable(UNIT_NAME).await?;
        ctx.progress.waiting(&format!("{UNIT_NAME} to start"));
        if changed {
            // A join service already running (enabled by Ignition, or from
            // an older agent) must pick up the new command line.
            ctx.services.restart(UNIT_NAME).await?;
        } else {
            ctx.services.start(UNIT_NAME).await?;
        }
        let port = ctx.config.cluster.bootstrap.join_port;
        wait::poll_until(
            &format!("the join service to listen on {}:{port}", ctx.node.ip),
            LISTEN_WAIT,
            Backoff::local(),
            || async {
                match Self::listening(ctx).await {
                    Ok(()) => Poll::Ready(()),
                    Err(e) => Poll::Pending(e),
                }
            },
        )
        .await?;
        Ok(Outcome::Done)
    }
}
