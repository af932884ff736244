//! The CRI calls the agent makes over containerd's unix socket: `Version`,
//! the same question the kubelet's `PreInitRuntimeService` asks before it
//! does anything else, so "it answers" means "a kubelet can start"; and
//! listing, stopping and removing pod sandboxes, which `reset` does once
//! the kubelet is stopped (containerd's `KillMode=process` leaves the pods
//! running when containerd itself stops).
//!
//! The messages are written by hand from `k8s.io/cri-api`'s
//! `runtime/v1/api.proto` (tags as there), so there is no build script and
//! no protoc step for one call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;

/// The gRPC method, as `api.proto` names it (`package runtime.v1`).
pub const VERSION_METHOD: &str = "/runtime.v1.RuntimeService/Version";
pub const LIST_PODS_METHOD: &str = "/runtime.v1.RuntimeService/ListPodSandbox";
pub const STOP_POD_METHOD: &str = "/runtime.v1.RuntimeService/StopPodSandbox";
pub const REMOVE_POD_METHOD: &str = "/runtime.v1.RuntimeService/RemovePodSandbox";
/// The CRI version this client speaks, as the kubelet sends it.
pub const CRI_API_VERSION: &str = "v1";

/// `message VersionRequest { string version = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

/// `message VersionResponse`: the CRI version and the runtime's name,
/// version and API version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

/// `message ListPodSandboxRequest { PodSandboxFilter filter = 1; }`, sent
/// without a filter: every sandbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxRequest {}

/// `message ListPodSandboxResponse { repeated PodSandbox items = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

/// `message PodSandbox { string id = 1; … }`: only the id is read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
}

/// `StopPodSandboxRequest` and `RemovePodSandboxRequest`, both
/// `{ string pod_sandbox_id = 1; }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxIdRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// The empty `StopPodSandboxResponse` / `RemovePodSandboxResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// What the runtime says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// `containerd`
    pub runtime_name: String,
    /// `v2.2.9`
    pub runtime_version: String,
    /// `v1`
    pub runtime_api_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the CRI socket {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// containerd answers, but not as a CRI runtime (the CRI plugin is
    /// disabled or failed to load: `Unimplemented`), or refuses the call.
    #[error("CRI {method} on {} failed: {} ({:?})", socket.display(), status.message(), status.code())]
    Call {
        socket: PathBuf,
        method: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("no CRI answer on {} within {timeout:?}", socket.display())]
    Timeout { socket: PathBuf, timeout: Duration },
}

/// Asks the runtime behind `socket` for its version, within `timeout`
/// (connect and call together): a down runtime never stalls a step or
/// `status`.
pub async fn version(socket: &Path, timeout: Duration) -> Result<RuntimeVersion, CriError> {
    let response: VersionResponse = within(socket, timeout, async {
        let mut grpc = connect(socket).await?;
        let request = VersionRequest {
            version: CRI_API_VERSION.into(),
        };
        unary(&mut grpc, socket, VERSION_METHOD, request).await
    })
    .await?;
    Ok(RuntimeVersion {
        runtime_name: response.runtime_name,
        runtime_version: response.runtime_version,
        runtime_api_version: response.runtime_api_version,
    })
}

/// Stops and removes every pod sandbox (their containers, and through CNI
/// their network, go with them); how many there were. `timeout` bounds
/// the whole job.
pub async fn remove_all_pods(socket: &Path, timeout: Duration) -> Result<usize, CriError> {
    within(socket, timeout, async {
        let mut grpc = connect(socket).await?;
        let list: ListPodSandboxResponse = unary(
            &mut grpc,
            socket,
            LIST_PODS_METHOD,
            ListPodSandboxRequest {},
        )
        .await?;
        for pod in &list.items {
            for method in [STOP_POD_METHOD, REMOVE_POD_METHOD] {
                let request = PodSandboxIdRequest {
                    pod_sandbox_id: pod.id.clone(),
                };
                let _: Empty = unary(&mut grpc, socket, method, request).await?;
            }
        }
        Ok(list.items.len())
    })
    .await
}

async fn within<T>(
    socket: &Path,
    timeout: Duration,
    job: impl std::future::Future<Output = Result<T, CriError>>,
) -> Result<T, CriError> {
    match tokio::time::timeout(timeout, job).await {
        Ok(result) => result,
        Err(_) => Err(CriError::Timeout {
            socket: socket.to_path_buf(),
            timeout,
        }),
    }
}

type Grpc = tonic::client::Grpc<tonic::transport::Channel>;

async fn connect(socket: &Path) -> Result<Grpc, CriError> {
    let connect = |source| CriError::Connect {
        socket: socket.to_path_buf(),
        source,
    };
    // tonic dials `unix://` endpoints itself; the HTTP/2 authority is a
    // placeholder that containerd ignores.
    let channel = tonic::transport::Endpoint::from_shared(super::endpoint_of(socket))
        .map_err(connect)?
        .connect()
        .await
        .map_err(connect)?;
    Ok(tonic::client::Grpc::new(channel))
}

async fn unary<Req, Resp>(
    grpc: &mut Grpc,
    socket: &Path,
    method: &'static str,
    request: Req,
) -> Result<Resp, CriError>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let failed = |status: tonic::Status| CriError::Call {
        socket: socket.to_path_buf(),
        method,
        status: Box::new(status),
    };
    grpc.ready()
        .await
        .map_err(|e| failed(tonic::Status::unavailable(e.to_string())))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    Ok(grpc
        .unary(
            tonic::Request::new(request),
            PathAndQuery::from_static(method),
            codec,
        )
        .await
        .map_err(failed)?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The wire bytes of the hand-written messages are the ones protoc's
    /// code produces for api.proto: field n, wire type 2 (length-delimited).
    #[test]
    fn messages_match_the_proto_tags() {
        let request = VersionRequest {
            version: "v1".into(),
        };
        assert_eq!(request.encode_to_vec(), [0x0a, 2, b'v', b'1']);
        let wire = [
            0x0a, 2, b'0', b'.', // version = 1
            0x12, 1, b'c', // runtime_name = 2
            0x1a, 1, b'2', // runtime_version = 3
            0x22, 2, b'v', b'1', // runtime_api_version = 4
        ];
        let response = VersionResponse::decode(&wire[..]).unwrap();
        assert_eq!(
            response,
            VersionResponse {
                version: "0.".into(),
                runtime_name: "c".into(),
                runtime_version: "2".into(),
                runtime_api_version: "v1".into(),
            }
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let err = version(&socket, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, CriError::Connect { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&socket.display().to_string()),
            "{err}"
        );
    }

    /// A socket nobody answers on (bound, never accepted from): the call is
    /// cut at the deadline instead of hanging.
    #[tokio::test]
    async fn a_silent_socket_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("silent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let started = std::time::Instant::now();
        let err = version(&socket, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, CriError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
