//! Process backend: runs a unit file's `ExecStart` as a detached daemon
//! (own session, stdin null, output appended to a log file) and tracks it by
//! a pid file holding pid *and* start time, so a pid reused after a reboot or
//! wrap-around is never taken for ours. The daemon outlives the agent; a new
//! agent recognises it through the pid file.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

use super::unit::{self, Unit};
use super::{
    ActiveState, DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT, ServiceManager, ServicesError,
    UnitState,
};
use crate::fsutil::{self, PUBLIC_MODE};
use crate::paths::HostPaths;
use crate::wait::{Backoff, Poll, poll_until};

const PID_DIR: &str = "/run/cluster-agent";
/// Every daemon starts as `sh -c GATE_SCRIPT PROGRAM ARGS…`, which execs
/// PROGRAM (same pid) once the agent has recorded that pid and written a
/// line to its stdin, and exits if the agent died first (end of file).
const GATE_SHELL: &str = "/bin/sh";
const GATE_SCRIPT: &str = r#"read -r _ || exit 125; exec "$0" "$@" </dev/null"#;
const LOG_DIR: &str = "/var/log/cluster-agent";
/// systemd's default PATH for services; the rest of the agent's own
/// environment is not passed on, as under systemd.
const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a fresh process must stay alive to count as started. A bad flag
/// or a missing file makes etcd and friends exit within tens of ms.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(300);
const LOG_TAIL_LINES: usize = 20;
const LOG_TAIL_BYTES: u64 = 16 * 1024;

#[derive(Debug, Clone)]
pub struct ProcessManager {
    paths: HostPaths,
    settle: Duration,
}

/// A process we started, as recorded in its pid file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    pid: u32,
    start_time: u64,
}

impl ProcessManager {
    pub fn new(paths: HostPaths) -> ProcessManager {
        ProcessManager {
            paths,
            settle: DEFAULT_SETTLE,
        }
    }

    /// Overrides [`DEFAULT_SETTLE`].
    pub fn with_settle(mut self, settle: Duration) -> ProcessManager {
        self.settle = settle;
        self
    }

    pub fn pid_file(&self, unit: &str) -> PathBuf {
        self.paths.host(PID_DIR).join(format!("{unit}.pid"))
    }

    pub fn log_file(&self, unit: &str) -> PathBuf {
        self.paths.host(LOG_DIR).join(format!("{unit}.log"))
    }

    fn load_unit(&self, name: &str) -> Result<Unit, ServicesError> {
        unit::validate_unit_name(name)?;
        let path = unit::unit_path(&self.paths, name);
        let bytes = fsutil::read_optional(&path)
            .map_err(|source| ServicesError::Io {
                what: "read the unit file".into(),
                path: path.clone(),
                source,
            })?
            .ok_or_else(|| ServicesError::UnitNotFound {
                unit: name.to_string(),
                path: path.clone(),
            })?;
        unit::parse_unit(name, &String::from_utf8_lossy(&bytes), &path)
    }

    /// The recorded process if it is still the one we started.
    fn running(&self, unit: &str) -> Result<Option<Tracked>, ServicesError> {
        Ok(self.read_pid_file(unit)?.filter(|t| is_alive(*t)))
    }

    fn read_pid_file(&self, unit: &str) -> Result<Option<Tracked>, ServicesError> {
        let path = self.pid_file(unit);
        let bytes = fsutil::read_optional(&path).map_err(|source| ServicesError::Io {
            what: "read the pid file".into(),
            path: path.clone(),
            source,
        })?;
        // A torn or foreign pid file cannot be ours (writes are atomic), so
        // treat it as "nothing running" rather than refusing to start.
        Ok(bytes.and_then(|b| {
            let text = String::from_utf8_lossy(&b).into_owned();
            let mut words = text.split_whitespace();
            Some(Tracked {
                pid: words.next()?.parse().ok()?,
                start_time: words.next()?.parse().ok()?,
            })
        }))
    }

