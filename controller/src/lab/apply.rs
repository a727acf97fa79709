//! `dp lab apply`: new manifests into a running lab, for dp (the agents
//! pick them up) or as kube-proxy's rules.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _};

use crate::kube_proxy::{
    apply::{Applier, Backend},
    ProxyConfig,
};

use super::{process::*, *};

impl Lab {
    /// The lab's Service ports as `node` serves them (kube-proxy's
    /// translation of the manifests directory), and what was skipped.
    pub(super) fn service_ports_for(
        &self,
        node: &Member,
    ) -> anyhow::Result<(
        Vec<crate::translate::ServicePortInfo>,
        Vec<crate::translate::Skipped>,
    )> {
        let objects = crate::source::manifests::load_dir(&self.manifests_dir())?;
        let info = crate::translate::NodeInfo {
            name: node.name.clone(),
            ips: node_ips(node),
            zone: None,
        };
        let mut skipped = objects.skipped.clone();
        let ports = crate::translate::service_ports(
            &objects.services,
            &objects.slices,
            &info,
            &mut skipped,
        );
        Ok((ports, skipped))
    }

    /// Loads the kube-proxy rules for the lab's manifests into a node, in
    /// full (like kube-proxy's first sync after a restart).
    pub(super) fn apply_rules(&self, state: &State, node: &Member) -> anyhow::Result<()> {
        let (ports, _) = self.service_ports_for(node)?;
        let config = ProxyConfig {
            cluster_cidrs: parse_cidrs(state.ip_family.cluster_cidrs())?,
            service_cidrs: parse_cidrs(state.ip_family.service_cidrs())?,
            node_ips: node_ips(node)
                .into_iter()
                .filter(|ip| {
                    if ip.is_ipv4() {
                        state.ip_family.has_ipv4()
                    } else {
                        state.ip_family.has_ipv6()
                    }
                })
                .collect(),
            ..ProxyConfig::default()
        };
        let backend = if state.mode == Mode::Iptables {
            Backend::IptablesNft
        } else {
            Backend::Nftables
        };
        let prefix: Vec<OsString> = vec![
            "nsenter".into(),
            format!("--net={}", self.netns_path(&node.name).display()).into(),
        ];
        // kube-proxy sets this for NodePorts on 127.0.0.1.
        let ns = self.netns_path(&node.name);
        run(Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"]))?;
        Applier::new(backend, config, prefix)
            .sync(&ports, true)
            .with_context(|| format!("loading the rules into {}", node.name))?;
        Ok(())
    }

    /// Adds a manifest file to the lab, or replaces the lab's file that
    /// defines the same objects, and waits until every node's dataplane
    /// serves it.
    pub fn apply(&self, file: &Path, out: &mut impl Write) -> anyhow::Result<()> {
        let state = self.state()?;
        let text = fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
        let text = state.ip_family.manifest(&text)?;
        let mut objects = crate::source::manifests::Objects::default();
        crate::source::manifests::load_str(&text, &file.display().to_string(), &mut objects);
        for s in &objects.skipped {
            writeln!(out, "  skipped {}: {}", s.object, s.reason)?;
        }
        ensure!(
            !objects.services.is_empty() || !objects.slices.is_empty(),
            "{}: no Service or EndpointSlice in it",
            file.display()
        );
        let name = file
            .file_name()
            .context("a file name")?
            .to_string_lossy()
            .into_owned();
        let name = if crate::source::manifests::is_manifest(Path::new(&name)) {
            name
        } else {
            format!("{name}.yaml")
        };
        // Like `kubectl apply`, by object: a lab file that defines any of
        // the same objects is replaced (in place, in one rename, so the
        // agents never see an object twice or not at all).
        let ours = identities(&objects);
        let mut replaced = Vec::new();
        for entry in fs::read_dir(self.manifests_dir())? {
            let path = entry?.path();
            if !crate::source::manifests::is_manifest(&path) {
                continue;
            }
            let mut theirs = crate::source::manifests::Objects::default();
            let existing = fs::read_to_string(&path).unwrap_or_default();
            crate::source::manifests::load_str(&existing, "", &mut theirs);
            let theirs = identities(&theirs);
            if theirs.iter().any(|id| ours.contains(id)) {
                for lost in theirs.iter().filter(|id| !ours.contains(*id)) {
                    writeln!(out, "  {lost} goes: {} is replaced", path.display())?;
                }
                replaced.push(path);
            }
        }
        replaced.sort();
        let target = replaced
            .first()
            .cloned()
            .unwrap_or_else(|| self.manifests_dir().join(&name));
        if fs::read_to_string(&target).ok().as_deref() == Some(text.as_str()) {
            writeln!(out, "{name} unchanged")?;
            return Ok(());
        }
        let agents: Vec<(u32, PathBuf, usize)> = state
            .processes
            .iter()
            .filter(|p| p.what == "agent")
            .map(|p| {
                let log = self.log(&p.member, "agent");
                let seen = count_syncs(&fs::read_to_string(&log).unwrap_or_default());
                (p.pid, log, seen)
            })
            .collect();
        let tmp = self.manifests_dir().join(format!(".{name}.tmp"));
        fs::write(&tmp, &text)?;
        fs::rename(&tmp, &target)?;
        for other in replaced.iter().skip(1) {
            fs::remove_file(other)?;
        }
        match state.mode {
            Mode::Dp => {
                for (pid, log, seen) in agents {
                    self.wait_for_log(pid, &log, seen)?;
                }
            }
            Mode::Iptables | Mode::Nftables => {
                for node in &state.nodes {
                    self.apply_rules(&state, node)?;
                }
            }
        }
        let written = target.file_name().unwrap_or_default().to_string_lossy();
        writeln!(
            out,
            "{name} applied{}: {} services, {} endpoint slices; every node's {} dataplane serves it",
            if written == name {
                String::new()
            } else {
                format!(" (replaces {written})")
            },
            objects.services.len(),
            objects.slices.len(),
            state.mode.name()
        )?;
        Ok(())
    }
}

/// A node's addresses: IPv4, and IPv6 in an IPv6 or dual-stack lab.
fn node_ips(node: &Member) -> Vec<std::net::IpAddr> {
    let mut ips = vec![node.ip.into()];
    ips.extend(node.ip6.map(std::net::IpAddr::from));
    ips
}

fn parse_cidrs(cidrs: Vec<String>) -> anyhow::Result<Vec<crate::translate::Cidr>> {
    cidrs
        .iter()
        .map(|c| c.parse().map_err(|e| anyhow::anyhow!("{c}: {e}")))
        .collect()
}

/// `Kind namespace/name` of every object.
pub(super) fn identities(objects: &crate::source::manifests::Objects) -> BTreeSet<String> {
    let id = |kind: &str, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        format!(
            "{kind} {}/{}",
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap_or_default()
        )
    };
    let services = objects.services.iter().map(|o| id("Service", &o.metadata));
    let slices = objects
        .slices
        .iter()
        .map(|o| id("EndpointSlice", &o.metadata));
    let nodes = objects.nodes.iter().map(|o| id("Node", &o.metadata));
    services.chain(slices).chain(nodes).collect()
}
