//! The node's images, built without a registry or a container engine: a docker-archive tarball
//! (manifest.json + image config + one layer.tar) around Debian's static busybox, imported into
//! containerd's `k8s.io` namespace where the kubelet's CRI looks for images.
//!
//! Two images from the same layer: the busybox image for test pods, and the pod-sandbox ("pause")
//! image, which only has to block forever (`sleep infinity`; containerd SIGKILLs it on teardown).

use super::layout::{BUSYBOX_IMAGE, Layout, PAUSE_IMAGE};
use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;

const BUSYBOX: &str = "/bin/busybox";

struct Image {
    name: &'static str,
    file: &'static str,
    entrypoint: Vec<&'static str>,
    cmd: Vec<&'static str>,
}

fn images() -> [Image; 2] {
    [
        Image {
            name: PAUSE_IMAGE,
            file: "pause.tar",
            entrypoint: vec!["/bin/sleep", "infinity"],
            cmd: vec![],
        },
        Image {
            name: BUSYBOX_IMAGE,
            file: "busybox.tar",
            entrypoint: vec![],
            cmd: vec!["/bin/sh"],
        },
    ]
}

/// Builds the archives (once) and imports those the containerd at `socket` does not have yet.
pub fn ensure_imported(layout: &Layout, socket: &Path) -> Result<()> {
    let present = ctr_at(socket, &["images", "ls", "-q"])?;
    let dir = layout.images();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for image in images() {
        if present.lines().any(|l| l.trim() == image.name) {
            continue;
        }
        let archive = dir.join(image.file);
        write_archive(&archive, &image)?;
        import(socket, &archive, image.name)?;
    }
    Ok(())
}

fn write_archive(path: &Path, image: &Image) -> Result<()> {
    let layer = busybox_layer()?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/bin"],
            "Entrypoint": image.entrypoint,
            "Cmd": image.cmd,
            "WorkingDir": "/",
        },
    });
    let bytes = docker_archive(image.name, config, &layer)?;
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// A one-layer docker-archive (manifest.json + image config + `layer/layer.tar`), the format
/// `ctr images import` (and `docker load`) read. `config` is the image config without `rootfs`,
/// which is filled in here from the layer so the two cannot disagree.
pub(crate) fn docker_archive(
    repo_tag: &str,
    mut config: serde_json::Value,
    layer: &[u8],
) -> Result<Vec<u8>> {
    let diff_id = format!("sha256:{}", hex(&Sha256::digest(layer)));
    config["rootfs"] = json!({ "type": "layers", "diff_ids": [diff_id] });
    let config = serde_json::to_vec(&config)?;
    let config_name = format!("{}.json", hex(&Sha256::digest(&config)));
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": [repo_tag],
        "Layers": ["layer/layer.tar"],
    }]))?;

    let mut out = tar::Builder::new(Vec::new());
    append(&mut out, "manifest.json", &manifest, 0o644)?;
    append(&mut out, &config_name, &config, 0o644)?;
    append(&mut out, "layer/layer.tar", layer, 0o644)?;
    out.into_inner().context("cannot finish the image archive")
}

/// Whether the `k8s.io` namespace of the containerd at `socket` already has an image of that name.
pub(crate) fn has_image(socket: &Path, name: &str) -> Result<bool> {
    let present = ctr_at(socket, &["images", "ls", "-q"])?;
    Ok(present.lines().any(|l| l.trim() == name))
}

/// Imports (and unpacks, so the kubelet can start it at once) a docker-archive into containerd.
pub(crate) fn import(socket: &Path, archive: &Path, name: &str) -> Result<()> {
    let archive = archive.display().to_string();
    ctr_at(socket, &["images", "import", "--no-unpack=false", &archive])
        .with_context(|| format!("cannot import {name} into containerd"))?;
    Ok(())
}

/// `/bin/busybox` plus a symlink per applet, and the few dirs programs expect.
fn busybox_layer() -> Result<Vec<u8>> {
    let binary = std::fs::read(BUSYBOX).with_context(|| {
        format!("cannot read {BUSYBOX}; install busybox-static (bash .ci/install-deps)")
    })?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .context("cannot run busybox --list")?;
    if !list.status.success() {
        bail!("{BUSYBOX} --list failed; is it Debian's busybox-static?");
    }
    let mut layer = tar::Builder::new(Vec::new());
    for dir in ["bin", "tmp", "etc", "proc", "sys", "dev", "var", "root"] {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
        header.set_size(0);
        header.set_mtime(0);
        layer.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    }
    append(&mut layer, "bin/busybox", &binary, 0o755)?;
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        header.set_mtime(0);
        layer.append_link(&mut header, format!("bin/{applet}"), "busybox")?;
    }
    append(
        &mut layer,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    )?;
    append(
        &mut layer,
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\n",
        0o644,
    )?;
    layer.into_inner().context("cannot finish the image layer")
}

pub(crate) fn append(
    out: &mut tar::Builder<Vec<u8>>,
    path: &str,
    data: &[u8],
    mode: u32,
) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    out.append_data(&mut header, path, data)
        .with_context(|| format!("cannot add {path} to an archive"))
}

/// Runs `ctr` (Debian's containerd client) against one of our containerds (node-1's or
/// node-2's socket), in the CRI's namespace.
pub fn ctr_at(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io"])
        .args(args)
        .output()
        .context("cannot run `ctr`; install containerd (bash .ci/install-deps)")?;
    if !out.status.success() {
        bail!(
            "ctr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive is what `ctr images import` expects: a manifest naming the config and the
    /// layer, a config whose diff_id is the layer's digest, a layer with the busybox applets.
    #[test]
    fn archive_has_manifest_config_and_layer() {
        let dir = std::env::temp_dir().join(format!("nodegate-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("busybox.tar");
        let [_, busybox] = images();
        write_archive(&path, &busybox).unwrap();

        let mut entries = std::collections::BTreeMap::new();
        let mut archive = tar::Archive::new(std::fs::File::open(&path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            entries.insert(name, data);
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&entries["manifest.json"]).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], BUSYBOX_IMAGE);
        let config_name = manifest[0]["Config"].as_str().unwrap();
        let config: serde_json::Value = serde_json::from_slice(&entries[config_name]).unwrap();
        let layer = &entries["layer/layer.tar"];
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", hex(&Sha256::digest(layer)))
        );
        assert_eq!(config["config"]["Cmd"][0], "/bin/sh");

        let mut names = Vec::new();
        for entry in tar::Archive::new(layer.as_slice()).entries().unwrap() {
            names.push(entry.unwrap().path().unwrap().display().to_string());
        }
        for expected in ["bin/busybox", "bin/sh", "bin/sleep", "bin/httpd", "tmp/"] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from the layer"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
