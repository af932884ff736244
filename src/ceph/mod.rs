//! The one seam to Ceph: keys in Ceph's own format, `ceph.conf` and
//! keyrings from cluster.yaml, the monitor's admin socket, and the few
//! Ceph tools the monitor's birth needs (`monmaptool`, `ceph-mon --mkfs`,
//! `ceph mon getmap`), and the manager's key and map (`ceph auth`,
//! `ceph mgr dump`).
//!
//! Every path is under `--root`, including the ones ceph.conf names
//! (`mon_data`, `run_dir`, `admin_socket`, `log_file`), so a test root is
//! self-contained and a real node gets the standard locations.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{ClusterConfig, NodeRole, NodeSpec};
use crate::paths::HostPaths;
use crate::wait::Poll;

pub const CLUSTER: &str = "ceph";
pub const CONF_FILE: &str = "/etc/ceph/ceph.conf";
pub const ADMIN_KEYRING: &str = "/etc/ceph/ceph.client.admin.keyring";
pub const BOOTSTRAP_OSD_KEYRING: &str = "/var/lib/ceph/bootstrap-osd/ceph.keyring";
/// Debian's ceph units read it too; the place for `CEPH_ARGS` overrides.
pub const DEFAULTS_FILE: &str = "/etc/default/ceph";
pub const MON_BINARY: &str = "/usr/bin/ceph-mon";
pub const MGR_BINARY: &str = "/usr/bin/ceph-mgr";
pub const MSGR2_PORT: u16 = 3300;
pub const MSGR1_PORT: u16 = 6789;
/// `CEPH_CRYPTO_AES`, the only key type Ceph uses for cephx.
const KEY_TYPE_AES: u16 = 1;
const KEY_SECRET_LEN: usize = 16;
/// A `ceph` CLI call gives up on an unreachable quorum after this.
const CLI_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CephError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        /// The exit code: the `ceph` CLI exits with the errno the cluster
        /// answered (22 EINVAL, 2 ENOENT, 110 ETIMEDOUT, ...).
        code: Option<i32>,
        stderr: String,
    },
    #[error("cannot run `{program}`: {source}; this image must ship ceph-mon and ceph-common")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "monitor {id} is still in the monmap: {source}; check `ceph -s` on a monitor in quorum"
    )]
    NotRemoved {
        id: String,
        #[source]
        source: crate::wait::WaitTimeout,
    },
    #[error("admin socket {}: {reason}", path.display())]
    AdminSocket { path: PathBuf, reason: String },
    #[error("{} is not a keyring we can use: {reason}", path.display())]
    Keyring { path: PathBuf, reason: String },
}

/// A cephx secret in Ceph's encoding: base64 of type (u16), creation time
/// (u32 seconds, u32 nanoseconds), length (u16) and 16 random bytes, all
/// little-endian — what `ceph-authtool --gen-print-key` prints.
#[derive(Clone, PartialEq, Eq)]
pub struct CephKey(String);

impl fmt::Debug for CephKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CephKey(..)")
    }
}

impl CephKey {
    pub fn generate() -> CephKey {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secret: [u8; KEY_SECRET_LEN] = rand::random();
        let mut raw = Vec::with_capacity(12 + KEY_SECRET_LEN);
        raw.extend_from_slice(&KEY_TYPE_AES.to_le_bytes());
        raw.extend_from_slice(&(now.as_secs() as u32).to_le_bytes());
        raw.extend_from_slice(&now.subsec_nanos().to_le_bytes());
        raw.extend_from_slice(&(KEY_SECRET_LEN as u16).to_le_bytes());
        raw.extend_from_slice(&secret);
        CephKey(B64.encode(raw))
    }

