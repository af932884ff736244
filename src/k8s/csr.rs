//! Client certificates through the certificates API: the node sends a CSR
//! for a key it keeps, an approver decides, the controller-manager's
//! signer signs. Used for identities a node needs besides its kubelet's
//! (kube-proxy's) without a CA key or a private key on the wire.

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use super::{K8sError, api_error};

/// The signer of client certificates the API server accepts.
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
/// What such a certificate may do, and all it may do (the signer refuses
/// more).
pub const CLIENT_USAGES: [&str; 2] = ["digital signature", "client auth"];

/// What became of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Pending,
    /// The signed certificate, PEM.
    Issued(String),
    /// Denied or failed, with the reason the approver or signer gave.
    Refused(String),
}

/// Sends `csr_pem` for a client certificate; returns the request's name
/// (`<name_prefix><random>`: every attempt is a new object, so a request
/// a crash orphaned never blocks the next).
pub async fn create(
    client: &kube::Client,
    name_prefix: &str,
    csr_pem: &str,
) -> Result<String, K8sError> {
    let request = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(name_prefix.to_string()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.as_bytes().to_vec()),
            signer_name: CLIENT_SIGNER.into(),
            usages: Some(CLIENT_USAGES.map(String::from).to_vec()),
            ..Default::default()
        },
        status: None,
    };
    let created = Api::<CertificateSigningRequest>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await
        .map_err(api_error(format!(
            "create CertificateSigningRequest {name_prefix}…"
        )))?;
    Ok(created.metadata.name.unwrap_or_default())
}

pub async fn answer(client: &kube::Client, name: &str) -> Result<Answer, K8sError> {
    let csr = Api::<CertificateSigningRequest>::all(client.clone())
        .get(name)
        .await
        .map_err(api_error(format!("get CertificateSigningRequest {name}")))?;
    let status = csr.status.unwrap_or_default();
    let refusal = status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True");
    if let Some(c) = refusal {
        return Ok(Answer::Refused(format!(
            "{} ({}): {}",
            c.type_,
            c.reason.as_deref().unwrap_or("no reason"),
            c.message.as_deref().unwrap_or("")
        )));
    }
    Ok(match status.certificate {
        Some(cert) if !cert.0.is_empty() => {
            Answer::Issued(String::from_utf8_lossy(&cert.0).into_owned())
        }
        _ => Answer::Pending,
    })
}
