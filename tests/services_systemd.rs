//! The real `SystemdManager` driven over a real dbus-daemon (private,
//! system-type bus under the test's root) against a systemd1 double.

mod support;

use std::time::Instant;

use cluster_agent::paths::HostPaths;
use cluster_agent::services::{
    self, ActiveState, Backend, ServiceManager, ServicesError, SystemdManager,
};
use support::dbus::PrivateBus;
use support::systemd1_double::{self, Shared};

struct Fixture {
    _dir: tempfile::TempDir,
    paths: HostPaths,
    _bus: PrivateBus,
    _double: zbus::Connection,
    state: Shared,
    address: String,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let paths = HostPaths::new(dir.path(), None, None);
    let socket = paths.host("/run/dbus/system_bus_socket");
    let bus = PrivateBus::start(dir.path(), &socket);
    let (double, state) = systemd1_double::serve(&bus.address).await;
    let address = bus.address.clone();
    Fixture {
        _dir: dir,
        paths,
        _bus: bus,
        _double: double,
        state,
        address,
    }
}

impl Fixture {
    /// Through `services::connect` (socket under `--root`) unless the
    /// environment points elsewhere, in which case we connect explicitly.
    async fn manager(&self) -> std::sync::Arc<dyn ServiceManager> {
        if std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_none() {
            return services::connect(Backend::Systemd, &self.paths)
                .await
                .unwrap();
        }
        let conn = zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .unwrap();
        std::sync::Arc::new(
            SystemdManager::with_connection(conn, self.paths.clone())
                .await
                .unwrap(),
        )
    }
    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
}

#[tokio::test]
async fn start_stop_restart_reload_enable_over_the_bus() {
    let fx = fixture().await;
    let mgr = fx.manager().await;
    assert!(
        fx.state.lock().unwrap().subscribed,
        "Subscribe was not called"
    );

    let t0 = Instant::now();
    mgr.start("etcd.service").await.unwrap();
    eprintln!(
        "systemd backend (double): StartUnit → active in {:?}",
        t0.elapsed()
    );
    let state = mgr.state("etcd.service").await.unwrap();
    assert_eq!(state.active_state, ActiveState::Active);
    assert_eq!(state.sub_state, "running");
    assert!(state.main_pid.is_some());

    mgr.stop("etcd.service").await.unwrap();
    let state = mgr.state("etcd.service").await.unwrap();
    assert_eq!(state.active_state, ActiveState::Inactive);
    assert_eq!(state.main_pid, None);

    mgr.restart("etcd.service").await.unwrap();
    mgr.daemon_reload().await.unwrap();
    mgr.enable("etcd.service").await.unwrap();
    assert_eq!(
        fx.calls(),
        [
            "StartUnit etcd.service",
            "StopUnit etcd.service",
            "RestartUnit etcd.service",
            "Reload",
            "EnableUnitFiles etcd.service",
            "Reload",
        ]
    );
}

#[tokio::test]
async fn failed_job_is_reported_with_result_and_state() {
    let fx = fixture().await;
    let mgr = fx.manager().await;
    let err = mgr.start("broken.service").await.unwrap_err();
    match &err {
        ServicesError::JobFailed { result, state, .. } => {
            assert_eq!(result, "failed");
            assert_eq!(*state, ActiveState::Failed);
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(
        err.to_string().contains("journalctl -u broken.service"),
        "{err}"
    );
}

#[tokio::test]
async fn activating_unit_is_polled_until_active() {
    let fx = fixture().await;
    let mgr = fx.manager().await;
    mgr.start("slow.service").await.unwrap();
    let rec = fx.state.lock().unwrap();
    assert_eq!(rec.units["slow.service"].activating_reads, 0);
}

#[tokio::test]
async fn invalid_unit_names_never_reach_the_bus() {
    let fx = fixture().await;
    let mgr = fx.manager().await;
    let err = mgr.start("../x.service").await.unwrap_err();
    assert!(matches!(err, ServicesError::InvalidUnit { .. }), "{err}");
    assert!(fx.calls().is_empty());
}

#[tokio::test]
async fn no_bus_socket_means_no_systemd() {
    // The agent prefers that variable to the socket under --root: run this
    // test again in a child of this binary without it.
    if std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_some() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["no_bus_socket_means_no_systemd", "--exact"])
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .output()
            .unwrap();
        let text = support::text(&out);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = HostPaths::new(dir.path(), None, None);
    assert!(services::system_bus(&paths).await.unwrap().is_none());
    let err = services::connect(Backend::Systemd, &paths)
        .await
        .err()
        .expect("connect without a bus must fail");
    assert!(matches!(err, ServicesError::NoSystemBus { .. }), "{err}");
}
