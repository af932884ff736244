//! Step `api-address` of a master's kubelet phase: with
//! `floating_endpoint: true`, `cluster-api-address.service`
//! ([`crate::floating`]) on every master, once the node's API balancer,
//! through which it renews its Lease, runs (`api-balancer`); the Lease's
//! Role comes with the control-plane phase's `cluster-objects`.

use std::time::Duration;

use async_trait::async_trait;

use crate::engine::{Context, Outcome, Step, StepError};
use crate::paths::HostPaths;
use crate::services::Unit;

use super::api_balancer::{agent_daemon_running, agent_daemon_unit, sandboxed, start_agent_daemon};

pub const UNIT: &str = "cluster-api-address.service";
const START_WAIT: Duration = Duration::from_secs(30);

/// `cluster-api-address.service`. Adding an address and sending ARP take
/// CAP_NET_ADMIN and CAP_NET_RAW; it needs nothing else, and sees the
/// system read-only but for its view.
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
        "cluster-agent floating API address: held by one master, forwarded to every ready kube-apiserver",
        "api-address",
        &sandboxed(
            paths,
            "CAP_NET_ADMIN CAP_NET_RAW",
            "AF_INET AF_INET6 AF_UNIX AF_NETLINK AF_PACKET",
        ),
    )
}

pub struct ApiAddress;

#[async_trait]
impl Step for ApiAddress {
    fn name(&self) -> &'static str {
        "api-address"
    }
    fn summary(&self) -> &'static str {
        "with floating_endpoint: true, install, enable and start cluster-api-address.service (the masters elect who holds control_plane_endpoint)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        if ctx.config.cluster.floating_endpoint.is_none() {
            return Ok(false);
        }
        let unit = render_unit(&ctx.paths, &ctx.node, &super::join_service::agent_path()?);
        agent_daemon_running(ctx, &unit).await
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        if ctx.config.cluster.floating_endpoint.is_none() {
            return Ok(Outcome::Skipped(
                "control_plane_endpoint is not floating (floating_endpoint: true would make the masters hold it)".into(),
            ));
        }
        let unit = render_unit(&ctx.paths, &ctx.node, &super::join_service::agent_path()?);
        start_agent_daemon(ctx, &unit, START_WAIT).await?;
        Ok(Outcome::Done)
    }
}
