//! Phase `addons` (masters): the CNI manifest `networking.cni.manifest`
//! names, if any, then every `*.yaml` under the config dir's `manifests/`,
//! is applied with server-side apply once the API answers —
//! on the first master, and again by any master that finds a manifest
//! changed. What each master applied is recorded per file by its SHA-256,
//! so an unchanged manifest is not sent again, and a changed one is.
//!
//! A manifest that does not parse, or an object the API refuses, is
//! reported by file, object and the API's reason; everything else is still
//! applied. The typical content is CoreDNS (a Deployment, Service,
//! ConfigMap and RBAC, with the Service at the tenth service IP the
//! kubelets use as `clusterDNS`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::k8s::apply::{self, ApplyError};
use crate::wait::Backoff;

use super::control_plane;

pub const PHASE: &str = "addons";
const RECORD: &str = "addons-applied.json";
/// How long passing refusals are retried: an API server still settling,
/// a CRD being established, a namespace another manifest creates.
const APPLY_WAIT: Duration = Duration::from_secs(120);

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![control_plane::PHASE],
        steps: vec![Box::new(ApplyManifests)],
        owns: crate::engine::owns_nothing,
    }
}

/// Path in the config dir → SHA-256 (hex) of the content last applied in
/// full.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Record {
    applied: BTreeMap<String, String>,
}

struct Manifest {
    file: String,
    digest: String,
    text: String,
}

/// The CNI manifest (`networking.cni.manifest`) first, then the add-ons
/// in name order, each by its path in the config dir, with its digest.
fn manifests(ctx: &Context) -> Result<Vec<Manifest>, StepError> {
    let config_dir = ctx.paths.config_dir();
    let unreadable =
        |e: crate::config::ConfigError| StepError::Precondition(crate::error_chain(&e));
    let mut sources = crate::config::Sources {
        cluster_yaml: Vec::new(),
        node_files: Vec::new(),
        manifests: crate::config::read_manifests(config_dir).map_err(unreadable)?,
        cni_manifest: None,
    };
    sources
        .read_cni_manifest(config_dir, &ctx.config)
        .map_err(unreadable)?;
    Ok(sources
        .cni_manifest
        .into_iter()
        .chain(sources.manifests)
        .map(|f| {
            let digest = ring::digest::digest(&ring::digest::SHA256, &f.bytes);
            Manifest {
                file: f.path.display().to_string(),
                digest: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
                text: String::from_utf8_lossy(&f.bytes).into_owned(),
            }
        })
        .collect())
}

fn record_path(ctx: &Context) -> PathBuf {
    ctx.paths.state_file(RECORD)
}

fn unapplied(ctx: &Context) -> Result<Vec<Manifest>, StepError> {
    let record: Record = super::load_record(&record_path(ctx))?.unwrap_or_default();
    Ok(manifests(ctx)?
        .into_iter()
        .filter(|m| record.applied.get(&m.file) != Some(&m.digest))
        .collect())
}

/// One object (or a whole file) that was not applied.
#[derive(Debug)]
pub struct ManifestFailure {
    pub file: String,
    /// `Kind namespace/name`, when the failure is one object's.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for ManifestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(object) => write!(f, "{}: {object}: {}", self.file, self.reason),
            None => write!(f, "{}: {}", self.file, self.reason),
        }
    }
}

/// Every failure of one pass over the manifests, all reported at once.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} add-on manifest object(s) not applied (the others were):\n  {}\nfix them in {dir} and run the agent again",
    failures.len(),
    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
)]
pub struct ManifestFailures {
    pub dir: String,
    pub failures: Vec<ManifestFailure>,
}

struct ApplyManifests;

#[async_trait]
impl Step for ApplyManifests {
    fn name(&self) -> &'static str {
        "addon-manifests"
    }
    fn summary(&self) -> &'static str {
        "server-side apply the CNI manifest (networking.cni.manifest) and every manifests/*.yaml of the config dir that changed since this master last applied it (field manager cluster-agent)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(unapplied(ctx)?.is_empty())
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let pending = unapplied(ctx)?;
        let client =
            crate::k8s::client_from_kubeconfig(&ctx.paths.host(control_plane::ADMIN_CONF)).await?;
        let mut failures = Vec::new();
        let mut queue = Vec::new();
        for (index, manifest) in pending.iter().enumerate() {
            match serde_saphyr::from_multiple::<serde_json::Value>(&manifest.text) {
                Ok(documents) => queue.extend(
                    documents
                        .into_iter()
                        .filter(|d| !d.is_null())
                        .map(|d| (index, d)),
                ),
                Err(e) => failures.push(ManifestFailure {
                    file: manifest.file.clone(),
                    object: None,
                    reason: format!("not YAML: {e}"),
                }),
            }
        }
        let objects = queue.len();
        ctx.progress.waiting(&format!(
            "the API server to take {objects} object(s) from {} manifest(s)",
            pending.len()
        ));
        let deadline = Instant::now() + APPLY_WAIT;
        let mut backoff = Backoff::remote(Duration::from_secs(2));
        loop {
            let mut again = Vec::new();
            for (index, object) in queue {
                match apply::apply(&client, &object).await {
                    Ok(()) => {}
                    Err(e) if e.is_transient() && Instant::now() < deadline => {
                        tracing::debug!(file = %pending[index].file, "retrying: {e}");
                        again.push((index, object, e));
                    }
                    Err(e) => failures.push(failure(&pending[index], &object, &e)),
                }
            }
            if again.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                failures.extend(again.iter().map(|(i, o, e)| failure(&pending[*i], o, e)));
                break;
            }
            tokio::time::sleep(backoff.next_delay()).await;
            queue = again.into_iter().map(|(i, o, _)| (i, o)).collect();
        }

        // Remember every file applied in full, also when others failed.
        let mut record: Record = super::load_record(&record_path(ctx))?.unwrap_or_default();
        for manifest in &pending {
            if !failures.iter().any(|f| f.file == manifest.file) {
                record
                    .applied
                    .insert(manifest.file.clone(), manifest.digest.clone());
            }
        }
        super::save_record(&record_path(ctx), &record)?;
        if !failures.is_empty() {
            return Err(StepError::Manifests(ManifestFailures {
                dir: ctx.paths.config_dir().display().to_string(),
                failures,
            }));
        }
        tracing::info!(
            objects,
            manifests = pending.len(),
            "add-on manifests applied"
        );
        Ok(Outcome::Done)
    }
}

fn failure(manifest: &Manifest, object: &serde_json::Value, error: &ApplyError) -> ManifestFailure {
    ManifestFailure {
        file: manifest.file.clone(),
        object: apply::describe(object),
        reason: error.to_string(),
    }
}
