//! `api-balancer`: the node-local API balancer
//! (`cluster-api-balancer.service` on every Kubernetes node), until SIGTERM.
//! It forwards to the masters cluster.yaml lists and to those the API's
//! `kubernetes` EndpointSlice names (read with kube-proxy's identity, which
//! may list them, once kube-proxy has one), and writes its view for
//! `status` on every change. READY=1 once it listens.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::balancer::{self, Balancer};
use crate::cli::GlobalArgs;
use crate::paths::HostPaths;

use super::{CliError, EXIT_OK, load_config, target};

/// The API's list of masters is read this often; a master that joins is
/// in cluster.yaml already, so this only matters for ones added later.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

pub async fn api_balancer(global: &GlobalArgs, paths: &HostPaths) -> Result<i32, CliError> {
    let config = load_config(paths)?;
    let (node, _) = target(global, paths, &config)?;
    let ca_path = paths.host(crate::phases::kubelet::CA_FILE);
    let ca = std::fs::read_to_string(&ca_path).map_err(|e| {
        CliError::Failed(format!(
            "cannot read the cluster CA {}: {e} (the kubelet phase writes it)",
            ca_path.display()
        ))
    })?;
    let listen = balancer::listen_addr(node);
    let balancer = Balancer::new(listen, &ca)
        .map_err(|e| CliError::Failed(format!("{}: {e}", ca_path.display())))?;
    let configured = balancer::configured_backends(&config);
    balancer.set_backends(&configured, &[]);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::Failed(format!("cannot listen on {listen}: {e}")))?;
    tracing::info!(%listen, backends = configured.len(), "API balancer listening");
    crate::notify::ready(&format!("listening on {listen}"));

    let view_file = paths.host(balancer::VIEW_FILE);
    let writer = tokio::spawn(write_views(balancer.clone(), view_file));
    let kubeconfig = paths.host(crate::phases::kube_proxy::KUBECONFIG);
    let discovery = tokio::spawn(discover(balancer.clone(), configured, kubeconfig));
    balancer
        .serve(listener, super::serve_join::shutdown_signal())
        .await;
    writer.abort();
    discovery.abort();
    tracing::info!("API balancer stopped");
    Ok(EXIT_OK)
}

/// Changes closer together than this are written as one (connections
/// opening and closing by the hundred must not mean a write each).
const VIEW_COALESCE: Duration = Duration::from_millis(100);

/// Keeps [`balancer::VIEW_FILE`] equal to the balancer's view.
async fn write_views(balancer: Balancer, path: std::path::PathBuf) {
    let mut changes = balancer.changes();
    loop {
        changes.mark_unchanged();
        let text = serde_json::to_vec_pretty(&balancer.view()).expect("the view serialises");
        let written = path
            .parent()
            .map_or(Ok(()), crate::fsutil::create_dir_all_durable)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                crate::fsutil::write_atomic(&path, &text, 0o644).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::warn!("writing {}: {e}", path.display());
        }
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(VIEW_COALESCE).await;
    }
}

/// Adds the masters the API knows of beside cluster.yaml's.
async fn discover(balancer: Balancer, configured: Vec<SocketAddr>, kubeconfig: std::path::PathBuf) {
    let mut ticks = tokio::time::interval(DISCOVERY_INTERVAL);
    let mut learned = Vec::new();
    loop {
        ticks.tick().await;
        // Before kube-proxy has its identity, cluster.yaml is all there is.
        if !kubeconfig.exists() {
            continue;
        }
        match api_servers(&kubeconfig).await {
            Ok(found) if found != learned => {
                learned = found;
                balancer.set_backends(&configured, &learned);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("listing the API servers: {e}"),
        }
    }
}

/// The ready addresses of the `kubernetes` Service's EndpointSlices.
async fn api_servers(kubeconfig: &std::path::Path) -> Result<Vec<SocketAddr>, String> {
    let client = crate::k8s::client_from_kubeconfig(kubeconfig)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "default");
    let listed = slices
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await
        .map_err(|e| crate::error_chain(&e))?;
    let mut found: Vec<SocketAddr> = listed
        .items
        .iter()
        .flat_map(|slice| {
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some("https"))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok());
            slice
                .endpoints
                .iter()
                .flatten()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .flat_map(|e| e.addresses.iter())
                .filter_map(move |a| Some(SocketAddr::new(a.parse().ok()?, port?)))
        })
        .collect();
    found.sort();
    found.dedup();
    Ok(found)
}
