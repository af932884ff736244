//! etcd: the client seam and the bootstrap logic built on it.

mod client;
pub mod topology;

pub use client::{ClientTls, EtcdClient, EtcdError, Member, member_id_hex};
