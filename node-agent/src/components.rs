//! The node's other components — kube-proxy, kube-controller-manager, kube-scheduler and etcd —
//! reached by the agent on their (usually loopback) ports, and which of them are present.
//!
//! The catalogue ([`nodegate_crds::catalogue::ComponentUpstream`]) names each upstream, its
//! default URL and the credential used there; an installation enables components (nothing is
//! enabled by default: a token is never offered to a port the installation did not name) and
//! may override URLs, trust and credentials. Presence is a TCP connect, no request and no
//! credential: a probe never tells a listener anything.

use crate::upstream::{Upstream, UpstreamError, UpstreamSettings};
use http::Uri;
use nodegate_crds::catalogue::{Component, ComponentUpstream, UpstreamCredential};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often presence is probed again after the first probe at start.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// The enabled component upstreams and how to reach each.
#[derive(Debug, Clone, Default)]
pub struct ComponentSettings {
    pub upstreams: BTreeMap<ComponentUpstream, UpstreamSettings>,
    pub probe_interval: Option<Duration>,
    /// Where the probes' findings go (also read by the status writer).
    pub presence: ComponentPresence,
}

/// What an installation says about components (the agent's `--component*` flags).
#[derive(Debug, Clone, Default)]
pub struct ComponentFlags {
    pub enabled: Vec<Component>,
    pub urls: Vec<(ComponentUpstream, Uri)>,
    pub ca_files: Vec<(ComponentUpstream, PathBuf)>,
    pub insecure_skip_tls_verify: Vec<ComponentUpstream>,
    /// The agent's own token, for the upstreams whose credential is
    /// [`UpstreamCredential::AgentToken`].
    pub token_file: Option<PathBuf>,
    pub etcd_client_cert_file: Option<PathBuf>,
    pub etcd_client_key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ComponentConfigError {
    #[error(
        "unknown component {0:?} (known: kube-proxy, kube-controller-manager, kube-scheduler, etcd)"
    )]
    UnknownComponent(String),
    #[error(
        "unknown component upstream {0:?} (known: kube-proxy, kube-proxy-healthz, \
         kube-controller-manager, kube-scheduler, etcd)"
    )]
    UnknownUpstream(String),
    #[error("{0:?} is not NAME=VALUE")]
    NotAssignment(String),
    #[error("{0}: bad URL {1:?}")]
    BadUrl(ComponentUpstream, String),
    #[error(
        "{0} is https: it needs --component-ca-file {0}=PATH or --component-insecure-skip-tls-verify {0}"
    )]
    NoTrust(ComponentUpstream),
    #[error("{0} needs the agent's token (--component-token-file or --upstream-token-file)")]
    NoToken(ComponentUpstream),
    #[error(
        "etcd over https (its client port) needs --etcd-client-cert-file and --etcd-client-key-file"
    )]
    NoEtcdCertificate,
    #[error("{0} is configured but its component is not enabled (--components)")]
    NotEnabled(ComponentUpstream),
    #[error("{0} gets the agent's token: its URL must be https, never plain HTTP")]
    TokenOverHttp(ComponentUpstream),
    #[error(
        "the per-node upstreams ({0}) are not a map of node name to a map of upstream name to \
         URL"
    )]
    BadNodeUpstreams(String),
}

/// Parses a comma-separated list of component names (blanks ignored).
pub fn parse_components(list: &str) -> Result<Vec<Component>, ComponentConfigError> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let c = Component::from_name(name)
            .ok_or_else(|| ComponentConfigError::UnknownComponent(name.to_string()))?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Parses an upstream name.
pub fn parse_upstream(name: &str) -> Result<ComponentUpstream, ComponentConfigError> {
    ComponentUpstream::from_name(name.trim())
        .ok_or_else(|| ComponentConfigError::UnknownUpstream(name.to_string()))
}

/// Parses `NAME=VALUE` with NAME an upstream.
pub fn parse_assignment(s: &str) -> Result<(ComponentUpstream, String), ComponentConfigError> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| ComponentConfigError::NotAssignment(s.to_string()))?;
    Ok((parse_upstream(name)?, value.trim().to_string()))
}

