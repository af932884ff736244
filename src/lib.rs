//! cluster-agent: turns freshly booted bare-metal machines into a Kubernetes
//! cluster with a Ceph monitor quorum, crash-safely and without a human.

pub mod config;
pub mod fsutil;
pub mod paths;
pub mod services;
pub mod wait;
