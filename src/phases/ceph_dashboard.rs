//! Phase `ceph-dashboard` (monitors on masters, with `ceph.dashboard:
//! true`): Ceph's dashboard served by the managers over HTTPS, as the
//! design's runbook enables it after seeding.
//!
//! Each manager gets its own certificate from the cluster CA (its node's
//! name and address) and listens on its node's address: a standby answers
//! there too, redirecting to the active one. The cluster-wide admin
//! account's password is generated once, by the first monitor in
//! cluster.yaml's order, and kept in the monitors' config-key store, so
//! every monitor node (and a node reset and rejoined) writes the same 0600
//! file. The other monitors wait for it, so their dashboard phase waits
//! for the first monitor's, which needs that master's PKI: the dashboard
//! (never the monitors or managers) waits for Kubernetes.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};

use super::ceph::conf_and_admin;
use crate::ceph;
use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::fsutil::{self, SECRET_MODE};
use crate::pki::CertKeyPaths;
use crate::wait::{self, Backoff, Poll};

pub const PHASE: &str = "ceph-dashboard";
const DIR: &str = "/etc/ceph/dashboard";
/// The admin account's password, readable by root only.
pub const PASSWORD_FILE: &str = "/etc/ceph/dashboard/admin-password";
pub const ADMIN_USER: &str = "admin";
const ADMIN_ROLE: &str = "administrator";
const MODULE: &str = "dashboard";
/// Where Debian's ceph-mgr-dashboard puts the module.
const MODULE_DIR: &str = "/usr/share/ceph/mgr/dashboard";
const PACKAGE: &str = "ceph-mgr-dashboard";
/// The dashboard's cluster-wide certificate, which a manager without its
/// own serves.
const SHARED_CERT: &str = "mgr/dashboard/crt";
/// The password in the monitors' store; only `client.admin` reads it.
const PASSWORD_KEY: &str = "cluster-agent/ceph-dashboard/admin-password";
/// Generated passwords: 24 of 62 characters, 142 bits.
const PASSWORD_LEN: usize = 24;
/// The module starts its web server a few seconds after it is enabled.
const SERVE_WAIT: Duration = Duration::from_secs(120);
/// The other monitors wait this long for the first one's password.
const PASSWORD_WAIT: Duration = Duration::from_secs(300);
/// The manager restart owed after its dashboard settings changed.
const RESTART: super::RestartDue = super::RestartDue("ceph-dashboard-mgr");

fn owns(paths: &crate::paths::HostPaths, _: Option<&crate::config::NodeSpec>) -> Vec<PathBuf> {
    vec![paths.host(DIR)]
}

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        // The CA comes with the etcd phase's PKI; the managers with ceph.
        requires: vec![super::ceph::PHASE, super::etcd::PHASE],
        owns,
        steps: vec![
            Box::new(Certificate),
            Box::new(Settings),
            Box::new(Enable),
            Box::new(Admin),
        ],
    }
}

fn cert_paths(ctx: &Context) -> CertKeyPaths {
    CertKeyPaths {
        cert: ctx.paths.host(format!("{DIR}/dashboard.crt")),
        key: ctx.paths.host(format!("{DIR}/dashboard.key")),
    }
}

/// Where the dashboard reads manager `id`'s own settings: a config option
/// for its address, config-keys for its certificate and key.
struct SettingNames {
    address: String,
    cert: String,
    key: String,
}

fn setting_names(id: &str) -> SettingNames {
    SettingNames {
        address: format!("mgr/dashboard/{id}/server_addr"),
        cert: format!("mgr/dashboard/{id}/crt"),
        key: format!("mgr/dashboard/{id}/key"),
    }
}

/// What a manager's dashboard settings are in the cluster, to delete when
/// the node is reset: (config options, config-keys).
pub fn cluster_settings(id: &str) -> (Vec<String>, Vec<String>) {
    let names = setting_names(id);
    (vec![names.address], vec![names.cert, names.key])
}

