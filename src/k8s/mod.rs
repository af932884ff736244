//! The one seam to the Kubernetes API: kubeconfigs, readiness and version
//! probes pinned to the cluster CA, and the cluster objects a bootstrap
//! needs (bootstrap tokens, the RBAC bindings for TLS bootstrapping,
//! `cluster-info`), each created idempotently (create, or keep what is
//! there).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::{
    ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, PostParams};
use time::OffsetDateTime;

pub mod apply;
pub mod approver;
pub mod csr;
pub mod lease;
pub mod node;

pub const BOOTSTRAP_TOKEN_TYPE: &str = "bootstrap.kubernetes.io/token";
/// The group kubeadm's node tokens put bootstrapping kubelets in; the RBAC
/// bindings below name it, so kubeadm-minded tooling keeps working.
pub const BOOTSTRAPPERS_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
const TOKEN_DESCRIPTION: &str = "minted by cluster-agent serve-join for joining nodes";
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("kubeconfig {}: {reason}", path.display())]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("Kubernetes API: {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{url}: {reason}")]
    Probe { url: String, reason: String },
    #[error(
        "{what} exists with other content ({detail}); delete it or fix it by hand, the agent does not overwrite it"
    )]
    Conflict { what: String, detail: String },
}

/// How a kubeconfig's user authenticates.
pub enum Credentials<'a> {
    ClientCert { cert_pem: &'a str, key_pem: &'a str },
    Token(&'a str),
}

/// A kubeconfig with one cluster, one user, one context. Every value is a
/// URL, a name from cluster.yaml or base64, so plain formatting is valid
/// YAML.
pub fn render_kubeconfig(
    cluster: &str,
    server: &str,
    ca_pem: &str,
    user: &str,
    credentials: Credentials<'_>,
) -> String {
    let user_fields = match credentials {
        Credentials::ClientCert { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            B64.encode(cert_pem),
            B64.encode(key_pem)
        ),
        Credentials::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n{user_fields}contexts:\n- name: {user}@{cluster}\n  context:\n    cluster: {cluster}\n    user: {user}\ncurrent-context: {user}@{cluster}\n",
        ca = B64.encode(ca_pem),
    )
}

/// The cluster-only kubeconfig kubeadm publishes as `cluster-info`.
pub fn render_cluster_info(cluster: &str, server: &str, ca_pem: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers: []\ncontexts: []\n",
        B64.encode(ca_pem)
    )
}

/// A client from a kubeconfig file (TLS through rustls with ring).
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, K8sError> {
    client_with_timeouts(path, PROBE_TIMEOUT, Duration::from_secs(30)).await
}

/// The same, for callers with a time budget (`status`).
pub async fn client_with_timeouts(
    path: &Path,
    connect: Duration,
    read: Duration,
) -> Result<kube::Client, K8sError> {
    let bad = |reason: String| K8sError::Kubeconfig {
        path: path.to_path_buf(),
        reason,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    config.connect_timeout = Some(connect);
    config.read_timeout = Some(read);
    kube::Client::try_from(config).map_err(|e| bad(e.to_string()))
}

/// An HTTPS client that trusts exactly the cluster CA, on ring.
fn pinned(ca_pem: &str) -> Result<reqwest::Client, String> {
    pinned_client(ca_pem, PROBE_TIMEOUT)
}

/// The same with a deadline of the caller's for every request.
pub fn pinned_client(ca_pem: &str, timeout: Duration) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<_> = rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the cluster CA is not PEM: {e}"))?;
    for cert in certs {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    trusting(roots, timeout)
}

/// A client trusting `roots` alone (none: plain HTTP only).
fn trusting(roots: rustls::RootCertStore, timeout: Duration) -> Result<reqwest::Client, String> {
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())
}

/// `GET /readyz` (anonymous, as the API server allows) with the server
/// authenticated by the cluster CA.
pub async fn readyz(server: &str, ca_pem: &str) -> Result<(), K8sError> {
    let url = format!("{server}/readyz");
    let fail = |reason: String| K8sError::Probe {
        url: url.clone(),
        reason,
    };
    let client = pinned(ca_pem).map_err(fail)?;
    answers_success(&client, &url).await
}

