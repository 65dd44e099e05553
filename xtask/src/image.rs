//! `cargo xtask image`: the operator's and the agent's container images, built without a
//! container engine or a registry and imported into the local cluster's containerd.
//!
//! Each image is one layer holding exactly the release binary, the shared libraries `ldd` says
//! it loads and the dynamic loader, at the paths the loader looks for them: no shell, no package
//! manager, nothing an attacker in the container could use that the binary does not need. The
//! config runs the binary as 65532:65532 (numeric, so `runAsNonRoot` can verify it without an
//! /etc/passwd in the image).
//!
//! The tag is `<crate version>-<first 12 hex of the layer's sha256>`: it changes exactly when the
//! binary or a library changes, so `helm upgrade` with the new ref rolls the pods, and a rebuild
//! of the same binary is the same ref, which containerd already has (no re-import). There is
//! deliberately no moving `:dev` tag: with `imagePullPolicy: IfNotPresent` (or `Never`) a pod
//! spec naming `:dev` would never change, so pods would keep running the old binary.
//!
//! Each build is also tagged `<crate version>` (the release tag a registry would serve, and the
//! one the chart's default `appVersion` and `config/` name), pointed at the newest build, so
//! `helm install` and `kubectl apply -k config` with their defaults find an image on the local
//! node. That tag moves: to roll pods onto a new build, use the digest tag.

use crate::cluster::images::{
    append, ctr_at, docker_archive, has_image, hex, import as import_archive,
};
use crate::cluster::layout::Layout;
use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Registry part of the refs: not a real registry, so nothing ever tries to pull from one
/// silently (a pull of `nodegate.local/...` fails loudly).
pub const REGISTRY: &str = "nodegate.local";
/// Non-root user and group the binaries run as (distroless's `nonroot`).
pub const USER: &str = "65532:65532";
/// Where the binary goes in the image.
const BIN_DIR: &str = "usr/local/bin";

/// The refs of the two images, as imported into containerd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    /// `nodegate.local/nodegate-operator:<version>-<layer digest prefix>`
    pub operator: String,
    /// `nodegate.local/nodegate-agent:<version>-<layer digest prefix>`
    pub agent: String,
}

impl Images {
    /// The environment variables the chart tests read the refs from.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NODEGATE_OPERATOR_IMAGE".into(), self.operator.clone()),
            ("NODEGATE_AGENT_IMAGE".into(), self.agent.clone()),
        ]
    }
}

#[derive(Parser)]
pub struct Args {
    /// Print only `NODEGATE_OPERATOR_IMAGE=<ref>` and `NODEGATE_AGENT_IMAGE=<ref>` on stdout
    /// (progress goes to stderr): `eval "export $(cargo xtask image --print-refs)"`.
    #[arg(long)]
    pub print_refs: bool,
    /// Only build the docker-archive tarballs (under target/images/); needs no cluster.
    #[arg(long)]
    pub no_import: bool,
}

pub fn run(args: Args) -> Result<()> {
    let images = if args.no_import {
        let (images, built) = build()?;
        for image in &built {
            eprintln!("archive: {}", image.archive.display());
        }
        images
    } else {
        build_and_import()?
    };
    if args.print_refs {
        for (key, value) in images.env() {
            println!("{key}={value}");
        }
    } else {
        println!("operator image: {}", images.operator);
        println!("agent image:    {}", images.agent);
    }
    Ok(())
}

/// What goes into one image.
struct Spec {
    /// Binary (and Cargo package) name, also the image's repository name.
    name: &'static str,
    description: &'static str,
}

const OPERATOR: Spec = Spec {
    name: "nodegate-operator",
    description: "nodegate operator: compiles NodeGate policies for the node agents",
};
const AGENT: Spec = Spec {
    name: "nodegate-agent",
    description: "nodegate node agent: the policy-enforcing proxy in front of the kubelet API",
};

/// One image, assembled and written as a docker-archive.
struct Built {
    name: &'static str,
    reference: String,
    archive: PathBuf,
    layer_size: usize,
}

/// Builds both release binaries, assembles their images and imports into the local cluster's
/// containerds (`k8s.io` namespace; node-2 has its own when it runs) the ones they do not have
/// yet. Needs the cluster to be up.
pub fn build_and_import() -> Result<Images> {
    containerd_socket()?;
    import(build_archives()?)
}

/// The images built and assembled, not yet imported (see [`import`]).
pub struct Archives {
    images: Images,
    built: Vec<Built>,
}

/// Builds both release binaries and assembles their images; needs no cluster, so
/// `cargo xtask test` builds them while the cluster's own binaries build.
pub fn build_archives() -> Result<Archives> {
    let (images, built) = build()?;
    Ok(Archives { images, built })
}

