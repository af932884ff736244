//! A test double of systemd's D-Bus API (org.freedesktop.systemd1), served on
//! a private dbus-daemon so the real `SystemdManager` is driven over a real
//! bus. It implements only what the agent calls, with scripted behaviour
//! chosen by unit name:
//!
//! * `broken.service`: the start job fails (`result = failed`, unit `failed`);
//! * `slow.service`: the job finishes, but the unit reports `activating` for
//!   the first [`SLOW_READS`] reads of ActiveState before turning `active`;
//! * anything else starts at once.
//!
//! Every job emits JobRemoved *before* the method reply: the worst case for
//! a client that subscribes too late.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use zbus::object_server::{ObjectServer, SignalEmitter};
use zbus::{OwnedObjectPath, fdo, interface};

pub const SLOW_READS: u32 = 3;

#[derive(Debug, Clone, Default)]
pub struct DoubleUnitState {
    pub active_state: String,
    pub sub_state: String,
    pub main_pid: u32,
    /// ActiveState reads left that still say `activating`.
    pub activating_reads: u32,
}

#[derive(Debug, Default)]
pub struct Recorded {
    pub units: BTreeMap<String, DoubleUnitState>,
    pub calls: Vec<String>,
    pub reloads: u32,
    pub subscribed: bool,
    next_job: u32,
}

pub type Shared = Arc<Mutex<Recorded>>;

pub struct ManagerDouble {
    pub state: Shared,
}

/// systemd's bus-path escaping: every byte outside `[A-Za-z0-9]` → `_xx`.
fn unit_path(name: &str) -> OwnedObjectPath {
    let escaped: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("_{b:02x}")
            }
        })
        .collect();
    OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/unit/{escaped}")).unwrap()
}

impl ManagerDouble {
    async fn ensure_object(
        &self,
        server: &ObjectServer,
        name: &str,
    ) -> fdo::Result<OwnedObjectPath> {
        let path = unit_path(name);
        self.state
            .lock()
            .unwrap()
            .units
            .entry(name.to_string())
            .or_insert_with(|| DoubleUnitState {
                active_state: "inactive".into(),
                sub_state: "dead".into(),
                ..DoubleUnitState::default()
            });
        let unit = UnitDouble {
            name: name.to_string(),
            state: self.state.clone(),
        };
        server.at(path.clone(), unit.clone()).await?;
        server.at(path.clone(), ServiceDouble(unit)).await?;
        Ok(path)
    }

    async fn job(
        &self,
        server: &ObjectServer,
        emitter: &SignalEmitter<'_>,
        call: &str,
        name: &str,
        up: bool,
    ) -> fdo::Result<OwnedObjectPath> {
        self.ensure_object(server, name).await?;
        let (id, result) = {
            let mut rec = self.state.lock().unwrap();
            rec.calls.push(format!("{call} {name}"));
            rec.next_job += 1;
            let id = rec.next_job;
            let unit = rec.units.get_mut(name).unwrap();
            let result = match (up, name) {
                (true, "broken.service") => {
                    unit.active_state = "failed".into();
                    unit.sub_state = "failed".into();
                    unit.main_pid = 0;
                    "failed"
                }
                (true, _) => {
                    unit.active_state = "active".into();
                    unit.sub_state = "running".into();
                    unit.main_pid = 4000 + id;
                    if name == "slow.service" {
                        unit.activating_reads = SLOW_READS;
                    }
                    "done"
                }
                (false, _) => {
                    unit.active_state = "inactive".into();
                    unit.sub_state = "dead".into();
                    unit.main_pid = 0;
                    "done"
                }
            };
            (id, result)
        };
        let job = OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{id}")).unwrap();
        Self::job_removed(
            emitter,
            id,
            job.clone(),
            name.to_string(),
            result.to_string(),
        )
        .await?;
        Ok(job)
    }
}

#[interface(name = "org.freedesktop.systemd1.Manager")]
impl ManagerDouble {
    async fn start_unit(
        &self,
        name: String,
        _mode: String,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> fdo::Result<OwnedObjectPath> {
        self.job(server, &emitter, "StartUnit", &name, true).await
    }

    async fn stop_unit(
        &self,
        name: String,
        _mode: String,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> fdo::Result<OwnedObjectPath> {
        self.job(server, &emitter, "StopUnit", &name, false).await
    }

    async fn restart_unit(
        &self,
        name: String,
        _mode: String,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> fdo::Result<OwnedObjectPath> {
        self.job(server, &emitter, "RestartUnit", &name, true).await
    }

    fn reload(&self) {
        let mut rec = self.state.lock().unwrap();
        rec.reloads += 1;
        rec.calls.push("Reload".into());
    }

    fn subscribe(&self) {
        self.state.lock().unwrap().subscribed = true;
    }

    fn get_unit(&self, name: String) -> fdo::Result<OwnedObjectPath> {
        if self.state.lock().unwrap().units.contains_key(&name) {
            Ok(unit_path(&name))
        } else {
            Err(fdo::Error::UnknownObject(format!(
                "Unit {name} not loaded."
            )))
        }
    }

    async fn load_unit(
        &self,
        name: String,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> fdo::Result<OwnedObjectPath> {
        self.ensure_object(server, &name).await
    }

    fn enable_unit_files(
        &self,
        files: Vec<String>,
        _runtime: bool,
        _force: bool,
    ) -> (bool, Vec<(String, String, String)>) {
        let mut rec = self.state.lock().unwrap();
        rec.calls
            .push(format!("EnableUnitFiles {}", files.join(",")));
        (false, Vec::new())
    }

    #[zbus(signal)]
    async fn job_removed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[derive(Clone)]
pub struct UnitDouble {
    name: String,
    state: Shared,
}

#[interface(name = "org.freedesktop.systemd1.Unit")]
impl UnitDouble {
    #[zbus(property)]
    fn active_state(&self) -> String {
        let mut rec = self.state.lock().unwrap();
        let unit = rec.units.get_mut(&self.name).unwrap();
        if unit.activating_reads > 0 {
            unit.activating_reads -= 1;
            return "activating".into();
        }
        unit.active_state.clone()
    }

    #[zbus(property)]
    fn sub_state(&self) -> String {
        self.state.lock().unwrap().units[&self.name]
            .sub_state
            .clone()
    }
}

pub struct ServiceDouble(UnitDouble);

#[interface(name = "org.freedesktop.systemd1.Service")]
impl ServiceDouble {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> u32 {
        self.0.state.lock().unwrap().units[&self.0.name].main_pid
    }
}

/// Serves the double as `org.freedesktop.systemd1` on the bus at `address`.
pub async fn serve(address: &str) -> (zbus::Connection, Shared) {
    let state = Shared::default();
    let conn = zbus::connection::Builder::address(address)
        .name("org.freedesktop.systemd1")
        .serve_at(
            "/org/freedesktop/systemd1",
            ManagerDouble {
                state: state.clone(),
            },
        )
        .build()
        .await
        .expect("serve the systemd1 double");
    (conn, state)
}
