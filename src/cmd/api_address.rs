//! `api-address`: the floating endpoint's keeper
//! (`cluster-api-address.service` on every control-plane node when
//! cluster.yaml says `floating_endpoint: true`), until SIGTERM. It
//! campaigns for the Lease with its own identity through this node's API
//! balancer ([`crate::floating`]), holds the address while it wins, and
//! writes its view for `status` on every change. READY=1 once it has
//! removed any address a killed keeper left, before its first attempt.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::balancer::{self, Balancer};
use crate::cli::GlobalArgs;
use crate::floating::{self, Keeper};
use crate::paths::HostPaths;

use super::{CliError, EXIT_OK, load_config, target};

/// The Lease's client gives up on a silent API server this fast; the
/// keeper bounds every attempt anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn api_address(global: &GlobalArgs, paths: &HostPaths) -> Result<i32, CliError> {
    let config = load_config(paths)?;
    let (node, _) = target(global, paths, &config)?;
    let Some(address) = config.cluster.floating_endpoint else {
        return Err(CliError::Usage(
            "cluster.yaml does not say floating_endpoint: true; there is no address to hold".into(),
        ));
    };
    let failed = |e: &dyn std::error::Error| CliError::Failed(crate::error_chain(e));
    let address = SocketAddr::new(
        IpAddr::V4(address),
        config.cluster.control_plane_endpoint.port,
    );
    let interface = crate::hostnet::interface_with(node.ip).map_err(|e| failed(&e))?;
    let ca_path = paths.host(crate::phases::kubelet::CA_FILE);
    let ca = std::fs::read_to_string(&ca_path).map_err(|e| {
        CliError::Failed(format!(
            "cannot read the cluster CA {}: {e} (the pki phase writes it)",
            ca_path.display()
        ))
    })?;
    let proxy = Balancer::new(address, &ca)
        .map_err(|e| CliError::Failed(format!("{}: {e}", ca_path.display())))?;
    proxy.set_backends(&balancer::configured_backends(&config), &[]);
    let kubeconfig = paths.host(crate::phases::control_plane::API_ADDRESS_CONF);
    let client =
        crate::k8s::client_with_timeouts(&kubeconfig, CONNECT_TIMEOUT, floating::RENEW_DEADLINE)
            .await
            .map_err(|e| failed(&e))?;
    let keeper = Keeper {
        address,
        interface,
        node: node.name.clone(),
        elector: crate::k8s::lease::Elector::new(client, &node.name, floating::LEASE_DURATION),
        proxy,
    };
    tracing::info!(%address, interface = %keeper.interface.name, "campaigning for the floating endpoint");
    let view_file = paths.host(floating::VIEW_FILE);
    let mut ready = false;
    keeper
        .run(super::serve_join::shutdown_signal(), |view| {
            write_view(&view_file, view);
            if !ready {
                crate::notify::ready(&format!("campaigning for {address}"));
                ready = true;
            }
        })
        .await
        .map_err(|e| failed(&e))?;
    tracing::info!("floating endpoint keeper stopped");
    Ok(EXIT_OK)
}

fn write_view(path: &std::path::Path, view: &floating::View) {
    let text = serde_json::to_vec_pretty(view).expect("the view serialises");
    if let Err(e) = crate::fsutil::write_atomic(path, &text, 0o644) {
        tracing::warn!("{}", crate::error_chain(&e));
    }
}