fn containerd_socket() -> Result<PathBuf> {
    let layout = Layout::from_env()?;
    let socket = layout.containerd_socket();
    if !socket.exists() {
        bail!(
            "no containerd at {}: start the local cluster with `cargo xtask cluster up` \
             (or build the archives only with `cargo xtask image --no-import`)",
            socket.display()
        );
    }
    Ok(socket)
}

/// Imports the images into the local cluster's containerds (`k8s.io` namespace; node-2 has
/// its own when it runs) that do not have them yet, and tags them as the release.
pub fn import(archives: Archives) -> Result<Images> {
    containerd_socket()?;
    let layout = Layout::from_env()?;
    let Archives { images, built } = archives;
    for (node, socket) in crate::cluster::containerd_sockets(&layout) {
        for image in &built {
            if has_image(&socket, &image.reference)? {
                eprintln!("{node}'s containerd already has {}", image.reference);
                continue;
            }
            let started = Instant::now();
            import_archive(&socket, &image.archive, &image.reference)?;
            eprintln!(
                "imported {} into {node}'s containerd ({:.1?})",
                image.reference,
                started.elapsed()
            );
        }
        for image in &built {
            let release = release_reference(image.name);
            ctr_at(
                &socket,
                &["images", "tag", "--force", &image.reference, &release],
            )
            .with_context(|| format!("cannot tag {} as {release}", image.reference))?;
            eprintln!("tagged {release} -> {} on {node}", image.reference);
        }
    }
    Ok(images)
}

/// Builds the binaries and writes one docker-archive per image under `<target>/images/`.
fn build() -> Result<(Images, Vec<Built>)> {
    let binaries = cargo_build_release(&[OPERATOR.name, AGENT.name])?;
    let dir = target_dir().join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut built = Vec::new();
    for (spec, binary) in [(OPERATOR, &binaries[0]), (AGENT, &binaries[1])] {
        let files = image_files(spec.name, binary)?;
        let layer = layer(&files)?;
        let reference = reference(spec.name, &layer);
        let archive = docker_archive(&reference, config(&spec), &layer)?;
        let path = dir.join(format!("{}.tar", spec.name));
        std::fs::write(&path, archive)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "assembled {reference}: {} files, {:.1} MB ({})",
            files.len(),
            layer.len() as f64 / 1e6,
            files
                .iter()
                .map(|f| format!("/{}", f.path))
                .collect::<Vec<_>>()
                .join(" ")
        );
        built.push(Built {
            name: spec.name,
            reference,
            archive: path,
            layer_size: layer.len(),
        });
    }
    let images = Images {
        operator: built[0].reference.clone(),
        agent: built[1].reference.clone(),
    };
    let total: usize = built.iter().map(|b| b.layer_size).sum();
    eprintln!("images: {:.1} MB in all", total as f64 / 1e6);
    Ok((images, built))
}

/// `cargo build --release` of the binaries, returning their paths in the order asked (read from
/// cargo's JSON messages, so a `CARGO_TARGET_DIR` or `--target` config is followed).
fn cargo_build_release(names: &[&str]) -> Result<Vec<PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::workspace_root()).args([
        "build",
        "--release",
        "--message-format=json-render-diagnostics",
    ]);
    for name in names {
        cmd.args(["-p", name]);
    }
    eprintln!("building {} (cargo build --release)", names.join(", "));
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo build --release")?;
    let stdout = child.stdout.take().context("cargo build has no stdout")?;
    let mut found: Vec<Option<PathBuf>> = vec![None; names.len()];
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("cannot read cargo build's output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| *n == name) {
            found[i] = Some(PathBuf::from(exe));
        }
    }
    let status = child.wait().context("cargo build did not finish")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    eprintln!("release build done in {:.1?}", started.elapsed());
    names
        .iter()
        .zip(found)
        .map(|(name, path)| path.with_context(|| format!("cargo built no binary {name}")))
        .collect()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => crate::workspace_root().join("target"),
    }
}

/// A regular file of the layer.
#[derive(Debug)]
struct File {
    /// Path inside the image, without the leading `/`.
    path: String,
    data: Vec<u8>,
    mode: u32,
}

/// The binary at `usr/local/bin/<name>`, then each library and the loader at the path `ldd`
/// resolved it to (the loader's own default search path, so no ld.so.cache is needed).
fn image_files(name: &str, binary: &Path) -> Result<Vec<File>> {
    let read = |path: &Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut files = vec![File {
        path: format!("{BIN_DIR}/{name}"),
        data: read(binary)?,
        mode: 0o755,
    }];
    for library in shared_libraries(binary)? {
        let path = library
            .to_str()
            .and_then(|p| p.strip_prefix('/'))
            .with_context(|| format!("odd library path {}", library.display()))?
            .to_string();
        // Read through symlinks (libc.so.6 -> libc-2.x.so on some systems): the image gets
        // the content at the name the loader asks for.
        files.push(File {
            data: read(&library)?,
            mode: 0o755,
            path,
        });
    }
    Ok(files)
}

