//! Reading the config directory (cluster.yaml, nodes/*.yaml) into a validated
//! [`ClusterConfig`](super::ClusterConfig).
//!
//! File access is kept apart from [`parse_sources`], which is pure, so tests
//! and the fuzz target exercise exactly what production runs.

use std::path::{Path, PathBuf};

use super::diagnostics::Diagnostic;
use super::raw;
use super::tree::{self, Pos};
use super::validate::{self, Findings};
use super::{CLUSTER_FILE, ClusterConfig, MANIFESTS_DIR, NODES_DIR, ValidationReport};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration in {dir} is invalid:\n{report}")]
    Invalid {
        dir: PathBuf,
        report: ValidationReport,
    },
}

/// The content of one file of the config dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Relative to the config dir, e.g. `nodes/cp-2.yaml`; the file stem
    /// must equal the node's name.
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// The files a configuration is made of, as read from the config dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub cluster_yaml: Vec<u8>,
    /// `nodes/*.yaml`, sorted by name.
    pub node_files: Vec<SourceFile>,
    /// `manifests/*.yaml`, sorted by name: the add-ons masters apply.
    pub manifests: Vec<SourceFile>,
    /// The file `networking.cni.manifest` names, once a parse found it
    /// ([`Sources::read_cni_manifest`]).
    pub cni_manifest: Option<SourceFile>,
}

impl Sources {
    /// Reads the CNI manifest `config` names, if any, from `config_dir`.
    pub fn read_cni_manifest(
        &mut self,
        config_dir: &Path,
        config: &ClusterConfig,
    ) -> Result<(), ConfigError> {
        if let super::Cni::Manifest(path) = &config.cluster.networking.cni {
            let bytes = std::fs::read(config_dir.join(path)).map_err(|source| ConfigError::Io {
                path: config_dir.join(path),
                source,
            })?;
            self.cni_manifest = Some(SourceFile {
                path: path.clone(),
                bytes,
            });
        }
        Ok(())
    }
}

/// Reads `config_dir/cluster.yaml` and `config_dir/nodes/*.yaml` (`*.yml`
/// too) without validating them: exactly the files [`load`] looks at, so
/// whatever ships a configuration to a machine ships all of it.
pub fn read_sources(config_dir: &Path) -> Result<Sources, ConfigError> {
    let read =
        |path: PathBuf| std::fs::read(&path).map_err(|source| ConfigError::Io { path, source });
    let cluster_yaml = read(config_dir.join(CLUSTER_FILE))?;
    Ok(Sources {
        cluster_yaml,
        node_files: read_yaml_files(config_dir, NODES_DIR)?,
        manifests: read_manifests(config_dir)?,
        cni_manifest: None,
    })
}

/// `config_dir/manifests/*.yaml` (`*.yml` too), sorted by name; none when
/// the directory does not exist.
pub fn read_manifests(config_dir: &Path) -> Result<Vec<SourceFile>, ConfigError> {
    read_yaml_files(config_dir, MANIFESTS_DIR)
}

fn read_yaml_files(config_dir: &Path, subdir: &str) -> Result<Vec<SourceFile>, ConfigError> {
    yaml_file_names(&config_dir.join(subdir))?
        .into_iter()
        .map(|name| {
            let path = Path::new(subdir).join(&name);
            std::fs::read(config_dir.join(&path))
                .map(|bytes| SourceFile {
                    path: path.clone(),
                    bytes,
                })
                .map_err(|source| ConfigError::Io {
                    path: config_dir.join(&path),
                    source,
                })
        })
        .collect()
}

/// Reads and validates `config_dir/cluster.yaml` and `config_dir/nodes/*.yaml`
/// (`*.yml` too). Never writes anything.
pub fn load(config_dir: &Path) -> Result<ClusterConfig, ConfigError> {
    let sources = read_sources(config_dir)?;
    parse_sources(config_dir, &sources.cluster_yaml, &sources.node_files).map_err(|report| {
        ConfigError::Invalid {
            dir: config_dir.to_path_buf(),
            report,
        }
    })
}

