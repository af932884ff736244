//! One module per subcommand. Each returns a [`CliError`] whose kind picks
//! the documented exit code.

mod api_address;
mod api_balancer;
mod gen_join_secret;
pub mod lab;
mod plan;
mod pod_routes;
mod render;
mod reset;
mod run;
mod serve;
mod serve_join;
mod status;
mod validate;

use crate::cli::{Cli, Command, GlobalArgs};
use crate::config::{self, ClusterConfig, ConfigError};
use crate::identity::IdentityError;
use crate::paths::HostPaths;
use crate::state::StateError;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_LOCKED: i32 = 3;
pub const EXIT_PROGRESSING: i32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Services(#[from] crate::services::ServicesError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(ConfigError::Invalid { .. })
            | CliError::Identity(_)
            | CliError::Config(ConfigError::Io { .. })
            | CliError::Usage(_) => EXIT_USAGE,
            CliError::State(StateError::Locked { .. }) => EXIT_LOCKED,
            _ => EXIT_FAILURE,
        }
    }
}

/// Resolves the host paths, honouring the seed scripts' `CONFIG_DIR`.
pub fn host_paths(global: &GlobalArgs) -> HostPaths {
    let config_dir = global
        .config_dir
        .clone()
        .or_else(|| std::env::var_os("CONFIG_DIR").map(Into::into));
    HostPaths::new(
        &global.root,
        config_dir.as_deref(),
        global.state_dir.as_deref(),
    )
}

/// `auto` picks systemd exactly when systemd is PID 1 under the root (the
/// check `sd_booted()` makes), so a temp-root run never drives the host's.
pub(crate) fn services_backend(
    choice: crate::cli::ServicesArg,
    paths: &HostPaths,
) -> crate::services::Backend {
    use crate::cli::ServicesArg;
    use crate::services::Backend;
    match choice {
        ServicesArg::Systemd => Backend::Systemd,
        ServicesArg::Process => Backend::Process,
        ServicesArg::Auto if paths.host("/run/systemd/system").is_dir() => Backend::Systemd,
        ServicesArg::Auto => Backend::Process,
    }
}

pub fn load_config(paths: &HostPaths) -> Result<ClusterConfig, CliError> {
    Ok(config::load(paths.config_dir())?)
}

/// Runs a parsed command line; returns the process exit code.
pub async fn dispatch(cli: Cli) -> i32 {
    let paths = host_paths(&cli.global);
    let global = &cli.global;
    let result = match &cli.command {
        Command::Run => run::run(global, &paths).await,
        Command::Plan(args) => plan::plan(global, &paths, args),
        Command::Validate => validate::validate(global, &paths),
        Command::Status(args) => status::status(global, &paths, args).await,
        Command::Reset(args) => reset::reset(global, &paths, args).await,
        Command::GenJoinSecret(args) => gen_join_secret::gen_join_secret(&paths, args),
        Command::ServeJoin(args) => serve_join::serve_join(global, &paths, args).await,
        Command::PodRoutes => pod_routes::pod_routes(global, &paths).await,
        Command::ApiBalancer => api_balancer::api_balancer(global, &paths).await,
        Command::ApiAddress => api_address::api_address(global, &paths).await,
        Command::Render(command) => render::render(global, &paths, command),
        Command::Serve(args) => serve::serve(&paths, args).await,
        Command::Lab(command) => lab::lab(command).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cluster-agent: {}", crate::error_chain(&e));
            e.exit_code()
        }
    }
}

pub fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("output serialises")
    );
}

/// This node as the agent sees it: who, by which evidence, in which roles.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Target {
    pub node: String,
    pub role: crate::role::Role,
    pub ceph_role: crate::role::CephRole,
    pub identity: crate::identity::IdentitySource,
}

pub fn target<'c>(
    global: &GlobalArgs,
    paths: &HostPaths,
    config: &'c ClusterConfig,
) -> Result<(&'c config::NodeSpec, Target), CliError> {
    let (node, identity) = crate::identity::resolve(paths, config, global.node.as_deref())?;
    Ok((
        node,
        Target {
            node: node.name.clone(),
            role: crate::role::decide(config, node),
            ceph_role: crate::role::decide_ceph(config, node),
            identity,
        },
    ))
}
