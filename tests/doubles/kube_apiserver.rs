//! TEST DOUBLE of kube-apiserver (the real one cannot be installed here).
//! Started by the agent's kube-apiserver unit with the real flags; serves
//! the calls cluster-agent and the kubelet/controller-manager doubles make,
//! in the real JSON shapes (k8s-openapi types), storing objects in the real
//! etcd the agent formed, under `/registry/…` as the real one does. So
//! every master's API server sees the same objects, and tests check them
//! with `etcdctl`.
//!
//! Authentication: client certificates from `--client-ca-file` (CN = user,
//! O = groups) and bootstrap tokens (Secrets `bootstrap-token-<id>` in
//! kube-system, checked for secret, expiry and usage). Authorization, a
//! small part of RBAC and the Node authorizer: `system:masters` and the
//! controller-manager may do anything; a bootstrapper may create and read
//! CSRs only if a ClusterRoleBinding grants its group
//! `system:node-bootstrapper`; a node may create and read its own Node and
//! CSRs; anonymous users may read `/readyz` and `/version`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use serde_json::{Value, json};
use tokio::sync::Mutex;

type Reply = Response<Full<Bytes>>;

struct User {
    name: String,
    groups: Vec<String>,
}

struct Server {
    etcd: Mutex<etcd_client::Client>,
}

fn flags() -> BTreeMap<String, String> {
    std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (k, v) = a.strip_prefix("--")?.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("kube-apiserver-double: {path}: {e}"))
}

