use clap::Parser;

use cluster_agent::cli::Cli;

fn main() {
    let cli = Cli::parse();
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
