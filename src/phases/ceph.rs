//! Phase `ceph` (ceph-mon nodes): seed the monitor quorum on the first
//! monitor, grow it on the others. It requires only the `node` phase:
//! storage never waits for, or fails with, Kubernetes.
//!
//! The decision — seed a new cluster or join the existing one, and the fsid
//! — is written to `ceph-bootstrap.json` before anything acts on it, so a
//! crash never makes a second cluster.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ceph::{self, CephBootstrap, CephKey, KeyringEntry};
use crate::config::NodeRole;
use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::fsutil::{self, PUBLIC_MODE, SECRET_MODE};
use crate::role::CephRole;
use crate::services::{self, ActiveState, RestartPolicy, ServiceSection, ServiceType, Unit};
use crate::wait::{self, Backoff, Poll};

pub const PHASE: &str = "ceph";
pub const RECORD_FILE: &str = "ceph-bootstrap.json";
/// The keyring a monitor's store starts with: `mon.`, `client.admin`,
/// `client.bootstrap-osd`. Identical on every monitor; the join service
/// ships it to new ones.
pub const MON_KEYRING_FILE: &str = "ceph-mon.keyring";
/// Written into the mon data dir after `--mkfs` succeeded: a dir without
/// it is half-initialised and is made again.
const MKFS_DONE: &str = "done";
/// A peer whose monitor port does not accept a TCP connection in this time
/// is taken as not running a monitor.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Joining monitors wait for the first one (and its join service).
const JOIN_WAIT: Duration = Duration::from_secs(300);
/// A monitor added to a running quorum needs an election (~5 s).
const QUORUM_WAIT: Duration = Duration::from_secs(300);
/// A manager reports to the monitors within a few seconds of its start;
/// the monitors must be in quorum to take its report.
const MGR_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Formation {
    /// This monitor founds the cluster with a monmap of itself.
    Seed,
    /// This monitor joins the quorum that exists.
    Join,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephRecord {
    pub formation: Formation,
    pub fsid: String,
}

/// The monitor's store, the manager's key, and what the phase writes under
/// /etc/ceph and for OSDs; a rejoin fetches them again.
fn owns(paths: &crate::paths::HostPaths, node: Option<&crate::config::NodeSpec>) -> Vec<PathBuf> {
    node.into_iter()
        .flat_map(|n| [ceph::mon_data_dir(paths, n), ceph::mgr_data_dir(paths, n)])
        .chain(
            [
                ceph::CONF_FILE,
                ceph::ADMIN_KEYRING,
                ceph::BOOTSTRAP_OSD_KEYRING,
            ]
            .map(|p| paths.host(p)),
        )
        .collect()
}

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![super::node::PHASE],
        owns,
        steps: vec![
            Box::new(Discover),
            Box::new(Keys),
            Box::new(Configure),
            Box::new(Mkfs),
            Box::new(UnitConfig),
            Box::new(Start),
            Box::new(MgrKey),
            Box::new(MgrUnitConfig),
            Box::new(MgrStart),
        ],
    }
}

pub fn unit_name(node: &crate::config::NodeSpec) -> String {
    format!("ceph-mon@{}.service", ceph::mon_id(node))
}

pub fn mgr_unit_name(node: &crate::config::NodeSpec) -> String {
    format!("ceph-mgr@{}.service", ceph::mgr_id(node))
}

/// The monitor's unit: Debian's `ceph-mon@.service` made concrete, with
/// every path under the root.
pub fn render_unit(paths: &crate::paths::HostPaths, node: &crate::config::NodeSpec) -> Unit {
    daemon_unit(
        paths,
        node,
        unit_name(node),
        format!("Ceph monitor {}", ceph::mon_id(node)),
        ceph::MON_BINARY,
        ceph::mon_id(node),
    )
}

/// The manager's unit, Debian's `ceph-mgr@.service` made concrete.
pub fn render_mgr_unit(paths: &crate::paths::HostPaths, node: &crate::config::NodeSpec) -> Unit {
    daemon_unit(
        paths,
        node,
        mgr_unit_name(node),
        format!("Ceph manager {}", ceph::mgr_id(node)),
        ceph::MGR_BINARY,
        ceph::mgr_id(node),
    )
}

