//! systemd backend over D-Bus (org.freedesktop.systemd1), never `systemctl`.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use zbus::OwnedObjectPath;
use zbus::proxy::CacheProperties;

use super::unit::{self, validate_unit_name};
use super::{
    ActiveState, DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT, ServiceManager, ServicesError,
    UnitState,
};
use crate::paths::HostPaths;
use crate::wait::{Backoff, Poll, poll_until};

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Systemd1Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reload(&self) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn enable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<(bool, Vec<(String, String, String)>)>;
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Systemd1Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Systemd1Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
}

/// Job mode for every job we queue: replace a conflicting queued job, as
/// `systemctl start` does.
const MODE: &str = "replace";

#[derive(Debug, Clone)]
pub struct SystemdManager {
    conn: zbus::Connection,
    manager: Systemd1ManagerProxy<'static>,
    /// To read TimeoutStartSec= from the unit files we install.
    paths: HostPaths,
}

impl SystemdManager {
    /// Connects to the system bus at [`super::system_bus_address`].
    pub async fn connect(paths: &HostPaths) -> Result<SystemdManager, ServicesError> {
        let conn = super::system_bus(paths)
            .await?
            .ok_or_else(|| ServicesError::NoSystemBus {
                path: paths.host(super::SYSTEM_BUS_SOCKET),
            })?;
        SystemdManager::with_connection(conn, paths.clone()).await
    }

    pub async fn with_connection(
        conn: zbus::Connection,
        paths: HostPaths,
    ) -> Result<SystemdManager, ServicesError> {
        let bus = |source| ServicesError::Bus {
            call: "Subscribe",
            unit: "systemd".into(),
            source,
        };
        let manager = Systemd1ManagerProxy::new(&conn).await.map_err(bus)?;
        // systemd only emits JobRemoved to subscribed clients.
        manager.subscribe().await.map_err(bus)?;
        Ok(SystemdManager {
            conn,
            manager,
            paths,
        })
    }

    async fn unit_proxy(&self, path: &OwnedObjectPath) -> zbus::Result<Systemd1UnitProxy<'static>> {
        // Uncached: we poll, and a cache would show stale values until a
        // PropertiesChanged signal arrives.
        Systemd1UnitProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
    }

    async fn read_state(&self, name: &str) -> zbus::Result<UnitState> {
        let path = self.manager.load_unit(name).await?;
        let unit = self.unit_proxy(&path).await?;
        let active_state = ActiveState::from_systemd(&unit.active_state().await?);
        let sub_state = unit.sub_state().await?;
        let service = Systemd1ServiceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let main_pid = service.main_pid().await?;
        Ok(UnitState {
            active_state,
            sub_state,
            main_pid: (main_pid != 0).then_some(main_pid),
        })
    }

    /// Queues a job and waits for its JobRemoved, then for the unit to settle
    /// in the goal state.
    async fn run_job(
        &self,
        name: &str,
        job_kind: Job,
        timeout: Duration,
    ) -> Result<(), ServicesError> {
        validate_unit_name(name)?;
        let action = job_kind.action();
        let up = job_kind.wants_up();
        let bus = |call| {
            move |source| ServicesError::Bus {
                call,
                unit: name.to_string(),
                source,
            }
        };
        // Subscribe before queueing: a job that finishes at once would
        // otherwise emit JobRemoved before we listen.
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(bus("AddMatch JobRemoved"))?;
        let job = match job_kind {
            Job::Start => self.manager.start_unit(name, MODE).await,
            Job::Stop => self.manager.stop_unit(name, MODE).await,
            Job::Restart => self.manager.restart_unit(name, MODE).await,
        }
        .map_err(bus(job_kind.call()))?;

        let timed_out = |what: String| ServicesError::Timeout {
            unit: name.to_string(),
            action,
            source: crate::wait::WaitTimeout {
                what,
                waited: timeout,
                last_seen: None,
            },
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(timeout, async {
            while let Some(signal) = removed.next().await {
                if let Ok(args) = signal.args()
                    && args.job == job
                {
                    return Some(args.result);
                }
            }
            None
        })
        .await
        .map_err(|_| timed_out(format!("job {} to finish", job.as_str())))?
        .ok_or_else(|| timed_out("JobRemoved (the bus connection closed)".into()))?;

        let remaining = timeout.saturating_sub(started.elapsed());
        let settled = poll_until(
            &format!(
                "{name} to become {}",
                if up { "active" } else { "inactive" }
            ),
            remaining,
            Backoff::local(),
            || async {
                match self.read_state(name).await {
                    Ok(s) => match (up, s.active_state) {
                        (true, ActiveState::Active)
                        | (_, ActiveState::Failed)
                        | (false, ActiveState::Inactive) => Poll::Ready(Ok(s)),
                        (_, other) => Poll::Pending(format!("{other:?}/{}", s.sub_state)),
                    },
                    Err(e) => Poll::Ready(Err(e)),
                }
            },
        )
        .await
        .map_err(|source| ServicesError::Timeout {
            unit: name.to_string(),
            action,
            source,
        })?
        .map_err(bus("Get ActiveState"))?;

        // A unit that failed while stopping is stopped all the same.
        let ok = result == "done" && (!up || settled.active_state == ActiveState::Active);
        if ok {
            Ok(())
        } else {
            Err(ServicesError::JobFailed {
                unit: name.to_string(),
                action,
                result,
                state: settled.active_state,
                sub_state: settled.sub_state,
            })
        }
    }

    /// systemd enforces the unit's own TimeoutStartSec= and fails the job;
    /// our deadline is a backstop just beyond it, in case the job hangs.
    fn start_timeout(&self, name: &str) -> Duration {
        let path = unit::unit_path(&self.paths, name);
        let from_file = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| unit::parse_unit(name, &text, &path).ok())
            .and_then(|u| u.service.timeout_start_sec);
        from_file.unwrap_or(DEFAULT_START_TIMEOUT) + BACKSTOP_MARGIN
    }
}