/// The shared libraries (and the loader) a dynamic executable needs, from `ldd`. Empty for a
/// static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run `ldd` (glibc's libc-bin package)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

/// `ldd` lines are `name => /path (0x…)`, `name (0x…)` for the vDSO (in the kernel, not a
/// file), `/path/to/ld-linux… (0x…)` for the loader, or `name => not found`.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = BTreeSet::new();
    let mut loader = false;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            return Ok(Vec::new());
        }
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("{} is not found on this machine", name.trim());
                }
                target.split_whitespace().next().unwrap_or_default()
            }
            None => {
                let first = line.split_whitespace().next().unwrap_or_default();
                loader |= first.starts_with('/');
                first
            }
        };
        if path.starts_with('/') {
            libraries.insert(PathBuf::from(path));
        }
    }
    if !libraries.is_empty() && !loader {
        bail!("ldd named libraries but no dynamic loader");
    }
    Ok(libraries.into_iter().collect())
}

/// The layer tarball: the files plus their parent directories, sorted, with zero mtimes and
/// root ownership, so the same files always give the same bytes (and so the same tag).
fn layer(files: &[File]) -> Result<Vec<u8>> {
    let mut dirs = BTreeSet::new();
    for file in files {
        let mut parent = Path::new(&file.path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(format!("{}/", dir.display()));
            parent = dir.parent();
        }
    }
    let mut out = tar::Builder::new(Vec::new());
    for dir in &dirs {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        out.append_data(&mut header, dir, std::io::empty())
            .with_context(|| format!("cannot add {dir} to the layer"))?;
    }
    let mut sorted: Vec<&File> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for file in sorted {
        append(&mut out, &file.path, &file.data, file.mode)?;
    }
    out.into_inner().context("cannot finish the image layer")
}

/// `nodegate.local/<name>:<version>-<first 12 hex of the layer's sha256>`.
fn reference(name: &str, layer: &[u8]) -> String {
    let digest = hex(&Sha256::digest(layer));
    format!(
        "{REGISTRY}/{name}:{}-{}",
        env!("CARGO_PKG_VERSION"),
        &digest[..12]
    )
}

/// `<registry>/<name>:<crate version>`: what the chart's default tag and `config/` name.
fn release_reference(name: &str) -> String {
    format!("{REGISTRY}/{name}:{}", env!("CARGO_PKG_VERSION"))
}