/// This node's values for [`SettingNames`]: its address and the PEM files.
struct Wanted {
    names: SettingNames,
    address: String,
    cert: String,
    key: String,
}

fn wanted_settings(ctx: &Context) -> Result<Wanted, StepError> {
    let at = cert_paths(ctx);
    let read = |path: &PathBuf| {
        super::read_text(path)?.ok_or_else(|| {
            StepError::Precondition(format!(
                "{} is missing although ceph-dashboard-cert completed; run again",
                path.display()
            ))
        })
    };
    Ok(Wanted {
        names: setting_names(ceph::mgr_id(&ctx.node)),
        address: ctx.node.ip.to_string(),
        cert: read(&at.cert)?,
        key: read(&at.key)?,
    })
}

struct Certificate;

#[async_trait]
impl Step for Certificate {
    fn name(&self) -> &'static str {
        "ceph-dashboard-cert"
    }
    fn summary(&self) -> &'static str {
        "issue this manager's dashboard certificate (RSA, the node's name and address) from the cluster CA"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(crate::pki::ceph_dashboard_cert_current(
            &ctx.paths,
            &ctx.node,
            &cert_paths(ctx),
        )?)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let outcome =
            crate::pki::ensure_ceph_dashboard_cert(&ctx.paths, &ctx.node, &cert_paths(ctx))?;
        tracing::info!(?outcome, "dashboard certificate");
        Ok(Outcome::Done)
    }
}

struct Settings;

/// This manager's dashboard settings in the cluster against the wanted ones.
#[derive(PartialEq, Eq)]
enum Stored {
    Current,
    /// Never set, nor the cluster-wide certificate: a manager that runs
    /// the dashboard waits for them (it looks every few seconds) and needs
    /// no restart.
    Missing,
    /// Set to other values, which a running dashboard has loaded.
    Stale,
}

impl Settings {
    async fn stored(ctx: &Context) -> Result<Stored, StepError> {
        let (conf, admin) = conf_and_admin(ctx);
        let wanted = wanted_settings(ctx)?;
        let address = ceph::config_get(&conf, &admin, "mgr", &wanted.names.address).await?;
        let cert = ceph::config_key_get(&conf, &admin, &wanted.names.cert).await?;
        let key = ceph::config_key_get(&conf, &admin, &wanted.names.key).await?;
        let (Some(cert), Some(key)) = (cert, key) else {
            // Without its own, a dashboard serves the cluster-wide one
            // (an operator's `create-self-signed-cert`, say).
            let shared = ceph::config_key_get(&conf, &admin, SHARED_CERT).await?;
            return Ok(if shared.is_some() {
                Stored::Stale
            } else {
                Stored::Missing
            });
        };
        Ok(
            if address == wanted.address
                && cert == wanted.cert
                && ceph::secret_eq(&key, &wanted.key)
            {
                Stored::Current
            } else {
                Stored::Stale
            },
        )
    }
}

#[async_trait]
impl Step for Settings {
    fn name(&self) -> &'static str {
        "ceph-dashboard-settings"
    }
    fn summary(&self) -> &'static str {
        "give this manager's dashboard its address and certificate in the cluster's config; restart the manager if its dashboard runs on older ones"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        // Without the module the monitors do not know its options: let
        // apply say which package is missing.
        if module_installed(std::path::Path::new(MODULE_DIR)).is_err() {
            return Ok(false);
        }
        Ok(!RESTART.pending(ctx) && Self::stored(ctx).await? == Stored::Current)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        module_installed(std::path::Path::new(MODULE_DIR))?;
        let (conf, admin) = conf_and_admin(ctx);
        // A manager that loaded the dashboard keeps what it read then.
        let enabled = ceph::mgr_modules(&conf, &admin)
            .await?
            .enabled_modules
            .iter()
            .any(|m| m == MODULE);
        if enabled && Self::stored(ctx).await? == Stored::Stale {
            RESTART.mark(ctx)?;
        }
        let wanted = wanted_settings(ctx)?;
        ceph::config_set(&conf, &admin, "mgr", &wanted.names.address, &wanted.address).await?;
        let at = cert_paths(ctx);
        ceph::config_key_set_from(&conf, &admin, &wanted.names.cert, &at.cert).await?;
        ceph::config_key_set_from(&conf, &admin, &wanted.names.key, &at.key).await?;
        RESTART
            .settle(ctx, &super::ceph::mgr_unit_name(&ctx.node))
            .await?;
        Ok(Outcome::Done)
    }
}