/// How much longer than systemd's own timeout we wait for a job.
const BACKSTOP_MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Job {
    Start,
    Stop,
    Restart,
}

impl Job {
    fn action(self) -> &'static str {
        match self {
            Job::Start => "start",
            Job::Stop => "stop",
            Job::Restart => "restart",
        }
    }
    fn call(self) -> &'static str {
        match self {
            Job::Start => "StartUnit",
            Job::Stop => "StopUnit",
            Job::Restart => "RestartUnit",
        }
    }
    /// Whether the unit should end up active.
    fn wants_up(self) -> bool {
        !matches!(self, Job::Stop)
    }
}

#[async_trait]
impl ServiceManager for SystemdManager {
    async fn daemon_reload(&self) -> Result<(), ServicesError> {
        // Reload replies only after systemd has re-read every unit file.
        self.manager
            .reload()
            .await
            .map_err(|source| ServicesError::Bus {
                call: "Reload",
                unit: "systemd".into(),
                source,
            })
    }

    async fn start(&self, name: &str) -> Result<(), ServicesError> {
        self.run_job(name, Job::Start, self.start_timeout(name))
            .await
    }

    async fn stop(&self, name: &str) -> Result<(), ServicesError> {
        self.run_job(name, Job::Stop, DEFAULT_STOP_TIMEOUT + BACKSTOP_MARGIN)
            .await
    }

    async fn restart(&self, name: &str) -> Result<(), ServicesError> {
        self.run_job(name, Job::Restart, self.start_timeout(name))
            .await
    }

    async fn state(&self, name: &str) -> Result<UnitState, ServicesError> {
        validate_unit_name(name)?;
        self.read_state(name)
            .await
            .map_err(|source| ServicesError::Bus {
                call: "LoadUnit/Get",
                unit: name.to_string(),
                source,
            })
    }

    async fn enable(&self, name: &str) -> Result<(), ServicesError> {
        validate_unit_name(name)?;
        let bus = |call| {
            move |source| ServicesError::Bus {
                call,
                unit: name.to_string(),
                source,
            }
        };
        self.manager
            .enable_unit_files(&[name], false, true)
            .await
            .map_err(bus("EnableUnitFiles"))?;
        // systemctl enable reloads too, so the new .wants links take effect.
        self.manager.reload().await.map_err(bus("Reload"))
    }
}
