//! TEST DOUBLE of kube-controller-manager: the two controllers a node's
//! TLS bootstrap needs. Like the real csrapprover it approves
//! `kube-apiserver-client-kubelet` CSRs whose requester is a bootstrapping
//! kubelet (or a node renewing), for `system:node:<name>` in
//! `system:nodes`; like the real csrsigner it signs approved CSRs with
//! `--cluster-signing-cert-file`/`--cluster-signing-key-file`. Started by
//! the agent's unit with the real flags.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestStatus,
};
use kube::api::{Api, ListParams, PostParams};
use x509_parser::prelude::FromDer;

fn flags() -> BTreeMap<String, String> {
    std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (k, v) = a.strip_prefix("--")?.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

fn subject(csr_pem: &str) -> Option<(String, Vec<String>)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).ok()?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .ok()?;
    let s = &csr.certification_request_info.subject;
    let cn = s.iter_common_name().next()?.as_str().ok()?.to_string();
    let o = s
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some((cn, o))
}

fn condition(type_: &str, reason: &str) -> CertificateSigningRequestCondition {
    CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(format!("{reason} by the kube-controller-manager double")),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let f = flags();
    let client = cluster_agent::k8s::client_from_kubeconfig(f["kubeconfig"].as_ref())
        .await
        .expect("kube-controller-manager-double: kubeconfig");
    let ca_pem = std::fs::read_to_string(&f["cluster-signing-cert-file"]).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&f["cluster-signing-key-file"]).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let csrs: Api<CertificateSigningRequest> = Api::all(client);
    loop {
        for mut csr in csrs
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let name = csr.metadata.name.clone().unwrap_or_default();
            let request = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
            let conditions = csr
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let approved = conditions.iter().any(|c| c.type_ == "Approved");
            let decided = approved || conditions.iter().any(|c| c.type_ == "Denied");
            let groups = csr.spec.groups.clone().unwrap_or_default();
            let is_client = csr.spec.signer_name == "kubernetes.io/kube-apiserver-client-kubelet";
            if !decided && is_client {
                let by_bootstrapper = groups.iter().any(|g| g == "system:bootstrappers");
                let by_node = groups.iter().any(|g| g == "system:nodes");
                let node_subject = subject(&request).is_some_and(|(cn, o)| {
                    cn.starts_with("system:node:") && o == ["system:nodes".to_string()]
                });
                if (by_bootstrapper || by_node) && node_subject {
                    let status = csr
                        .status
                        .get_or_insert_with(CertificateSigningRequestStatus::default);
                    status.conditions = Some(vec![condition("Approved", "AutoApproved")]);
                    let _ = csrs
                        .replace_subresource("approval", &name, &PostParams::default(), &csr)
                        .await;
                }
                continue;
            }
            let signed = csr
                .status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some();
            if approved && !signed {
                let Ok(params) = rcgen::CertificateSigningRequestParams::from_pem(&request) else {
                    continue;
                };
                let Ok(cert) = params.signed_by(&issuer) else {
                    continue;
                };
                let status = csr
                    .status
                    .get_or_insert_with(CertificateSigningRequestStatus::default);
                status.certificate = Some(k8s_openapi::ByteString(cert.pem().into_bytes()));
                let _ = csrs
                    .replace_subresource("status", &name, &PostParams::default(), &csr)
                    .await;
            }
        }
        // A double's control loop; the real one watches.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