    /// Accepts exactly what [`CephKey::generate`] produces.
    pub fn parse(text: &str) -> Option<CephKey> {
        let raw = B64.decode(text.trim()).ok()?;
        let ok = raw.len() == 12 + KEY_SECRET_LEN
            && raw[0..2] == KEY_TYPE_AES.to_le_bytes()
            && raw[10..12] == (KEY_SECRET_LEN as u16).to_le_bytes();
        ok.then(|| CephKey(text.trim().to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// One keyring entry: who, their key, their capabilities.
pub struct KeyringEntry<'a> {
    pub entity: &'a str,
    pub key: &'a CephKey,
    pub caps: &'a [(&'a str, &'a str)],
}

pub fn render_keyring(entries: &[KeyringEntry<'_>]) -> String {
    let mut out = String::new();
    for e in entries {
        out.push_str(&format!("[{}]\n\tkey = {}\n", e.entity, e.key.expose()));
        for (service, cap) in e.caps {
            out.push_str(&format!("\tcaps {service} = \"{cap}\"\n"));
        }
    }
    out
}

/// The key of `entity` in keyring text.
pub fn keyring_key(text: &str, entity: &str) -> Option<CephKey> {
    let header = format!("[{entity}]");
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == header;
        } else if in_section && let Some(value) = line.strip_prefix("key") {
            return CephKey::parse(value.trim_start().strip_prefix('=')?);
        }
    }
    None
}

pub const ADMIN_CAPS: &[(&str, &str)] = &[
    ("mds", "allow *"),
    ("mgr", "allow *"),
    ("mon", "allow *"),
    ("osd", "allow *"),
];
pub const MON_CAPS: &[(&str, &str)] = &[("mon", "allow *")];
/// What Ceph's manual deployment guide gives a manager.
pub const MGR_CAPS: &[(&str, &str)] = &[
    ("mds", "allow *"),
    ("mon", "allow profile mgr"),
    ("osd", "allow *"),
];
pub const BOOTSTRAP_OSD_CAPS: &[(&str, &str)] =
    &[("mgr", "allow r"), ("mon", "profile bootstrap-osd")];

/// The monitor id of a node: its name, as Ceph's own tools use hostnames.
pub fn mon_id(node: &NodeSpec) -> &str {
    &node.name
}

pub fn mon_data_dir(paths: &HostPaths, node: &NodeSpec) -> PathBuf {
    paths.host(format!("/var/lib/ceph/mon/{CLUSTER}-{}", mon_id(node)))
}

pub fn admin_socket(paths: &HostPaths, node: &NodeSpec) -> PathBuf {
    paths.host(format!("/run/ceph/{CLUSTER}-mon.{}.asok", mon_id(node)))
}

/// The manager id of a node: its name, like its monitor's.
pub fn mgr_id(node: &NodeSpec) -> &str {
    &node.name
}

pub fn mgr_entity(node: &NodeSpec) -> String {
    mgr_entity_of(mgr_id(node))
}

pub fn mgr_entity_of(id: &str) -> String {
    format!("mgr.{id}")
}

pub fn mgr_data_dir(paths: &HostPaths, node: &NodeSpec) -> PathBuf {
    paths.host(format!("/var/lib/ceph/mgr/{CLUSTER}-{}", mgr_id(node)))
}

/// Where ceph.conf's `[mgr] keyring` points for this node's manager.
pub fn mgr_keyring(paths: &HostPaths, node: &NodeSpec) -> PathBuf {
    mgr_data_dir(paths, node).join("keyring")
}

/// `[v2:IP:3300,v1:IP:6789]` of one monitor.
pub fn mon_addrs(node: &NodeSpec) -> String {
    format!("[v2:{ip}:{MSGR2_PORT},v1:{ip}:{MSGR1_PORT}]", ip = node.ip)
}

/// ceph.conf for this cluster, identical on every node for the same fsid
/// and root. `mon_host` names every monitor of cluster.yaml, so clients and
/// new monitors find the quorum wherever it currently is.
pub fn render_conf(paths: &HostPaths, config: &ClusterConfig, fsid: &str) -> String {
    let ceph = config
        .cluster
        .ceph
        .as_ref()
        .expect("validation: ceph-mon nodes need a ceph section");
    let mons = crate::role::ordered_nodes(config, NodeRole::CephMon);
    let host = |p: &str| paths.host(p).to_string_lossy().into_owned();
    format!(
        "# Written by cluster-agent from cluster.yaml; edit the configuration, not this file.\n\
         [global]\n\
         fsid = {fsid}\n\
         mon_host = {mon_host}\n\
         public_network = {public}\n\
         cluster_network = {cluster}\n\
         auth_cluster_required = cephx\n\
         auth_service_required = cephx\n\
         auth_client_required = cephx\n\
         auth_allow_insecure_global_id_reclaim = false\n\
         ms_bind_ipv6 = false\n\
         run_dir = {run}\n\
         admin_socket = {run}/$cluster-$name.asok\n\
         log_file = {log}/$cluster-$name.log\n\
         \n\
         [mon]\n\
         mon_data = {mon}/$cluster-$id\n\
         # Ceph 16's default adds restful, which cannot load on Debian 12: its\n\
         # python3-cryptography (PyO3) initialises once per process, and\n\
         # another manager module has. The dashboard serves the REST API.\n\
         mgr_initial_modules = iostat nfs\n\
         \n\
         [mgr]\n\
         mgr_data = {mgr}/$cluster-$id\n\
         keyring = {mgr}/$cluster-$id/keyring\n",
        mon_host = mons
            .iter()
            .map(|n| mon_addrs(n))
            .collect::<Vec<_>>()
            .join(","),
        public = ceph.public_network,
        cluster = ceph.cluster_network,
        run = host("/run/ceph"),
        log = host("/var/log/ceph"),
        mon = host("/var/lib/ceph/mon"),
        mgr = host("/var/lib/ceph/mgr"),
    )
}

/// A fresh fsid (UUID v4).
pub fn generate_fsid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What a monitor's admin socket says about it.
#[derive(Debug, Clone, Deserialize)]
pub struct MonStatus {
    pub name: String,
    /// `probing`, `synchronizing`, `electing`, `leader`, `peon`.
    pub state: String,
    pub quorum: Vec<u32>,
    pub monmap: MonMap,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MonMap {
    pub fsid: String,
    pub mons: Vec<MonMapEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MonMapEntry {
    pub name: String,
    pub rank: u32,
}

impl MonStatus {
    pub fn in_quorum(&self) -> bool {
        matches!(self.state.as_str(), "leader" | "peon")
    }

    /// Names of the monitors in quorum.
    pub fn quorum_names(&self) -> Vec<String> {
        self.monmap
            .mons
            .iter()
            .filter(|m| self.quorum.contains(&m.rank))
            .map(|m| m.name.clone())
            .collect()
    }
}

/// `mon_status` through the monitor's admin socket: local, no auth, no
/// Python start-up (the `ceph` CLI costs ~0.3 s per call). The protocol:
/// the command as JSON and a NUL; the answer is a big-endian u32 length and
/// that many bytes.
pub async fn mon_status(socket: &Path) -> Result<MonStatus, CephError> {
    let fail = |reason: String| CephError::AdminSocket {
        path: socket.to_path_buf(),
        reason,
    };
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        stream
            .write_all(b"{\"prefix\": \"mon_status\"}\0")
            .await
            .map_err(|e| fail(format!("write: {e}")))?;
        let len = stream
            .read_u32()
            .await
            .map_err(|e| fail(format!("read: {e}")))?;
        if len > 16 * 1024 * 1024 {
            return Err(fail(format!("answer of {len} bytes")));
        }
        let mut body = vec![0u8; len as usize];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|e| fail(format!("read: {e}")))?;
        serde_json::from_slice(&body).map_err(|e| fail(format!("not mon_status JSON: {e}")))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .unwrap_or_else(|_| Err(fail("no answer within 2 s".into())))
}

/// Runs a Ceph tool; its stderr tail goes into the error.
async fn run(
    program: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, String)],
) -> Result<Vec<u8>, CephError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.map_err(|source| CephError::Spawn {
        program: program.to_string(),
        source,
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    // ceph-mon reports some failures on stdout.
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let tail: Vec<&str> = output.lines().rev().take(5).collect();
    Err(CephError::Command {
        command: std::iter::once(program.to_string())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" "),
        status: out.status.to_string(),
        code: out.status.code(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
    })
}

/// How long a `ceph` call may take once connected: `--connect-timeout`
/// bounds only the monitors' connection, and a manager command waits for
/// an active manager as long as there is none.
const CLI_COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// Two secrets' bytes compared in constant time (for equal lengths).
pub fn secret_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The `ceph` CLI through the quorum with the admin key; `connect_timeout`
/// bounds how long an unreachable quorum is tried, and the whole call ends
/// (ETIMEDOUT) [`CLI_COMMAND_DEADLINE`] after that. The key is passed in
/// CEPH_ARGS so the CLI neither warns about nor reads /etc/ceph keyrings.
async fn admin_cli(
    conf: &Path,
    admin_keyring: &Path,
    connect_timeout: Duration,
    args: &[&std::ffi::OsStr],
) -> Result<Vec<u8>, CephError> {
    let timeout = connect_timeout.as_secs().max(1).to_string();
    let mut all: Vec<&std::ffi::OsStr> = vec![
        "--connect-timeout".as_ref(),
        timeout.as_ref(),
        "-c".as_ref(),
        conf.as_os_str(),
    ];
    all.extend_from_slice(args);
    let env = [(
        "CEPH_ARGS",
        format!("--keyring {}", admin_keyring.display()),
    )];
    let call = run("ceph", &all, &env);
    // The child is killed on drop.
    tokio::time::timeout(connect_timeout + CLI_COMMAND_DEADLINE, call)
        .await
        .unwrap_or_else(|_| {
            Err(CephError::Command {
                command: std::iter::once("ceph".to_string())
                    .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(" "),
                status: "no answer".into(),
                code: Some(ETIMEDOUT),
                stderr: format!(
                    "no answer within {:?}",
                    connect_timeout + CLI_COMMAND_DEADLINE
                ),
            })
        })
}

/// `ceph quorum_status` through the quorum: (monitors in quorum, every
/// monitor in the map). `connect_timeout` bounds how long an unreachable
/// quorum is tried.
pub async fn quorum_status(
    conf: &Path,
    admin_keyring: &Path,
    connect_timeout: Duration,
) -> Result<(Vec<String>, Vec<String>), CephError> {
    let out = admin_cli(
        conf,
        admin_keyring,
        connect_timeout,
        &["quorum_status".as_ref(), "-f".as_ref(), "json".as_ref()],
    )
    .await?;
    let v: serde_json::Value = parse_json("ceph quorum_status", &out)?;
    let names = |list: &serde_json::Value, key: Option<&str>| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| match key {
                Some(k) => x[k].as_str(),
                None => x.as_str(),
            })
            .map(str::to_string)
            .collect()
    };
    Ok((
        names(&v["quorum_names"], None),
        names(&v["monmap"]["mons"], Some("name")),
    ))
}