/// `GET url` over plain HTTP answers 2xx: the health endpoints node
/// daemons (kube-proxy's `/healthz`) serve without TLS.
pub async fn http_ok(url: &str) -> Result<(), K8sError> {
    let client = trusting(rustls::RootCertStore::empty(), PROBE_TIMEOUT).map_err(|reason| {
        K8sError::Probe {
            url: url.to_string(),
            reason,
        }
    })?;
    answers_success(&client, url).await
}

async fn answers_success(client: &reqwest::Client, url: &str) -> Result<(), K8sError> {
    let fail = |reason: String| K8sError::Probe {
        url: url.to_string(),
        reason,
    };
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| fail(crate::error_chain(&e)))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(fail(format!("{status}: {}", body.trim())))
    }
}

/// The API server's `gitVersion` from `/version`, e.g. `v1.31.0`.
pub async fn server_version(server: &str, ca_pem: &str) -> Result<String, K8sError> {
    let url = format!("{server}/version");
    let fail = |reason: String| K8sError::Probe {
        url: url.clone(),
        reason,
    };
    let client = pinned(ca_pem).map_err(fail)?;
    let info: k8s_openapi::apimachinery::pkg::version::Info = client
        .get(&url)
        .send()
        .await
        .map_err(|e| fail(crate::error_chain(&e)))?
        .error_for_status()
        .map_err(|e| fail(e.to_string()))?
        .json()
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(info.git_version)
}

/// `(major, minor)` of `v1.31.0`, `1.31`, `v1.31.0+k3s1`…
pub fn minor_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim_start_matches('v').split(['.', '+', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A bootstrap token `<id>.<secret>` and when it expires.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    pub id: String,
    secret: String,
    pub expires: OffsetDateTime,
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapToken")
            .field("id", &self.id)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl BootstrapToken {
    fn generate(ttl: time::Duration) -> BootstrapToken {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let pick = |n: usize| -> String {
            (0..n)
                .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
                .collect()
        };
        BootstrapToken {
            id: pick(6),
            secret: pick(16),
            expires: OffsetDateTime::now_utc() + ttl,
        }
    }

    /// `<id>.<secret>`, the bearer credential.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    pub fn expires_rfc3339(&self) -> String {
        self.expires
            .format(&time::format_description::well_known::Rfc3339)
            .expect("a UTC time formats")
    }

    fn to_secret(&self) -> Secret {
        let data: BTreeMap<String, String> = [
            ("description", TOKEN_DESCRIPTION.to_string()),
            ("token-id", self.id.clone()),
            ("token-secret", self.secret.clone()),
            ("expiration", self.expires_rfc3339()),
            ("usage-bootstrap-authentication", "true".into()),
            ("usage-bootstrap-signing", "true".into()),
            ("auth-extra-groups", BOOTSTRAPPERS_GROUP.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(format!("bootstrap-token-{}", self.id)),
                namespace: Some("kube-system".into()),
                ..Default::default()
            },
            type_: Some(BOOTSTRAP_TOKEN_TYPE.into()),
            string_data: Some(data),
            ..Default::default()
        }
    }

    fn from_secret(secret: &Secret) -> Option<BootstrapToken> {
        if secret.type_.as_deref() != Some(BOOTSTRAP_TOKEN_TYPE) {
            return None;
        }
        let data = secret.data.as_ref()?;
        let field = |k: &str| {
            data.get(k)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        if field("description").as_deref() != Some(TOKEN_DESCRIPTION) {
            return None;
        }
        Some(BootstrapToken {
            id: field("token-id")?,
            secret: field("token-secret")?,
            expires: OffsetDateTime::parse(
                &field("expiration")?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()?,
        })
    }
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> K8sError {
    let what = what.into();
    move |source| K8sError::Api { what, source }
}

/// A token of ours with at least `renew_before` left, or a fresh one valid
/// for `ttl`: a node that boots weeks after the cluster still joins.
pub async fn ensure_bootstrap_token(
    client: &kube::Client,
    ttl: Duration,
    renew_before: Duration,
) -> Result<BootstrapToken, K8sError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    let list = secrets
        .list(&ListParams::default())
        .await
        .map_err(api_error("list secrets in kube-system"))?;
    let horizon = OffsetDateTime::now_utc() + renew_before;
    if let Some(token) = list
        .items
        .iter()
        .filter_map(BootstrapToken::from_secret)
        .filter(|t| t.expires > horizon)
        .max_by_key(|t| t.expires)
    {
        return Ok(token);
    }
    let token =
        BootstrapToken::generate(time::Duration::try_from(ttl).unwrap_or(time::Duration::DAY));
    secrets
        .create(&PostParams::default(), &token.to_secret())
        .await
        .map_err(api_error("create a bootstrap token secret"))?;
    tracing::info!(id = %token.id, expires = %token.expires_rfc3339(), "minted a bootstrap token");
    Ok(token)
}

/// Creates `object` unless one of that name exists; an existing one must
/// carry the same `compare` projection.
async fn create_or_keep<K>(
    api: &Api<K>,
    object: &K,
    what: &str,
    compare: impl Fn(&K) -> String,
) -> Result<(), K8sError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = api
                .get(&name)
                .await
                .map_err(api_error(format!("get {what}")))?;
            if compare(&existing) == compare(object) {
                Ok(())
            } else {
                Err(K8sError::Conflict {
                    what: what.to_string(),
                    detail: format!("found {}, want {}", compare(&existing), compare(object)),
                })
            }
        }
        Err(e) => Err(api_error(format!("create {what}"))(e)),
    }
}

