//! `serve`: the bootstrap machine's server, until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::cli::{DEFAULT_TLS_PORT, ServeArgs};
use crate::fsutil;
use crate::paths::HostPaths;
use crate::provision::dnsmasq::{Dnsmasq, PxeError, PxeSettings};
use crate::provision::serve::{BootServer, NEIGHBOUR_TABLE, ServeError, ServeOptions};
use crate::provision::{Bundle, matchbox};

use super::render::cli_error;
use super::{CliError, EXIT_OK};

pub const DEFAULT_RUN_DIR: &str = "/run/cluster-agent/serve";
pub const PID_FILE: &str = "serve.pid";

#[derive(Debug, thiserror::Error)]
enum RunDirError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] fsutil::WriteError),
}

fn serve_error(e: ServeError) -> CliError {
    match e {
        ServeError::NotConcrete { .. }
        | ServeError::Interface { .. }
        | ServeError::Assets { .. } => CliError::Usage(crate::error_chain(&e)),
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

/// The signals serve answers, hooked before anything else happens, so that
/// a signal sent once the pid file exists never meets the default action
/// (which would leave the pid file and dnsmasq behind).
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn hook() -> Result<Signals, CliError> {
        let hook = |kind| {
            signal(kind).map_err(|e| CliError::Failed(format!("hooking signal {kind:?}: {e}")))
        };
        Ok(Signals {
            terminate: hook(SignalKind::terminate())?,
            interrupt: hook(SignalKind::interrupt())?,
            hangup: hook(SignalKind::hangup())?,
        })
    }
}

/// A machine may open a connection per listener and asset; the default
/// soft limit of 1024 descriptors would be the first thing a busy rack
/// (or a hostile client) exhausts.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("raising the open-file limit to {hard}: {e}");
    }
}

pub async fn serve(paths: &HostPaths, args: &ServeArgs) -> Result<i32, CliError> {
    let signals = Signals::hook()?;
    raise_open_file_limit();
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
    let server = Arc::new(BootServer::new(&bundle, options.clone()).map_err(serve_error)?);
    for asset in server.missing_assets() {
        tracing::warn!(
            "{asset} is missing from {}: machines fail to boot until it is there (Flatcar's PXE images, named by cluster.provisioning)",
            options.assets.display()
        );
    }
    let listeners = server.bind().map_err(serve_error)?;
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| paths.host(DEFAULT_RUN_DIR));
    let created = claim_run_dir(&run_dir).map_err(|e| CliError::Failed(crate::error_chain(&e)))?;
    let pid_file = run_dir.join(PID_FILE);
    let result = match fsutil::write_atomic(
        &pid_file,
        format!("{}\n", std::process::id()).as_bytes(),
        fsutil::PUBLIC_MODE,
    ) {
        Ok(()) => {
            serve_until_stopped(paths, args, &run_dir, signals, server, listeners, &options).await
        }
        Err(e) => Err(CliError::Failed(crate::error_chain(&e))),
    };
    let _ = fsutil::remove_durable(&pid_file);
    if created {
        let _ = std::fs::remove_dir(&run_dir);
    }
    result
}

/// Creates the run dir unless it exists; `true` when serve made it (and so
/// removes it on exit: an operator's own directory stays).
fn claim_run_dir(dir: &Path) -> Result<bool, RunDirError> {
    if dir.is_dir() {
        return Ok(false);
    }
    fsutil::create_dir_all_durable(dir).map_err(|source| RunDirError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(true)
}

async fn serve_until_stopped(
    paths: &HostPaths,
    args: &ServeArgs,
    run_dir: &Path,
    mut signals: Signals,
    server: Arc<BootServer>,
    listeners: (tokio::net::TcpListener, tokio::net::TcpListener),
    options: &ServeOptions,
) -> Result<i32, CliError> {
    let mut dnsmasq = match &args.pxe_interface {
        Some(interface) => {
            let settings =
                PxeSettings::for_interface(paths, interface, options.listen).map_err(pxe_error)?;
            Some(
                Dnsmasq::start(paths, run_dir, &settings)
                    .await
                    .map_err(pxe_error)?,
            )
        }
        None => None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.clone().serve(listeners, async move {
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
    let outcome = loop {
        let dnsmasq_exit = async {
            match dnsmasq.as_mut() {
                Some(d) => d.exited().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signals.terminate.recv() => break Ok(EXIT_OK),
            _ = signals.interrupt.recv() => break Ok(EXIT_OK),
            _ = signals.hangup.recv() => server.rearm(),
            status = dnsmasq_exit => break Err(CliError::Failed(format!(
                "dnsmasq exited ({}); PXE stopped, so serve stops too: its log is above",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
            ))),
        }
    };
    let _ = stop.send(());
    let _ = serving.await;
    if let Some(d) = dnsmasq {
        d.stop().await;
    }
    tracing::info!("serve stopped");
    outcome
}
