//! Phase `container-runtime`: containerd on every node that runs a kubelet,
//! serving the CRI on `<root>/run/containerd/containerd.sock` before the
//! kubelet starts (its `PreInitRuntimeService` asks the runtime's version
//! first and exits when nothing answers).
//!
//! What containerd runs with is [`crate::containerd`]'s: the config it
//! renders, the cgroup driver and the socket the kubelet uses too.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

use crate::containerd::{self, CONTAINERD, SHIM};
use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::fsutil::{self, PUBLIC_MODE};
use crate::paths::HostPaths;
use crate::services::{self, ActiveState, RestartPolicy, ServiceSection, ServiceType, Unit};
use crate::wait::{self, Backoff, Poll};

pub const PHASE: &str = "container-runtime";
/// The unit a kubelet unit orders itself `After=` and `Requires=`.
pub const UNIT: &str = "containerd.service";
/// Marked before the config or the unit changes, cleared once containerd
/// serves with them (`containerd-restart-due` in the state dir): a crash
/// between the write and the restart still leaves the restart due, so a
/// running containerd never keeps an old config because the file already
/// looks right.
const RESTART: super::RestartDue = super::RestartDue("containerd");
/// containerd is ready in seconds; the first start also creates its
/// databases.
const READY_WAIT: Duration = Duration::from_secs(120);
/// One CRI Version call, connect included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![super::node::PHASE],
        // containerd's images, snapshots and state, and its config.
        // Containers still running would keep their mounts under these
        // dirs: reset stops the pods first.
        owns: |paths, _| {
            [
                containerd::ROOT_DIR,
                containerd::STATE_DIR,
                containerd::CONFIG_FILE,
            ]
            .map(|p| paths.host(p))
            .to_vec()
        },
        steps: vec![
            Box::new(Binaries),
            Box::new(Config),
            Box::new(UnitConfig),
            Box::new(Start),
        ],
    }
}

/// `containerd.service`, after upstream's `containerd.service` (v2.2):
/// `Type=notify` (containerd sends `READY=1` once its plugins are loaded),
/// `Delegate=yes` (containerd and runc manage the containers' cgroups below
/// it), `KillMode=process` (stopping or restarting containerd leaves the
/// shims and their containers running), unlimited tasks, processes and
/// core dumps, and an OOM score that makes the kernel spare it. Not taken
/// over: `ExecStartPre=-/sbin/modprobe overlay` (the kernel loads overlay
/// by itself on the first overlay mount). `LimitNOFILE` is left unset as
/// upstream left it since containerd#8924: Go raises its own soft limit,
/// and containers then inherit the default 1024 rather than infinity.
pub fn render_unit(paths: &HostPaths) -> Unit {
    let exec_start = vec![
        file(&paths.binary(CONTAINERD)),
        "--config".into(),
        file(&paths.host(containerd::CONFIG_FILE)),
    ];
    let systemd_only = [
        ("Unit", "Documentation", "https://containerd.io"),
        ("Service", "Delegate", "yes"),
        ("Service", "KillMode", "process"),
        ("Service", "LimitNPROC", "infinity"),
        ("Service", "LimitCORE", "infinity"),
        ("Service", "TasksMax", "infinity"),
        ("Service", "OOMScoreAdjust", "-999"),
    ]
    .into_iter()
    .map(|(s, k, v)| (s.to_string(), k.to_string(), v.to_string()))
    .collect();
    Unit {
        name: UNIT.into(),
        description: "containerd container runtime".into(),
        after: vec!["network.target".into(), "dbus.service".into()],
        wants: vec![],
        requires: vec![],
        service: ServiceSection {
            type_: ServiceType::Notify,
            exec_start,
            environment: Default::default(),
            environment_file: None,
            working_directory: None,
            restart: Some(RestartPolicy::Always),
            restart_sec: Some(Duration::from_secs(5)),
            timeout_start_sec: None,
            timeout_stop_sec: None,
            limit_nofile: None,
        },
        install: services::InstallSection {
            wanted_by: vec!["multi-user.target".into()],
        },
        systemd_only,
    }
}

fn file(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn render_config(ctx: &Context) -> Result<String, StepError> {
    let inputs = containerd::ConfigInputs::detect(&ctx.paths, &ctx.config).map_err(|source| {
        StepError::Read {
            path: ctx.paths.host(containerd::ROOT_DIR),
            source,
        }
    })?;
    Ok(containerd::render_config(&inputs))
}

/// `containerd --version` → its major version (`containerd
/// github.com/containerd/containerd/v2 v2.2.9 <commit>` → 2).
async fn major_version(binary: &Path) -> Result<u64, StepError> {
    let text = super::version_output(binary).await?;
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix('v'))
        .find_map(|v| v.split('.').next()?.parse().ok())
        .ok_or_else(|| {
            StepError::Precondition(format!(
                "{} --version printed no version: {}",
                binary.display(),
                text.trim()
            ))
        })
}

struct Binaries;

