//! TEST DOUBLE of the kubelet: the real TLS-bootstrap exchange. With the
//! token from `--bootstrap-kubeconfig` it submits a CSR for
//! `system:node:<name>` (signer kube-apiserver-client-kubelet), waits for
//! approval and the certificate, writes `kubelet-client-current.pem` and
//! `--kubeconfig`, then with its own identity creates its Node and asks for
//! a serving certificate (signer kubelet-serving, SANs = hostname and IP).
//! `--version` prints `Kubernetes $KUBELET_DOUBLE_VERSION` (default
//! v1.31.0).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

#[path = "../support/node_csr.rs"]
mod node_csr;
use node_csr::node_csr_pem;

fn flags() -> BTreeMap<String, String> {
    std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (k, v) = a.strip_prefix("--")?.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

async fn submit(
    api: &Api<CertificateSigningRequest>,
    prefix: &str,
    pem: &str,
    signer: &str,
    usages: &[&str],
) -> String {
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(prefix.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(pem.as_bytes().to_vec()),
            signer_name: signer.into(),
            usages: Some(usages.iter().map(|u| u.to_string()).collect()),
            ..Default::default()
        },
        status: None,
    };
    loop {
        match api.create(&PostParams::default(), &object).await {
            Ok(created) => return created.metadata.name.unwrap(),
            Err(e) => eprintln!("kubelet-double: CSR not accepted yet: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--version") {
        let version = std::env::var("KUBELET_DOUBLE_VERSION").unwrap_or_else(|_| "v1.31.0".into());
        println!("Kubernetes {version}");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let f = flags();
    let name = f["hostname-override"].clone();
    let ip = f["node-ip"].clone();
    let cert_dir = std::path::PathBuf::from(&f["cert-dir"]);
    let current = cert_dir.join("kubelet-client-current.pem");
    let kubeconfig = std::path::PathBuf::from(&f["kubeconfig"]);
    if !current.exists() || !kubeconfig.exists() {
        let bootstrap = f["bootstrap-kubeconfig"].clone();
        let client = cluster_agent::k8s::client_from_kubeconfig(bootstrap.as_ref())
            .await
            .expect("bootstrap kubeconfig");
        let api: Api<CertificateSigningRequest> = Api::all(client);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr_name = submit(
            &api,
            "node-csr-",
            &node_csr_pem(&key, &format!("system:node:{name}"), &[]),
            "kubernetes.io/kube-apiserver-client-kubelet",
            &["digital signature", "client auth"],
        )
        .await;
        let cert = loop {
            if let Ok(c) = api.get(&csr_name).await
                && let Some(cert) = c.status.and_then(|s| s.certificate)
            {
                break String::from_utf8(cert.0).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        std::fs::create_dir_all(&cert_dir).unwrap();
        let text = std::fs::read_to_string(&bootstrap).unwrap();
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(k))
                .unwrap()
                .trim()
                .to_string()
        };
        let server = field("server:");
        let ca = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(field("certificate-authority-data:"))
                .unwrap(),
        )
        .unwrap();
        let own = cluster_agent::k8s::render_kubeconfig(
            "default",
            &server,
            &ca,
            &format!("system:node:{name}"),
            cluster_agent::k8s::Credentials::ClientCert {
                cert_pem: &cert,
                key_pem: &key.serialize_pem(),
            },
        );
        std::fs::write(&kubeconfig, own).unwrap();
        std::fs::write(&current, format!("{cert}{}", key.serialize_pem())).unwrap();
    }
    let client = cluster_agent::k8s::client_from_kubeconfig(&kubeconfig)
        .await
        .expect("kubelet kubeconfig");
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.clone(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.clone(),
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Registers until it is registered, as the real kubelet keeps trying.
    while nodes.get(&name).await.is_err() {
        if let Err(e) = nodes.create(&PostParams::default(), &node).await {
            eprintln!("kubelet-double: cannot register yet: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let serving_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csrs: Api<CertificateSigningRequest> = Api::all(client);
    submit(
        &csrs,
        "csr-",
        &node_csr_pem(&serving_key, &format!("system:node:{name}"), &[&name, &ip]),
        "kubernetes.io/kubelet-serving",
        &["digital signature", "server auth"],
    )
    .await;
    std::future::pending::<()>().await;
}