fn reply(code: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// A `Status` failure as the real API server sends it.
fn status(code: StatusCode, reason: &str, message: String) -> Reply {
    reply(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// Which typed object a resource holds, to validate bodies against the
/// real schema, and its List kind.
fn validate(resource: &str, body: &Value) -> Result<&'static str, String> {
    fn check<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
        serde_json::from_value::<T>(v.clone())
            .map(drop)
            .map_err(|e| e.to_string())
    }
    match resource {
        "secrets" => check::<Secret>(body).map(|_| "Secret"),
        "configmaps" => check::<ConfigMap>(body).map(|_| "ConfigMap"),
        "nodes" => check::<Node>(body).map(|_| "Node"),
        "clusterrolebindings" => check::<ClusterRoleBinding>(body).map(|_| "ClusterRoleBinding"),
        "certificatesigningrequests" => {
            check::<CertificateSigningRequest>(body).map(|_| "CertificateSigningRequest")
        }
        "leases" => check::<Lease>(body).map(|_| "Lease"),
        other => Err(format!("resource {other} is not served by this double")),
    }
}

/// Where a request path points.
struct Target {
    /// `/registry/<resource>/[<namespace>/]`
    prefix: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let resource = rest.first()?.to_string();
    let name = rest.get(1).map(|s| s.to_string());
    let sub = rest.get(2).map(|s| s.to_string());
    let prefix = match &ns {
        Some(ns) => format!("/registry/{resource}/{ns}/"),
        None => format!("/registry/{resource}/"),
    };
    Some(Target {
        prefix,
        resource,
        namespace: ns,
        name,
        subresource: sub,
    })
}

impl Server {
    async fn authenticate(
        &self,
        req: &Request<hyper::body::Incoming>,
        cert: Option<&User>,
    ) -> Option<User> {
        if let Some(u) = cert {
            return Some(User {
                name: u.name.clone(),
                groups: u.groups.clone(),
            });
        }
        let token = req
            .headers()
            .get("authorization")?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .to_string();
        let (id, secret) = token.split_once('.')?;
        let stored = self
            .get(&format!(
                "/registry/secrets/kube-system/bootstrap-token-{id}"
            ))
            .await?;
        let data = |k: &str| -> Option<String> {
            let b = stored["data"][k].as_str()?;
            String::from_utf8(B64.decode(b).ok()?).ok()
        };
        let expires = time::OffsetDateTime::parse(
            &data("expiration")?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let valid = stored["type"] == "bootstrap.kubernetes.io/token"
            && data("token-secret")? == secret
            && data("usage-bootstrap-authentication").as_deref() == Some("true")
            && expires > time::OffsetDateTime::now_utc();
        if !valid {
            return None;
        }
        let mut groups = vec!["system:bootstrappers".to_string()];
        groups.extend(
            data("auth-extra-groups")
                .unwrap_or_default()
                .split(',')
                .filter(|g| !g.is_empty())
                .map(str::to_string),
        );
        Some(User {
            name: format!("system:bootstrap:{id}"),
            groups,
        })
    }

    async fn get(&self, key: &str) -> Option<Value> {
        let resp = self.etcd.lock().await.get(key, None).await.ok()?;
        stored_object(resp.kvs().first()?)
    }

    async fn list(&self, prefix: &str) -> Vec<Value> {
        let Ok(resp) = self
            .etcd
            .lock()
            .await
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
        else {
            return Vec::new();
        };
        resp.kvs().iter().filter_map(stored_object).collect()
    }

    /// Writes `key` only if `condition` holds, in one etcd transaction as
    /// the real one: create-if-absent, or update-if-unchanged
    /// (resourceVersion). `Ok(false)` when the condition failed.
    async fn put_if(&self, key: &str, value: &Value, condition: Compare) -> Result<bool, String> {
        let txn = Txn::new()
            .when([condition])
            .and_then([TxnOp::put(key, value.to_string(), None)]);
        self.etcd
            .lock()
            .await
            .txn(txn)
            .await
            .map(|r| r.succeeded())
            .map_err(|e| e.to_string())
    }

    fn allowed(
        &self,
        user: &User,
        method: &Method,
        resource: &str,
        name: Option<&str>,
        bindings: &[Value],
    ) -> bool {
        let in_group = |g: &str| user.groups.iter().any(|x| x == g);
        if in_group("system:masters") || user.name == "system:kube-controller-manager" {
            return true;
        }
        let bound = |role: &str| {
            bindings.iter().any(|b| {
                b["roleRef"]["name"] == role
                    && b["subjects"].as_array().is_some_and(|s| {
                        s.iter().any(|s| {
                            s["kind"] == "Group" && s["name"].as_str().is_some_and(in_group)
                        })
                    })
            })
        };
        match resource {
            "certificatesigningrequests" if in_group("system:bootstrappers") => {
                bound("system:node-bootstrapper") && matches!(*method, Method::GET | Method::POST)
            }
            "certificatesigningrequests" if in_group("system:nodes") => {
                matches!(*method, Method::GET | Method::POST)
            }
            "nodes" if in_group("system:nodes") => {
                let own = format!("system:node:{}", name.unwrap_or_default());
                *method == Method::POST || user.name == own
            }
            _ if user.name == "system:kube-scheduler" => *method == Method::GET,
            _ => false,
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        cert_user: Option<Arc<User>>,
    ) -> Reply {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/readyz" | "/livez" | "/healthz" => {
                return Response::new(Full::new(Bytes::from_static(b"ok")));
            }
            "/version" => {
                return reply(
                    StatusCode::OK,
                    serde_json::to_value(k8s_openapi::apimachinery::pkg::version::Info {
                        major: "1".into(),
                        minor: "31".into(),
                        git_version: "v1.31.0".into(),
                        platform: "linux/amd64".into(),
                        ..Default::default()
                    })
                    .unwrap(),
                );
            }
            _ => {}
        }
        let Some(user) = self.authenticate(&req, cert_user.as_deref()).await else {
            return status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Unauthorized".into(),
            );
        };
        let Some(Target {
            prefix,
            resource,
            namespace: ns,
            name,
            subresource: sub,
        }) = parse_path(&path)
        else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{path} not found"),
            );
        };
        let method = req.method().clone();
        let bindings = self.list("/registry/clusterrolebindings/").await;
        if !self.allowed(&user, &method, &resource, name.as_deref(), &bindings) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "User \"{}\" cannot {method} resource \"{resource}\"",
                    user.name
                ),
            );
        }
        let body: Option<Value> = match method {
            Method::POST | Method::PUT => {
                let Ok(bytes) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "unreadable body".into(),
                    );
                };
                match serde_json::from_slice(&bytes) {
                    Ok(v) => Some(v),
                    Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
                }
            }
            _ => None,
        };
        let kind = match body
            .as_ref()
            .map(|b| validate(&resource, b))
            .unwrap_or_else(|| validate(&resource, &json!({})))
        {
            Ok(kind) => kind,
            Err(e) if body.is_some() => {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e);
            }
            Err(_) => {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{resource} not served"),
                );
            }
        };
        match (method, name, sub) {
            (Method::GET, None, None) => {
                let items = self.list(&prefix).await;
                reply(
                    StatusCode::OK,
                    json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": {"resourceVersion": "0"}, "items": items}),
                )
            }
            (Method::GET, Some(name), None) => match self.get(&format!("{prefix}{name}")).await {
                Some(v) => reply(StatusCode::OK, v),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{resource} \"{name}\" not found"),
                ),
            },
            (Method::POST, None, None) => {
                let mut obj = body.expect("read above");
                let name = match obj["metadata"]["name"].as_str() {
                    Some(n) => n.to_string(),
                    None => match obj["metadata"]["generateName"].as_str() {
                        Some(g) => format!("{g}{:05x}", rand::random::<u32>() & 0xfffff),
                        None => {
                            return status(
                                StatusCode::UNPROCESSABLE_ENTITY,
                                "Invalid",
                                "metadata.name required".into(),
                            );
                        }
                    },
                };
                obj["metadata"]["name"] = json!(name);
                if let Some(ns) = &ns {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                obj["metadata"]["uid"] = json!(format!("{:032x}", rand::random::<u128>()));
                obj["metadata"]["creationTimestamp"] = json!(
                    time::OffsetDateTime::now_utc()
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap()
                );
                if resource == "secrets"
                    && let Some(string_data) = obj.get("stringData").cloned()
                {
                    let data = obj["data"].as_object().cloned().unwrap_or_default();
                    let mut data = data;
                    for (k, v) in string_data.as_object().into_iter().flatten() {
                        data.insert(k.clone(), json!(B64.encode(v.as_str().unwrap_or_default())));
                    }
                    obj["data"] = Value::Object(data);
                    obj.as_object_mut().unwrap().remove("stringData");
                }
                if resource == "certificatesigningrequests" {
                    obj["spec"]["username"] = json!(user.name);
                    obj["spec"]["groups"] = json!(user.groups);
                }
                match self
                    .put_if(
                        &format!("{prefix}{name}"),
                        &obj,
                        Compare::create_revision(format!("{prefix}{name}"), CompareOp::Equal, 0),
                    )
                    .await
                {
                    Ok(true) => {
                        let stored = self.get(&format!("{prefix}{name}")).await.unwrap_or(obj);
                        reply(StatusCode::CREATED, stored)
                    }
                    Ok(false) => status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{resource} \"{name}\" already exists"),
                    ),
                    Err(e) => status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        format!("etcd: {e}"),
                    ),
                }
            }
            (Method::PUT, Some(name), sub) => {
                let key = format!("{prefix}{name}");
                let Some(mut current) = self.get(&key).await else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{resource} \"{name}\" not found"),
                    );
                };
                let new = body.expect("read above");
                // Optimistic concurrency, as the real one: a write based on
                // an older version is a conflict.
                let expected = new["metadata"]["resourceVersion"].as_str();
                if expected
                    .is_some_and(|v| Some(v) != current["metadata"]["resourceVersion"].as_str())
                {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!("{resource} \"{name}\" was modified"),
                    );
                }
                match sub.as_deref() {
                    // The approval subresource changes conditions only; the
                    // status subresource the status only.
                    Some("approval") => {
                        current["status"]["conditions"] = new["status"]["conditions"].clone()
                    }
                    Some("status") => current["status"] = new["status"].clone(),
                    None => current = new,
                    Some(other) => {
                        return status(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            format!("subresource {other}"),
                        );
                    }
                }
                let revision = current["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                match self
                    .put_if(
                        &key,
                        &current,
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
                    )
                    .await
                {
                    Ok(true) => reply(StatusCode::OK, self.get(&key).await.unwrap_or(current)),
                    Ok(false) => status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!("{resource} \"{name}\" was modified"),
                    ),
                    Err(e) => status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        format!("etcd: {e}"),
                    ),
                }
            }
            (m, _, _) => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{m} not served"),
            ),
        }
    }
}

