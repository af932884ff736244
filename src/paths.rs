//! Every host path the agent touches goes through [`HostPaths`], so the whole
//! agent can run inside a temp dir (`--root`) for tests and the lab.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    root: PathBuf,
    config_dir: PathBuf,
    state_dir: PathBuf,
}

pub const DEFAULT_CONFIG_DIR: &str = "/etc/cluster-config";
/// Where an image keeps the programs the agent runs (etcd, the Kubernetes
/// components, containerd), searched in this order under `--root`:
/// `/opt/bin` (Flatcar's place for added binaries), then `/usr/bin`
/// (the distribution's, and where systemd-sysext images merge), then
/// `/usr/sbin` (where Debian puts runc and dnsmasq).
pub const BINARY_DIRS: &[&str] = &["/opt/bin", "/usr/bin", "/usr/sbin"];
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cluster-state";

impl HostPaths {
    /// `config_dir`/`state_dir` given explicitly are used as they are; when
    /// absent, the defaults are placed under `root`.
    pub fn new(root: &Path, config_dir: Option<&Path>, state_dir: Option<&Path>) -> HostPaths {
        let root = root.to_path_buf();
        let under_root = |p: &str| prefix(&root, Path::new(p));
        HostPaths {
            config_dir: config_dir
                .map(Path::to_path_buf)
                .unwrap_or_else(|| under_root(DEFAULT_CONFIG_DIR)),
            state_dir: state_dir
                .map(Path::to_path_buf)
                .unwrap_or_else(|| under_root(DEFAULT_STATE_DIR)),
            root,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `host("/etc/kubernetes/pki")` → `<root>/etc/kubernetes/pki`.
    pub fn host(&self, absolute: impl AsRef<Path>) -> PathBuf {
        prefix(&self.root, absolute.as_ref())
    }

    pub fn state_file(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    /// `<root><dir>/<name>` for the first of [`BINARY_DIRS`] that has it.
    pub fn find_binary(&self, name: &str) -> Option<PathBuf> {
        BINARY_DIRS
            .iter()
            .map(|d| self.host(d).join(name))
            .find(|p| p.is_file())
    }

    /// [`Self::find_binary`], or where the image should have put it: units
    /// are rendered (and checked) before the image is known to be complete.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.find_binary(name)
            .unwrap_or_else(|| self.host(BINARY_DIRS[0]).join(name))
    }

    /// `<root>/opt/bin or <root>/usr/bin`, for messages about a missing
    /// binary.
    pub fn binary_dirs(&self) -> String {
        BINARY_DIRS
            .iter()
            .map(|d| self.host(d).display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

fn prefix(root: &Path, path: &Path) -> PathBuf {
    let relative: PathBuf = path
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
        .collect();
    root.join(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_live_under_root() {
        let p = HostPaths::new(Path::new("/tmp/n1"), None, None);
        assert_eq!(p.config_dir(), Path::new("/tmp/n1/etc/cluster-config"));
        assert_eq!(p.state_dir(), Path::new("/tmp/n1/var/lib/cluster-state"));
        assert_eq!(p.host("/etc/ceph"), Path::new("/tmp/n1/etc/ceph"));
    }

    #[test]
    fn explicit_dirs_are_taken_verbatim() {
        let p = HostPaths::new(Path::new("/tmp/n1"), Some(Path::new("cfg")), None);
        assert_eq!(p.config_dir(), Path::new("cfg"));
    }

    #[test]
    fn slash_root_is_identity() {
        let p = HostPaths::new(Path::new("/"), None, None);
        assert_eq!(p.host("/var/lib/etcd"), Path::new("/var/lib/etcd"));
    }
}