/// The bindings kubeadm creates for TLS bootstrapping: bootstrapping
/// kubelets may create CSRs and have their client CSRs auto-approved;
/// nodes may renew their own client certificates.
pub const TLS_BOOTSTRAP_BINDINGS: &[(&str, &str, &str)] = &[
    (
        "kubeadm:kubelet-bootstrap",
        "system:node-bootstrapper",
        BOOTSTRAPPERS_GROUP,
    ),
    (
        "kubeadm:node-autoapprove-bootstrap",
        "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
        BOOTSTRAPPERS_GROUP,
    ),
    (
        "kubeadm:node-autoapprove-certificate-rotation",
        "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
        "system:nodes",
    ),
];

pub async fn ensure_tls_bootstrap_rbac(client: &kube::Client) -> Result<(), K8sError> {
    let api: Api<ClusterRoleBinding> = Api::all(client.clone());
    for (name, role, group) in TLS_BOOTSTRAP_BINDINGS {
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: role.to_string(),
            },
            subjects: Some(vec![Subject {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Group".into(),
                name: group.to_string(),
                namespace: None,
            }]),
        };
        create_or_keep(&api, &binding, &format!("clusterrolebinding {name}"), |b| {
            format!("{}→{:?}", b.role_ref.name, subject_names(&b.subjects))
        })
        .await?;
    }
    Ok(())
}

/// `kube-public/cluster-info`: the API endpoint and CA, as kubeadm
/// publishes them. Only the `kubeconfig` key is ours: the bootstrapsigner
/// adds a `jws-kubeconfig-<token-id>` signature per signing token, so the
/// rest of the map is expected to differ.
pub async fn ensure_cluster_info(client: &kube::Client, kubeconfig: &str) -> Result<(), K8sError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-public");
    let map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CLUSTER_INFO.into()),
            namespace: Some("kube-public".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "kubeconfig".to_string(),
            kubeconfig.to_string(),
        )])),
        ..Default::default()
    };
    create_or_keep(&api, &map, "configmap kube-public/cluster-info", |m| {
        cluster_info_kubeconfig(m)
            .unwrap_or("<no kubeconfig key>")
            .to_string()
    })
    .await?;
    ensure_cluster_info_readable(client).await
}