/// An object as stored, with its etcd revision as resourceVersion.
fn stored_object(kv: &etcd_client::KeyValue) -> Option<Value> {
    let mut v: Value = serde_json::from_slice(kv.value()).ok()?;
    v["metadata"]["resourceVersion"] = json!(kv.mod_revision().to_string());
    Some(v)
}

/// CN and O of the client certificate, if one was presented.
fn cert_user(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(User { name, groups })
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let f = flags();
    let flag = |k: &str| {
        f.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("kube-apiserver-double: --{k} is required"))
    };
    let addr = format!("{}:{}", flag("bind-address"), flag("secure-port"));

    let endpoints: Vec<String> = flag("etcd-servers")
        .split(',')
        .map(str::to_string)
        .collect();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(&flag(
            "etcd-cafile",
        ))))
        .identity(etcd_client::Identity::from_pem(
            read(&flag("etcd-certfile")),
            read(&flag("etcd-keyfile")),
        ));
    let etcd = etcd_client::Client::connect(
        endpoints,
        Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    )
    .await
    .expect("kube-apiserver-double: etcd");

    let certs: Vec<_> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(&read(&flag("tls-cert-file")))
            .collect::<Result<_, _>>()
            .unwrap();
    let key =
        rustls::pki_types::pem::PemObject::from_pem_slice(&read(&flag("tls-private-key-file")))
            .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::pem::PemObject::pem_slice_iter(&read(&flag("client-ca-file"))) {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("kube-apiserver-double: bind");
    let server = Arc::new(Server {
        etcd: Mutex::new(etcd),
    });
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| cert_user(c))
                .map(Arc::new);
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                let user = user.clone();
                async move { Ok::<_, Infallible>(server.handle(req, user).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