/// A Ceph daemon in the foreground on this node's cluster address, reading
/// the agent's ceph.conf and the operator's `CEPH_ARGS` overrides.
fn daemon_unit(
    paths: &crate::paths::HostPaths,
    node: &crate::config::NodeSpec,
    name: String,
    description: String,
    binary: &str,
    id: &str,
) -> Unit {
    Unit {
        name,
        description,
        after: vec!["network-online.target".into()],
        wants: vec!["network-online.target".into()],
        requires: vec![],
        service: ServiceSection {
            type_: ServiceType::Simple,
            exec_start: vec![
                binary.into(),
                "-f".into(),
                "--cluster".into(),
                ceph::CLUSTER.into(),
                "--id".into(),
                id.into(),
                "-c".into(),
                paths.host(ceph::CONF_FILE).to_string_lossy().into_owned(),
                "--public-addr".into(),
                node.ip.to_string(),
            ],
            environment: Default::default(),
            environment_file: Some(services::EnvironmentFile {
                path: paths.host(ceph::DEFAULTS_FILE),
                optional: true,
                vars: Default::default(),
            }),
            working_directory: None,
            restart: Some(RestartPolicy::OnFailure),
            restart_sec: Some(Duration::from_secs(10)),
            timeout_start_sec: None,
            timeout_stop_sec: None,
            limit_nofile: Some(1_048_576),
        },
        install: services::InstallSection {
            wanted_by: vec!["multi-user.target".into()],
        },
        systemd_only: Vec::new(),
    }
}

fn record_path(ctx: &Context) -> PathBuf {
    ctx.paths.state_file(RECORD_FILE)
}

fn keyring_path(ctx: &Context) -> PathBuf {
    ctx.paths.state_file(MON_KEYRING_FILE)
}

pub fn load_record(paths: &crate::paths::HostPaths) -> Result<Option<CephRecord>, StepError> {
    super::load_record(&paths.state_file(RECORD_FILE))
}

fn require_record(ctx: &Context) -> Result<CephRecord, StepError> {
    load_record(&ctx.paths)?.ok_or_else(|| {
        StepError::Precondition(format!(
            "{} is missing although ceph-discover completed; run `cluster-agent reset` on this node",
            record_path(ctx).display()
        ))
    })
}

/// What this monitor hands to monitors that join after it; `None` until it
/// has a store of its own.
pub fn read_bootstrap(paths: &crate::paths::HostPaths) -> Result<Option<CephBootstrap>, StepError> {
    let Some(record) = load_record(paths)? else {
        return Ok(None);
    };
    let Some(mon_keyring) = super::read_text(&paths.state_file(MON_KEYRING_FILE))? else {
        return Ok(None);
    };
    Ok(Some(CephBootstrap {
        fsid: record.fsid,
        mon_keyring,
    }))
}

async fn fetch_bootstrap(ctx: &Context) -> Result<CephBootstrap, StepError> {
    super::fetch_join_material(ctx, crate::join::Purpose::CephMon, JOIN_WAIT, |m| match m {
        crate::join::Material::CephMon(bootstrap) => Some(bootstrap),
        _ => None,
    })
    .await
}

struct Discover;

#[async_trait]
impl Step for Discover {
    fn name(&self) -> &'static str {
        "ceph-discover"
    }
    fn summary(&self) -> &'static str {
        "decide once: seed a new Ceph cluster (first monitor, no peer monitor answering) or join the quorum"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(load_record(&ctx.paths)?.is_some())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let peers = crate::role::ordered_nodes(&ctx.config, NodeRole::CephMon)
            .into_iter()
            .filter(|n| n.name != ctx.node.name)
            .map(|n| format!("{}:{}", n.ip, ceph::MSGR2_PORT));
        // The first monitor re-imaged while the others run must not found
        // a second cluster: it joins theirs.
        let running = if ctx.ceph_role == CephRole::MonFirst {
            super::first_listening(peers, PROBE_TIMEOUT).await
        } else {
            None
        };
        let record = match (ctx.ceph_role, running) {
            (CephRole::MonFirst, None) => CephRecord {
                formation: Formation::Seed,
                fsid: ceph::generate_fsid(),
            },
            (_, found) => {
                if let Some(peer) = found {
                    tracing::warn!(%peer, "a monitor already runs: joining its cluster instead of seeding one");
                }
                let bootstrap = fetch_bootstrap(ctx).await?;
                // The keyring first: the record says the decision is made
                // and everything it needs is here.
                fsutil::write_atomic(
                    &keyring_path(ctx),
                    bootstrap.mon_keyring.as_bytes(),
                    SECRET_MODE,
                )?;
                CephRecord {
                    formation: Formation::Join,
                    fsid: bootstrap.fsid,
                }
            }
        };
        super::save_record(&record_path(ctx), &record)?;
        tracing::info!(formation = ?record.formation, fsid = %record.fsid, "Ceph formation decided");
        Ok(Outcome::Done)
    }
}

struct Keys;

