//! Certificate approval for what Kubernetes never auto-approves.
//! `kubernetes.io/kubelet-serving` CSRs carry whatever SANs the kubelet
//! claims, so operators install extra controllers for them; and a node's
//! kube-proxy asks for its `system:kube-proxy` client certificate with
//! `kubernetes.io/kube-apiserver-client`, which nothing approves at all.
//! The join service approves exactly those whose requester is a node
//! listed in cluster.yaml asking for its own name and address, or for
//! kube-proxy's bare identity, and denies what a node asks beyond that,
//! with the reason. One approver acts at a time across the masters: the
//! holder of a `coordination.k8s.io` Lease.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestStatus,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, ListParams, PostParams};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::csr::CLIENT_SIGNER;
use crate::config::ClusterConfig;
use crate::pki::KUBE_PROXY_USER;

pub const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
pub const LEASE_NAME: &str = "cluster-agent-serving-csr-approver";
const LEASE_NAMESPACE: &str = "kube-system";
const LEASE_SECONDS: i32 = 15;
/// How often the holder renews and looks at pending CSRs. A kubelet asks
/// once and waits for the answer, so a second is prompt enough, and the
/// API sees one list per second from one master.
const RESYNC: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Deny(String),
    /// Not ours to decide (another signer, or already decided).
    Ignore,
}

/// What the approver decides for one CSR.
pub fn decide(csr: &CertificateSigningRequest, config: &ClusterConfig) -> Decision {
    let signer = csr.spec.signer_name.as_str();
    if signer != SERVING_SIGNER && signer != CLIENT_SIGNER {
        return Decision::Ignore;
    }
    let decided = csr
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Approved" || c.type_ == "Denied")
        });
    if decided {
        return Decision::Ignore;
    }
    let username = csr.spec.username.as_deref().unwrap_or_default();
    let groups = csr.spec.groups.clone().unwrap_or_default();
    let Some(node_name) = username.strip_prefix("system:node:") else {
        // Client certificates for anyone but a node are the operator's
        // (`kubectl certificate approve`), not ours to refuse.
        if signer == CLIENT_SIGNER {
            return Decision::Ignore;
        }
        return Decision::Deny(format!("requested by {username:?}, not by a node"));
    };
    if !groups.iter().any(|g| g == "system:nodes") {
        return Decision::Deny(format!("{username} is not in system:nodes"));
    }
    let Some(node) = config.node(node_name) else {
        return Decision::Deny(format!("node {node_name} is not listed in cluster.yaml"));
    };
    let request = match parse_request(&csr.spec.request.0) {
        Ok(r) => r,
        Err(e) => return Decision::Deny(format!("unreadable CSR: {e}")),
    };
    if signer == CLIENT_SIGNER {
        kube_proxy_client(&request, csr.spec.usages.as_deref().unwrap_or_default())
    } else {
        serving(&request, username, node)
    }
}

/// A node's kubelet serving certificate: the node's own names only.
fn serving(request: &Request, username: &str, node: &crate::config::NodeSpec) -> Decision {
    if request.common_name.as_deref() != Some(username) || request.organizations != ["system:nodes"]
    {
        return Decision::Deny(format!(
            "subject must be CN={username}, O=system:nodes (got CN={:?}, O={:?})",
            request.common_name, request.organizations
        ));
    }
    let allowed_dns = [node.hostname.as_str(), node.name.as_str()];
    if request.other_sans {
        return Decision::Deny("SANs other than DNS names and IP addresses".into());
    }
    if let Some(dns) = request
        .dns
        .iter()
        .find(|d| !allowed_dns.contains(&d.as_str()))
    {
        return Decision::Deny(format!(
            "DNS SAN {dns} is not node {}'s hostname {}",
            node.name, node.hostname
        ));
    }
    if let Some(ip) = request.ips.iter().find(|ip| **ip != IpAddr::V4(node.ip)) {
        return Decision::Deny(format!(
            "IP SAN {ip} is not node {}'s address {}",
            node.name, node.ip
        ));
    }
    if request.dns.is_empty() && request.ips.is_empty() {
        return Decision::Deny("no SANs".into());
    }
    Decision::Approve
}

/// A client certificate a node asks for: kube-proxy's identity, with no
/// group (a group would be a way into `system:masters`), no SANs, and
/// client authentication only.
fn kube_proxy_client(request: &Request, usages: &[String]) -> Decision {
    if request.common_name.as_deref() != Some(KUBE_PROXY_USER) || !request.organizations.is_empty()
    {
        return Decision::Deny(format!(
            "a node may ask only for CN={KUBE_PROXY_USER} with no organization (got CN={:?}, O={:?})",
            request.common_name, request.organizations
        ));
    }
    if request.other_sans || !request.dns.is_empty() || !request.ips.is_empty() {
        return Decision::Deny("a client certificate carries no SANs".into());
    }
    let allowed = ["digital signature", "key encipherment", "client auth"];
    if let Some(usage) = usages.iter().find(|u| !allowed.contains(&u.as_str())) {
        return Decision::Deny(format!("usage {usage:?} is not for a client certificate"));
    }
    if !usages.iter().any(|u| u == "client auth") {
        return Decision::Deny("usages lack \"client auth\"".into());
    }
    Decision::Approve
}

