//! The one seam to etcd's API: a mutually authenticated TLS client with the
//! few membership calls bootstrap needs, and errors sorted into "retry" and
//! "stop".

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, MemberAddOptions, TlsOptions};

/// Per-request and connect timeout: short, so probing a down peer never
/// stalls a step (or `status`) for long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(700);

/// Files of the client certificate used to talk to etcd.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd at {endpoints}: {source}")]
    Api {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints} answered without {what}")]
    Incomplete {
        endpoints: String,
        what: &'static str,
    },
}

impl EtcdError {
    /// etcd's answer to promoting a member that is already a voter (the
    /// not-in-sync refusal shares its prefix).
    pub fn is_already_voter(&self) -> bool {
        let text = self.to_string();
        text.contains("can only promote a learner member") && !text.contains("in sync")
    }

    /// The one-learner limit: another node's learner is not promoted yet.
    pub fn is_too_many_learners(&self) -> bool {
        self.to_string().contains("too many learner members")
    }

    /// The strict reconfiguration check's refusal: the leader does not
    /// (yet) see every voter connected.
    pub fn is_unhealthy_cluster(&self) -> bool {
        self.to_string().contains("unhealthy cluster")
    }

    /// Errors etcd documents as transient during membership changes: the
    /// strict reconfiguration check right after a promotion, the one-learner
    /// limit while another node joins, a learner not yet in sync, and plain
    /// unavailability.
    pub fn is_retryable(&self) -> bool {
        match self {
            EtcdError::Api { source, .. } => {
                let text = source.to_string().to_lowercase();
                [
                    "unhealthy cluster",
                    "too many learner members",
                    "can only promote a learner member which is in sync",
                    "not in sync",
                    "leader changed",
                    "no leader",
                    "timed out",
                    "timeout",
                    "transport error",
                    "unavailable",
                    "connection refused",
                ]
                .iter()
                .any(|needle| text.contains(needle))
                    || matches!(source, etcd_client::Error::TransportError(_))
            }
            EtcdError::Incomplete { .. } => true,
            EtcdError::TlsFile { .. } => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    #[serde(serialize_with = "hex_id")]
    pub id: u64,
    /// Empty until the member has started (etcd learns the name then).
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

impl Member {
    pub fn started(&self) -> bool {
        !self.name.is_empty()
    }
}

impl From<&etcd_client::Member> for Member {
    fn from(m: &etcd_client::Member) -> Member {
        Member {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            client_urls: m.client_urls().to_vec(),
            is_learner: m.is_learner(),
        }
    }
}

/// What one endpoint says about itself, as `etcdctl endpoint status` shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EndpointStatus {
    #[serde(serialize_with = "hex_id")]
    pub member_id: u64,
    /// 0 while the member knows no leader.
    #[serde(serialize_with = "hex_id")]
    pub leader: u64,
    pub is_learner: bool,
    pub version: String,
    pub db_size: i64,
    pub raft_term: u64,
    pub raft_index: u64,
}

/// Member ids are shown in hex, as etcdctl does.
pub fn member_id_hex(id: u64) -> String {
    format!("{id:x}")
}

/// Ids go into JSON as hex strings: as numbers, most JSON readers would
/// round them (they exceed 2^53).
fn hex_id<S: serde::Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&member_id_hex(*id))
}

#[derive(Clone)]
pub struct EtcdClient {
    inner: Client,
    endpoints: String,
}

fn read(path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile {
        path: path.to_path_buf(),
        source,
    })
}

impl EtcdClient {
    pub async fn connect(endpoints: &[String], tls: &ClientTls) -> Result<EtcdClient, EtcdError> {
        let options = ConnectOptions::new()
            .with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
                    .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?)),
            )
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let joined = endpoints.join(",");
        let inner = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| EtcdError::Api {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(EtcdClient {
            inner,
            endpoints: joined,
        })
    }

    fn api(&self) -> impl FnOnce(etcd_client::Error) -> EtcdError + use<> {
        let endpoints = self.endpoints.clone();
        move |source| EtcdError::Api { endpoints, source }
    }

    pub async fn members(&mut self) -> Result<Vec<Member>, EtcdError> {
        let response = self.inner.member_list().await.map_err(self.api())?;
        Ok(response.members().iter().map(Member::from).collect())
    }

    /// Health as `etcdctl endpoint health` judges it: a linearizable read
    /// succeeds, which needs a leader and a quorum.
    pub async fn check_health(&mut self) -> Result<(), EtcdError> {
        self.inner.get("health", None).await.map_err(self.api())?;
        Ok(())
    }

    /// The answering member's id, once it knows a leader (learners included,
    /// which cannot serve the linearizable read `check_health` makes).
    pub async fn local_member_with_leader(&mut self) -> Result<u64, EtcdError> {
        let status = self.endpoint_status().await?;
        if status.member_id == 0 || status.leader == 0 {
            return Err(EtcdError::Incomplete {
                endpoints: self.endpoints.clone(),
                what: "a leader",
            });
        }
        Ok(status.member_id)
    }

    pub async fn endpoint_status(&mut self) -> Result<EndpointStatus, EtcdError> {
        let status = self.inner.status().await.map_err(self.api())?;
        Ok(EndpointStatus {
            member_id: status.header().map(|h| h.member_id()).unwrap_or(0),
            leader: status.leader(),
            is_learner: status.is_learner(),
            version: status.version().to_string(),
            db_size: status.db_size(),
            raft_term: status.raft_term(),
            raft_index: status.raft_index(),
        })
    }

    /// Adds a learner; returns its id and the member list etcd reports after
    /// the addition (which `ETCD_INITIAL_CLUSTER` must be built from).
    pub async fn add_learner(&mut self, peer_url: &str) -> Result<(u64, Vec<Member>), EtcdError> {
        let response = self
            .inner
            .member_add([peer_url], Some(MemberAddOptions::new().with_is_learner()))
            .await
            .map_err(self.api())?;
        let id = response
            .member()
            .map(|m| m.id())
            .ok_or(EtcdError::Incomplete {
                endpoints: self.endpoints.clone(),
                what: "the added member",
            })?;
        Ok((
            id,
            response.member_list().iter().map(Member::from).collect(),
        ))
    }

    pub async fn promote(&mut self, id: u64) -> Result<(), EtcdError> {
        self.inner.member_promote(id).await.map_err(self.api())?;
        Ok(())
    }

    pub async fn remove(&mut self, id: u64) -> Result<(), EtcdError> {
        self.inner.member_remove(id).await.map_err(self.api())?;
        Ok(())
    }
}