#[async_trait]
impl Step for Keys {
    fn name(&self) -> &'static str {
        "ceph-keys"
    }
    fn summary(&self) -> &'static str {
        "generate the mon., client.admin and client.bootstrap-osd keys (seed) or check the fetched ones"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(super::read_text(&keyring_path(ctx))?.is_some_and(|k| keyring_complete(&k)))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let record = require_record(ctx)?;
        if record.formation == Formation::Join {
            return Err(StepError::Precondition(format!(
                "{} is missing or incomplete although this monitor joined with fetched keys; \
                 run `cluster-agent reset` on this node",
                keyring_path(ctx).display()
            )));
        }
        let (mon, admin, osd) = (
            CephKey::generate(),
            CephKey::generate(),
            CephKey::generate(),
        );
        let text = ceph::render_keyring(&[
            KeyringEntry {
                entity: "mon.",
                key: &mon,
                caps: ceph::MON_CAPS,
            },
            KeyringEntry {
                entity: "client.admin",
                key: &admin,
                caps: ceph::ADMIN_CAPS,
            },
            KeyringEntry {
                entity: "client.bootstrap-osd",
                key: &osd,
                caps: ceph::BOOTSTRAP_OSD_CAPS,
            },
        ]);
        fsutil::write_atomic(&keyring_path(ctx), text.as_bytes(), SECRET_MODE)?;
        Ok(Outcome::Done)
    }
}

fn keyring_complete(text: &str) -> bool {
    ["mon.", "client.admin", "client.bootstrap-osd"]
        .iter()
        .all(|e| ceph::keyring_key(text, e).is_some())
}

/// ceph.conf and the two keyrings other tools look for, from the record
/// and the mon keyring.
fn rendered_files(ctx: &Context) -> Result<Vec<(PathBuf, String, u32)>, StepError> {
    let record = require_record(ctx)?;
    let keyring = super::read_text(&keyring_path(ctx))?.unwrap_or_default();
    let entry = |entity: &str, caps: &[(&str, &str)]| -> Result<String, StepError> {
        let key = ceph::keyring_key(&keyring, entity).ok_or_else(|| StepError::Corrupt {
            path: keyring_path(ctx),
            reason: format!("no key for {entity}"),
        })?;
        Ok(ceph::render_keyring(&[KeyringEntry {
            entity,
            key: &key,
            caps,
        }]))
    };
    Ok(vec![
        (
            ctx.paths.host(ceph::CONF_FILE),
            ceph::render_conf(&ctx.paths, &ctx.config, &record.fsid),
            PUBLIC_MODE,
        ),
        (
            ctx.paths.host(ceph::ADMIN_KEYRING),
            entry("client.admin", ceph::ADMIN_CAPS)?,
            SECRET_MODE,
        ),
        (
            ctx.paths.host(ceph::BOOTSTRAP_OSD_KEYRING),
            entry("client.bootstrap-osd", ceph::BOOTSTRAP_OSD_CAPS)?,
            SECRET_MODE,
        ),
    ])
}

struct Configure;

#[async_trait]
impl Step for Configure {
    fn name(&self) -> &'static str {
        "ceph-conf"
    }
    fn summary(&self) -> &'static str {
        "write /etc/ceph/ceph.conf (fsid, every monitor's v2+v1 address, networks, cephx) and the admin and bootstrap-osd keyrings"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        for (path, text, _) in rendered_files(ctx)? {
            if super::read_text(&path)?.as_deref() != Some(text.as_str()) {
                return Ok(false);
            }
        }
        Ok(true)
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        for (path, text, mode) in rendered_files(ctx)? {
            fsutil::write_atomic(&path, text.as_bytes(), mode)?;
        }
        Ok(Outcome::Done)
    }
}

struct Mkfs;