struct Request {
    common_name: Option<String>,
    organizations: Vec<String>,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    other_sans: bool,
}

fn parse_request(pem: &[u8]) -> Result<Request, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| e.to_string())?;
    csr.verify_signature()
        .map_err(|e| format!("bad signature: {e}"))?;
    let info = &csr.certification_request_info;
    let mut request = Request {
        common_name: info
            .subject
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .map(str::to_string),
        organizations: info
            .subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_string))
            .collect(),
        dns: Vec::new(),
        ips: Vec::new(),
        other_sans: false,
    };
    for extension in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(d) => request.dns.push(d.to_string()),
                    GeneralName::IPAddress(bytes) => match <[u8; 4]>::try_from(*bytes) {
                        Ok(v4) => request.ips.push(IpAddr::from(v4)),
                        Err(_) => match <[u8; 16]>::try_from(*bytes) {
                            Ok(v6) => request.ips.push(IpAddr::from(v6)),
                            Err(_) => request.other_sans = true,
                        },
                    },
                    _ => request.other_sans = true,
                }
            }
        }
    }
    Ok(request)
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Takes or renews the Lease; true while this process holds it.
async fn hold_lease(leases: &Api<Lease>, holder: &str) -> Result<bool, kube::Error> {
    let fresh = |resource_version: Option<String>| Lease {
        metadata: ObjectMeta {
            name: Some(LEASE_NAME.into()),
            namespace: Some(LEASE_NAMESPACE.into()),
            resource_version,
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(now()),
            acquire_time: Some(now()),
            ..Default::default()
        }),
    };
    let Some(current) = leases.get_opt(LEASE_NAME).await? else {
        return match leases.create(&PostParams::default(), &fresh(None)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = current.spec.clone().unwrap_or_default();
    let mine = spec.holder_identity.as_deref() == Some(holder);
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
        age.as_secs() >= i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS))
    });
    if !mine && !expired {
        return Ok(false);
    }
    let mut next = fresh(current.metadata.resource_version.clone());
    if mine && let Some(spec) = next.spec.as_mut() {
        spec.acquire_time = current.spec.and_then(|s| s.acquire_time);
    }
    // resourceVersion makes the write conditional: of two masters taking
    // over an expired lease, one wins, the other gets 409.
    match leases
        .replace(LEASE_NAME, &PostParams::default(), &next)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn condition(type_: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        )),
        ..Default::default()
    }
}

async fn decide_pending(
    csrs: &Api<CertificateSigningRequest>,
    config: &ClusterConfig,
) -> Result<(), kube::Error> {
    for mut csr in csrs.list(&ListParams::default()).await?.items {
        let name = csr.metadata.name.clone().unwrap_or_default();
        let verdict = match decide(&csr, config) {
            Decision::Ignore => continue,
            Decision::Approve => {
                tracing::info!(csr = %name, signer = %csr.spec.signer_name, "approving certificate request");
                condition(
                    "Approved",
                    "ClusterAgentApproved",
                    "a node listed in cluster.yaml asking for what it may have".into(),
                )
            }
            Decision::Deny(why) => {
                tracing::warn!(csr = %name, signer = %csr.spec.signer_name, "denying certificate request: {why}");
                condition("Denied", "ClusterAgentDenied", why)
            }
        };
        csr.status
            .get_or_insert_with(CertificateSigningRequestStatus::default)
            .conditions
            .get_or_insert_with(Vec::new)
            .push(verdict);
        csrs.replace_subresource("approval", &name, &PostParams::default(), &csr)
            .await?;
    }
    Ok(())
}