/// This node's entry of a per-node upstreams document (YAML or JSON: node name → upstream
/// name → URL), for nodes whose components listen elsewhere than the installation's URLs (a
/// control-plane node whose etcd serves metrics on another port, say). A node the document
/// does not name keeps the installation's URLs. Applied after `--component-upstream`, so it
/// wins; checked as those are (an upstream of a component not enabled is an error).
pub fn node_upstreams(
    document: &str,
    node: &str,
) -> Result<Vec<(ComponentUpstream, Uri)>, ComponentConfigError> {
    let by_node: BTreeMap<String, BTreeMap<String, String>> = serde_yaml::from_str(document)
        .map_err(|e| ComponentConfigError::BadNodeUpstreams(e.to_string()))?;
    let Some(entry) = by_node.get(node) else {
        return Ok(Vec::new());
    };
    entry
        .iter()
        .map(|(name, url)| {
            let upstream = parse_upstream(name)?;
            let uri = url
                .parse()
                .map_err(|_| ComponentConfigError::BadUrl(upstream, url.clone()))?;
            Ok((upstream, uri))
        })
        .collect()
}

impl ComponentSettings {
    /// The settings of every upstream of the enabled components: the catalogue's defaults,
    /// then the installation's overrides. Checked here, so a misconfigured agent does not
    /// start: an https upstream needs trust (a CA file or an explicit skip), a token upstream
    /// a token, etcd over https a client certificate.
    pub fn from_flags(flags: &ComponentFlags) -> Result<Self, ComponentConfigError> {
        let mut upstreams = BTreeMap::new();
        let enabled = |u: ComponentUpstream| flags.enabled.contains(&u.component());
        for u in flags
            .urls
            .iter()
            .map(|(u, _)| *u)
            .chain(flags.ca_files.iter().map(|(u, _)| *u))
            .chain(flags.insecure_skip_tls_verify.iter().copied())
        {
            if !enabled(u) {
                return Err(ComponentConfigError::NotEnabled(u));
            }
        }
        for upstream in ComponentUpstream::ALL.into_iter().filter(|u| enabled(*u)) {
            let url = match flags.urls.iter().rev().find(|(u, _)| *u == upstream) {
                Some((_, url)) => url.clone(),
                None => upstream.default_url().parse().map_err(|_| {
                    ComponentConfigError::BadUrl(upstream, upstream.default_url().into())
                })?,
            };
            let https = match url.scheme_str() {
                Some("https") => true,
                Some("http") => false,
                _ => return Err(ComponentConfigError::BadUrl(upstream, url.to_string())),
            };
            if url.host().is_none() {
                return Err(ComponentConfigError::BadUrl(upstream, url.to_string()));
            }
            let mut s = UpstreamSettings::new(url);
            s.ca_file = flags
                .ca_files
                .iter()
                .rev()
                .find(|(u, _)| *u == upstream)
                .map(|(_, p)| p.clone());
            s.insecure_skip_tls_verify = flags.insecure_skip_tls_verify.contains(&upstream);
            if https && s.ca_file.is_none() && !s.insecure_skip_tls_verify {
                return Err(ComponentConfigError::NoTrust(upstream));
            }
            match upstream.credential() {
                UpstreamCredential::AgentToken => {
                    if !https {
                        return Err(ComponentConfigError::TokenOverHttp(upstream));
                    }
                    s.token_file = Some(
                        flags
                            .token_file
                            .clone()
                            .ok_or(ComponentConfigError::NoToken(upstream))?,
                    );
                }
                UpstreamCredential::None | UpstreamCredential::ClientCertificate => {}
            }
            if upstream == ComponentUpstream::Etcd && https {
                // etcd's client port: the configured client certificate, never a token.
                match (&flags.etcd_client_cert_file, &flags.etcd_client_key_file) {
                    (Some(cert), Some(key)) => {
                        s.client_cert_file = Some(cert.clone());
                        s.client_key_file = Some(key.clone());
                    }
                    _ => return Err(ComponentConfigError::NoEtcdCertificate),
                }
            }
            upstreams.insert(upstream, s);
        }
        Ok(ComponentSettings {
            upstreams,
            probe_interval: Some(DEFAULT_PROBE_INTERVAL),
            presence: ComponentPresence::default(),
        })
    }

    /// The enabled components.
    pub fn enabled(&self) -> BTreeSet<Component> {
        self.upstreams.keys().map(|u| u.component()).collect()
    }
}

/// Which enabled components were found listening at the last probe; `None` before the first.
#[derive(Debug, Clone, Default)]
pub struct ComponentPresence(Arc<RwLock<Option<BTreeSet<Component>>>>);

impl ComponentPresence {
    pub fn set(&self, present: BTreeSet<Component>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(present);
    }

