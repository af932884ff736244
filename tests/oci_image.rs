//! The test images of `support::oci` (Debian's busybox-static as OCI
//! images, no registry) in the real containerd 2 the agent sets up: a
//! worker root runs the container-runtime phase as in
//! tests/container_runtime.rs, then both images are imported into the
//! `k8s.io` namespace, unpacked for the CRI's snapshotter, known to the CRI
//! under the exact names the kubelet will ask for (the sandbox image as
//! containerd's config pins it), and a container of the app image runs.

mod support;

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use support::etcd::run_ok;
use support::oci::{self, APP_IMAGE, DEFAULT_SANDBOX_IMAGE};
use support::{Cluster, install_built, require_tool};

const NODE: &str = "w-1";

/// A master (cluster.yaml needs one; it never runs here) and a worker whose
/// image has containerd 2 in /opt/bin and Debian's runc in /usr/sbin; no
/// kubelet, so the worker phase skips itself.
fn worker() -> Cluster {
    let c = Cluster::new(&[("cp-1", &["control-plane"]), (NODE, &["worker"])]);
    install_built(&c.root(NODE), &["containerd", "containerd-shim-runc-v2"]);
    let sbin = c.root(NODE).join("usr/sbin");
    std::fs::create_dir_all(&sbin).unwrap();
    std::os::unix::fs::symlink(require_tool("runc", "runc"), sbin.join("runc")).unwrap();
    c
}

/// Every entry of a tar as (path, entry type, link target, bytes).
fn entries(tar: &[u8]) -> Vec<(String, tar::EntryType, Option<String>, Vec<u8>)> {
    let mut archive = tar::Archive::new(tar);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (path, kind, link, data)
        })
        .collect()
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The archive read back: every blob under its own digest, the index
/// naming both images, each manifest's config and layer present with the
/// right sizes, the config's diff ID the layer's digest (uncompressed), the
/// layer holding busybox itself and relative symlinks to it.
#[test]
fn the_archive_is_a_consistent_oci_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("images.tar");
    let written = oci::write_archive(
        &path,
        &[
            oci::ImageDef::new(APP_IMAGE, &oci::SLEEP_FOREVER),
            oci::ImageDef::new(DEFAULT_SANDBOX_IMAGE, &oci::SLEEP_FOREVER),
        ],
    );
    let files: std::collections::BTreeMap<String, Vec<u8>> =
        entries(&std::fs::read(&path).unwrap())
            .into_iter()
            .map(|(p, _, _, data)| (p, data))
            .collect();
    let blob = |digest: &str| -> &Vec<u8> {
        &files[&format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap())]
    };
    for (name, data) in &files {
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            assert_eq!(oci::digest(data), format!("sha256:{hex}"), "{name}");
        }
    }
    assert_eq!(
        json(&files["oci-layout"]),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = json(&files["index.json"]);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    assert_ne!(written[0].config, written[1].config, "distinct image IDs");
    for (entry, image) in manifests.iter().zip(&written) {
        assert_eq!(entry["annotations"]["io.containerd.image.name"], image.name);
        assert_eq!(entry["digest"], image.manifest);
        assert_eq!(entry["size"], blob(&image.manifest).len());
        let manifest = json(blob(&image.manifest));
        assert_eq!(manifest["config"]["digest"], image.config);
        assert_eq!(manifest["config"]["size"], blob(&image.config).len());
        let config = json(blob(&image.config));
        assert_eq!(config["architecture"], oci::architecture());
        assert_eq!(config["os"], "linux");
        assert_eq!(
            config["config"]["Cmd"],
            serde_json::json!(["/bin/sleep", "2147483647"])
        );
        let layer = manifest["layers"][0]["digest"].as_str().unwrap();
        assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([layer]));
        assert_eq!(manifest["layers"][0]["size"], blob(layer).len());
    }
    assert_eq!(
        manifests[1]["annotations"]["org.opencontainers.image.ref.name"],
        "3.10.1"
    );

    let layer = json(blob(&written[0].manifest))["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let layer = entries(blob(&layer));
    let busybox = layer.iter().find(|e| e.0 == "bin/busybox").unwrap();
    assert_eq!(busybox.3, std::fs::read(oci::busybox()).unwrap());
    for applet in [
        "sh", "sleep", "httpd", "nc", "wget", "ip", "cat", "hostname",
    ] {
        let link = layer
            .iter()
            .find(|e| e.0 == format!("bin/{applet}"))
            .unwrap_or_else(|| panic!("no /bin/{applet}"));
        assert_eq!(link.1, tar::EntryType::Symlink, "{applet}");
        assert_eq!(link.2.as_deref(), Some("busybox"), "{applet}");
    }
    for d in ["dev/", "etc/", "proc/", "sys/", "tmp/"] {
        assert!(
            layer
                .iter()
                .any(|e| e.0 == d && e.1 == tar::EntryType::Directory),
            "{d}"
        );
    }
    assert!(!layer.iter().any(|e| e.0 == "etc/passwd"));
}