/// How long a monitor's removal may take to hold in the quorum's map.
const REMOVE_DEADLINE: Duration = Duration::from_secs(60);

/// Takes monitor `id` out of the monmap through the quorum and returns only
/// once the quorum's map no longer lists it. `ceph mon remove` answered 0
/// under load while the map kept the monitor (the change lost to an
/// election), so the map is read back and the removal asked again until it
/// holds; a monitor already gone is success.
pub async fn remove_monitor(conf: &Path, admin_keyring: &Path, id: &str) -> Result<(), CephError> {
    let ask_removal = || async {
        admin_cli(
            conf,
            admin_keyring,
            CLI_CONNECT_TIMEOUT,
            &["mon".as_ref(), "remove".as_ref(), id.as_ref()],
        )
        .await
    };
    let outcome = crate::wait::poll_until(
        &format!("monitor {id} to leave the monmap"),
        REMOVE_DEADLINE,
        crate::wait::Backoff::remote(Duration::from_secs(2)),
        || async {
            match quorum_status(conf, admin_keyring, CLI_CONNECT_TIMEOUT).await {
                Ok((_, mons)) if !mons.iter().any(|m| m == id) => return Poll::Ready(Ok(())),
                Ok(_) => {}
                Err(e @ CephError::Spawn { .. }) => return Poll::Ready(Err(e)),
                Err(e) => return Poll::Pending(e.to_string()),
            }
            match ask_removal().await {
                Ok(_) => Poll::Pending(format!("the monmap still lists {id}")),
                Err(e @ CephError::Spawn { .. }) => Poll::Ready(Err(e)),
                Err(e) => Poll::Pending(e.to_string()),
            }
        },
    )
    .await;
    match outcome {
        Ok(result) => result,
        Err(source) => Err(CephError::NotRemoved {
            id: id.to_string(),
            source,
        }),
    }
}