/// Runs for as long as serve-join does.
pub async fn run(client: kube::Client, config: Arc<ClusterConfig>, holder: String) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let csrs: Api<CertificateSigningRequest> = Api::all(client);
    let mut tick = tokio::time::interval(RESYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match hold_lease(&leases, &holder).await {
            Ok(true) => {
                if let Err(e) = decide_pending(&csrs, &config).await {
                    tracing::warn!("CSR approval: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!("approver lease: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec;

    mod node_csr {
        include!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/node_csr.rs"
        ));
    }
    use node_csr::node_csr_pem;

    fn config() -> ClusterConfig {
        crate::config::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/example"))
            .unwrap()
    }

    /// A CSR as `user` would submit it (the API server fills in username
    /// and groups from the requester's credentials).
    fn csr(user: &str, groups: &[&str], cn: &str, sans: &[&str]) -> CertificateSigningRequest {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        with_request(user, groups, node_csr_pem(&key, cn, sans))
    }

    fn with_request(user: &str, groups: &[&str], pem: String) -> CertificateSigningRequest {
        CertificateSigningRequest {
            metadata: Default::default(),
            spec: CertificateSigningRequestSpec {
                request: k8s_openapi::ByteString(pem.into_bytes()),
                signer_name: SERVING_SIGNER.into(),
                username: Some(user.into()),
                groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                ..Default::default()
            },
            status: None,
        }
    }

    const NODES: &[&str] = &["system:nodes", "system:authenticated"];

    #[test]
    fn approves_only_a_listed_node_asking_for_its_own_names() {
        let c = config();
        let w1 = "system:node:w-1";
        let node = c.node("w-1").expect("docs/example lists w-1");
        let ip = node.ip.to_string();
        let good = csr(w1, NODES, w1, &[&node.hostname, &ip]);
        assert_eq!(decide(&good, &c), Decision::Approve);

        let cases = [
            (
                csr(w1, NODES, w1, &["evil.example.com", &ip]),
                "DNS SAN evil.example.com",
            ),
            (
                csr(w1, NODES, w1, &[&node.hostname, "192.168.1.99"]),
                "IP SAN 192.168.1.99",
            ),
            (
                csr(w1, NODES, "system:node:cp-1", &[&node.hostname]),
                "subject must be",
            ),
            (
                csr("system:node:ghost", NODES, "system:node:ghost", &["ghost"]),
                "not listed",
            ),
            (
                csr(
                    "kubernetes-admin",
                    &["system:masters"],
                    w1,
                    &[&node.hostname],
                ),
                "not by a node",
            ),
            (
                csr(w1, &["system:authenticated"], w1, &[&node.hostname]),
                "not in system:nodes",
            ),
            (csr(w1, NODES, w1, &[]), "no SANs"),
        ];
        for (request, why) in cases {
            match decide(&request, &c) {
                Decision::Deny(reason) => assert!(reason.contains(why), "{reason} lacks {why}"),
                other => panic!("{why}: {other:?}"),
            }
        }

        let mut client_signer = good.clone();
        client_signer.spec.signer_name = "kubernetes.io/kube-apiserver-client-kubelet".into();
        assert_eq!(decide(&client_signer, &c), Decision::Ignore);
        let mut decided = good;
        decided.status = Some(CertificateSigningRequestStatus {
            conditions: Some(vec![condition("Denied", "x", "y".into())]),
            ..Default::default()
        });
        assert_eq!(decide(&decided, &c), Decision::Ignore);
    }

    /// A client CSR as `user` sends it for kube-proxy.
    fn client_csr(user: &str, cn: &str, usages: &[&str]) -> CertificateSigningRequest {
        let dir = tempfile::tempdir().unwrap();
        let (_, pem) = crate::pki::client_request(&dir.path().join("client.key"), cn).unwrap();
        let mut csr = with_request(user, NODES, pem);
        csr.spec.signer_name = CLIENT_SIGNER.into();
        csr.spec.usages = Some(usages.iter().map(|u| u.to_string()).collect());
        csr
    }

    #[test]
    fn approves_a_listed_node_asking_for_kube_proxys_identity_and_nothing_more() {
        let c = config();
        let w1 = "system:node:w-1";
        let usages = crate::k8s::csr::CLIENT_USAGES;
        assert_eq!(
            decide(&client_csr(w1, KUBE_PROXY_USER, &usages), &c),
            Decision::Approve
        );
        let cases = [
            (
                client_csr(w1, "kubernetes-admin", &usages),
                "may ask only for",
            ),
            (
                client_csr(w1, KUBE_PROXY_USER, &["client auth", "server auth"]),
                "\"server auth\" is not for a client",
            ),
            (
                client_csr(w1, KUBE_PROXY_USER, &["digital signature"]),
                "lack \"client auth\"",
            ),
            (
                client_csr("system:node:ghost", KUBE_PROXY_USER, &usages),
                "not listed",
            ),
        ];
        for (request, why) in cases {
            match decide(&request, &c) {
                Decision::Deny(reason) => assert!(reason.contains(why), "{reason} lacks {why}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        // Anyone else's client CSRs wait for the operator.
        let mut admin = client_csr(w1, KUBE_PROXY_USER, &usages);
        admin.spec.username = Some("kubernetes-admin".into());
        assert_eq!(decide(&admin, &c), Decision::Ignore);
    }
}
