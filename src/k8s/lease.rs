//! The floating endpoint's Lease (`kube-system/cluster-api-address`,
//! coordination.k8s.io/v1): which master holds the address. Election as
//! client-go's `leaderelection` does it: the holder renews `renewTime`
//! through an update guarded by `resourceVersion`; a candidate takes over
//! only after the record has not changed for `leaseDurationSeconds` **by
//! its own clock**, from when it first saw that record, so the masters'
//! clocks need not agree.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

use super::{K8sError, api_error};

pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "cluster-api-address";
/// The Role (and its binding to [`crate::pki::API_ADDRESS_USER`]) that
/// lets the keeper read and write that one Lease.
pub const ROLE: &str = "cluster-agent:api-address";

/// Lets the keepers' user get and update the Lease, and create it (RBAC
/// cannot limit `create` by name), nothing else.
pub async fn ensure_rbac(client: &kube::Client) -> Result<(), K8sError> {
    let rule = |verbs: &[&str], names: Option<Vec<String>>| PolicyRule {
        api_groups: Some(vec!["coordination.k8s.io".into()]),
        resources: Some(vec!["leases".into()]),
        resource_names: names,
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    };
    super::ensure_role_for_user(
        client,
        NAMESPACE,
        ROLE,
        vec![
            rule(&["get", "update"], Some(vec![NAME.into()])),
            rule(&["create"], None),
        ],
        crate::pki::API_ADDRESS_USER,
    )
    .await
}

/// Where this candidate stands after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// This candidate holds the Lease (just acquired or renewed).
    Holder,
    /// Another holds it, or held it until recently; `None`: nobody yet
    /// (another candidate won the race for a free Lease).
    Follower { holder: Option<String> },
}

/// What a candidate compares between attempts: any renewal changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<String>,
    transitions: Option<i32>,
}

impl Record {
    fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.map(|t| t.0.to_string()),
            transitions: spec.lease_transitions,
        }
    }
}

/// One master's side of the election.
pub struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    /// The record last seen and when (this host's monotonic clock) it was
    /// first seen.
    observed: Option<(Record, Instant)>,
}

impl Elector {
    pub fn new(client: kube::Client, identity: &str, duration: Duration) -> Elector {
        Elector {
            api: Api::namespaced(client, NAMESPACE),
            identity: identity.to_owned(),
            duration,
            observed: None,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let held_before = previous
            .and_then(|p| p.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: if held_before {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if held_before || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..Default::default()
        }
    }

    /// One round: renew the Lease if this candidate holds it, take it if
    /// it is free or its holder has not renewed for the Lease's duration,
    /// otherwise note what the holder did. A lost race (409) is not an
    /// error: another candidate got there first.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Standing, K8sError> {
        let existing = match self.api.get_opt(NAME).await {
            Ok(found) => found,
            Err(e) => return Err(api_error(format!("get lease {NAMESPACE}/{NAME}"))(e)),
        };
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(NAME.into()),
                    namespace: Some(NAMESPACE.into()),
                    ..Default::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => Ok(self.won(&created)),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    Ok(Standing::Follower { holder: None })
                }
                Err(e) => Err(api_error(format!("create lease {NAMESPACE}/{NAME}"))(e)),
            };
        };
        let record = Record::of(&lease);
        let mine = record.holder.as_deref() == Some(self.identity.as_str());
        if !mine && let Some(holder) = &record.holder {
            let now = Instant::now();
            let first_seen = match &self.observed {
                Some((seen, at)) if *seen == record => *at,
                _ => {
                    self.observed = Some((record.clone(), now));
                    now
                }
            };
            if now.duration_since(first_seen) < self.held_for(&lease) {
                return Ok(Standing::Follower {
                    holder: Some(holder.clone()),
                });
            }
        }
        lease.spec = Some(self.spec(lease.spec.as_ref()));
        match self.api.replace(NAME, &PostParams::default(), &lease).await {
            Ok(updated) => Ok(self.won(&updated)),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Standing::Follower {
                holder: record.holder.filter(|_| !mine),
            }),
            Err(e) => Err(api_error(format!("update lease {NAMESPACE}/{NAME}"))(e)),
        }
    }

    fn won(&mut self, lease: &Lease) -> Standing {
        self.observed = Some((Record::of(lease), Instant::now()));
        Standing::Holder
    }

    /// The holder's own promise, at least a second (the API's unit).
    fn held_for(&self, lease: &Lease) -> Duration {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.duration, Duration::from_secs)
            .max(Duration::from_secs(1))
    }

    /// Gives the Lease up if this candidate holds it, so the next takes
    /// over at its next attempt instead of after the Lease's duration.
    pub async fn release(&mut self) -> Result<(), K8sError> {
        let Some(mut lease) = self
            .api
            .get_opt(NAME)
            .await
            .map_err(api_error(format!("get lease {NAMESPACE}/{NAME}")))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        match self.api.replace(NAME, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            // Renewed or taken meanwhile: not ours to give up any more.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(api_error(format!("release lease {NAMESPACE}/{NAME}"))(e)),
        }
    }
}