/// The static check [`oci::busybox`] makes: Debian's busybox-static
/// passes, a dynamically linked program (`runc`'s, from Debian) and a
/// non-ELF file do not.
#[test]
fn only_a_static_busybox_is_accepted() {
    oci::busybox();
    assert_eq!(
        oci::static_elf(&std::fs::read(oci::BUSYBOX).unwrap()),
        Ok(())
    );
    let dynamic = std::fs::read(require_tool("runc", "runc")).unwrap();
    let why = oci::static_elf(&dynamic).unwrap_err();
    assert!(why.contains("dynamically linked"), "{why}");
    let why = oci::static_elf(b"#!/bin/sh\n").unwrap_err();
    assert!(why.contains("not a 64-bit"), "{why}");
}

fn run_in_app_image(images: &oci::NodeImages, id: &str, runc: &Path, argv: &[&str]) -> String {
    let mut args = vec![
        "run",
        "--rm",
        "--snapshotter",
        &images.snapshotter,
        "--runc-binary",
        runc.to_str().unwrap(),
        "--hostname",
        id,
        APP_IMAGE,
        id,
    ];
    args.extend(argv);
    oci::ctr_ok(&images.socket, &args)
}

#[test]
fn imported_images_run_and_the_cri_knows_the_sandbox_image() {
    let started = Instant::now();
    let c = worker();
    run_ok(&c, NODE);
    let containerd_up = started.elapsed();

    let imported = Instant::now();
    let images = oci::import_for_node(&c.root(NODE), c.dir.path());
    let import_took = imported.elapsed();
    // The name containerd's config pins is the agent's default here, as
    // cluster.yaml leaves it out.
    assert_eq!(images.sandbox.name, DEFAULT_SANDBOX_IMAGE);
    assert_eq!(images.app.name, APP_IMAGE);
    assert_eq!(images.snapshotter, "overlayfs", "a temp root on ext4");

    // Unpacked at import, for the CRI's snapshotter: the layer's snapshot
    // is there before any container asks for it.
    let snapshots = oci::snapshots(&images.socket, &images.snapshotter);
    assert!(
        snapshots.contains(&images.layer),
        "no snapshot {} in {}: {snapshots:?}",
        images.layer,
        images.snapshotter
    );

    // What the kubelet asks (ImagePullPolicy Never: present or fail).
    let sandbox = oci::cri_image_status(&images.socket, DEFAULT_SANDBOX_IMAGE)
        .expect("the CRI knows the sandbox image");
    assert_eq!(sandbox.id, images.sandbox.config);
    assert_eq!(sandbox.repo_tags, [DEFAULT_SANDBOX_IMAGE]);
    assert!(sandbox.size > 1_000_000, "{sandbox:?}");
    assert!(sandbox.pinned, "the sandbox image is pinned: {sandbox:?}");
    let app = oci::cri_image_status(&images.socket, APP_IMAGE).expect("the CRI knows the app");
    assert_eq!(app.id, images.app.config);
    assert_eq!(app.repo_tags, [APP_IMAGE]);
    assert!(!app.pinned, "{app:?}");
    assert!(
        oci::cri_image_status(&images.socket, "cluster-agent.test/absent:1").is_none(),
        "an image never imported is unknown"
    );

    // A container of the app image runs busybox through its symlinks.
    let runc = require_tool("runc", "runc");
    let ran = Instant::now();
    let out = run_in_app_image(
        &images,
        "oci-hello",
        &runc,
        &[
            "/bin/sh",
            "-c",
            "echo hello from $(hostname); ls /bin/sleep",
        ],
    );
    let run_took = ran.elapsed();
    assert_eq!(out, "hello from oci-hello\n/bin/sleep\n");

    // Importing again changes nothing: same images, same IDs.
    let again = oci::import_for_node(&c.root(NODE), c.dir.path());
    assert_eq!(again.app.config, images.app.config);
    assert_eq!(again.sandbox.config, images.sandbox.config);
    let mut names = oci::ctr_images(&images.socket);
    names.sort();
    assert_eq!(names, [APP_IMAGE, DEFAULT_SANDBOX_IMAGE]);
    eprintln!(
        "containerd up in {containerd_up:?}, both images imported in {import_took:?}, \
         a container ran in {run_took:?}"
    );
}