pub const CLUSTER_INFO: &str = "cluster-info";
/// kubeadm's name for the Role and RoleBinding that let anyone read
/// `cluster-info`: a joining node reads it before it holds any credential
/// and trusts it only once a token's signature matches.
pub const CLUSTER_INFO_READER: &str = "kubeadm:bootstrap-signer-clusterinfo";

fn cluster_info_kubeconfig(map: &ConfigMap) -> Option<&str> {
    map.data.as_ref()?.get("kubeconfig").map(String::as_str)
}

/// `system:anonymous` may `get` `kube-public/cluster-info`, and nothing
/// else (kubeadm's Role and RoleBinding of the same name).
async fn ensure_cluster_info_readable(client: &kube::Client) -> Result<(), K8sError> {
    ensure_role_for_user(
        client,
        "kube-public",
        CLUSTER_INFO_READER,
        vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![CLUSTER_INFO.into()]),
            verbs: vec!["get".into()],
            ..Default::default()
        }],
        "system:anonymous",
    )
    .await
}

/// The Role `namespace/name` with `rules`, bound (a RoleBinding of the same
/// name) to `user` alone; existing ones must say the same.
pub(crate) async fn ensure_role_for_user(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    rules: Vec<PolicyRule>,
    user: &str,
) -> Result<(), K8sError> {
    let meta = || ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..Default::default()
    };
    let role = Role {
        metadata: meta(),
        rules: Some(rules),
    };
    create_or_keep(
        &Api::namespaced(client.clone(), namespace),
        &role,
        &format!("role {namespace}/{name}"),
        |r: &Role| format!("{:?}", r.rules),
    )
    .await?;
    let binding = RoleBinding {
        metadata: meta(),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: user.into(),
            namespace: None,
        }]),
    };
    create_or_keep(
        &Api::namespaced(client.clone(), namespace),
        &binding,
        &format!("rolebinding {namespace}/{name}"),
        |b: &RoleBinding| format!("{}→{:?}", b.role_ref.name, subject_names(&b.subjects)),
    )
    .await
}

fn subject_names(subjects: &Option<Vec<Subject>>) -> Option<Vec<String>> {
    subjects
        .as_ref()
        .map(|s| s.iter().map(|s| s.name.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_bootstrap_format() {
        let t = BootstrapToken::generate(time::Duration::HOUR);
        let exposed = t.expose();
        let (id, secret) = exposed.split_once('.').unwrap();
        assert_eq!(id.len(), 6);
        assert_eq!(secret.len(), 16);
        assert!(
            exposed
                .chars()
                .all(|c| c == '.' || c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert!(!format!("{t:?}").contains(secret));
        let s = t.to_secret();
        assert_eq!(
            s.metadata.name.as_deref(),
            Some(format!("bootstrap-token-{id}").as_str())
        );
        assert_eq!(
            s.string_data.unwrap()["auth-extra-groups"],
            BOOTSTRAPPERS_GROUP
        );
    }

    #[test]
    fn cluster_info_is_compared_by_its_kubeconfig_alone() {
        let with = |data: &[(&str, &str)]| ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let ours = with(&[("kubeconfig", "k")]);
        let signed = with(&[("kubeconfig", "k"), ("jws-kubeconfig-abcdef", "h..s")]);
        assert_eq!(
            cluster_info_kubeconfig(&ours),
            cluster_info_kubeconfig(&signed)
        );
        assert_ne!(
            cluster_info_kubeconfig(&ours),
            cluster_info_kubeconfig(&with(&[("kubeconfig", "other")]))
        );
        assert_eq!(cluster_info_kubeconfig(&with(&[])), None);
    }

    #[test]
    fn minor_versions() {
        assert_eq!(minor_version("v1.31.0"), Some((1, 31)));
        assert_eq!(minor_version("1.30"), Some((1, 30)));
        assert_eq!(minor_version("v1.29.3+k3s1"), Some((1, 29)));
        assert_eq!(minor_version("garbage"), None);
    }
}
