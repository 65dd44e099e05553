//! The cluster's certificates and keys, made once per state dir with the `openssl` CLI.
//!
//! One CA signs everything: it is the API server's client CA (so tests can mint users from it),
//! the kubelet's client CA (the API server's kubelet client cert is signed by it), etcd's CA, and
//! the CSR signer of the controller manager. Keys are ECDSA P-256 (fast to make, accepted by Go
//! and rustls). A separate key pair signs service-account tokens.

use super::layout::{Layout, NODE_NAME, NODE2_NAME, POD_GATEWAY, SERVICE_IP_KUBERNETES};
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::path::Path;
use std::process::Command;

/// A leaf certificate: file stem, subject (CN + O groups), usage, and DNS/IP names.
struct Leaf {
    stem: &'static str,
    cn: String,
    groups: Vec<&'static str>,
    server: bool,
    sans: Vec<String>,
}

pub fn ensure(layout: &Layout) -> Result<()> {
    let dir = layout.pki();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if !dir.join("ca.crt").is_file() || !dir.join("ca.key").is_file() {
        make_ca(&dir)?;
    }
    if !dir.join("sa.key").is_file() || !dir.join("sa.pub").is_file() {
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "sa.key",
            ],
        )?;
        openssl(
            &dir,
            &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
        )?;
    }
    for leaf in leaves() {
        let crt = dir.join(format!("{}.crt", leaf.stem));
        if !crt.is_file() {
            make_leaf(&dir, &leaf)?;
        } else if let Some(missing) = missing_san(&crt, &leaf.sans)? {
            // A state dir made before a name was added (the API server's 10.89.0.1): without
            // it clients that connect by that name refuse the certificate, so make a new one.
            // The API server reloads its serving certificate when the file changes.
            println!(
                "{}.crt lacks the name {missing}; making a new one",
                leaf.stem
            );
            make_leaf(&dir, &leaf)?;
        }
    }
    Ok(())
}

/// The first of `sans` the certificate does not name, if any.
fn missing_san(crt: &Path, sans: &[String]) -> Result<Option<String>> {
    if sans.is_empty() {
        return Ok(None);
    }
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(crt)
        .output()
        .context("cannot run `openssl`; install it (bash .ci/install-deps)")?;
    if !out.status.success() {
        bail!(
            "cannot read the names of {}: {}",
            crt.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // "X509v3 Subject Alternative Name: \n    IP Address:127.0.0.1, DNS:localhost, ..."
    let text = String::from_utf8_lossy(&out.stdout);
    let named: Vec<&str> = text
        .lines()
        .skip(1)
        .flat_map(|line| line.split(','))
        .filter_map(|entry| {
            let entry = entry.trim();
            entry
                .strip_prefix("IP Address:")
                .or_else(|| entry.strip_prefix("DNS:"))
        })
        .collect();
    Ok(sans
        .iter()
        .find(|san| !named.contains(&san.as_str()))
        .cloned())
}

fn leaves() -> Vec<Leaf> {
    let loopback = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let mut apiserver_sans = loopback.clone();
    apiserver_sans.extend(
        [
            SERVICE_IP_KUBERNETES,
            // The advertised address: the `kubernetes` Service's endpoint.
            POD_GATEWAY,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(String::from),
    );
    let client = |stem, cn: &str, groups| Leaf {
        stem,
        cn: cn.to_string(),
        groups,
        server: false,
        sans: vec![],
    };
    vec![
        Leaf {
            stem: "apiserver",
            cn: "kube-apiserver".into(),
            groups: vec![],
            server: true,
            sans: apiserver_sans,
        },
        Leaf {
            stem: "etcd",
            cn: "etcd".into(),
            groups: vec![],
            server: true,
            sans: loopback,
        },
        client(
            "apiserver-etcd-client",
            "kube-apiserver-etcd-client",
            vec![],
        ),
        // system:masters: the API server's identity towards kubelets (logs, exec, proxy).
        client(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            vec!["system:masters"],
        ),
        client("admin", "nodegate-admin", vec!["system:masters"]),
        // The API server's identity towards aggregated API servers (metrics-server): they read
        // the caller from its X-Remote-* headers only when this certificate presents them.
        client("front-proxy-client", "front-proxy-client", vec![]),
        client(
            "controller-manager",
            "system:kube-controller-manager",
            vec![],
        ),
        client("scheduler", "system:kube-scheduler", vec![]),
        // The user the default `system:node-proxier` ClusterRoleBinding grants kube-proxy's needs.
        client("kube-proxy", "system:kube-proxy", vec![]),
        client(
            "kubelet",
            &format!("system:node:{NODE_NAME}"),
            vec!["system:nodes"],
        ),
        client(
            "kubelet-node-2",
            &format!("system:node:{NODE2_NAME}"),
            vec!["system:nodes"],
        ),
    ]
}

fn make_ca(dir: &Path) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=nodegate-local-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
    )
}

fn make_leaf(dir: &Path, leaf: &Leaf) -> Result<()> {
    let stem = leaf.stem;
    let subject: String = leaf
        .groups
        .iter()
        .map(|g| format!("/O={g}"))
        .chain(std::iter::once(format!("/CN={}", leaf.cn)))
        .collect();
    let mut ext = String::from(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
    );
    ext.push_str(if leaf.server {
        "extendedKeyUsage=serverAuth,clientAuth\n"
    } else {
        "extendedKeyUsage=clientAuth\n"
    });
    if !leaf.sans.is_empty() {
        let sans: Vec<String> = leaf
            .sans
            .iter()
            .map(|s| {
                if s.parse::<std::net::IpAddr>().is_ok() {
                    format!("IP:{s}")
                } else {
                    format!("DNS:{s}")
                }
            })
            .collect();
        ext.push_str(&format!("subjectAltName={}\n", sans.join(",")));
    }
    let ext_file = format!("{stem}.ext");
    std::fs::write(dir.join(&ext_file), ext).context("cannot write an openssl extension file")?;
    let (key, csr, crt) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.crt"),
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ],
    )?;
    let serial = random_serial()?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial,
            "-days",
            "3650",
            "-extfile",
            &ext_file,
            "-out",
            &crt,
        ],
    )?;
    let _ = std::fs::remove_file(dir.join(&csr));
    let _ = std::fs::remove_file(dir.join(&ext_file));
    Ok(())
}

fn random_serial() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    bytes[0] &= 0x7f; // positive
    Ok(format!(
        "0x{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("cannot run `openssl`; install it (bash .ci/install-deps)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed in {}: {}",
            args.first().unwrap_or(&""),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
