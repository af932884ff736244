//! Process backend end to end in a temp root: real rendered unit files, real
//! detached processes, real signals.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster_agent::paths::HostPaths;
use cluster_agent::services::{
    ActiveState, EnvironmentFile, ProcessManager, ServiceManager, ServiceSection, ServicesError,
    Unit, install_unit,
};
use cluster_agent::wait::{Backoff, Poll, poll_until};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

const CHILD_ROOT_ENV: &str = "CLUSTER_AGENT_TEST_AGENT_CHILD_ROOT";

/// Kills whatever a test left running, even when it fails half-way.
struct Root {
    dir: tempfile::TempDir,
    paths: HostPaths,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        Root { dir, paths }
    }
    fn manager(&self) -> ProcessManager {
        ProcessManager::new(self.paths.clone())
    }
    fn install(&self, name: &str, exec_start: &[&str], tweak: impl FnOnce(&mut ServiceSection)) {
        let mut service = ServiceSection {
            exec_start: exec_start.iter().map(|s| s.to_string()).collect(),
            ..ServiceSection::default()
        };
        tweak(&mut service);
        let unit = Unit {
            name: name.into(),
            description: format!("test {name}"),
            service,
            ..Unit::default()
        };
        install_unit(&self.paths, &unit).unwrap();
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let pid_dir = self.paths.host("/run/cluster-agent");
        for entry in std::fs::read_dir(pid_dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

async fn wait_for_file(path: &Path) -> String {
    poll_until(
        &format!("{}", path.display()),
        Duration::from_secs(10),
        Backoff::local(),
        || async {
            match std::fs::read_to_string(path) {
                Ok(text) => Poll::Ready(text),
                Err(e) => Poll::Pending(e.to_string()),
            }
        },
    )
    .await
    .unwrap()
}

/// A shell daemon that reports its environment and cwd, then idles.
fn reporter(report: &Path) -> Vec<String> {
    let script = format!(
        "printf 'A=%s\\nFROMFILE=%s\\nOVR=%s\\nHOME=%s\\nCWD=%s\\nNOFILE=%s\\n' \"$A\" \"$FROMFILE\" \"$OVR\" \"$HOME\" \"$(pwd)\" \"$(ulimit -n)\" > {0}.tmp && mv {0}.tmp {0}; echo ready; exec sleep 1000",
        report.display()
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

#[tokio::test]
async fn runs_rendered_unit_with_env_and_cwd_then_stops() {
    let root = Root::new();
    let work = root.paths.host("/var/lib/demo");
    std::fs::create_dir_all(&work).unwrap();
    let report = root.dir.path().join("report");
    let argv = reporter(&report);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    root.install("demo.service", &argv, |s| {
        s.environment = BTreeMap::from([
            ("A".into(), "value with spaces and 100%".into()),
            ("OVR".into(), "from Environment=".into()),
        ]);
        s.environment_file = Some(EnvironmentFile {
            path: root.paths.host("/etc/demo/demo.env"),
            optional: false,
            vars: BTreeMap::from([
                ("FROMFILE".into(), "quoted \"x\" $y".into()),
                ("OVR".into(), "from EnvironmentFile=".into()),
            ]),
        });
        s.working_directory = Some(work.clone());
        s.limit_nofile = Some(4242);
    });
    let mgr = root.manager();

    let t0 = Instant::now();
    mgr.start("demo.service").await.unwrap();
    let start_latency = t0.elapsed();
    let state = mgr.state("demo.service").await.unwrap();
    assert_eq!(state.active_state, ActiveState::Active);
    let pid = state.main_pid.unwrap();
    eprintln!("process backend: start → active in {start_latency:?} (settle window included)");

    let text = wait_for_file(&report).await;
    assert!(text.contains("A=value with spaces and 100%\n"), "{text}");
    assert!(text.contains("FROMFILE=quoted \"x\" $y\n"), "{text}");
    assert!(text.contains("OVR=from EnvironmentFile=\n"), "{text}");
    // The agent's own environment is not inherited, as under systemd.
    assert!(text.contains("HOME=\n"), "{text}");
    assert!(
        text.contains(&format!("CWD={}\n", work.display())),
        "{text}"
    );
    assert!(text.contains("NOFILE=4242\n"), "{text}");

    // Idempotent: a second start keeps the same process.
    mgr.start("demo.service").await.unwrap();
    assert_eq!(mgr.state("demo.service").await.unwrap().main_pid, Some(pid));

    let log = std::fs::read_to_string(mgr.log_file("demo.service")).unwrap();
    assert!(log.contains("ready"), "{log}");

    let t0 = Instant::now();
    mgr.stop("demo.service").await.unwrap();
    eprintln!("process backend: stop (SIGTERM) in {:?}", t0.elapsed());
    assert!(!alive(pid));
    let state = mgr.state("demo.service").await.unwrap();
    assert_eq!(state.active_state, ActiveState::Inactive);
    mgr.stop("demo.service").await.unwrap();

    mgr.restart("demo.service").await.unwrap();
    let new_pid = mgr.state("demo.service").await.unwrap().main_pid.unwrap();
    assert_ne!(new_pid, pid);
    mgr.stop("demo.service").await.unwrap();
}

#[tokio::test]
async fn immediate_exit_is_reported_with_log_tail() {
    let root = Root::new();
    root.install(
        "bad.service",
        &["/bin/sh", "-c", "echo 'unknown flag: --bogus' >&2; exit 3"],
        |_| {},
    );
    let mgr = root.manager();
    let t0 = Instant::now();
    let err = mgr.start("bad.service").await.unwrap_err();
    eprintln!(
        "process backend: immediate exit detected in {:?}",
        t0.elapsed()
    );
    match &err {
        ServicesError::ExitedEarly {
            status, log_tail, ..
        } => {
            assert!(status.contains('3'), "{status}");
            assert!(log_tail.contains("unknown flag: --bogus"), "{log_tail}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(err.to_string().contains("unknown flag"), "{err}");
    assert_eq!(
        mgr.state("bad.service").await.unwrap().active_state,
        ActiveState::Inactive
    );
}

#[tokio::test]
async fn missing_unit_and_missing_program_are_clear_errors() {
    let root = Root::new();
    let mgr = root.manager();
    let err = mgr.start("nope.service").await.unwrap_err();
    assert!(matches!(err, ServicesError::UnitNotFound { .. }), "{err}");
    root.install("ghost.service", &["/nonexistent/daemon"], |_| {});
    let err = mgr.start("ghost.service").await.unwrap_err();
    assert!(matches!(err, ServicesError::Spawn { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/daemon"), "{err}");
}

#[tokio::test]
async fn stop_escalates_to_sigkill_after_timeout_stop_sec() {
    let root = Root::new();
    root.install(
        "stubborn.service",
        &[
            "/bin/sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        ],
        |s| s.timeout_stop_sec = Some(Duration::from_millis(500)),
    );
    let mgr = root.manager();
    mgr.start("stubborn.service").await.unwrap();
    let pid = mgr
        .state("stubborn.service")
        .await
        .unwrap()
        .main_pid
        .unwrap();
    let t0 = Instant::now();
    mgr.stop("stubborn.service").await.unwrap();
    let took = t0.elapsed();
    assert!(!alive(pid));
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn reused_pid_is_not_mistaken_for_ours() {
    let root = Root::new();
    root.install("sleeper.service", &["/bin/sleep", "1000"], |_| {});
    let mgr = root.manager();
    // Our own pid with a start time that is not ours: a reused pid.
    let fake = format!("{} 1\n", std::process::id());
    cluster_agent::fsutil::write_atomic(&mgr.pid_file("sleeper.service"), fake.as_bytes(), 0o644)
        .unwrap();
    assert_eq!(
        mgr.state("sleeper.service").await.unwrap().active_state,
        ActiveState::Failed
    );
    // stop must not signal the foreign process (that would kill this test).
    mgr.stop("sleeper.service").await.unwrap();
    mgr.start("sleeper.service").await.unwrap();
    let pid = mgr
        .state("sleeper.service")
        .await
        .unwrap()
        .main_pid
        .unwrap();
    assert_ne!(pid, std::process::id());
    mgr.stop("sleeper.service").await.unwrap();
}

#[tokio::test]
async fn enable_creates_wants_symlink() {
    let root = Root::new();
    let unit = Unit {
        name: "en.service".into(),
        description: "enable me".into(),
        service: ServiceSection {
            exec_start: vec!["/bin/sleep".into(), "1".into()],
            ..ServiceSection::default()
        },
        install: cluster_agent::services::InstallSection {
            wanted_by: vec!["multi-user.target".into()],
        },
        ..Unit::default()
    };
    install_unit(&root.paths, &unit).unwrap();
    let mgr = root.manager();
    mgr.enable("en.service").await.unwrap();
    mgr.enable("en.service").await.unwrap();
    let link = root
        .paths
        .host("/etc/systemd/system/multi-user.target.wants/en.service");
    assert_eq!(
        std::fs::read_link(link).unwrap(),
        PathBuf::from("/etc/systemd/system/en.service")
    );
}

/// The "agent" of the next test, run in a child process of the test binary.
#[tokio::test]
async fn agent_child_helper() {
    let Some(root) = std::env::var_os(CHILD_ROOT_ENV) else {
        return;
    };
    let mgr = ProcessManager::new(HostPaths::new(Path::new(&root), None, None));
    mgr.start("sleeper.service").await.unwrap();
    println!("STARTED");
    std::future::pending::<()>().await;
}

/// The agent may be SIGKILLed at any instant; the daemon must keep running
/// and a new agent must recognise it through the pid file.
#[tokio::test]
async fn daemon_survives_sigkilled_agent_and_is_recognised() {
    let root = Root::new();
    root.install("sleeper.service", &["/bin/sleep", "1000"], |_| {});
    let mut agent = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "agent_child_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ROOT_ENV, root.dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(agent.stdout.take().unwrap());
    let started = stdout
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("STARTED"));
    assert!(started, "the child agent did not start the unit");
    kill(Pid::from_raw(agent.id() as i32), Signal::SIGKILL).unwrap();
    agent.wait().unwrap();

    let mgr = root.manager();
    let state = mgr.state("sleeper.service").await.unwrap();
    assert_eq!(state.active_state, ActiveState::Active);
    let pid = state.main_pid.unwrap();
    assert!(alive(pid));
    // A second start from the new agent adopts it instead of starting another.
    mgr.start("sleeper.service").await.unwrap();
    assert_eq!(
        mgr.state("sleeper.service").await.unwrap().main_pid,
        Some(pid)
    );
    mgr.stop("sleeper.service").await.unwrap();
    assert!(!alive(pid));
}
