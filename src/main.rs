use clap::Parser;

use cluster_agent::cli::Cli;

fn main() {
    let cli = Cli::parse();
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
