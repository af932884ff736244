//! Container images for tests, with no registry: one layer holding Debian's
//! statically linked busybox (`/bin/busybox` from `busybox-static`) and
//! relative symlinks to it, wrapped as OCI images in an OCI image-layout
//! tar written here (tar + JSON + SHA-256, no container tool), and loaded
//! into containerd's `k8s.io` namespace (the CRI plugin's) with the real
//! `ctr images import`, unpacked for the snapshotter the CRI uses. Pods can
//! then run them with `imagePullPolicy: Never`; the sandbox (pause) image
//! is the same layer under the name containerd's config pins.
//!
//! Names are fully qualified: the CRI stores `registry.k8s.io/pause:3.10.1`
//! as written, but would normalise a short `busybox:1` to
//! `docker.io/library/busybox:1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

/// The image test pods run (`imagePullPolicy: Never`).
pub const APP_IMAGE: &str = "cluster-agent.test/busybox:1";
/// `cluster.containerd.sandbox_image` when cluster.yaml leaves it out (the
/// agent's default; the tests' cluster.yaml does). [`import_for_node`]
/// reads the name from the node's containerd config instead of trusting
/// this copy.
pub const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10.1";
/// The containerd namespace the CRI plugin (and so the kubelet) uses.
pub const NAMESPACE: &str = "k8s.io";
/// Both images' command: a pause that never exits on its own.
pub const SLEEP_FOREVER: [&str; 2] = ["/bin/sleep", "2147483647"];
/// The busybox applets linked in `/bin` (beside `/bin/busybox` itself).
pub const APPLETS: [&str; 13] = [
    "sh", "sleep", "httpd", "nc", "wget", "ip", "cat", "hostname", "echo", "ls", "env", "ps",
    "true",
];
/// Where `busybox-static` installs it.
pub const BUSYBOX: &str = "/bin/busybox";

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Every timestamp in the images (2000-01-01T00:00:00Z): the same bytes,
/// so the same digests, on every run.
const EPOCH: u64 = 946_684_800;
const CREATED: &str = "2000-01-01T00:00:00Z";

/// Debian's static busybox. Panics, saying how to install it, when it is
/// missing, is not a static ELF executable for this machine, or lacks one
/// of [`APPLETS`]: a test never passes without the image it needs.
#[track_caller]
pub fn busybox() -> PathBuf {
    let path = PathBuf::from(BUSYBOX);
    let install = "run `.ci/setup` as root (or `apt-get install busybox-static`)";
    let Ok(bytes) = std::fs::read(&path) else {
        panic!("{BUSYBOX} is missing and the test images need it: {install}");
    };
    if let Err(why) = static_elf(&bytes) {
        panic!(
            "{BUSYBOX} is {why}; the test images need Debian's statically linked one: {install} \
             (package `busybox` is the dynamic build)"
        );
    }
    let list = Command::new(&path)
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("run {BUSYBOX} --list: {e}: {install}"));
    let have = String::from_utf8_lossy(&list.stdout);
    for applet in APPLETS {
        assert!(
            have.lines().any(|l| l == applet),
            "{BUSYBOX} has no `{applet}` applet: {install}"
        );
    }
    path
}

/// `Ok` for a 64-bit little-endian ELF executable for this machine with no
/// program interpreter (`PT_INTERP`), i.e. statically linked.
pub fn static_elf(bytes: &[u8]) -> Result<(), String> {
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let machine = match std::env::consts::ARCH {
        "x86_64" => 0x3e,
        "aarch64" => 0xb7,
        other => return Err(format!("of an unknown machine for this {other} host")),
    };
    if u16_at(0x12) != Some(machine) {
        return Err(format!(
            "built for another machine than {}",
            std::env::consts::ARCH
        ));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err("a truncated ELF file".into());
    };
    const PT_INTERP: u32 = 3;
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff).unwrap() + i * usize::from(phentsize);
        match u32_at(at) {
            None => return Err("a truncated ELF file".into()),
            Some(PT_INTERP) => return Err("dynamically linked (it has a PT_INTERP)".into()),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The image's `architecture` (Go's GOARCH) for this machine.
pub fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no OCI architecture known for {other}"),
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(EPOCH);
    h.set_size(size);
    h
}