#[async_trait]
impl Step for Binaries {
    fn name(&self) -> &'static str {
        "containerd-binaries"
    }
    fn summary(&self) -> &'static str {
        "find containerd 2, containerd-shim-runc-v2 (/opt/bin, /usr/bin) and runc (also /usr/sbin) in the image"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        if !containerd::missing_binaries(&ctx.paths).is_empty() {
            return Ok(false);
        }
        Ok(major_version(&ctx.paths.binary(CONTAINERD)).await? >= 2)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let missing = containerd::missing_binaries(&ctx.paths);
        let looked = ctx.paths.binary_dirs();
        if missing.contains(&CONTAINERD) && missing.contains(&SHIM) {
            // An image without a container runtime (storage only, or a
            // kubelet double): nothing to run; an image with containerd
            // finishes the phase on the next run.
            return Ok(Outcome::SkipRest(format!(
                "no containerd in {looked}: this image cannot run containers; install \
                 containerd 2, containerd-shim-runc-v2 and runc and run `cluster-agent run` again"
            )));
        }
        if !missing.is_empty() {
            return Err(StepError::Precondition(format!(
                "{} missing from {looked}{} while the rest of containerd is there; the image \
                 is incomplete",
                missing.join(", "),
                if missing.contains(&containerd::RUNC) {
                    " (runc also from /usr/sbin)"
                } else {
                    ""
                }
            )));
        }
        let binary = ctx.paths.binary(CONTAINERD);
        let major = major_version(&binary).await?;
        if major < 2 {
            return Err(StepError::Precondition(format!(
                "{} is containerd {major}.x; the agent renders containerd 2's configuration \
                 (version 3) and Kubernetes needs containerd 2.0.6 or newer: put containerd 2 \
                 in {looked}",
                binary.display()
            )));
        }
        Ok(Outcome::Done)
    }
}

struct Config;

#[async_trait]
impl Step for Config {
    fn name(&self) -> &'static str {
        "containerd-config"
    }
    fn summary(&self) -> &'static str {
        "write /etc/containerd/config.toml (CRI on, cgroup driver, snapshotter, CNI dirs, sandbox image, all under --root)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let path = ctx.paths.host(containerd::CONFIG_FILE);
        Ok(super::read_text(&path)?.as_deref() == Some(render_config(ctx)?.as_str()))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let text = render_config(ctx)?;
        RESTART.mark(ctx)?;
        fsutil::write_atomic(
            &ctx.paths.host(containerd::CONFIG_FILE),
            text.as_bytes(),
            PUBLIC_MODE,
        )?;
        Ok(Outcome::Done)
    }
}

struct UnitConfig;

#[async_trait]
impl Step for UnitConfig {
    fn name(&self) -> &'static str {
        "containerd-unit"
    }
    fn summary(&self) -> &'static str {
        "install and enable containerd.service (Type=notify, Delegate=yes, KillMode=process)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let unit = render_unit(&ctx.paths);
        Ok(services::unit_installed(&ctx.paths, &unit)?
            && services::unit_enabled(&ctx.paths, &unit))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let unit = render_unit(&ctx.paths);
        if !services::unit_installed(&ctx.paths, &unit)? {
            RESTART.mark(ctx)?;
            services::install_unit(&ctx.paths, &unit)?;
        }
        ctx.services.daemon_reload().await?;
        ctx.services.enable(UNIT).await?;
        Ok(Outcome::Done)
    }
}

/// The runtime's version over the CRI, for the readiness wait.
async fn probe(socket: &Path) -> Poll<containerd::RuntimeVersion> {
    match containerd::cri::version(socket, PROBE_TIMEOUT).await {
        Ok(v) => Poll::Ready(v),
        Err(e) => Poll::Pending(crate::error_chain(&e)),
    }
}

struct Start;

#[async_trait]
impl Step for Start {
    fn name(&self) -> &'static str {
        "containerd-start"
    }
    fn summary(&self) -> &'static str {
        "start containerd (restart it when its config or unit changed) and wait until the CRI answers Version"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        if RESTART.pending(ctx) {
            return Ok(false);
        }
        let socket = containerd::cri_socket(&ctx.paths);
        Ok(containerd::cri::version(&socket, PROBE_TIMEOUT)
            .await
            .is_ok())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let socket = containerd::cri_socket(&ctx.paths);
        let what = format!("the CRI to answer on {}", socket.display());
        let running = ctx.services.state(UNIT).await?.active_state == ActiveState::Active;
        let version = if running && RESTART.pending(ctx) {
            // Running with an older config or unit: pick the new ones up.
            ctx.services.restart(UNIT).await?;
            ctx.progress.waiting(&what);
            wait::poll_until(&what, READY_WAIT, Backoff::local(), || probe(&socket)).await?
        } else {
            super::start_until_ready(ctx, UNIT, &what, READY_WAIT, || probe(&socket)).await?
        };
        RESTART.clear(ctx)?;
        tracing::info!(
            runtime = %version.runtime_name,
            version = %version.runtime_version,
            cri = %version.runtime_api_version,
            "the CRI answers on {}",
            socket.display()
        );
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_containerd_with_the_config_under_the_root() {
        let paths = HostPaths::new(Path::new("/tmp/n1"), None, None);
        let unit = render_unit(&paths);
        assert_eq!(
            unit.service.exec_start,
            [
                "/tmp/n1/opt/bin/containerd",
                "--config",
                "/tmp/n1/etc/containerd/config.toml"
            ]
        );
        let text = unit.render().unwrap();
        for line in [
            "Type=notify",
            "Delegate=yes",
            "KillMode=process",
            "Restart=always",
            "TasksMax=infinity",
            "OOMScoreAdjust=-999",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line}\n{text}");
        }
        // What the process backend reads back is what was rendered.
        let parsed = services::parse_unit(UNIT, &text, Path::new("containerd.service")).unwrap();
        assert_eq!(parsed, unit);
    }
}
