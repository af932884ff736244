use clap::Parser;

use cluster_agent::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Plan(_) | Command::Validate) {
        // Reports get piped into `head` and `less`: end quietly on a closed
        // pipe, as Unix tools do. Commands that drive daemons keep Rust's
        // ignored SIGPIPE, so a closed socket or child pipe is an error to
        // handle, not sudden death.
        // SAFETY: no other thread exists yet, and SIG_DFL installs no handler.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    // One TLS provider for the whole process (etcd-client, reqwest, kube);
    // with two compiled in, rustls would refuse to pick.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cluster_agent::logging::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cluster-agent: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(cluster_agent::cmd::dispatch(cli));
    std::process::exit(code);
}
