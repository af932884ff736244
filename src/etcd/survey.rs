//! A read-only look at the whole etcd cluster from one node: every
//! control-plane endpoint asked concurrently, each bounded by one deadline,
//! so a peer that is down or black-holed costs at most the deadline and
//! never hides what the others said. `status` reports it; `reset` decides
//! with it whether removing this node's member keeps the cluster's quorum.

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::{ClientTls, EndpointStatus, EtcdClient, Member, member_id_hex};

/// One configured control-plane node's etcd endpoint and what it answered.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointReport {
    pub node: String,
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<EndpointStatus>,
    /// A linearizable read succeeded (needs a leader and a quorum), as
    /// `etcdctl endpoint health` judges it. Learners cannot serve one, so
    /// for them a known leader counts.
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Survey {
    pub endpoints: Vec<EndpointReport>,
    /// The member list, from the first voter that answered one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Member>>,
}

impl Survey {
    /// Ids of the members whose endpoint answered healthy.
    pub fn healthy_ids(&self) -> BTreeSet<u64> {
        self.endpoints
            .iter()
            .filter(|e| e.healthy)
            .filter_map(|e| e.status.as_ref().map(|s| s.member_id))
            .collect()
    }

    /// A healthy voter's URL other than `except` (a member cannot be removed
    /// through itself: it stops serving as the removal commits).
    pub fn healthy_voter_url(&self, except: Option<u64>) -> Option<String> {
        self.endpoints
            .iter()
            .find(|e| {
                e.healthy
                    && e.status
                        .as_ref()
                        .is_some_and(|s| !s.is_learner && Some(s.member_id) != except)
            })
            .map(|e| e.url.clone())
    }
}

/// Asks every `(node, client URL)` concurrently; whatever has not answered
/// by `deadline` is reported as such.
pub async fn survey(
    endpoints: Vec<(String, String)>,
    tls: &ClientTls,
    deadline: Instant,
) -> Survey {
    let probes = endpoints.into_iter().map(|(node, url)| {
        let tls = tls.clone();
        async move {
            match tokio::time::timeout_at(deadline, probe(&url, &tls)).await {
                Ok((report, members)) => (EndpointReport { node, ..report }, members),
                Err(_) => (
                    EndpointReport {
                        node,
                        url,
                        status: None,
                        healthy: false,
                        error: Some("no answer before the deadline".into()),
                    },
                    None,
                ),
            }
        }
    });
    let answers = futures_util::future::join_all(probes).await;
    let members = answers.iter().find_map(|(_, m)| m.clone());
    Survey {
        endpoints: answers.into_iter().map(|(r, _)| r).collect(),
        members,
    }
}

async fn probe(url: &str, tls: &ClientTls) -> (EndpointReport, Option<Vec<Member>>) {
    let mut report = EndpointReport {
        node: String::new(),
        url: url.to_string(),
        status: None,
        healthy: false,
        error: None,
    };
    let mut client = match EtcdClient::connect(&[url.to_string()], tls).await {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(crate::error_chain(&e));
            return (report, None);
        }
    };
    let status = match client.endpoint_status().await {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(crate::error_chain(&e));
            return (report, None);
        }
    };
    let learner = status.is_learner;
    report.healthy = if learner {
        status.leader != 0
    } else {
        match client.check_health().await {
            Ok(()) => true,
            Err(e) => {
                report.error = Some(crate::error_chain(&e));
                false
            }
        }
    };
    report.status = Some(status);
    // Learners refuse membership calls; a voter without quorum cannot serve
    // a consistent list either.
    let members = if report.healthy && !learner {
        client.members().await.ok()
    } else {
        None
    };
    (report, members)
}

/// Voters needed for a quorum among `voters`.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// Why removing `member` (through a healthy voter) would cost the cluster
/// its quorum or its last fault tolerance; `None` when it is safe.
pub fn removal_risk(members: &[Member], healthy: &BTreeSet<u64>, member: u64) -> Option<String> {
    let target = members.iter().find(|m| m.id == member)?;
    if target.is_learner {
        // Learners do not vote: removing one never touches the quorum.
        return None;
    }
    let voters: Vec<&Member> = members.iter().filter(|m| !m.is_learner).collect();
    let remaining: Vec<&&Member> = voters.iter().filter(|m| m.id != member).collect();
    let healthy_now = voters.iter().filter(|m| healthy.contains(&m.id)).count();
    let healthy_after = remaining.iter().filter(|m| healthy.contains(&m.id)).count();
    let id = member_id_hex(member);
    if remaining.is_empty() {
        return Some(format!(
            "member {id} is the only voting member: removing it destroys the cluster and its data"
        ));
    }
    if remaining.len() < 2 {
        return Some(format!(
            "removing member {id} leaves a single voting member: the cluster would have no fault \
             tolerance left (add a control-plane node first)"
        ));
    }
    if healthy_now < quorum(voters.len()) {
        return Some(format!(
            "only {healthy_now} of {} voting members are healthy: the cluster has no quorum to \
             commit the removal",
            voters.len()
        ));
    }
    if healthy_after < quorum(remaining.len()) {
        return Some(format!(
            "only {healthy_after} of the {} voting members that would remain are healthy \
             (a quorum needs {}): bring them back first",
            remaining.len(),
            quorum(remaining.len())
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, learner: bool) -> Member {
        Member {
            id,
            name: format!("cp-{id}"),
            peer_urls: vec![],
            client_urls: vec![],
            is_learner: learner,
        }
    }

    #[test]
    fn removal_keeps_quorum_and_fault_tolerance() {
        let three = [member(1, false), member(2, false), member(3, false)];
        let all: BTreeSet<u64> = [1, 2, 3].into();
        assert_eq!(removal_risk(&three, &all, 3), None);
        // A member not in the list (removed before a crash): nothing to risk.
        assert_eq!(removal_risk(&three, &all, 9), None);

        let two_healthy: BTreeSet<u64> = [1, 3].into();
        let why = removal_risk(&three, &two_healthy, 3).unwrap();
        assert!(why.contains("only 1 of the 2"), "{why}");
        // Removing the dead one is fine: the two healthy remain.
        let dead_two: BTreeSet<u64> = [1, 3].into();
        assert_eq!(removal_risk(&three, &dead_two, 2), None);

        let pair = [member(1, false), member(2, false)];
        let why = removal_risk(&pair, &[1, 2].into(), 2).unwrap();
        assert!(why.contains("single voting member"), "{why}");

        let alone = [member(1, false)];
        let why = removal_risk(&alone, &[1].into(), 1).unwrap();
        assert!(why.contains("only voting member"), "{why}");

        let with_learner = [member(1, false), member(2, true)];
        assert_eq!(removal_risk(&with_learner, &[1].into(), 2), None);

        // Four voters, this one down, two of the others down: no quorum now.
        let four = [
            member(1, false),
            member(2, false),
            member(3, false),
            member(4, false),
        ];
        let why = removal_risk(&four, &[1, 2].into(), 4).unwrap();
        assert!(why.contains("no quorum to commit"), "{why}");
    }
}
