//! How long `cluster-agent status` takes on a control-plane node of a real
//! three-member etcd cluster: with every peer healthy, and with every peer
//! down (its own etcd killed, both peers black-holed by taking their links
//! down). The promise is ≤ 2.5 s in the second case; this prints the numbers
//! and whether the promise held.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::Cluster;
use support::etcd::{assert_converged, finish, spawn_run};

const RUNS: usize = 7;
const BOUND: Duration = Duration::from_millis(2500);

fn measure(c: &Cluster, label: &str, expected_exit: i32) -> Duration {
    let mut took: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            let out = c.run("cp-1", &["--json", "status"]);
            let elapsed = started.elapsed();
            assert_eq!(
                out.status.code(),
                Some(expected_exit),
                "{}",
                support::text(&out)
            );
            elapsed
        })
        .collect();
    took.sort();
    println!(
        "status, {label}: min {:?}, median {:?}, max {:?} ({RUNS} runs)",
        took[0],
        took[RUNS / 2],
        took[RUNS - 1]
    );
    took[RUNS - 1]
}

fn main() {
    let nodes = ["cp-1", "cp-2", "cp-3"];
    let c = Cluster::isolated(&[
        ("cp-1", &["control-plane"]),
        ("cp-2", &["control-plane"]),
        ("cp-3", &["control-plane"]),
    ]);
    c.share_ca();
    let children: Vec<_> = nodes.iter().map(|n| (*n, spawn_run(&c, n, None))).collect();
    for (node, child) in children {
        finish(node, child);
    }
    assert_converged(&c, &nodes);
    measure(&c, "every member healthy", 0);

    c.kill_daemons("cp-1");
    for peer in ["cp-2", "cp-3"] {
        let ns = c.netns(peer).unwrap();
        let out = std::process::Command::new("ip")
            .args(["-n", &ns, "link", "set", "eth0", "down"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", support::text(&out));
    }
    let worst = measure(&c, "every peer down", 1);
    println!(
        "bound {BOUND:?}: {}",
        if worst <= BOUND { "held" } else { "EXCEEDED" }
    );
}