/// The one layer (an uncompressed tar): `/bin/busybox`, a relative symlink
/// `/bin/<applet>` → `busybox` per [`APPLETS`], and empty `/dev`, `/etc`,
/// `/proc`, `/sys`, `/tmp` (1777) — no `/etc/passwd`: containers run as
/// uid 0 unless told otherwise.
pub fn busybox_layer() -> Vec<u8> {
    let program = std::fs::read(busybox()).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin/", 0o755),
        ("dev/", 0o755),
        ("etc/", 0o755),
        ("proc/", 0o555),
        ("sys/", 0o555),
        ("tmp/", 0o1777),
    ] {
        tar.append_data(
            &mut header(tar::EntryType::Directory, mode, 0),
            dir,
            std::io::empty(),
        )
        .unwrap();
    }
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o755, program.len() as u64),
        "bin/busybox",
        &program[..],
    )
    .unwrap();
    for applet in APPLETS {
        tar.append_link(
            &mut header(tar::EntryType::Symlink, 0o777, 0),
            format!("bin/{applet}"),
            "busybox",
        )
        .unwrap();
    }
    tar.into_inner().unwrap()
}

/// One image of an archive: its full reference and command.
#[derive(Debug, Clone)]
pub struct ImageDef {
    pub name: String,
    pub cmd: Vec<String>,
}

impl ImageDef {
    pub fn new(name: &str, cmd: &[&str]) -> ImageDef {
        ImageDef {
            name: name.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// What [`write_archive`] put in: per image, its manifest and config
/// digests (the config digest is the image ID the CRI reports).
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    pub name: String,
    pub manifest: String,
    pub config: String,
}

/// The tag part of `name` (`registry.k8s.io/pause:3.10.1` → `3.10.1`), as
/// `org.opencontainers.image.ref.name` holds it; `latest` without one.
fn tag_of(name: &str) -> &str {
    let last = name.rsplit('/').next().unwrap_or(name);
    last.rsplit_once(':').map_or("latest", |(_, tag)| tag)
}

fn to_json(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// Writes an OCI image layout (`oci-layout`, `index.json`,
/// `blobs/sha256/…`) as a tar at `path`: every image in `images` on the
/// [`busybox_layer`], with a config of its own (its name is a label, so
/// no two images share an ID). Each index entry carries the full name in
/// `io.containerd.image.name`, which `ctr images import` (transfer service
/// or `--local`) takes as the image's name unchanged, and the tag in
/// `org.opencontainers.image.ref.name`.
pub fn write_archive(path: &Path, images: &[ImageDef]) -> Vec<ArchiveImage> {
    let layer = busybox_layer();
    let layer_digest = digest(&layer);
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut manifests = Vec::new();
    let mut written = Vec::new();
    for image in images {
        let config = to_json(&json!({
            "created": CREATED,
            "architecture": architecture(),
            "os": "linux",
            "config": {
                "Env": ["PATH=/bin"],
                "Cmd": image.cmd,
                "WorkingDir": "/",
                "Labels": {"cluster-agent.test/image": image.name},
            },
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created": CREATED, "created_by": "cluster-agent tests/support/oci.rs"}],
        }));
        let config_digest = digest(&config);
        let manifest = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": LAYER_MEDIA_TYPE,
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }));
        let manifest_digest = digest(&manifest);
        manifests.push(json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": architecture(), "os": "linux"},
            "annotations": {
                "io.containerd.image.name": image.name,
                "org.opencontainers.image.ref.name": tag_of(&image.name),
            },
        }));
        written.push(ArchiveImage {
            name: image.name.clone(),
            manifest: manifest_digest.clone(),
            config: config_digest.clone(),
        });
        blobs.insert(config_digest, config);
        blobs.insert(manifest_digest, manifest);
    }
    blobs.insert(layer_digest, layer);
    let index = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": manifests,
    }));

    let file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |name: &str, data: &[u8]| {
        tar.append_data(
            &mut header(tar::EntryType::Regular, 0o644, data.len() as u64),
            name,
            data,
        )
        .unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for (d, data) in &blobs {
        let hex = d.strip_prefix("sha256:").unwrap();
        add(&format!("blobs/sha256/{hex}"), data);
    }
    use std::io::Write;
    tar.into_inner().unwrap().flush().unwrap();
    written
}