/// A monmap holding only `node`: the seed of a new cluster.
pub async fn create_seed_monmap(out: &Path, fsid: &str, node: &NodeSpec) -> Result<(), CephError> {
    let addrs = mon_addrs(node);
    run(
        "monmaptool",
        &[
            "--create".as_ref(),
            "--clobber".as_ref(),
            "--enable-all-features".as_ref(),
            "--fsid".as_ref(),
            fsid.as_ref(),
            "--addv".as_ref(),
            mon_id(node).as_ref(),
            addrs.as_ref(),
            out.as_os_str(),
        ],
        &[],
    )
    .await
    .map(drop)
}

/// The cluster's current monmap, from the quorum, with the admin key.
pub async fn fetch_monmap(conf: &Path, admin_keyring: &Path, out: &Path) -> Result<(), CephError> {
    admin_cli(
        conf,
        admin_keyring,
        CLI_CONNECT_TIMEOUT,
        &[
            "mon".as_ref(),
            "getmap".as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
        ],
    )
    .await
    .map(drop)
}

fn parse_json<T: serde::de::DeserializeOwned>(command: &str, out: &[u8]) -> Result<T, CephError> {
    serde_json::from_slice(out).map_err(|e| CephError::Command {
        command: command.into(),
        status: "ok".into(),
        code: Some(0),
        stderr: format!("printed no JSON we understand: {e}"),
    })
}

