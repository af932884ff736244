//! Phase `control-plane`: the Kubernetes control plane on top of etcd.
//! Today it establishes that the image can run one at all; the API server,
//! controller-manager and scheduler steps build on that.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::engine::{Context, Outcome, Phase, Step, StepError};

pub const PHASE: &str = "control-plane";
/// Where images put the Kubernetes binaries: Flatcar sysext/`/opt/bin`
/// first, then the distribution's.
pub const BINARY_DIRS: &[&str] = &["/opt/bin", "/usr/bin"];
pub const BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
];

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![super::etcd::PHASE],
        steps: vec![Box::new(Binaries)],
    }
}

/// The first `dir/name` that exists, for each binary; `Err` lists the
/// missing ones.
pub fn locate_binaries(dirs: &[&str]) -> Result<Vec<PathBuf>, Vec<&'static str>> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in BINARIES {
        match dirs
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
        {
            Some(path) => found.push(path),
            None => missing.push(*name),
        }
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(missing)
    }
}

struct Binaries;

#[async_trait]
impl Step for Binaries {
    fn name(&self) -> &'static str {
        "control-plane-binaries"
    }
    fn summary(&self) -> &'static str {
        "find kube-apiserver, kube-controller-manager, kube-scheduler and kubelet in the image"
    }
    async fn check(&self, _ctx: &Context) -> Result<bool, StepError> {
        Ok(locate_binaries(BINARY_DIRS).is_ok())
    }
    async fn apply(&self, _ctx: &Context) -> Result<Outcome, StepError> {
        match locate_binaries(BINARY_DIRS) {
            Ok(found) => {
                tracing::info!(?found, "Kubernetes control-plane binaries present");
                Ok(Outcome::Done)
            }
            // etcd is formed and recorded; only the layer above it cannot
            // start. Skipping (not failing) keeps the member serving its
            // peers and lets a fixed image finish the phase on the next run.
            Err(missing) => Ok(Outcome::Skipped(format!(
                "{} not found in {}: this image cannot run the Kubernetes control plane; \
                 etcd is formed and stays recorded; install them and run `cluster-agent run` again",
                missing.join(", "),
                BINARY_DIRS.join(" or ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_exactly_the_missing_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        std::fs::write(dir.path().join("kubelet"), b"").unwrap();
        std::fs::write(dir.path().join("kube-scheduler"), b"").unwrap();
        assert_eq!(
            locate_binaries(&[d]).unwrap_err(),
            vec!["kube-apiserver", "kube-controller-manager"]
        );
        for b in BINARIES {
            std::fs::write(dir.path().join(b), b"").unwrap();
        }
        assert_eq!(locate_binaries(&[d]).unwrap().len(), 4);
    }
}