/// The real `ctr` (built by `.ci/setup`) on containerd's `socket`, in the
/// CRI's namespace.
pub fn ctr(socket: &Path) -> Command {
    let mut cmd = Command::new(super::built_binary("ctr"));
    cmd.arg("--address").arg(socket).args(["-n", NAMESPACE]);
    cmd
}

/// Runs `ctr` with `args`; panics with its output unless it succeeds.
/// Returns stdout.
#[track_caller]
pub fn ctr_ok(socket: &Path, args: &[&str]) -> String {
    let out = ctr(socket).args(args).output().expect("spawn ctr");
    assert!(
        out.status.success(),
        "ctr {}: {}",
        args.join(" "),
        super::text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ctr images import` of `archive` through containerd's transfer service,
/// unpacked for `snapshotter` (the CRI's: `ctr` alone would pick
/// containerd's default, overlayfs), each image labelled with `labels`
/// (`key=value`). Returns ctr's output.
pub fn import(socket: &Path, archive: &Path, snapshotter: &str, labels: &[&str]) -> String {
    let archive = archive.to_str().expect("a UTF-8 archive path");
    let platform = format!("linux/{}", architecture());
    let mut args = vec![
        "images",
        "import",
        "--platform",
        &platform,
        "--snapshotter",
        snapshotter,
    ];
    for label in labels {
        args.extend(["--label", label]);
    }
    args.push(archive);
    ctr_ok(socket, &args)
}

/// The label the CRI puts on the images it pulled (it manages them).
pub const CRI_MANAGED: &str = "io.cri-containerd.image=managed";
/// The label of a pinned image, which the kubelet's image GC never removes
/// (the CRI pins the sandbox image it pulls).
pub const CRI_PINNED: &str = "io.cri-containerd.pinned=pinned";

/// The image names in the `k8s.io` namespace (`ctr images ls -q`).
pub fn ctr_images(socket: &Path) -> Vec<String> {
    ctr_ok(socket, &["images", "ls", "-q"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// The keys of `snapshotter`'s snapshots in the `k8s.io` namespace (a
/// single-layer image unpacked there has one keyed by its layer's diff ID).
pub fn snapshots(socket: &Path, snapshotter: &str) -> Vec<String> {
    ctr_ok(socket, &["snapshots", "--snapshotter", snapshotter, "ls"])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// `key`'s value in `[section]` of a containerd config as the agent renders
/// it (one `key = "value"` per line, no inline tables): enough to read
/// back the socket, the CRI snapshotter and the pinned sandbox image.
pub fn config_value(config: &str, section: &str, key: &str) -> Option<String> {
    let header = format!("[{section}]");
    let mut in_section = false;
    for line in config.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == header;
        } else if in_section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            return Some(v.trim().trim_matches('"').to_string());
        }
    }
    None
}

/// What [`import_for_node`] loaded, and where.
#[derive(Debug, Clone)]
pub struct NodeImages {
    /// containerd's socket, from `[grpc] address`.
    pub socket: PathBuf,
    /// The CRI's snapshotter, the images are unpacked for.
    pub snapshotter: String,
    /// [`APP_IMAGE`].
    pub app: ArchiveImage,
    /// The sandbox image, named as containerd's config pins it.
    pub sandbox: ArchiveImage,
    /// The diff ID of the one layer (the unpacked snapshot's key).
    pub layer: String,
}

const CRI_IMAGES: &str = "plugins.'io.containerd.cri.v1.images'";

/// Imports [`APP_IMAGE`] and the sandbox image into the containerd of the
/// node whose root is `root` (running, configured by the agent: its
/// `etc/containerd/config.toml` gives the socket, the CRI snapshotter and
/// the sandbox image's exact name), then waits until the CRI reports both
/// (what the kubelet asks before it would pull). The sandbox image is
/// pinned, as the CRI pins the one it pulls. `work` holds the archives.
/// Importing again changes nothing (same digests).
pub fn import_for_node(root: &Path, work: &Path) -> NodeImages {
    let config_path = root.join("etc/containerd/config.toml");
    let config = std::fs::read_to_string(&config_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the container-runtime phase writes it)",
            config_path.display()
        )
    });
    let get = |section: &str, key: &str| {
        config_value(&config, section, key)
            .unwrap_or_else(|| panic!("no {key} in [{section}] of {}", config_path.display()))
    };
    let socket = PathBuf::from(get("grpc", "address"));
    let snapshotter = get(CRI_IMAGES, "snapshotter");
    let sandbox = get(&format!("{CRI_IMAGES}.pinned_images"), "sandbox");

    std::fs::create_dir_all(work).unwrap();
    // Two archives, so that only the sandbox image is pinned, as the CRI
    // pins the one it pulls.
    let mut loaded = Vec::new();
    for (file, image, labels) in [
        ("app", APP_IMAGE, &[CRI_MANAGED][..]),
        ("sandbox", sandbox.as_str(), &[CRI_MANAGED, CRI_PINNED][..]),
    ] {
        let archive = work.join(format!("cluster-agent-test-{file}.oci.tar"));
        let written = write_archive(&archive, &[ImageDef::new(image, &SLEEP_FOREVER)]);
        import(&socket, &archive, &snapshotter, labels);
        loaded.extend(written);
    }
    let names = ctr_images(&socket);
    for image in &loaded {
        assert!(
            names.contains(&image.name),
            "ctr images ls has no {}: {names:?}",
            image.name
        );
        let status = wait_cri_image(&socket, &image.name, Duration::from_secs(20));
        assert_eq!(status.id, image.config, "{} in the CRI", image.name);
    }
    let [app, sandbox] = <[ArchiveImage; 2]>::try_from(loaded).unwrap();
    NodeImages {
        socket,
        snapshotter,
        app,
        sandbox,
        layer: digest(&busybox_layer()),
    }
}

/// The CRI's `ImageService/ImageStatus` messages, by hand from
/// `k8s.io/cri-api` v0.34 `runtime/v1/api.proto` (tags as there; fields
/// not needed here left out, which protobuf skips).
pub mod cri {
    /// `message ImageSpec`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }

    /// `message ImageStatusRequest`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    /// `message Image`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, repeated, tag = "2")]
        pub repo_tags: Vec<String>,
        #[prost(string, repeated, tag = "3")]
        pub repo_digests: Vec<String>,
        #[prost(uint64, tag = "4")]
        pub size: u64,
        #[prost(bool, tag = "8")]
        pub pinned: bool,
    }

    /// `message ImageStatusResponse`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    pub const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
}

/// The CRI's `ImageStatus` of `image` on containerd's `socket`, as the
/// kubelet asks it before deciding to pull: `None` when the CRI does not
/// know the image (its answer has no image).
pub fn cri_image_status(socket: &Path, image: &str) -> Option<cri::Image> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = format!("unix://{}", socket.display());
    let request = cri::ImageStatusRequest {
        image: Some(cri::ImageSpec {
            image: image.to_string(),
        }),
        verbose: false,
    };
    runtime
        .block_on(async {
            let call = async {
                let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                    .unwrap()
                    .connect()
                    .await
                    .unwrap_or_else(|e| panic!("connect to the CRI on {endpoint}: {e}"));
                let mut grpc = tonic::client::Grpc::new(channel);
                grpc.ready().await.unwrap();
                let codec = tonic_prost::ProstCodec::<
                    cri::ImageStatusRequest,
                    cri::ImageStatusResponse,
                >::default();
                grpc.unary(
                    tonic::Request::new(request),
                    tonic::codegen::http::uri::PathAndQuery::from_static(cri::IMAGE_STATUS),
                    codec,
                )
                .await
                .unwrap_or_else(|s| panic!("CRI ImageStatus {image} on {endpoint}: {s}"))
                .into_inner()
            };
            tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .unwrap_or_else(|_| {
                    panic!("CRI ImageStatus {image} on {endpoint}: no answer in 10 s")
                })
        })
        .image
        .filter(|i| !i.id.is_empty())
}

/// [`cri_image_status`] until the CRI knows `image` (it learns of imported
/// images from containerd's events), within `timeout`; panics after.
#[track_caller]
pub fn wait_cri_image(socket: &Path, image: &str, timeout: Duration) -> cri::Image {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = cri_image_status(socket, image) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the CRI does not know {image} {timeout:?} after the import (ctr images ls: {:?})",
            ctr_images(socket)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