/// `ceph auth get-or-create`: the key `entity` has in the cluster's auth
/// database, made with `caps` if it has none. Asking twice gives the same
/// key; an entity that exists with other caps is refused (EINVAL).
pub async fn get_or_create_key(
    conf: &Path,
    admin_keyring: &Path,
    entity: &str,
    caps: &[(&str, &str)],
) -> Result<CephKey, CephError> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["auth".as_ref(), "get-or-create".as_ref()];
    args.push(entity.as_ref());
    for (service, cap) in caps {
        args.push(service.as_ref());
        args.push(cap.as_ref());
    }
    args.extend::<[&std::ffi::OsStr; 2]>(["-f".as_ref(), "json".as_ref()]);
    let out = admin_cli(conf, admin_keyring, CLI_CONNECT_TIMEOUT, &args).await?;
    #[derive(Deserialize)]
    struct Entry {
        entity: String,
        key: String,
    }
    let entries: Vec<Entry> = parse_json("ceph auth get-or-create", &out)?;
    entries
        .into_iter()
        .find(|e| e.entity == entity)
        .and_then(|e| CephKey::parse(&e.key))
        .ok_or_else(|| CephError::Command {
            command: format!("ceph auth get-or-create {entity}"),
            status: "ok".into(),
            code: Some(0),
            stderr: "the answer holds no key for it".into(),
        })
}

/// `ceph auth del`: `entity` loses its key; one that has none already is
/// success.
pub async fn delete_key(conf: &Path, admin_keyring: &Path, entity: &str) -> Result<(), CephError> {
    admin_cli(
        conf,
        admin_keyring,
        CLI_CONNECT_TIMEOUT,
        &["auth".as_ref(), "del".as_ref(), entity.as_ref()],
    )
    .await
    .map(drop)
}

/// The managers the monitors know: the active one (if any has taken over)
/// and the standbys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MgrMap {
    pub active_name: String,
    /// The active manager has loaded its modules and serves commands.
    pub available: bool,
    #[serde(deserialize_with = "standby_names")]
    pub standbys: Vec<String>,
}

fn standby_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    struct Standby {
        name: String,
    }
    Ok(Vec::<Standby>::deserialize(d)?
        .into_iter()
        .map(|s| s.name)
        .collect())
}

impl MgrMap {
    /// `id` is the available active manager or a standby.
    pub fn serves(&self, id: &str) -> bool {
        (self.available && self.active_name == id) || self.standbys.iter().any(|s| s == id)
    }

    pub fn active(&self) -> Option<&str> {
        (self.available && !self.active_name.is_empty()).then_some(self.active_name.as_str())
    }
}

/// `ceph mgr dump` through the quorum.
pub async fn mgr_map(
    conf: &Path,
    admin_keyring: &Path,
    connect_timeout: Duration,
) -> Result<MgrMap, CephError> {
    let out = admin_cli(
        conf,
        admin_keyring,
        connect_timeout,
        &[
            "mgr".as_ref(),
            "dump".as_ref(),
            "-f".as_ref(),
            "json".as_ref(),
        ],
    )
    .await?;
    parse_json("ceph mgr dump", &out)
}