/// YAML files directly in nodes/, sorted so that results do not depend on
/// directory order. A missing nodes/ is the same as an empty one.
fn yaml_file_names(dir: &Path) -> Result<Vec<String>, ConfigError> {
    let io = |source| ConfigError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        // Non-UTF-8 names cannot match a node name anyway.
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        // Editors leave hidden swap and backup files next to the real ones.
        if is_yaml && !name.starts_with('.') && entry.file_type().map_err(io)?.is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Validates the contents of cluster.yaml and of the node files (paths
/// relative to the config dir). Pure: arbitrary input yields a report, never
/// a panic. `source_dir` only ends up in [`ClusterConfig::source_dir`].
pub fn parse_sources(
    source_dir: &Path,
    cluster_yaml: &[u8],
    node_files: &[SourceFile],
) -> Result<ClusterConfig, ValidationReport> {
    let mut findings = Findings::default();
    let cluster_tree = parse_file(Path::new(CLUSTER_FILE), cluster_yaml, &mut findings.errors);
    let mut sorted: Vec<&SourceFile> = node_files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let node_trees: Vec<(&Path, Option<Option<tree::Node>>)> = sorted
        .iter()
        .map(|f| {
            (
                f.path.as_path(),
                parse_file(&f.path, &f.bytes, &mut findings.errors),
            )
        })
        .collect();

    // Without a syntactically valid cluster.yaml, cross-file checks would
    // only produce noise; the syntax errors come first.
    let config = match cluster_tree {
        Some(cluster_tree) => {
            let cluster = raw::cluster_file(
                Path::new(CLUSTER_FILE),
                cluster_tree.as_ref(),
                &mut findings.errors,
            );
            let nodes: Vec<raw::RawNodeFile> = node_trees
                .iter()
                .filter_map(|(path, tree)| {
                    tree.as_ref()
                        .map(|t| raw::node_file(path, t.as_ref(), &mut findings.errors))
                })
                .collect();
            validate::validate(source_dir, &cluster, &nodes, &mut findings)
        }
        None => None,
    };
    match config {
        Some(config) if findings.errors.is_empty() => Ok(config),
        _ => {
            sort(&mut findings.errors);
            sort(&mut findings.warnings);
            Err(ValidationReport {
                errors: findings.errors,
                warnings: findings.warnings,
            })
        }
    }
}

/// Only cluster.yaml, no node files: the fuzz target's entry point.
pub fn parse_cluster_yaml(bytes: &[u8]) -> Result<ClusterConfig, ValidationReport> {
    parse_sources(Path::new(""), bytes, &[])
}

/// `Some(tree)` when the file is valid YAML (`Some(None)` when it is empty);
/// `None` after reporting why not.
fn parse_file(
    file: &Path,
    bytes: &[u8],
    errors: &mut Vec<Diagnostic>,
) -> Option<Option<tree::Node>> {
    let error = |pos: Pos, message: String| Diagnostic {
        severity: super::Severity::Error,
        file: file.to_path_buf(),
        line: pos.line,
        column: pos.column,
        field: String::new(),
        message,
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            let line = 1 + valid.iter().filter(|b| **b == b'\n').count();
            errors.push(error(
                Pos { line, column },
                "the file is not valid UTF-8".into(),
            ));
            return None;
        }
    };
    match tree::parse(text) {
        Ok(root) => Some(root),
        Err(e) => {
            errors.push(error(e.pos, e.message));
            None
        }
    }
}

/// cluster.yaml first, then node files by name; within a file by position.
fn sort(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by(|a, b| {
        let key = |d: &Diagnostic| {
            (
                d.file != Path::new(CLUSTER_FILE),
                d.file.clone(),
                d.line,
                d.column,
            )
        };
        key(a).cmp(&key(b))
    });
}