    fn remove_pid_file(&self, unit: &str) -> Result<(), ServicesError> {
        let path = self.pid_file(unit);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ServicesError::Io {
                what: "remove the pid file".into(),
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn environment(&self, unit: &Unit) -> Result<BTreeMap<String, String>, ServicesError> {
        let mut env = BTreeMap::from([("PATH".to_string(), SERVICE_PATH.to_string())]);
        env.extend(unit.service.environment.clone());
        // As in systemd, EnvironmentFile= overrides Environment=.
        if let Some(file) = &unit.service.environment_file {
            env.extend(unit::read_env_file(file)?);
        }
        Ok(env)
    }

    pub fn notify_socket(&self, unit: &str) -> PathBuf {
        self.paths.host(PID_DIR).join(format!("{unit}.notify"))
    }

    /// The `NOTIFY_SOCKET` a `Type=notify` daemon reports `READY=1` on, as
    /// systemd provides it; bound before the spawn so no message is lost.
    fn bind_notify_socket(&self, unit: &str) -> Result<UnixDatagram, ServicesError> {
        let path = self.notify_socket(unit);
        let io = |what: &str| {
            let what = what.to_string();
            let path = path.clone();
            move |source| ServicesError::Io { what, path, source }
        };
        fs::create_dir_all(self.paths.host(PID_DIR)).map_err(io("create the run directory"))?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove a stale notify socket")(e));
            }
            _ => {}
        }
        UnixDatagram::bind(&path).map_err(io("bind the notify socket"))
    }

    fn spawn(
        &self,
        unit: &Unit,
        notify_socket: Option<&Path>,
    ) -> Result<(Child, Tracked, u64), ServicesError> {
        let name = &unit.name;
        let log_path = self.log_file(name);
        let io_err = |what: &str, path: &Path| {
            let what = what.to_string();
            let path = path.to_path_buf();
            move |source| ServicesError::Io { what, path, source }
        };
        fs::create_dir_all(self.paths.host(LOG_DIR))
            .map_err(io_err("create the log directory", &log_path))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("open the log file", &log_path))?;
        let log_start = log
            .metadata()
            .map_err(io_err("stat the log file", &log_path))?
            .len();
        let stderr = log
            .try_clone()
            .map_err(io_err("duplicate the log file", &log_path))?;

