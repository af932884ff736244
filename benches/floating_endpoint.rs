//! The floating endpoint (`floating_endpoint: true`), in one run on one
//! machine (release agent): three masters and a worker, each in its own
//! network namespace (`cluster-agent lab up --netns --floating-endpoint`).
//! A benchmark, not a timed test: it prints the numbers; it panics only
//! when the cluster does not come up or the address never moves.
//!
//! ```text
//! cargo bench --bench floating_endpoint
//! ```
//!
//! * **added latency**: from inside the worker's namespace, `GET /version`
//!   on one kept-alive HTTPS connection, alternately straight to the
//!   holder's API server and through the floating address (the holder's
//!   forwarder, which spreads over all three), `FLOATING_BENCH_REQUESTS`
//!   (default 2000) of each: p50 and p99 of both and the difference.
//! * **fail-over as an operator's kubectl sees it**: a new connection per
//!   request (TCP, TLS, `GET /version`, 1 s timeout) every 20 ms to the
//!   floating address while the holder (1) has its API server stopped,
//!   (2) has its keeper stopped as systemd stops it (SIGTERM: the Lease is
//!   released), (3) loses power (link silent, every daemon killed: the next
//!   holder waits out the Lease). Reported: the longest gap between two
//!   successful requests across each cut, and who holds the address after.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/lab.rs"]
mod lab;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use lab::{InNamespace, ms, node_root, percentile};

const WORKER: &str = "w-1";
const MASTERS: [&str; 3] = ["cp-1", "cp-2", "cp-3"];
const REQUEST_EVERY: Duration = Duration::from_millis(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long each fail-over loop runs after its cut.
const AFTER_CUT: Duration = Duration::from_secs(8);

fn main() {
    if lab::runs("floating_endpoint", "FLOATING_BENCH_RUNS").is_none() {
        return;
    }
    let requests = lab::count("FLOATING_BENCH_REQUESTS", 2000);
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("lab");
    lab::lab_up_ok(
        &dir,
        &[
            "--masters",
            "3",
            "--workers",
            "1",
            "--ceph-mons",
            "0",
            "--floating-endpoint",
        ],
    );
    let config = cluster_agent::config::load(&node_root(&dir, WORKER).join("etc/cluster-config"))
        .expect("the lab's cluster.yaml");
    let floating = SocketAddr::from((
        config
            .cluster
            .floating_endpoint
            .expect("the lab's endpoint floats"),
        config.cluster.control_plane_endpoint.port,
    ));
    let address_of = |name: &str| {
        let node = config.nodes.iter().find(|n| n.name == name).unwrap();
        SocketAddr::from((node.ip, 6443))
    };
    let ca =
        std::fs::read_to_string(node_root(&dir, WORKER).join("etc/kubernetes/pki/ca.crt")).unwrap();
    let (_, first) = lab::wait("a master to hold the address", Instant::now(), || {
        holder(&dir, &[])
    });
    let in_worker = InNamespace::new(WORKER, &ca, REQUEST_TIMEOUT);

    let direct = format!("https://{}/version", address_of(first));
    let via = format!("https://{floating}/version");
    let (direct_times, via_times) = in_worker.latencies(&direct, &via, requests);
    let (d50, d99) = (percentile(&direct_times, 50), percentile(&direct_times, 99));
    let (f50, f99) = (percentile(&via_times, 50), percentile(&via_times, 99));
    println!(
        "GET /version, {requests} each, one kept-alive connection: {first}'s API server p50 {:.3} ms p99 {:.3} ms | {floating} p50 {:.3} ms p99 {:.3} ms | added p50 {:.3} ms p99 {:.3} ms",
        ms(d50),
        ms(d99),
        ms(f50),
        ms(f99),
        ms(f50.saturating_sub(d50)),
        ms(f99.saturating_sub(d99)),
    );

    let mut down: Vec<&str> = Vec::new();
    let mut holding = first;
    for cut in [Cut::ApiServerStopped, Cut::KeeperStopped, Cut::PowerLost] {
        let lab_dir = dir.clone();
        let gap = fail_over(&in_worker, &via, move || cut.apply(&lab_dir, holding));
        if cut.moves_the_address() {
            down.push(holding);
        }
        let (_, next) = lab::wait("a master to hold the address", Instant::now(), || {
            holder(&dir, &down)
        });
        println!(
            "{} on {holding}: longest gap between successful requests through {floating} {:.0} ms; {next} holds it",
            cut.describe(),
            ms(gap),
        );
        holding = next;
    }
    lab::lab_down(&dir);
}

#[derive(Clone, Copy)]
enum Cut {
    ApiServerStopped,
    KeeperStopped,
    PowerLost,
}

impl Cut {
    fn describe(self) -> &'static str {
        match self {
            Cut::ApiServerStopped => "API server stopped",
            Cut::KeeperStopped => "keeper stopped (SIGTERM)",
            Cut::PowerLost => "power cut",
        }
    }

    fn moves_the_address(self) -> bool {
        !matches!(self, Cut::ApiServerStopped)
    }

    fn apply(self, dir: &Path, master: &str) {
        match self {
            Cut::ApiServerStopped => lab::kill_unit(dir, master, "kube-apiserver.service"),
            Cut::KeeperStopped => lab::signal_unit(
                dir,
                master,
                "cluster-api-address.service",
                nix::sys::signal::Signal::SIGTERM,
            ),
            Cut::PowerLost => lab::power_cut(dir, master),
        }
    }
}

/// The master whose keeper says it holds the address, but none of `not`
/// (whose keepers are gone and whose views are stale).
fn holder(dir: &Path, not: &[&str]) -> Option<&'static str> {
    MASTERS.into_iter().filter(|m| !not.contains(m)).find(|m| {
        let path = cluster_agent::paths::HostPaths::new(&node_root(dir, m), None, None)
            .host(cluster_agent::floating::VIEW_FILE);
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<cluster_agent::floating::View>(&b).ok())
            .is_some_and(|v| v.holding)
    })
}

/// A request on a new connection every [`REQUEST_EVERY`], `cut` after a
/// second, for [`AFTER_CUT`] more: the longest gap between successes.
fn fail_over(in_worker: &InNamespace, url: &str, cut: impl FnOnce() + Send + 'static) -> Duration {
    let url = url.to_string();
    let ca = in_worker.ca.clone();
    in_worker.run(move |_| {
        Box::pin(async move {
            let started = Instant::now();
            let mut last_success = Instant::now();
            let mut longest = Duration::ZERO;
            let mut cut = Some(cut);
            let mut cut_at = None;
            loop {
                if started.elapsed() > Duration::from_secs(1)
                    && let Some(cut) = cut.take()
                {
                    cut();
                    cut_at = Some(Instant::now());
                }
                if cut_at.is_some_and(|at| at.elapsed() > AFTER_CUT) {
                    break;
                }
                // A client of its own: no connection outlives a request.
                let client = cluster_agent::k8s::pinned_client(&ca, REQUEST_TIMEOUT).unwrap();
                let ok = match client.get(&url).send().await {
                    Ok(answer) => answer.status().is_success() && answer.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    longest = longest.max(last_success.elapsed());
                    last_success = Instant::now();
                }
                tokio::time::sleep(REQUEST_EVERY).await;
            }
            longest
        })
    })
}
