//! `pod-routes`: the built-in pod network's route keeper
//! (`cluster-pod-routes.service` on every Kubernetes node), until SIGTERM.
//! It watches the Nodes with the kubelet's own identity and keeps one
//! route per other node's pod CIDR through that node's address
//! ([`crate::podnet`]), plus the NAT rule for pod traffic leaving the
//! cluster. READY=1 follows the first complete pass, so the kubelet phase
//! knows every existing node is reachable before it waits for Ready.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::cli::GlobalArgs;
use crate::paths::HostPaths;
use crate::podnet;

use super::{CliError, EXIT_OK, load_config, target};

/// Routes are checked again this often even without a Node event: someone
/// may have flushed them (a networkd restart drops foreign routes unless
/// told otherwise).
const RESYNC: Duration = Duration::from_secs(30);

pub async fn pod_routes(global: &GlobalArgs, paths: &HostPaths) -> Result<i32, CliError> {
    let config = load_config(paths)?;
    let (node, _) = target(global, paths, &config)?;
    let kubeconfig = paths.host(crate::phases::kubelet::KUBECONFIG);
    let client = crate::k8s::client_from_kubeconfig(&kubeconfig)
        .await
        .map_err(|e| CliError::Failed(crate::error_chain(&e)))?;
    let cluster_cidr = config.cluster.networking.pod_cidr;
    let api: kube::Api<Node> = kube::Api::all(client);
    let (store, writer) = reflector::store();
    let mut events = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .boxed();
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready = false;
    let shutdown = super::serve_join::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = events.next() => match event {
                None => {
                    return Err(CliError::Failed("the Node watch ended".into()));
                }
                Some(Err(e)) => {
                    // The watcher backs off and resumes by itself.
                    tracing::warn!("watching Nodes: {e}");
                    continue;
                }
                // Mid-relist the store is still partial: wait for its end.
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                Some(Ok(_)) => {}
            },
            _ = resync.tick() => {
                if !ready {
                    continue;
                }
            }
        }
        let nodes = store.state();
        let desired = podnet::desired_routes(nodes.iter().map(|n| n.as_ref()), &node.name);
        let own_cidr = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node.name.as_str()))
            .and_then(|n| crate::k8s::node::pod_cidr(n));
        let result = async {
            let changes = podnet::reconcile(&desired).await?;
            // A node on a loopback address shares the host's network
            // (tests, `lab` without --netns): its NAT table is the host's.
            if let Some(cidr) = own_cidr.filter(|_| !node.ip.is_loopback()) {
                podnet::ensure_masquerade(cidr, cluster_cidr).await?;
            }
            Ok::<_, podnet::PodNetError>(changes)
        }
        .await;
        match result {
            Ok(changes) => {
                for r in &changes.replace {
                    tracing::info!(pod_cidr = %r.pod_cidr, via = %r.via, "route set");
                }
                for cidr in &changes.remove {
                    tracing::info!(pod_cidr = %cidr, "route removed");
                }
                if !ready {
                    ready = true;
                    crate::notify::ready(&format!("{} routes to other nodes' pods", desired.len()));
                }
            }
            Err(e) => tracing::error!("pod routes: {}", crate::error_chain(&e)),
        }
    }
    tracing::info!("pod route keeper stopped");
    Ok(EXIT_OK)
}