        let argv = &unit.service.exec_start;
        let spawn_error = |source| ServicesError::Spawn {
            unit: name.clone(),
            program: argv[0].clone(),
            source,
        };
        // The shell only execs it: say what is wrong with the program here.
        nix::unistd::access(Path::new(&argv[0]), nix::unistd::AccessFlags::X_OK)
            .map_err(|e| spawn_error(std::io::Error::from(e)))?;
        let (gate, open_gate) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| spawn_error(std::io::Error::from(e)))?;
        let mut cmd = Command::new(GATE_SHELL);
        cmd.args(["-c", GATE_SCRIPT])
            .args(argv)
            .env_clear()
            .envs(self.environment(unit)?)
            .envs(notify_socket.map(|s| ("NOTIFY_SOCKET", s)))
            .stdin(gate)
            .stdout(log)
            .stderr(stderr);
        if let Some(dir) = &unit.service.working_directory {
            cmd.current_dir(dir);
        }
        let limit_nofile = unit.service.limit_nofile;
        // SAFETY: the closure only makes async-signal-safe system calls
        // (setsid, setrlimit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Own session and process group: the daemon survives the
                // agent's terminal and group, and stop can signal its whole
                // group.
                nix::unistd::setsid()?;
                if let Some(n) = limit_nofile {
                    use nix::sys::resource::{Resource, getrlimit, setrlimit};
                    // systemd (PID 1) may raise the hard limit; an agent in a
                    // container often may not, so it gets as close as allowed.
                    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
                    if setrlimit(Resource::RLIMIT_NOFILE, n, n).is_err() {
                        let n = n.min(hard);
                        setrlimit(Resource::RLIMIT_NOFILE, n, hard)?;
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_error)?;
        let pid = child.id().unwrap_or_default();
        let start_time = start_time(pid).unwrap_or_default();
        let tracked = Tracked { pid, start_time };
        fsutil::write_atomic(
            &self.pid_file(name),
            format!("{pid} {start_time}\n").as_bytes(),
            PUBLIC_MODE,
        )?;
        // Only now may the daemon run: an agent killed before this line
        // leaves the gate closed, and the shell exits instead of leaving a
        // daemon no pid file knows (a second etcd then waits forever for
        // the first one's data-dir lock).
        let mut open_gate = std::fs::File::from(open_gate);
        std::io::Write::write_all(&mut open_gate, b"go\n").map_err(|source| ServicesError::Io {
            what: "let the daemon start".into(),
            path: self.pid_file(name),
            source,
        })?;
        Ok((child, tracked, log_start))
    }

    /// The error for a daemon that died while starting, with what it logged;
    /// its pid file goes, so `state` does not report a crash of a later run.
    fn exited_early(
        &self,
        name: &str,
        status: String,
        log_start: u64,
    ) -> Result<ServicesError, ServicesError> {
        self.remove_pid_file(name)?;
        let log = self.log_file(name);
        Ok(ServicesError::ExitedEarly {
            unit: name.to_string(),
            status,
            log_tail: log_tail(&log, log_start),
            log,
        })
    }

    /// Like systemd for `Type=notify`: the start is done when the daemon
    /// sends `READY=1`, failed when it exits first, and timed out (and the
    /// daemon stopped) after `TimeoutStartSec=`.
    async fn start_notify(&self, unit: &Unit) -> Result<(), ServicesError> {
        let name = &unit.name;
        let socket = self.bind_notify_socket(name)?;
        let socket_path = self.notify_socket(name);
        let (mut child, _tracked, log_start) = self.spawn(unit, Some(&socket_path))?;
        let timeout = unit
            .service
            .timeout_start_sec
            .unwrap_or(DEFAULT_START_TIMEOUT);
        let ready = async {
            let mut buf = [0u8; 4096];
            loop {
                let n = socket.recv(&mut buf).await?;
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return Ok::<(), std::io::Error>(());
                }
            }
        };
        let outcome = tokio::select! {
            ready = tokio::time::timeout(timeout, ready) => match ready {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(ServicesError::Io {
                    what: "receive on the notify socket".into(),
                    path: socket_path.clone(),
                    source,
                }),
                Err(_) => Err(ServicesError::Timeout {
                    unit: name.clone(),
                    action: "start",
                    source: crate::wait::WaitTimeout {
                        what: format!("{name} to send READY=1"),
                        waited: timeout,
                        last_seen: Some("running, not ready".into()),
                    },
                }),
            },
            status = child.wait() => {
                let status = status.map_or_else(|e| format!("cannot wait for it: {e}"), |s| s.to_string());
                Err(self.exited_early(name, status, log_start)?)
            }
        };
        drop(socket);
        let _ = fs::remove_file(&socket_path);
        match outcome {
            Ok(()) => {
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                Ok(())
            }
            Err(e @ ServicesError::Timeout { .. }) => {
                // As systemd does on a start timeout: the half-started
                // daemon is stopped, so a retry starts from a clean slate.
                drop(child);
                self.stop(name).await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl ServiceManager for ProcessManager {
    /// Nothing to do: unit files are read on every start.
    async fn daemon_reload(&self) -> Result<(), ServicesError> {
        Ok(())
    }

    async fn start(&self, name: &str) -> Result<(), ServicesError> {
        let unit = self.load_unit(name)?;
        if unit.service.type_ == unit::ServiceType::Oneshot {
            return Err(ServicesError::Unsupported {
                unit: name.to_string(),
                what: "Type=oneshot".into(),
                backend: "process",
            });
        }
        if self.running(name)?.is_some() {
            return Ok(());
        }
        if unit.service.type_ == unit::ServiceType::Notify {
            return self.start_notify(&unit).await;
        }
        let (mut child, tracked, log_start) = self.spawn(&unit, None)?;
        let settle = self.settle.min(
            unit.service
                .timeout_start_sec
                .unwrap_or(DEFAULT_START_TIMEOUT),
        );
        // Watch the fresh process for the settle window; try_wait also reaps
        // it, so an early exit is seen with its status rather than as a zombie.
        let exited = poll_until(
            &format!("{name} to stay up"),
            settle,
            Backoff::local(),
            || {
                let status = child.try_wait();
                async move {
                    match status {
                        Ok(Some(status)) => Poll::Ready(status.to_string()),
                        Err(e) => Poll::Ready(format!("cannot wait for it: {e}")),
                        Ok(None) => Poll::Pending("running".into()),
                    }
                }
            },
        )
        .await;
        match exited {
            Err(_still_running) => {
                // Reap it when it eventually exits, while this agent lives;
                // after the agent is gone, init does.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                debug_assert!(is_alive(tracked));
                Ok(())
            }
            Ok(status) => Err(self.exited_early(name, status, log_start)?),
        }
    }

    async fn stop(&self, name: &str) -> Result<(), ServicesError> {
        unit::validate_unit_name(name)?;
        let Some(tracked) = self.running(name)? else {
            return self.remove_pid_file(name);
        };
        let timeout = self
            .load_unit(name)
            .ok()
            .and_then(|u| u.service.timeout_stop_sec)
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        let signal = |sig| {
            // The pid is the group leader (setsid); signalling the group also
            // stops helpers it forked.
            match killpg(Pid::from_raw(tracked.pid as i32), sig) {
                Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
                Err(source) => Err(ServicesError::Signal {
                    unit: name.to_string(),
                    pid: tracked.pid,
                    source,
                }),
            }
        };
        let gone = |what: String, timeout| async move {
            poll_until(&what, timeout, Backoff::local(), || async move {
                if is_alive(tracked) {
                    Poll::Pending(format!("pid {} alive", tracked.pid))
                } else {
                    Poll::Ready(())
                }
            })
            .await
        };
        signal(Signal::SIGTERM)?;
        if gone(format!("{name} to exit after SIGTERM"), timeout)
            .await
            .is_err()
        {
            tracing::warn!(
                unit = name,
                pid = tracked.pid,
                ?timeout,
                "did not exit on SIGTERM; sending SIGKILL"
            );
            signal(Signal::SIGKILL)?;
            gone(
                format!("{name} to exit after SIGKILL"),
                Duration::from_secs(5),
            )
            .await
            .map_err(|source| ServicesError::Timeout {
                unit: name.to_string(),
                action: "stop",
                source,
            })?;
        }
        self.remove_pid_file(name)
    }

    async fn restart(&self, name: &str) -> Result<(), ServicesError> {
        self.stop(name).await?;
        self.start(name).await
    }

    async fn state(&self, name: &str) -> Result<UnitState, ServicesError> {
        unit::validate_unit_name(name)?;
        let recorded = self.read_pid_file(name)?;
        Ok(match recorded {
            Some(t) if is_alive(t) => UnitState {
                active_state: ActiveState::Active,
                sub_state: "running".into(),
                main_pid: Some(t.pid),
            },
            // Started by us and gone without a stop: it crashed.
            Some(_) => UnitState {
                active_state: ActiveState::Failed,
                sub_state: "failed".into(),
                main_pid: None,
            },
            None => UnitState {
                active_state: ActiveState::Inactive,
                sub_state: "dead".into(),
                main_pid: None,
            },
        })
    }

    /// Creates the `<target>.wants/<unit>` symlinks `systemctl enable` would,
    /// so the same root boots correctly under systemd.
    async fn enable(&self, name: &str) -> Result<(), ServicesError> {
        let unit = self.load_unit(name)?;
        let target = Path::new(unit::UNIT_DIR).join(name);
        for wanted_by in &unit.install.wanted_by {
            let dir = self
                .paths
                .host(unit::UNIT_DIR)
                .join(format!("{wanted_by}.wants"));
            let link = dir.join(name);
            let io = |what: &str| {
                let what = what.to_string();
                let path = link.clone();
                move |source| ServicesError::Io { what, path, source }
            };
            if fs::read_link(&link).is_ok_and(|t| t == target) {
                continue;
            }
            fsutil::create_dir_all_durable(&dir).map_err(io("create the .wants directory"))?;
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).map_err(io("create the enable symlink"))?;
            fsutil::sync_dir(&dir).map_err(io("sync the .wants directory"))?;
        }
        Ok(())
    }
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// (state, start time) from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses; fields after the
    // last ')' are unambiguous. They start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

/// Alive and still the process we started. A zombie counts as gone: it has
/// exited and only waits for its parent to reap it.
fn is_alive(t: Tracked) -> bool {
    t.pid != 0
        && matches!(proc_stat(t.pid), Some((state, start)) if start == t.start_time && !matches!(state, 'Z' | 'X'))
}

/// The last lines this run wrote to the log, for error messages.
fn log_tail(path: &Path, from: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        let start = from.max(len.saturating_sub(LOG_TAIL_BYTES));
        f.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_start_time_distinguishes_reuse() {
        let me = std::process::id();
        let t = Tracked {
            pid: me,
            start_time: start_time(me).unwrap(),
        };
        assert!(is_alive(t));
        assert!(!is_alive(Tracked {
            start_time: t.start_time + 1,
            ..t
        }));
        assert!(!is_alive(Tracked {
            pid: 0,
            start_time: 0
        }));
    }

    /// The gate execs the program in its own pid once told to, and runs
    /// nothing when the agent is gone before it could say so.
    #[test]
    fn the_gate_runs_the_daemon_only_once_opened() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let gated = || {
            let mut cmd = Command::new(GATE_SHELL);
            cmd.args(["-c", GATE_SCRIPT, "/bin/sh", "-c", "echo $$"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            cmd
        };
        let mut opened = gated().spawn().unwrap();
        opened.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let pid = opened.id();
        let out = opened.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pid.to_string());

        let mut abandoned = gated().spawn().unwrap();
        drop(abandoned.stdin.take());
        let out = abandoned.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert!(out.stdout.is_empty(), "{out:?}");
    }
}
