//! `serve-join`: the join service of this node, until SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{GlobalArgs, ServeJoinArgs};
use crate::join::server::{ApiTokens, HostMaterial, JoinServer, Limits};
use crate::join::{JoinError, JoinKeys};
use crate::paths::HostPaths;

use super::{CliError, EXIT_OK, load_config, target};

pub async fn serve_join(
    global: &GlobalArgs,
    paths: &HostPaths,
    args: &ServeJoinArgs,
) -> Result<i32, CliError> {
    let config = Arc::new(load_config(paths)?);
    let (node, _) = target(global, paths, &config)?;
    // A missing or exposed secret is configuration: restarting cannot fix
    // it (the unit's RestartPreventExitStatus=2).
    let keys = JoinKeys::load(paths, &config, node)
        .map_err(|e| CliError::Usage(crate::error_chain(&e)))?;
    let listen = args.listen.unwrap_or(SocketAddr::new(
        IpAddr::V4(node.ip),
        config.cluster.bootstrap.join_port,
    ));
    let tokens: Option<Arc<dyn crate::join::server::BootstrapTokens>> =
        node.is_control_plane().then(|| {
            Arc::new(ApiTokens::new(
                paths.host(crate::phases::control_plane::ADMIN_CONF),
                config.cluster.bootstrap.token_ttl,
            )) as _
        });
    let source = Arc::new(HostMaterial::new(paths.clone(), config.clone(), tokens));
    let server = JoinServer::new(
        keys,
        config.clone(),
        source,
        Limits {
            handshake_timeout: Duration::from_secs_f64(args.request_timeout),
            request_timeout: Duration::from_secs_f64(args.request_timeout),
            ..Limits::default()
        },
        vec![node.ip.to_string(), node.hostname.clone()],
    )
    .map_err(|e| CliError::Failed(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| JoinError::Bind {
            addr: listen.to_string(),
            source,
        })
        .map_err(|e| CliError::Failed(crate::error_chain(&e)))?;
    if node.is_control_plane() {
        tokio::spawn(approve_serving_csrs(
            paths.host(crate::phases::control_plane::ADMIN_CONF),
            config.clone(),
            node.name.clone(),
        ));
    }
    tracing::info!(%listen, node = %node.name, "join service listening");
    crate::notify::ready(&format!("serving join material on {listen}"));
    Arc::new(server).serve(listener, shutdown_signal()).await;
    tracing::info!("join service stopped");
    Ok(EXIT_OK)
}

pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// The serving-CSR approver, once this master's control plane is up.
async fn approve_serving_csrs(
    admin_conf: std::path::PathBuf,
    config: Arc<crate::config::ClusterConfig>,
    holder: String,
) {
    let mut backoff = crate::wait::Backoff::remote(Duration::from_secs(10));
    let client = loop {
        if admin_conf.exists() {
            match crate::k8s::client_from_kubeconfig(&admin_conf).await {
                Ok(client) => break client,
                Err(e) => tracing::debug!("approver waits for the API: {e}"),
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    };
    crate::k8s::approver::run(client, config, holder).await;
}
