//! Join-service load: the release `cluster-agent serve-join` process, 1,000
//! concurrent authenticated clients (each a listed node on its own loopback
//! address, as the server checks), asking for control-plane material — the
//! largest answer (eight PEM files, ~5 KiB sealed). Clients and server share
//! this machine's cores, so the figures are a floor.
//!
//! Three measurements:
//! 1. cold joins: every join on a new TLS 1.3 session (a booting node);
//! 2. saturation: every client back to back on kept-alive sessions;
//! 3. a steady 5,000 joins/s spread over the 1,000 clients on established
//!    sessions, latency taken from each request's scheduled time (no
//!    coordinated omission);
//! 4. 2,000 cold joins/s offered the same way (a boot storm).
//!
//! Then the server's peak RSS (VmHWM). `JOIN_BENCH_SECS` sets each phase's
//! length (default 5).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_agent::join::{JoinClient, JoinKeys, Purpose};
use cluster_agent::paths::HostPaths;
use cluster_agent::pki::{self, CaSource};

const CLIENTS: usize = 1000;
const TARGET_RATE: f64 = 5000.0;
const COLD_RATE: f64 = 2000.0;
/// The server closes a session after 64 requests; clients reconnect first.
const REQUESTS_PER_SESSION: usize = 60;

fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 78, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, elapsed: Duration, mut latencies: Vec<Duration>, errors: usize) {
    latencies.sort();
    println!(
        "{name:<34} {:>8.0} joins/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} joins, {errors} errors)",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        latencies.len(),
    );
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let secs: u64 = std::env::var("JOIN_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let phase = Duration::from_secs(secs);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config_dir = root.join("etc/cluster-config");
    std::fs::create_dir_all(config_dir.join("secrets")).unwrap();
    let server_ip = Ipv4Addr::new(127, 77, 0, 1);
    let mut yaml = format!(
        "cluster:\n  name: bench\n  control_plane_endpoint: {server_ip}:6443\n  networking:\n    prefix_length: 8\nnodes:\n  - {{name: cp-0, ip: {server_ip}, roles: [control-plane]}}\n"
    );
    for i in 0..CLIENTS {
        yaml.push_str(&format!(
            "  - {{name: n-{i:04}, ip: {}, roles: [control-plane]}}\n",
            client_ip(i)
        ));
    }
    std::fs::write(config_dir.join("cluster.yaml"), yaml).unwrap();
    let secret: [u8; 32] = rand::random();
    let secret_path = config_dir.join("secrets/join-secret");
    std::fs::write(&secret_path, secret).unwrap();
    std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    pki::ensure_cluster_cas(&HostPaths::new(root, None, None), CaSource::Generate).unwrap();

    let server_addr = SocketAddr::new(IpAddr::V4(server_ip), 9443);
    let mut server = Command::new(env!("CARGO_BIN_EXE_cluster-agent"))
        .arg("--root")
        .arg(root)
        .args(["--node", "cp-0", "--services", "process", "serve-join"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("serve-join.log")).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(server_addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve-join did not listen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let idle_kib = vm_hwm_kib(server.id());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let clients: Arc<Vec<JoinClient>> = Arc::new(
        (0..CLIENTS)
            .map(|i| {
                JoinClient::new(
                    JoinKeys::derive(&secret, "bench"),
                    &format!("n-{i:04}"),
                    IpAddr::V4(client_ip(i)),
                )
            })
            .collect(),
    );
    println!(
        "join service: {CLIENTS} concurrent clients, control-plane material, {secs} s per phase, {} cores shared by clients and server",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    rt.block_on(async {
        // 1. Cold: a new session per join.
        let (elapsed, latencies, errors) = load(&clients, phase, None, true, server_addr).await;
        report(
            "cold (new TLS session per join)",
            elapsed,
            latencies,
            errors,
        );
        // 2. Saturation on kept-alive sessions.
        let (elapsed, latencies, errors) = load(&clients, phase, None, false, server_addr).await;
        report(
            "saturated (kept-alive sessions)",
            elapsed,
            latencies,
            errors,
        );
        // 3. The target rate.
        let (elapsed, latencies, errors) =
            load(&clients, phase, Some(TARGET_RATE), false, server_addr).await;
        report("steady 5,000/s offered", elapsed, latencies, errors);
        // 4. A boot storm: new sessions at a rate the cores can take.
        let (elapsed, latencies, errors) =
            load(&clients, phase, Some(COLD_RATE), true, server_addr).await;
        report("cold, 2,000/s offered", elapsed, latencies, errors);
    });

    let peak_kib = vm_hwm_kib(server.id());
    println!(
        "serve-join peak RSS: {:.1} MB (idle {:.1} MB)",
        peak_kib as f64 / 1024.0,
        idle_kib as f64 / 1024.0
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// Runs every client for `phase`. `rate`: total joins/s offered (open
/// loop), or `None` for back to back. `cold`: a new session per join.
async fn load(
    clients: &Arc<Vec<JoinClient>>,
    phase: Duration,
    rate: Option<f64>,
    cold: bool,
    server: SocketAddr,
) -> (Duration, Vec<Duration>, usize) {
    // Kept-alive runs start from established sessions, so the window
    // measures joins, not a burst of 1,000 handshakes (phase 1 does).
    let ready = Arc::new(tokio::sync::Barrier::new(clients.len() + 1));
    let (go, started) = tokio::sync::watch::channel(None::<Instant>);
    let tasks: Vec<_> = (0..clients.len())
        .map(|i| {
            let clients = clients.clone();
            let ready = ready.clone();
            let mut started = started.clone();
            tokio::spawn(async move {
                let client = &clients[i];
                let mut session = if cold {
                    None
                } else {
                    client.connect(server).await.ok()
                };
                ready.wait().await;
                let start = started
                    .wait_for(Option::is_some)
                    .await
                    .map(|s| s.expect("checked"))
                    .expect("the sender lives until all tasks end");
                let end = start + phase;
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                let interval = rate.map(|r| Duration::from_secs_f64(clients.len() as f64 / r));
                // Spread the clients' schedules over one interval.
                let mut next = start
                    + interval.map_or(Duration::ZERO, |iv| {
                        iv.mul_f64(i as f64 / clients.len() as f64)
                    });
                let mut used = 0;
                while Instant::now() < end {
                    let scheduled = match interval {
                        Some(iv) => {
                            tokio::time::sleep_until(next.into()).await;
                            let s = next;
                            next += iv;
                            s
                        }
                        None => Instant::now(),
                    };
                    if cold || used >= REQUESTS_PER_SESSION {
                        session = None;
                    }
                    if session.is_none() {
                        match client.connect(server).await {
                            Ok(s) => {
                                session = Some(s);
                                used = 0;
                            }
                            Err(_) => {
                                errors += 1;
                                continue;
                            }
                        }
                    }
                    let s = session.as_mut().expect("connected above");
                    used += 1;
                    match s.request(Purpose::ControlPlane).await {
                        Ok(_) => latencies.push(scheduled.elapsed()),
                        Err(_) => {
                            errors += 1;
                            session = None;
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    ready.wait().await;
    let start = Instant::now();
    go.send(Some(start)).expect("tasks hold receivers");
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    (start.elapsed(), all, errors)
}