struct Enable;

#[async_trait]
impl Step for Enable {
    fn name(&self) -> &'static str {
        "ceph-dashboard-enable"
    }
    fn summary(&self) -> &'static str {
        "enable the managers' dashboard module and wait until the active manager serves it"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let (conf, admin) = conf_and_admin(ctx);
        let modules = ceph::mgr_modules(&conf, &admin).await?;
        Ok(modules.enabled_modules.iter().any(|m| m == MODULE)
            && ceph::mgr_services(&conf, &admin, Duration::from_secs(5))
                .await?
                .contains_key(MODULE))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        module_installed(std::path::Path::new(MODULE_DIR))?;
        let (conf, admin) = conf_and_admin(ctx);
        ceph::mgr_module_enable(&conf, &admin, MODULE).await?;
        ctx.progress
            .waiting("the active manager to serve the dashboard");
        let url = wait::poll_until(
            "the active manager to serve the dashboard (ceph mgr services)",
            SERVE_WAIT,
            Backoff::remote(Duration::from_secs(2)),
            || async {
                match ceph::mgr_services(&conf, &admin, Duration::from_secs(5)).await {
                    Ok(services) => match services.get(MODULE) {
                        Some(url) => Poll::Ready(Ok(url.clone())),
                        // A module that cannot run on the active manager
                        // will not run by waiting.
                        None => match ceph::mgr_modules(&conf, &admin).await {
                            Ok(m) if m.cannot_run(MODULE).is_some() => {
                                Poll::Ready(Err(StepError::Precondition(format!(
                                    "the active manager cannot run the dashboard: {}; install \
                                     {PACKAGE} and its dependencies on every monitor node",
                                    m.cannot_run(MODULE).unwrap_or_default()
                                ))))
                            }
                            _ => Poll::Pending("no dashboard URL yet".into()),
                        },
                    },
                    Err(e) => Poll::Pending(e.to_string()),
                }
            },
        )
        .await??;
        tracing::info!(%url, "dashboard served");
        Ok(Outcome::Done)
    }
}

/// The dashboard module is on this node's image, or the step says which
/// package brings it.
fn module_installed(dir: &std::path::Path) -> Result<(), StepError> {
    if dir.join("module.py").exists() {
        Ok(())
    } else {
        Err(StepError::Precondition(format!(
            "ceph.dashboard is true, but {} is not on this node; install the {PACKAGE} package \
             (or set dashboard: false)",
            dir.display()
        )))
    }
}

struct Admin;

/// A dashboard command asked until the module answers: right after a
/// manager fail-over the new active one has not loaded it yet
/// (EOPNOTSUPP), and with no active manager the call runs into its
/// deadline (ETIMEDOUT).
async fn until_the_module_answers<T, F, Fut>(what: &str, call: F) -> Result<T, StepError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ceph::CephError>>,
{
    wait::poll_until(
        &format!("the dashboard module to answer ({what})"),
        SERVE_WAIT,
        Backoff::remote(Duration::from_secs(2)),
        || async {
            match call().await {
                Ok(value) => Poll::Ready(Ok(value)),
                Err(
                    e @ ceph::CephError::Command {
                        code: Some(ceph::EOPNOTSUPP | ceph::ETIMEDOUT),
                        ..
                    },
                ) => Poll::Pending(e.to_string()),
                Err(e) => Poll::Ready(Err(StepError::from(e))),
            }
        },
    )
    .await?
}

