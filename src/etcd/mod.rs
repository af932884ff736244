//! etcd: the client seam and the bootstrap logic built on it.

mod client;
pub mod survey;
pub mod topology;

pub use client::{ClientTls, EndpointStatus, EtcdClient, EtcdError, Member, member_id_hex};