#[async_trait]
impl Step for Mkfs {
    fn name(&self) -> &'static str {
        "ceph-mon-mkfs"
    }
    fn summary(&self) -> &'static str {
        "create the monitor's store from a monmap (a new one when seeding, the quorum's when joining)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(ceph::mon_data_dir(&ctx.paths, &ctx.node)
            .join(MKFS_DONE)
            .exists())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let record = require_record(ctx)?;
        let data = ceph::mon_data_dir(&ctx.paths, &ctx.node);
        if data.exists() {
            // No `done`: a crash interrupted mkfs. Nothing in it was ever
            // served, so it is made again from scratch.
            tracing::warn!(dir = %data.display(), "removing a half-initialised monitor store");
            std::fs::remove_dir_all(&data).map_err(|e| io_error(&data, e))?;
        }
        for dir in ["/run/ceph", "/var/log/ceph", "/var/lib/ceph/mon"] {
            let dir = ctx.paths.host(dir);
            crate::fsutil::create_dir_all_durable(&dir).map_err(|e| io_error(&dir, e))?;
        }
        let conf = ctx.paths.host(ceph::CONF_FILE);
        let monmap = ctx.paths.state_file("ceph-monmap.tmp");
        match record.formation {
            Formation::Seed => ceph::create_seed_monmap(&monmap, &record.fsid, &ctx.node).await?,
            Formation::Join => {
                let admin = ctx.paths.host(ceph::ADMIN_KEYRING);
                ctx.progress.waiting("the Ceph quorum's monmap");
                wait::poll_until(
                    "the Ceph quorum's monmap (ceph mon getmap)",
                    JOIN_WAIT,
                    Backoff::remote(Duration::from_secs(5)),
                    || async {
                        match ceph::fetch_monmap(&conf, &admin, &monmap).await {
                            Ok(()) => Poll::Ready(()),
                            Err(e) => Poll::Pending(e.to_string()),
                        }
                    },
                )
                .await?;
            }
        }
        ceph::mkfs(&conf, &ctx.node, &monmap, &keyring_path(ctx)).await?;
        fsutil::write_atomic(&data.join(MKFS_DONE), b"", PUBLIC_MODE)?;
        let _ = std::fs::remove_file(&monmap);
        Ok(Outcome::Done)
    }
}

fn io_error(path: &std::path::Path, source: std::io::Error) -> StepError {
    StepError::Read {
        path: path.to_path_buf(),
        source,
    }
}

struct UnitConfig;

#[async_trait]
impl Step for UnitConfig {
    fn name(&self) -> &'static str {
        "ceph-mon-config"
    }
    fn summary(&self) -> &'static str {
        "install and enable the ceph-mon@<id> unit"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        daemon_unit_installed(ctx, &render_unit(&ctx.paths, &ctx.node)).await
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let unit = render_unit(&ctx.paths, &ctx.node);
        install_daemon_unit(ctx, &unit, ceph::MON_BINARY, "ceph-mon").await?;
        Ok(Outcome::Done)
    }
}

/// Installs and enables `unit` once `binary` is on the image.
async fn install_daemon_unit(
    ctx: &Context,
    unit: &Unit,
    binary: &str,
    package: &str,
) -> Result<(), StepError> {
    if !std::path::Path::new(binary).exists() {
        return Err(StepError::Precondition(format!(
            "{binary} is not present; this image must ship {package}"
        )));
    }
    services::install_unit(&ctx.paths, unit)?;
    ctx.services.daemon_reload().await?;
    ctx.services.enable(&unit.name).await?;
    Ok(())
}

async fn daemon_unit_installed(ctx: &Context, unit: &Unit) -> Result<bool, StepError> {
    Ok(services::unit_installed(&ctx.paths, unit)? && services::unit_enabled(&ctx.paths, unit))
}

struct Start;

impl Start {
    /// This monitor's status when it is in quorum, of the recorded cluster.
    async fn in_quorum(ctx: &Context) -> Result<Option<ceph::MonStatus>, StepError> {
        let status = match ceph::mon_status(&ceph::admin_socket(&ctx.paths, &ctx.node)).await {
            Ok(s) => s,
            Err(_) => return Ok(None),
        };
        let record = require_record(ctx)?;
        if status.monmap.fsid != record.fsid {
            return Err(StepError::Precondition(format!(
                "the monitor store {} belongs to Ceph cluster {}, but this node recorded {}; \
                 stop the monitor, move the store aside, run `cluster-agent reset --yes` and run again",
                ceph::mon_data_dir(&ctx.paths, &ctx.node).display(),
                status.monmap.fsid,
                record.fsid
            )));
        }
        Ok(status.in_quorum().then_some(status))
    }
}

#[async_trait]
impl Step for Start {
    fn name(&self) -> &'static str {
        "ceph-mon-start"
    }
    fn summary(&self) -> &'static str {
        "start the monitor and wait until it is in quorum"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(ctx
            .services
            .state(&unit_name(&ctx.node))
            .await?
            .active_state
            == ActiveState::Active
            && Self::in_quorum(ctx).await?.is_some())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let unit = unit_name(&ctx.node);
        let what = format!("monitor {} to join the quorum", ceph::mon_id(&ctx.node));
        let socket = ceph::admin_socket(&ctx.paths, &ctx.node);
        let status = super::start_until_ready(ctx, &unit, &what, QUORUM_WAIT, || async {
            match Self::in_quorum(ctx).await {
                Ok(Some(status)) => Poll::Ready(Ok(status)),
                Err(e) => Poll::Ready(Err(e)),
                Ok(None) => Poll::Pending(
                    ceph::mon_status(&socket)
                        .await
                        .map(|s| format!("state {}", s.state))
                        .unwrap_or_else(|e| e.to_string()),
                ),
            }
        })
        .await??;
        tracing::info!(quorum = ?status.quorum_names(), "monitor in quorum");
        Ok(Outcome::Done)
    }
}

