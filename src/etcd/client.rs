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

/// The etcd server refusals the agent acts on. etcd's own Go client tells
/// them apart the same way (`api/v3rpc/rpctypes`): by gRPC code and the
/// exact description, never by a substring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MemberNotFound,
    /// Promoting a member that is already a voter.
    MemberNotLearner,
    /// Promoting a learner that has not caught up with the leader yet.
    LearnerNotReady,
    /// The one-learner limit: another node's learner is not promoted yet.
    TooManyLearners,
    /// The strict reconfiguration check: the leader does not (yet) see
    /// every voter connected.
    UnhealthyCluster,
    NoLeader,
    LeaderChanged,
    RequestTimedOut,
}

const REFUSALS: &[(tonic::Code, &str, Refusal)] = {
    use Refusal::*;
    use tonic::Code::{FailedPrecondition, NotFound, Unavailable};
    &[
        (NotFound, "etcdserver: member not found", MemberNotFound),
        (
            FailedPrecondition,
            "etcdserver: can only promote a learner member",
            MemberNotLearner,
        ),
        (
            FailedPrecondition,
            "etcdserver: can only promote a learner member which is in sync with leader",
            LearnerNotReady,
        ),
        (
            FailedPrecondition,
            "etcdserver: too many learner members in cluster",
            TooManyLearners,
        ),
        (
            Unavailable,
            "etcdserver: unhealthy cluster",
            UnhealthyCluster,
        ),
        (Unavailable, "etcdserver: no leader", NoLeader),
        (Unavailable, "etcdserver: leader changed", LeaderChanged),
        (
            Unavailable,
            "etcdserver: request timed out",
            RequestTimedOut,
        ),
        (
            Unavailable,
            "etcdserver: request timed out, possibly due to previous leader failure",
            RequestTimedOut,
        ),
        (
            Unavailable,
            "etcdserver: request timed out, possibly due to connection lost",
            RequestTimedOut,
        ),
    ]
};

impl EtcdError {
    /// The server's refusal, when it is one the agent knows.
    pub fn refusal(&self) -> Option<Refusal> {
        let EtcdError::Api {
            source: etcd_client::Error::GRpcStatus(status),
            ..
        } = self
        else {
            return None;
        };
        REFUSALS
            .iter()
            .find(|(code, description, _)| {
                status.code() == *code && status.message() == *description
            })
            .map(|(_, _, refusal)| *refusal)
    }

    pub fn is_already_voter(&self) -> bool {
        self.refusal() == Some(Refusal::MemberNotLearner)
    }

    pub fn is_too_many_learners(&self) -> bool {
        self.refusal() == Some(Refusal::TooManyLearners)
    }

    pub fn is_unhealthy_cluster(&self) -> bool {
        self.refusal() == Some(Refusal::UnhealthyCluster)
    }

    pub fn is_member_not_found(&self) -> bool {
        self.refusal() == Some(Refusal::MemberNotFound)
    }

    /// What etcd documents as transient during membership changes, by
    /// code: every `Unavailable` (no leader, leader changed, timeouts, the
    /// strict reconfiguration check, a peer not answering), deadlines and
    /// the client's own timeouts, the
    /// one-learner limit while another node joins, a learner not yet in
    /// sync, and a connection that failed below gRPC.
    pub fn is_retryable(&self) -> bool {
        match self {
            EtcdError::Api { source, .. } => match source {
                etcd_client::Error::GRpcStatus(status) => {
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            // tonic's own request timeout ("Timeout expired").
                            | tonic::Code::Cancelled
                            | tonic::Code::Aborted
                    ) || matches!(
                        self.refusal(),
                        Some(Refusal::TooManyLearners | Refusal::LearnerNotReady)
                    )
                }
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
                _ => false,
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(code: tonic::Code, message: &str) -> EtcdError {
        EtcdError::Api {
            endpoints: "https://10.0.0.11:2379".into(),
            source: etcd_client::Error::GRpcStatus(tonic::Status::new(code, message)),
        }
    }

    #[test]
    fn refusals_are_told_apart_by_code_and_exact_description() {
        use tonic::Code::{FailedPrecondition, NotFound, Unavailable};
        let learners = answered(
            FailedPrecondition,
            "etcdserver: too many learner members in cluster",
        );
        assert!(learners.is_too_many_learners() && learners.is_retryable());
        let voter = answered(
            FailedPrecondition,
            "etcdserver: can only promote a learner member",
        );
        assert!(voter.is_already_voter() && !voter.is_retryable());
        let behind = answered(
            FailedPrecondition,
            "etcdserver: can only promote a learner member which is in sync with leader",
        );
        assert!(!behind.is_already_voter() && behind.is_retryable());
        assert!(answered(Unavailable, "etcdserver: unhealthy cluster").is_unhealthy_cluster());
        assert!(answered(NotFound, "etcdserver: member not found").is_member_not_found());
        // The same words under another code, or inside another message,
        // are not that refusal.
        assert!(!answered(Unavailable, "etcdserver: member not found").is_member_not_found());
        assert!(
            !answered(
                FailedPrecondition,
                "proxy: etcdserver: too many learner members in cluster"
            )
            .is_too_many_learners()
        );
    }

    #[test]
    fn transient_means_unavailable_deadlines_and_the_learner_limits() {
        use tonic::Code::*;
        for code in [Unavailable, DeadlineExceeded, Cancelled, Aborted] {
            assert!(answered(code, "anything").is_retryable(), "{code:?}");
        }
        for code in [PermissionDenied, InvalidArgument, Unauthenticated, NotFound] {
            assert!(!answered(code, "anything").is_retryable(), "{code:?}");
        }
    }
}
