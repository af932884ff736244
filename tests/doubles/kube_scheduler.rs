//! TEST DOUBLE of kube-scheduler: authenticates to the API server with the
//! kubeconfig its unit names (so a broken scheduler.conf fails it, as it
//! would the real one) and then stays up, as a scheduler with nothing to
//! schedule does.

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = std::env::args()
        .find_map(|a| a.strip_prefix("--kubeconfig=").map(str::to_string))
        .expect("kube-scheduler-double: --kubeconfig is required");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = cluster_agent::k8s::client_from_kubeconfig(kubeconfig.as_ref())
            .await
            .expect("kube-scheduler-double: kubeconfig");
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
        nodes
            .list(&Default::default())
            .await
            .expect("kube-scheduler-double: cannot list nodes");
        std::future::pending::<()>().await;
    });
}