/// The image config (docker-archive form; `rootfs` is added by `docker_archive`). No revision
/// label: the tag follows the binary, not the commit, so a commit that leaves the binary alone
/// reuses the image and a revision label would be stale.
fn config(spec: &Spec) -> serde_json::Value {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let entrypoint = format!("/{BIN_DIR}/{}", spec.name);
    json!({
        "architecture": architecture,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "User": USER,
            "Entrypoint": [entrypoint],
            "Env": [format!("PATH=/{BIN_DIR}")],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": spec.name,
                "org.opencontainers.image.description": spec.description,
                "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
                "org.opencontainers.image.source": env!("CARGO_PKG_REPOSITORY"),
                "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The entries of a tarball: path -> (is a directory, content).
    fn entries(tarball: &[u8]) -> std::collections::BTreeMap<String, (bool, Vec<u8>)> {
        let mut entries = std::collections::BTreeMap::new();
        for entry in tar::Archive::new(tarball).entries().unwrap() {
            let mut entry = entry.unwrap();
            let dir = entry.header().entry_type().is_dir();
            let name = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            entries.insert(name, (dir, data));
        }
        entries
    }

    /// Built from this (dynamically linked) test binary: the layer holds it, its libraries and
    /// the loader, their parent directories, and nothing else (no shell).
    #[test]
    fn layer_holds_the_binary_its_libraries_and_nothing_else() {
        let exe = std::env::current_exe().unwrap();
        let libraries = shared_libraries(&exe).unwrap();
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("ld-")),
            "no loader in {libraries:?}"
        );
        let files = image_files("xtask-test", &exe).unwrap();
        let layer = layer(&files).unwrap();
        let entries = entries(&layer);

        let mut expected: BTreeSet<String> = libraries
            .iter()
            .map(|l| l.to_string_lossy().trim_start_matches('/').to_string())
            .collect();
        expected.insert("usr/local/bin/xtask-test".into());
        let regular: BTreeSet<String> = entries
            .iter()
            .filter(|(_, (dir, _))| !dir)
            .map(|(name, _)| name.clone())
            .collect();
        assert_eq!(regular, expected);
        assert_eq!(
            entries["usr/local/bin/xtask-test"].1,
            std::fs::read(&exe).unwrap()
        );
        for (name, (dir, _)) in &entries {
            if *dir {
                assert!(
                    expected.iter().any(|f| f.starts_with(name.as_str())),
                    "directory {name} holds none of the files"
                );
            }
        }
        assert!(!entries.contains_key("bin/sh"));
    }

    /// The archive's config runs the binary as the non-root user, with OCI labels, and its
    /// diff_id is the layer's digest, whose prefix is the tag.
    #[test]
    fn config_runs_the_binary_as_non_root() {
        let files = vec![File {
            path: format!("{BIN_DIR}/nodegate-agent"),
            data: b"binary".to_vec(),
            mode: 0o755,
        }];
        let layer = layer(&files).unwrap();
        let reference = reference(AGENT.name, &layer);
        let archive = docker_archive(&reference, config(&AGENT), &layer).unwrap();
        let entries = entries(&archive);
        let manifest: serde_json::Value =
            serde_json::from_slice(&entries["manifest.json"].1).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], reference.as_str());
        let config: serde_json::Value =
            serde_json::from_slice(&entries[manifest[0]["Config"].as_str().unwrap()].1).unwrap();
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(
            config["config"]["Entrypoint"],
            json!(["/usr/local/bin/nodegate-agent"])
        );
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.title"],
            "nodegate-agent"
        );
        let digest = hex(&Sha256::digest(&layer));
        assert_eq!(config["rootfs"]["diff_ids"][0], format!("sha256:{digest}"));
        assert_eq!(
            reference,
            format!(
                "nodegate.local/nodegate-agent:{}-{}",
                env!("CARGO_PKG_VERSION"),
                &digest[..12]
            )
        );
    }

    /// The same binary gives the same ref (no re-import, no pod roll); another binary a new one.
    #[test]
    fn tag_follows_the_binary() {
        let image = |data: &[u8]| {
            let files = [File {
                path: "usr/local/bin/nodegate-agent".into(),
                data: data.to_vec(),
                mode: 0o755,
            }];
            reference(AGENT.name, &layer(&files).unwrap())
        };
        assert_eq!(image(b"one"), image(b"one"));
        assert_ne!(image(b"one"), image(b"two"));
    }

    /// What the install instructions name is what `cargo xtask image` tags: the manifests of
    /// config/ (and its kustomization's `images:`), the chart's default (its appVersion), and
    /// docs/operations.md builds the images before it installs.
    #[test]
    fn install_instructions_name_tags_the_images_get() {
        let root = crate::workspace_root();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        let version = env!("CARGO_PKG_VERSION");
        for (spec, manifest) in [
            (OPERATOR, "config/operator/deployment.yaml"),
            (AGENT, "config/agent/daemonset.yaml"),
        ] {
            let text = read(manifest);
            let named: Vec<&str> = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("image: "))
                .collect();
            assert_eq!(named, [release_reference(spec.name)], "{manifest}");
        }
        let kustomization: serde_yaml::Value =
            serde_yaml::from_str(&read("config/kustomization.yaml")).unwrap();
        for image in kustomization["images"].as_sequence().into_iter().flatten() {
            let name = image["name"].as_str().unwrap();
            let tag = image["newTag"].as_str().unwrap();
            assert_eq!(
                format!("{name}:{tag}"),
                release_reference(name.trim_start_matches(&format!("{REGISTRY}/"))),
                "config/kustomization.yaml"
            );
        }
        let chart: serde_yaml::Value =
            serde_yaml::from_str(&read("charts/nodegate/Chart.yaml")).unwrap();
        assert_eq!(chart["appVersion"].as_str(), Some(version));
        let values: serde_yaml::Value =
            serde_yaml::from_str(&read("charts/nodegate/values.yaml")).unwrap();
        for (component, spec) in [("operator", OPERATOR), ("agent", AGENT)] {
            let image = &values[component]["image"];
            assert_eq!(
                image["repository"].as_str(),
                Some(format!("{REGISTRY}/{}", spec.name).as_str())
            );
            assert_eq!(image["tag"].as_str(), Some(""), "{component}: appVersion");
        }
        let ops = read("docs/operations.md");
        let build = ops
            .find("cargo xtask image")
            .expect("operations.md builds the images");
        let helm = ops.find("helm install").unwrap();
        let kubectl = ops.find("kubectl apply -k config").unwrap();
        assert!(build < helm && build < kubectl, "images are built first");
    }

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }
}