    pub fn get(&self) -> Option<BTreeSet<Component>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// For status: the present components, comma-separated in catalogue order; `None` before
    /// the first probe or when none is present.
    pub fn summary(&self) -> Option<String> {
        let present = self.get()?;
        (!present.is_empty()).then(|| {
            present
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(",")
        })
    }
}

/// The clients of the enabled component upstreams.
#[derive(Clone, Default)]
pub struct ComponentUpstreams {
    clients: Arc<BTreeMap<ComponentUpstream, (Upstream, String)>>,
    presence: ComponentPresence,
}

impl ComponentUpstreams {
    pub fn new(settings: &ComponentSettings) -> Result<Self, UpstreamError> {
        let mut clients = BTreeMap::new();
        for (upstream, s) in &settings.upstreams {
            if s.insecure_skip_tls_verify {
                tracing::warn!(
                    %upstream,
                    url = %s.url,
                    "component serving certificate is NOT verified \
                     (--component-insecure-skip-tls-verify): the agent's token goes to whatever \
                     listens there"
                );
            }
            clients.insert(*upstream, (Upstream::new(s)?, s.url.to_string()));
        }
        Ok(ComponentUpstreams {
            clients: Arc::new(clients),
            presence: settings.presence.clone(),
        })
    }

    /// The client of an enabled upstream, and its URL (for messages).
    pub fn get(&self, upstream: ComponentUpstream) -> Option<(&Upstream, &str)> {
        self.clients
            .get(&upstream)
            .map(|(c, url)| (c, url.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Probes every enabled upstream (TCP connect only): a component is present when one of
    /// its upstreams accepts connections.
    pub async fn probe(&self) -> BTreeSet<Component> {
        let mut present = BTreeSet::new();
        for (upstream, (client, _)) in self.clients.iter() {
            if client.reachable().await {
                present.insert(upstream.component());
            }
        }
        present
    }

    /// Probes at start and then every `interval`, publishing to the presence handle.
    pub async fn run_probes(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<BTreeSet<Component>> = None;
        loop {
            ticker.tick().await;
            let present = self.probe().await;
            if last.as_ref() != Some(&present) {
                let names: Vec<&str> = present.iter().map(|c| c.name()).collect();
                tracing::info!(present = %names.join(","), "node components probed");
                last = Some(present.clone());
            }
            self.presence.set(present);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A node's entry overrides the installation's URL (it comes after it); other nodes keep
    /// it; bad documents and unknown names are refused with what is wrong.
    #[test]
    fn a_node_entry_overrides_the_installation_url() {
        let doc =
            "cp-1:\n  etcd: http://127.0.0.1:12381\ncp-2:\n  kube-proxy: http://127.0.0.1:1\n";
        let mut f = flags("etcd,kube-proxy");
        f.urls.push((
            ComponentUpstream::Etcd,
            "http://127.0.0.1:2382".parse().unwrap(),
        ));
        f.urls.extend(node_upstreams(doc, "cp-1").unwrap());
        let s = ComponentSettings::from_flags(&f).unwrap();
        assert_eq!(
            s.upstreams[&ComponentUpstream::Etcd].url.to_string(),
            "http://127.0.0.1:12381/"
        );
        assert_eq!(
            s.upstreams[&ComponentUpstream::KubeProxy].url.to_string(),
            "http://127.0.0.1:10249/"
        );
        assert!(node_upstreams(doc, "worker-9").unwrap().is_empty());
        assert_eq!(
            node_upstreams("cp-1:\n  etcdd: http://x\n", "cp-1"),
            Err(ComponentConfigError::UnknownUpstream("etcdd".into()))
        );
        assert!(matches!(
            node_upstreams("[1, 2]", "cp-1"),
            Err(ComponentConfigError::BadNodeUpstreams(_))
        ));
        // An override is checked like a flag: a component not enabled is refused.
        let mut f = flags("kube-proxy");
        f.urls.extend(node_upstreams(doc, "cp-1").unwrap());
        assert_eq!(
            ComponentSettings::from_flags(&f).unwrap_err(),
            ComponentConfigError::NotEnabled(ComponentUpstream::Etcd)
        );
    }

    fn flags(enabled: &str) -> ComponentFlags {
        ComponentFlags {
            enabled: parse_components(enabled).unwrap(),
            token_file: Some("/token".into()),
            insecure_skip_tls_verify: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_kubeadms_loopback_ports_with_their_credentials() {
        let mut f = flags("kube-proxy,etcd,kube-scheduler,kube-controller-manager");
        f.insecure_skip_tls_verify = vec![
            ComponentUpstream::KubeScheduler,
            ComponentUpstream::KubeControllerManager,
        ];
        let s = ComponentSettings::from_flags(&f).unwrap();
        let url = |u| s.upstreams[&u].url.to_string();
        assert_eq!(url(ComponentUpstream::KubeProxy), "http://127.0.0.1:10249/");
        assert_eq!(
            url(ComponentUpstream::KubeProxyHealthz),
            "http://127.0.0.1:10256/"
        );
        assert_eq!(url(ComponentUpstream::Etcd), "http://127.0.0.1:2381/");
        assert_eq!(
            url(ComponentUpstream::KubeControllerManager),
            "https://127.0.0.1:10257/"
        );
        // The token goes to the controller manager and scheduler only.
        for (u, token) in [
            (ComponentUpstream::KubeProxy, false),
            (ComponentUpstream::KubeProxyHealthz, false),
            (ComponentUpstream::Etcd, false),
            (ComponentUpstream::KubeControllerManager, true),
            (ComponentUpstream::KubeScheduler, true),
        ] {
            assert_eq!(s.upstreams[&u].token_file.is_some(), token, "{u}");
            assert!(s.upstreams[&u].client_cert_file.is_none(), "{u}");
        }
        assert_eq!(s.enabled().len(), 4);
    }

    #[test]
    fn nothing_is_enabled_unless_named() {
        let s = ComponentSettings::from_flags(&ComponentFlags::default()).unwrap();
        assert!(s.upstreams.is_empty());
        let mut f = flags("kube-proxy");
        f.urls = vec![(
            ComponentUpstream::Etcd,
            "http://127.0.0.1:1".parse().unwrap(),
        )];
        assert_eq!(
            ComponentSettings::from_flags(&f).unwrap_err(),
            ComponentConfigError::NotEnabled(ComponentUpstream::Etcd)
        );
        assert!(parse_components("kube-proxy,kubelet").is_err());
    }

    #[test]
    fn https_needs_trust_and_etcd_client_port_needs_a_certificate() {
        assert_eq!(
            ComponentSettings::from_flags(&flags("kube-scheduler")).unwrap_err(),
            ComponentConfigError::NoTrust(ComponentUpstream::KubeScheduler)
        );
        let mut f = flags("kube-scheduler");
        f.ca_files = vec![(ComponentUpstream::KubeScheduler, "/ca.crt".into())];
        f.token_file = None;
        assert_eq!(
            ComponentSettings::from_flags(&f).unwrap_err(),
            ComponentConfigError::NoToken(ComponentUpstream::KubeScheduler)
        );
        let mut f = flags("kube-controller-manager");
        let (u, url) = parse_assignment("kube-controller-manager=http://127.0.0.1:10252").unwrap();
        f.urls = vec![(u, url.parse().unwrap())];
        assert_eq!(
            ComponentSettings::from_flags(&f).unwrap_err(),
            ComponentConfigError::TokenOverHttp(ComponentUpstream::KubeControllerManager)
        );
        let mut f = flags("etcd");
        let (u, url) = parse_assignment("etcd=https://127.0.0.1:2379").unwrap();
        f.urls = vec![(u, url.parse().unwrap())];
        f.ca_files = vec![(ComponentUpstream::Etcd, "/ca.crt".into())];
        assert_eq!(
            ComponentSettings::from_flags(&f).unwrap_err(),
            ComponentConfigError::NoEtcdCertificate
        );
        f.etcd_client_cert_file = Some("/etcd.crt".into());
        f.etcd_client_key_file = Some("/etcd.key".into());
        let s = ComponentSettings::from_flags(&f).unwrap();
        let etcd = &s.upstreams[&ComponentUpstream::Etcd];
        assert!(etcd.client_cert_file.is_some() && etcd.token_file.is_none());
    }

    #[test]
    fn presence_summary_lists_present_components_in_order() {
        let p = ComponentPresence::default();
        assert_eq!(p.summary(), None);
        p.set(
            [Component::Etcd, Component::KubeProxy]
                .into_iter()
                .collect(),
        );
        assert_eq!(p.summary().as_deref(), Some("kube-proxy,etcd"));
        p.set(BTreeSet::new());
        assert_eq!(p.summary(), None);
    }
}
