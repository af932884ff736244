//! cluster-agent: turns freshly booted bare-metal machines into a Kubernetes
//! cluster with a Ceph monitor quorum, crash-safely and without a human.

pub mod balancer;
pub mod ceph;
pub mod config;
pub mod containerd;
pub mod engine;
pub mod floating;
pub mod fsutil;
pub mod hostnet;
pub mod identity;
pub mod join;
pub mod k8s;
pub mod listener;
pub mod notify;
pub mod paths;
pub mod phases;
pub mod pki;
pub mod podnet;
pub mod provision;
pub mod role;
pub mod services;
pub mod state;
mod step_error;
#[cfg(test)]
mod test_tools;
pub mod wait;

/// `outer: middle: inner` — every cause, so the operator sees the root one.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // thiserror's `transparent` and `{source}` formats already repeat it.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
pub mod cli;
pub mod cmd;
pub mod etcd;
pub mod logging;