/// ceph.conf and the admin keyring: how this node's steps ask the quorum.
pub(super) fn conf_and_admin(ctx: &Context) -> (PathBuf, PathBuf) {
    (
        ctx.paths.host(ceph::CONF_FILE),
        ctx.paths.host(ceph::ADMIN_KEYRING),
    )
}

struct MgrKey;

#[async_trait]
impl Step for MgrKey {
    fn name(&self) -> &'static str {
        "ceph-mgr-key"
    }
    fn summary(&self) -> &'static str {
        "get or create this node's mgr.<id> key (caps mon 'allow profile mgr', osd and mds 'allow *') through the quorum"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let path = ceph::mgr_keyring(&ctx.paths, &ctx.node);
        let entity = ceph::mgr_entity(&ctx.node);
        Ok(super::read_text(&path)?.is_some_and(|k| ceph::keyring_key(&k, &entity).is_some()))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let (conf, admin) = conf_and_admin(ctx);
        let entity = ceph::mgr_entity(&ctx.node);
        // get-or-create: a crash after the cluster made the key and before
        // the file holds it gets the same key again.
        let key = match ceph::get_or_create_key(&conf, &admin, &entity, ceph::MGR_CAPS).await {
            Ok(key) => key,
            Err(ceph::CephError::Command {
                code: Some(ceph::EINVAL),
                ..
            }) => {
                return Err(StepError::Precondition(format!(
                    "the cluster refused to create {entity} (EINVAL), which it does when \
                     {entity} exists with other caps than a manager's (`ceph auth get \
                     {entity}` shows them); give it the documented ones (`ceph auth caps \
                     {entity} mon 'allow profile mgr' osd 'allow *' mds 'allow *'`) or remove \
                     it, and run again"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let text = ceph::render_keyring(&[KeyringEntry {
            entity: &entity,
            key: &key,
            caps: &[],
        }]);
        fsutil::write_atomic(
            &ceph::mgr_keyring(&ctx.paths, &ctx.node),
            text.as_bytes(),
            SECRET_MODE,
        )?;
        Ok(Outcome::Done)
    }
}

struct MgrUnitConfig;

#[async_trait]
impl Step for MgrUnitConfig {
    fn name(&self) -> &'static str {
        "ceph-mgr-config"
    }
    fn summary(&self) -> &'static str {
        "install and enable the ceph-mgr@<id> unit"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        daemon_unit_installed(ctx, &render_mgr_unit(&ctx.paths, &ctx.node)).await
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let unit = render_mgr_unit(&ctx.paths, &ctx.node);
        install_daemon_unit(ctx, &unit, ceph::MGR_BINARY, "ceph-mgr").await?;
        Ok(Outcome::Done)
    }
}

struct MgrStart;

impl MgrStart {
    async fn map(ctx: &Context) -> Result<ceph::MgrMap, ceph::CephError> {
        let (conf, admin) = conf_and_admin(ctx);
        ceph::mgr_map(&conf, &admin, Duration::from_secs(5)).await
    }
}

#[async_trait]
impl Step for MgrStart {
    fn name(&self) -> &'static str {
        "ceph-mgr-start"
    }
    fn summary(&self) -> &'static str {
        "start the manager and wait until the mgr map lists it, active or standby"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let id = ceph::mgr_id(&ctx.node);
        Ok(ctx
            .services
            .state(&mgr_unit_name(&ctx.node))
            .await?
            .active_state
            == ActiveState::Active
            && Self::map(ctx).await.is_ok_and(|m| m.serves(id)))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let id = ceph::mgr_id(&ctx.node);
        let what = format!("manager {id} to report to the monitors");
        let map =
            super::start_until_ready(ctx, &mgr_unit_name(&ctx.node), &what, MGR_WAIT, || async {
                match Self::map(ctx).await {
                    Ok(map) if map.serves(id) => Poll::Ready(map),
                    Ok(map) => Poll::Pending(format!(
                        "the mgr map has active {:?}, standbys {:?}",
                        map.active(),
                        map.standbys
                    )),
                    Err(e) => Poll::Pending(e.to_string()),
                }
            })
            .await?;
        tracing::info!(active = ?map.active(), standbys = ?map.standbys, "manager in the mgr map");
        Ok(Outcome::Done)
    }
}
