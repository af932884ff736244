// A PEM CSR as a kubelet writes it (CN = `cn`, O = system:nodes), shared by
// the kubelet double, the Kubernetes tests and the approver's unit tests
// (each includes this file by path: they are different crates).

pub fn node_csr_pem(key: &rcgen::KeyPair, cn: &str, sans: &[&str]) -> String {
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params.serialize_request(key).unwrap().pem().unwrap()
}