async fn admin_account_exists(ctx: &Context) -> Result<bool, StepError> {
    let (conf, admin) = conf_and_admin(ctx);
    until_the_module_answers("ceph dashboard ac-user-show", || {
        ceph::dashboard_user_exists(&conf, &admin, ADMIN_USER)
    })
    .await
}

/// The password file holds `password`.
fn file_holds(ctx: &Context, password: &str) -> Result<bool, StepError> {
    Ok(super::read_text(&ctx.paths.host(PASSWORD_FILE))?
        .is_some_and(|local| ceph::secret_eq(&local, password)))
}

#[async_trait]
impl Step for Admin {
    fn name(&self) -> &'static str {
        "ceph-dashboard-admin"
    }
    fn summary(&self) -> &'static str {
        "create the dashboard's admin account with a password the first monitor generates, kept in the monitors' store and 0600 in /etc/ceph/dashboard/admin-password"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let (conf, admin) = conf_and_admin(ctx);
        let Some(stored) = ceph::config_key_get(&conf, &admin, PASSWORD_KEY).await? else {
            return Ok(false);
        };
        Ok(file_holds(ctx, &stored)? && admin_account_exists(ctx).await?)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let (conf, admin) = conf_and_admin(ctx);
        let file = ctx.paths.host(PASSWORD_FILE);
        // One generator, chosen by cluster.yaml's order and not by who
        // seeded: a first monitor reset since, or a dashboard turned on
        // later, still has one.
        let generates = ctx.ceph_role == crate::role::CephRole::MonFirst;
        let stored = match ceph::config_key_get(&conf, &admin, PASSWORD_KEY).await? {
            Some(password) => password,
            None if generates => {
                // The file first: a crash before the store took it leaves
                // the same password to store on the next run.
                let password = match super::read_text(&file)? {
                    Some(p) if p.len() == PASSWORD_LEN => p,
                    _ => Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN),
                };
                fsutil::write_atomic(&file, password.as_bytes(), SECRET_MODE)?;
                ceph::config_key_set_from(&conf, &admin, PASSWORD_KEY, &file).await?;
                password
            }
            None => {
                ctx.progress
                    .waiting("the first monitor to create the dashboard's admin password");
                wait::poll_until(
                    "the first monitor to store the dashboard's admin password",
                    PASSWORD_WAIT,
                    Backoff::remote(Duration::from_secs(5)),
                    || async {
                        match ceph::config_key_get(&conf, &admin, PASSWORD_KEY).await {
                            Ok(Some(p)) => Poll::Ready(p),
                            Ok(None) => Poll::Pending("not stored yet".into()),
                            Err(e) => Poll::Pending(e.to_string()),
                        }
                    },
                )
                .await?
            }
        };
        if !file_holds(ctx, &stored)? {
            fsutil::write_atomic(&file, stored.as_bytes(), SECRET_MODE)?;
        }
        // Every monitor node may create it, and they start at once when the
        // password appears: they all hold the same one, so whoever loses
        // the race (EEXIST) has what it wanted.
        until_the_module_answers("ceph dashboard ac-user-create", || async {
            if ceph::dashboard_user_exists(&conf, &admin, ADMIN_USER).await? {
                return Ok(());
            }
            match ceph::dashboard_user_create(&conf, &admin, ADMIN_USER, &file, ADMIN_ROLE).await {
                Err(ceph::CephError::Command {
                    code: Some(ceph::EEXIST),
                    ..
                }) => Ok(()),
                other => other,
            }
        })
        .await?;
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_module_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let err = module_installed(&dir.path().join("dashboard")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("install the ceph-mgr-dashboard package"),
            "{text}"
        );
        std::fs::create_dir_all(dir.path().join("dashboard")).unwrap();
        std::fs::write(dir.path().join("dashboard/module.py"), "").unwrap();
        module_installed(&dir.path().join("dashboard")).unwrap();
    }
}
