//! `serve`: the bootstrap machine's server, until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::cli::{DEFAULT_TLS_PORT, ServeArgs};
use crate::fsutil;
use crate::paths::HostPaths;
use crate::provision::dnsmasq::{Dnsmasq, PxeError, PxeSettings};
use crate::provision::serve::{BootServer, NEIGHBOUR_TABLE, ServeError, ServeOptions};
use crate::provision::{Bundle, matchbox};

use super::render::cli_error;
use super::serve_join::shutdown_signal;
use super::{CliError, EXIT_OK};

pub const DEFAULT_RUN_DIR: &str = "/run/cluster-agent/serve";
pub const PID_FILE: &str = "serve.pid";

fn serve_error(e: ServeError) -> CliError {
    match e {
        ServeError::Unspecified { .. } | ServeError::Assets { .. } => {
            CliError::Usage(crate::error_chain(&e))
        }
        other => CliError::Failed(crate::error_chain(&other)),
    }
}

fn pxe_error(e: PxeError) -> CliError {
    match e {
        PxeError::NoDnsmasq { .. }
        | PxeError::NoIpxe { .. }
        | PxeError::NoNetwork { .. }
        | PxeError::ListenElsewhere { .. } => CliError::Usage(crate::error_chain(&e)),
        other => CliError::Failed(crate::error_chain(&other)),
    }
}

pub async fn serve(paths: &HostPaths, args: &ServeArgs) -> Result<i32, CliError> {
    let bundle = Bundle::load(paths.config_dir()).map_err(cli_error)?;
    if let Err(e) = matchbox::require_macs(&bundle.config) {
        tracing::warn!("{e}");
    }
    let provisioning = &bundle.config.cluster.provisioning;
    let options = ServeOptions {
        listen: args.listen,
        tls_listen: args
            .tls_listen
            .unwrap_or(SocketAddr::new(args.listen.ip(), DEFAULT_TLS_PORT)),
        assets: args.assets.clone(),
        kernel: provisioning.kernel.clone(),
        initrd: provisioning.initrd.clone(),
        neighbour_table: NEIGHBOUR_TABLE.into(),
    };
    for asset in [&options.kernel, &options.initrd] {
        if !options.assets.join(asset).is_file() {
            tracing::warn!(
                "{} is missing: machines will fail to boot until it is there (Flatcar's PXE images, named by cluster.provisioning)",
                options.assets.join(asset).display()
            );
        }
    }
    let server = Arc::new(BootServer::new(&bundle, options.clone()).map_err(serve_error)?);
    let listeners = server.bind().await.map_err(serve_error)?;
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| paths.host(DEFAULT_RUN_DIR));
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        CliError::Failed(format!("{what} {}: {e}", run_dir.display()))
    };
    fsutil::create_dir_all_durable(&run_dir).map_err(|e| failed("creating", &e))?;
    let pid_file = run_dir.join(PID_FILE);
    fsutil::write_atomic(
        &pid_file,
        format!("{}\n", std::process::id()).as_bytes(),
        fsutil::PUBLIC_MODE,
    )
    .map_err(|e| failed("writing the pid file in", &e))?;

    let result = serve_until_stopped(paths, args, &run_dir, server, listeners, &options).await;
    let _ = fsutil::remove_durable(&pid_file);
    let _ = std::fs::remove_dir(&run_dir);
    result
}

async fn serve_until_stopped(
    paths: &HostPaths,
    args: &ServeArgs,
    run_dir: &std::path::Path,
    server: Arc<BootServer>,
    listeners: (tokio::net::TcpListener, tokio::net::TcpListener),
    options: &ServeOptions,
) -> Result<i32, CliError> {
    let mut dnsmasq = match &args.pxe_interface {
        Some(interface) => {
            let settings = PxeSettings::for_interface(paths, interface, options.listen, run_dir)
                .map_err(pxe_error)?;
            Some(
                Dnsmasq::start(paths, run_dir, &settings)
                    .await
                    .map_err(pxe_error)?,
            )
        }
        None => None,
    };
    let rearm = {
        let server = server.clone();
        async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hangup) = signal(SignalKind::hangup()) else {
                return std::future::pending().await;
            };
            while hangup.recv().await.is_some() {
                server.rearm();
            }
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listeners, async move {
        let _ = stopped.await;
    }));
    eprintln!(
        "serving iPXE and assets on http://{}, Ignition on https://{}{}; power on your nodes (Ctrl-C stops, SIGHUP re-arms every node)",
        options.listen,
        options.tls_listen,
        args.pxe_interface
            .as_deref()
            .map(|i| format!(", PXE on {i}"))
            .unwrap_or_default()
    );
    let dnsmasq_exit = async {
        match dnsmasq.as_mut() {
            Some(d) => d.exited().await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(EXIT_OK),
        _ = rearm => Ok(EXIT_OK),
        status = dnsmasq_exit => Err(CliError::Failed(format!(
            "dnsmasq exited ({}); PXE stopped, so serve stops too: its log is above",
            status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
        ))),
    };
    let _ = stop.send(());
    let _ = serving.await;
    if let Some(d) = dnsmasq {
        d.stop().await;
    }
    tracing::info!("serve stopped");
    outcome
}