/// Exit codes of the `ceph` CLI: the errno the cluster answered.
pub const ENOENT: i32 = 2;
pub const EEXIST: i32 = 17;
pub const EINVAL: i32 = 22;
/// A manager command sent while no active manager has loaded the module
/// (after a fail-over, for a few seconds).
pub const EOPNOTSUPP: i32 = 95;
pub const ETIMEDOUT: i32 = 110;

/// The admin CLI with plain string arguments and the usual connect bound.
async fn admin(conf: &Path, admin_keyring: &Path, args: &[&str]) -> Result<Vec<u8>, CephError> {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    admin_cli(conf, admin_keyring, CLI_CONNECT_TIMEOUT, &args).await
}

/// `None` for an answer of ENOENT, the output otherwise.
fn unless_missing(result: Result<Vec<u8>, CephError>) -> Result<Option<Vec<u8>>, CephError> {
    match result {
        Ok(out) => Ok(Some(out)),
        Err(CephError::Command {
            code: Some(ENOENT), ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The value of `key` in the monitors' config-key store.
pub async fn config_key_get(
    conf: &Path,
    admin_keyring: &Path,
    key: &str,
) -> Result<Option<String>, CephError> {
    let out = unless_missing(admin(conf, admin_keyring, &["config-key", "get", key]).await)?;
    Ok(out.map(|o| String::from_utf8_lossy(&o).into_owned()))
}

/// Sets `key` from `file`, so that a secret never shows in a command line.
pub async fn config_key_set_from(
    conf: &Path,
    admin_keyring: &Path,
    key: &str,
    file: &Path,
) -> Result<(), CephError> {
    let file = file.to_string_lossy();
    admin(
        conf,
        admin_keyring,
        &["config-key", "set", key, "-i", &file],
    )
    .await
    .map(drop)
}

/// Removes `key`; one that is not there already is success.
pub async fn config_key_rm(conf: &Path, admin_keyring: &Path, key: &str) -> Result<(), CephError> {
    admin(conf, admin_keyring, &["config-key", "rm", key])
        .await
        .map(drop)
}

/// `option` as daemons of `who` (`mgr`, `mon`, ...) see it in the central
/// config database: the set value, else the default.
pub async fn config_get(
    conf: &Path,
    admin_keyring: &Path,
    who: &str,
    option: &str,
) -> Result<String, CephError> {
    let out = admin(conf, admin_keyring, &["config", "get", who, option]).await?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

pub async fn config_set(
    conf: &Path,
    admin_keyring: &Path,
    who: &str,
    option: &str,
    value: &str,
) -> Result<(), CephError> {
    admin(conf, admin_keyring, &["config", "set", who, option, value])
        .await
        .map(drop)
}

/// Removes `option` for `who`; one never set is success.
pub async fn config_rm(
    conf: &Path,
    admin_keyring: &Path,
    who: &str,
    option: &str,
) -> Result<(), CephError> {
    admin(conf, admin_keyring, &["config", "rm", who, option])
        .await
        .map(drop)
}

/// What the active manager says of its modules.
#[derive(Debug, Clone, Deserialize)]
pub struct MgrModules {
    pub enabled_modules: Vec<String>,
    pub disabled_modules: Vec<MgrModule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MgrModule {
    pub name: String,
    pub can_run: bool,
    pub error_string: String,
}

impl MgrModules {
    /// Why module `name` cannot run on the active manager, if it says so.
    pub fn cannot_run(&self, name: &str) -> Option<&str> {
        self.disabled_modules
            .iter()
            .find(|m| m.name == name && !m.can_run)
            .map(|m| m.error_string.as_str())
    }
}

pub async fn mgr_modules(conf: &Path, admin_keyring: &Path) -> Result<MgrModules, CephError> {
    let out = admin(conf, admin_keyring, &["mgr", "module", "ls", "-f", "json"]).await?;
    parse_json("ceph mgr module ls", &out)
}

pub async fn mgr_module_enable(
    conf: &Path,
    admin_keyring: &Path,
    name: &str,
) -> Result<(), CephError> {
    admin(conf, admin_keyring, &["mgr", "module", "enable", name])
        .await
        .map(drop)
}

/// The URLs the active manager's modules serve (`dashboard`, ...).
pub async fn mgr_services(
    conf: &Path,
    admin_keyring: &Path,
    connect_timeout: Duration,
) -> Result<std::collections::BTreeMap<String, String>, CephError> {
    let out = admin_cli(
        conf,
        admin_keyring,
        connect_timeout,
        &[
            "mgr".as_ref(),
            "services".as_ref(),
            "-f".as_ref(),
            "json".as_ref(),
        ],
    )
    .await?;
    parse_json("ceph mgr services", &out)
}

/// Whether the dashboard has account `user`. Fails while the dashboard
/// module is not running on the active manager (it answers the command).
pub async fn dashboard_user_exists(
    conf: &Path,
    admin_keyring: &Path,
    user: &str,
) -> Result<bool, CephError> {
    let out = admin(conf, admin_keyring, &["dashboard", "ac-user-show", user]).await;
    Ok(unless_missing(out)?.is_some())
}

/// A dashboard account with `role` and the password in `password_file`.
/// The password is random and long, so the dashboard's policy (which
/// rejects, say, three characters in sequence) is not asked.
pub async fn dashboard_user_create(
    conf: &Path,
    admin_keyring: &Path,
    user: &str,
    password_file: &Path,
    role: &str,
) -> Result<(), CephError> {
    let file = password_file.to_string_lossy();
    admin(
        conf,
        admin_keyring,
        &[
            "dashboard",
            "ac-user-create",
            user,
            "-i",
            &file,
            role,
            "--force-password",
        ],
    )
    .await
    .map(drop)
}

/// `ceph-mon --mkfs`: the monitor's store, from a monmap and the keyring
/// whose keys it starts with.
pub async fn mkfs(
    conf: &Path,
    node: &NodeSpec,
    monmap: &Path,
    keyring: &Path,
) -> Result<(), CephError> {
    let ip = node.ip.to_string();
    run(
        MON_BINARY,
        &[
            "--mkfs".as_ref(),
            "--cluster".as_ref(),
            CLUSTER.as_ref(),
            "-c".as_ref(),
            conf.as_os_str(),
            "-i".as_ref(),
            mon_id(node).as_ref(),
            "--monmap".as_ref(),
            monmap.as_os_str(),
            "--keyring".as_ref(),
            keyring.as_os_str(),
            // Otherwise it looks for an interface address inside
            // public_network, which a node with several may not resolve
            // to the one cluster.yaml names.
            "--public-addr".as_ref(),
            ip.as_ref(),
        ],
        &[],
    )
    .await
    .map(drop)
}

/// What a monitor joining the quorum gets from one already in it (through
/// the join service), sealed like the control-plane CA material.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephBootstrap {
    pub fsid: String,
    /// `mon.`, `client.admin` and `client.bootstrap-osd` with their caps:
    /// what a new monitor's store starts with.
    pub mon_keyring: String,
}

impl fmt::Debug for CephBootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CephBootstrap")
            .field("fsid", &self.fsid)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_cephs_layout_and_differ() {
        let a = CephKey::generate();
        let raw = B64.decode(a.expose()).unwrap();
        assert_eq!(raw.len(), 28);
        assert_eq!(&raw[0..2], &[1, 0]);
        assert_eq!(&raw[10..12], &[16, 0]);
        assert_ne!(a, CephKey::generate());
        assert_eq!(CephKey::parse(a.expose()), Some(a.clone()));
        assert!(CephKey::parse("AQAAAAAAAAAAAA==").is_none());
        assert_eq!(format!("{a:?}"), "CephKey(..)");
    }

    #[test]
    fn keyring_round_trips_per_entity() {
        let mon = CephKey::generate();
        let admin = CephKey::generate();
        let text = render_keyring(&[
            KeyringEntry {
                entity: "mon.",
                key: &mon,
                caps: MON_CAPS,
            },
            KeyringEntry {
                entity: "client.admin",
                key: &admin,
                caps: ADMIN_CAPS,
            },
        ]);
        assert_eq!(keyring_key(&text, "mon."), Some(mon));
        assert_eq!(keyring_key(&text, "client.admin"), Some(admin));
        assert_eq!(keyring_key(&text, "client.bootstrap-osd"), None);
        assert!(text.contains("caps mon = \"allow *\""), "{text}");
    }

    #[test]
    fn fsid_is_a_v4_uuid() {
        let f = generate_fsid();
        assert_eq!(f.len(), 36);
        assert_eq!(&f[14..15], "4");
        assert!("89ab".contains(&f[19..20]), "{f}");
        assert_ne!(f, generate_fsid());
    }
}
