//! `dp lab`: a Kubernetes-shaped network of namespaces on one machine that
//! stays up between commands, with real servers in its pods and either dp or
//! kube-proxy's rules as each node's dataplane.
//!
//! A lab called NAME is, on the machine:
//! - network namespaces `dp-NAME-net` (the node network's bridge),
//!   `dp-NAME-node1..N`, `dp-NAME-pod-N-M` and `dp-NAME-client`, shaped by
//!   [`e2e::Cluster`];
//! - `/run/dp-lab/NAME/`: `lab.json` (members, mode, processes),
//!   `manifests/` (what the dataplane serves), `logs/`, and a bpffs mounted
//!   at `bpffs/` (each node agent's pins, and the bridge ports' XDP links);
//! - processes: `dp lab serve` in every pod, and in dp mode `dp agent` in
//!   every node. In iptables and nftables mode the rules kube-proxy would
//!   write ([`crate::kube_proxy`]) are loaded into each node's namespace.
//!
//! [`Lab::down`] finds all of it by name, not from `lab.json` alone, so it
//! also cleans up after a crash.

pub mod demo;
pub mod probe;
pub mod serve;

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use serde::{Deserialize, Serialize};

use crate::kube_proxy::{
    apply::{Applier, Backend},
    ProxyConfig,
};

/// Where labs keep their state, one directory per lab.
pub const STATE_ROOT: &str = "/run/dp-lab";
pub const DEFAULT_NAME: &str = "lab";
/// Ports every pod serves (see [`serve`]).
pub const HTTP_PORT: u16 = 8080;
pub const UDP_ECHO_PORT: u16 = 9090;
pub const DNS_PORT: u16 = 53;
const PODS_PER_NODE: usize = 2;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The example manifests (`examples/`), built into the binary so `dp lab up`
/// works from anywhere.
pub const EXAMPLES: &[(&str, &str)] = &[
    ("dns.yaml", include_str!("../../../examples/dns.yaml")),
    (
        "draining.yaml",
        include_str!("../../../examples/draining.yaml"),
    ),
    (
        "no-endpoints.yaml",
        include_str!("../../../examples/no-endpoints.yaml"),
    ),
    ("sticky.yaml", include_str!("../../../examples/sticky.yaml")),
    (
        "web-local.yaml",
        include_str!("../../../examples/web-local.yaml"),
    ),
    (
        "web-nodeport.yaml",
        include_str!("../../../examples/web-nodeport.yaml"),
    ),
    ("web.yaml", include_str!("../../../examples/web.yaml")),
];

/// Each node's dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A `dp agent` per node, reading the lab's manifests.
    Dp,
    /// kube-proxy's iptables mode (iptables-nft), rules from the same manifests.
    Iptables,
    /// kube-proxy's nftables mode.
    Nftables,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Dp => "dp",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// A member of the lab: a node, a pod or the client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Member {
    /// `node1`, `pod-1-0`, `client`.
    pub name: String,
    pub ip: Ipv4Addr,
    /// A pod's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A node's pod gateway (on each of its pod veths): also the node's
    /// address, the one kube-proxy's MASQUERADE gives traffic to a pod on
    /// this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_gateway: Option<Ipv4Addr>,
}

/// A process the lab started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    /// The member it runs in.
    pub member: String,
    /// `agent` or `servers`.
    pub what: String,
}

/// `lab.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub mode: Mode,
    pub nodes: Vec<Member>,
    pub pods: Vec<Member>,
    pub client: Member,
    pub processes: Vec<Process>,
}

impl State {
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.nodes
            .iter()
            .chain(&self.pods)
            .chain(std::iter::once(&self.client))
    }

    /// The member with this address (a node's pod gateway is the node's).
    pub fn member_at(&self, ip: Ipv4Addr) -> Option<&Member> {
        self.members()
            .find(|m| m.ip == ip || m.pod_gateway == Some(ip))
    }

    /// The pod with this address.
    pub fn pod_at(&self, ip: Ipv4Addr) -> Option<&Member> {
        self.pods.iter().find(|p| p.ip == ip)
    }
}

/// What `dp lab up` builds.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub nodes: usize,
    pub mode: Mode,
    /// Manifests to serve instead of the examples.
    pub manifests: Option<PathBuf>,
}

/// What `dp lab down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: usize,
    pub state: bool,
}

/// A lab by name; its state is on the machine, not in this value.
pub struct Lab {
    pub name: String,
    root: PathBuf,
}

impl Lab {
    pub fn new(name: &str) -> anyhow::Result<Lab> {
        // Only letters and digits: `dp-NAME-` must not prefix another lab's
        // namespaces (a dash would let lab `a` claim lab `a-b`'s).
        ensure!(
            !name.is_empty()
                && name.len() <= 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "lab name {name:?}: use 1 to 16 lowercase letters and digits"
        );
        Ok(Lab {
            name: name.to_string(),
            root: Path::new(STATE_ROOT).join(name),
        })
    }

    fn prefix(&self) -> String {
        format!("dp-{}-", self.name)
    }

    /// The network namespace of a member (`node1`, `pod-1-0`, `client`).
    pub fn netns_path(&self, member: &str) -> PathBuf {
        Path::new("/run/netns").join(format!("{}{member}", self.prefix()))
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    fn bpffs(&self) -> PathBuf {
        self.root.join("bpffs")
    }

    /// A node agent's `--bpffs` directory.
    pub fn node_bpffs(&self, node: &str) -> PathBuf {
        self.bpffs().join(node)
    }

    fn log(&self, member: &str, what: &str) -> PathBuf {
        self.root.join("logs").join(format!("{member}-{what}.log"))
    }

    fn state_file(&self) -> PathBuf {
        self.root.join("lab.json")
    }

    pub fn state(&self) -> anyhow::Result<State> {
        let path = self.state_file();
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "no lab {:?} is up ({} unreadable); start one with `dp lab up`",
                self.name,
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn save(&self, state: &State) -> anyhow::Result<()> {
        let tmp = self.root.join(".lab.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        fs::rename(&tmp, self.state_file())?;
        Ok(())
    }

    /// Whether anything of this lab is on the machine.
    pub fn exists(&self) -> bool {
        self.root.exists() || !self.namespaces().is_empty()
    }

    /// This lab's namespaces: `dp-NAME-<role>` for the roles a lab has.
    fn namespaces(&self) -> Vec<String> {
        let prefix = self.prefix();
        let Ok(entries) = fs::read_dir("/run/netns") else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.strip_prefix(&prefix).is_some_and(is_lab_role))
            .collect();
        names.sort();
        names
    }

    /// Builds the lab: namespaces, servers, dataplane, manifests. On failure
    /// whatever was built is removed again.
    pub fn up(&self, opts: &UpOptions, out: &mut impl Write) -> anyhow::Result<State> {
        ensure!(
            (1..=9).contains(&opts.nodes),
            "--nodes {}: 1 to 9",
            opts.nodes
        );
        if self.exists() {
            bail!(
                "lab {:?} exists already: `dp lab status --name {0}`, or `dp lab down --name {0}` first",
                self.name
            );
        }
        let started = Instant::now();
        let result = self.build(opts, out);
        match result {
            Ok(state) => {
                writeln!(
                    out,
                    "lab {:?} up in {:.1} s ({} mode)",
                    self.name,
                    started.elapsed().as_secs_f64(),
                    opts.mode.name()
                )?;
                Ok(state)
            }
            Err(e) => {
                let _ = self.down();
                Err(e)
            }
        }
    }

    fn build(&self, opts: &UpOptions, out: &mut impl Write) -> anyhow::Result<State> {
        fs::create_dir_all(self.root.join("logs"))?;
        fs::create_dir_all(self.manifests_dir())?;
        crate::pin::ensure_bpffs(&self.bpffs())?;
        let links = self.bpffs().join("lab");
        fs::create_dir_all(&links)?;

        let cluster = e2e::Cluster::build(
            e2e::Topology::named(&self.prefix()),
            &vec![PODS_PER_NODE; opts.nodes],
        )
        .context("creating the namespaces")?;
        let mut state = State {
            name: self.name.clone(),
            mode: opts.mode,
            nodes: cluster
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Member {
                    name: n.name.clone(),
                    ip: n.ip,
                    node: None,
                    pod_gateway: Some(e2e::cluster::pod_gateway(i)),
                })
                .collect(),
            pods: cluster
                .pods
                .iter()
                .map(|p| Member {
                    name: p.name.clone(),
                    ip: p.ip,
                    node: Some(cluster.nodes[p.node].name.clone()),
                    pod_gateway: None,
                })
                .collect(),
            client: Member {
                name: "client".into(),
                ip: e2e::cluster::CLIENT_IP,
                node: None,
                pod_gateway: None,
            },
            processes: Vec::new(),
        };
        cluster.keep(&links)?;
        self.save(&state)?;
        for node in &state.nodes {
            let pods: Vec<String> = state
                .pods
                .iter()
                .filter(|p| p.node.as_deref() == Some(&node.name))
                .map(|p| format!("{} {}", p.name, p.ip))
                .collect();
            writeln!(out, "  {} {}: {}", node.name, node.ip, pods.join(", "))?;
        }
        writeln!(
            out,
            "  client {} (outside the cluster CIDR 10.244.0.0/16; routes 10.96.0.0/16 via node1)",
            state.client.ip
        )?;

        match &opts.manifests {
            Some(dir) => {
                let mut n = 0;
                for entry in fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
                    let path = entry?.path();
                    if crate::manifests::is_manifest(&path) {
                        fs::copy(&path, self.manifests_dir().join(path.file_name().unwrap()))?;
                        n += 1;
                    }
                }
                writeln!(out, "  {n} manifest files from {}", dir.display())?;
            }
            None => {
                for (name, text) in EXAMPLES {
                    fs::write(self.manifests_dir().join(name), text)?;
                }
                writeln!(
                    out,
                    "  the {} example manifests (examples/)",
                    EXAMPLES.len()
                )?;
            }
        }

        for pod in &state.pods {
            let pid = self.start_servers(pod)?;
            state.processes.push(Process {
                pid,
                member: pod.name.clone(),
                what: "servers".into(),
            });
            self.save(&state)?;
        }
        writeln!(
            out,
            "  every pod serves HTTP :{HTTP_PORT}, UDP echo :{UDP_ECHO_PORT}, DNS :{DNS_PORT} (replies name the pod and the client address it saw)"
        )?;

        match opts.mode {
            Mode::Dp => {
                for node in state.nodes.clone() {
                    let pid = self.start_agent(&node)?;
                    state.processes.push(Process {
                        pid,
                        member: node.name.clone(),
                        what: "agent".into(),
                    });
                    self.save(&state)?;
                    self.wait_for_log(pid, &self.log(&node.name, "agent"), 0)?;
                }
                writeln!(
                    out,
                    "  dataplane: a dp agent per node (pins under {})",
                    self.bpffs().display()
                )?;
            }
            Mode::Iptables | Mode::Nftables => {
                for node in &state.nodes {
                    self.apply_rules(&state, node)?;
                }
                writeln!(
                    out,
                    "  dataplane: kube-proxy's {} rules in every node",
                    if opts.mode == Mode::Iptables {
                        "iptables (iptables-nft)"
                    } else {
                        "nftables"
                    }
                )?;
            }
        }
        Ok(state)
    }

    /// `dp lab serve` in a pod; returns once its sockets are bound.
    fn start_servers(&self, pod: &Member) -> anyhow::Result<u32> {
        let exe = std::env::current_exe()?;
        let mut child = self
            .detached(&pod.name, &exe, &self.log(&pod.name, "servers"))?
            .args(["lab", "serve", "--pod", &pod.name])
            .arg("--state-dir")
            .arg(&self.root)
            .args(["--node", pod.node.as_deref().unwrap_or_default()])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting dp lab serve")?;
        // It prints one line once listening, and nothing more.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(READY_TIMEOUT).unwrap_or_default();
        ensure!(
            line.starts_with("ready"),
            "the servers in {} did not start: {}",
            pod.name,
            tail(&self.log(&pod.name, "servers"))
        );
        Ok(child.id())
    }

    /// `dp agent` in a node's namespace, reading the lab's manifests.
    fn start_agent(&self, node: &Member) -> anyhow::Result<u32> {
        let exe = std::env::current_exe()?;
        let child = self
            .detached(&node.name, &exe, &self.log(&node.name, "agent"))?
            .arg("agent")
            .arg("--manifests")
            .arg(self.manifests_dir())
            .arg("--bpffs")
            .arg(self.node_bpffs(&node.name))
            .args(["--node-name", &node.name, "--node-ip", &node.ip.to_string()])
            .args(["--devices", "eth0"])
            .args(["--cluster-cidr", "10.244.0.0/16"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .spawn()
            .context("starting dp agent")?;
        Ok(child.id())
    }

    /// A command that runs `program` in `member`'s network namespace only
    /// (`nsenter --net` keeps the mounts, so the lab's bpffs stays visible),
    /// in a process group of its own, logging to `log`, outliving us.
    fn detached(&self, member: &str, program: &Path, log: &Path) -> anyhow::Result<Command> {
        let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path(member).display()))
            .arg(program)
            .stdin(Stdio::null())
            .stderr(log)
            // Ctrl-C in the terminal of `dp lab up` must not reach it.
            .process_group(0);
        Ok(cmd)
    }

    /// Waits until the agent `pid` has logged more than `seen` syncs.
    fn wait_for_log(&self, pid: u32, log: &Path, seen: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if count_syncs(&text) > seen {
                return Ok(());
            }
            ensure!(alive(pid), "the agent (pid {pid}) exited: {}", tail(log));
            ensure!(
                Instant::now() < deadline,
                "the agent (pid {pid}) did not sync within {READY_TIMEOUT:?}: {}",
                tail(log)
            );
            // The agent writes its log; there is no other signal to wait on.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The lab's Service ports as `node` serves them (kube-proxy's
    /// translation of the manifests directory), and what was skipped.
    fn service_ports_for(
        &self,
        node: &Member,
    ) -> anyhow::Result<(
        Vec<crate::translate::ServicePortInfo>,
        Vec<crate::translate::Skipped>,
    )> {
        let objects = crate::manifests::load_dir(&self.manifests_dir())?;
        let info = crate::translate::NodeInfo {
            name: node.name.clone(),
            ips: vec![node.ip],
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
    fn apply_rules(&self, state: &State, node: &Member) -> anyhow::Result<()> {
        let (ports, _) = self.service_ports_for(node)?;
        let config = ProxyConfig {
            cluster_cidr: Some(
                "10.244.0.0/16"
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            service_cidr: Some(
                e2e::cluster::SERVICE_CIDR
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            node_ips: vec![node.ip],
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
        let mut objects = crate::manifests::Objects::default();
        crate::manifests::load_str(&text, &file.display().to_string(), &mut objects);
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
        let name = if crate::manifests::is_manifest(Path::new(&name)) {
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
            if !crate::manifests::is_manifest(&path) {
                continue;
            }
            let mut theirs = crate::manifests::Objects::default();
            let existing = fs::read_to_string(&path).unwrap_or_default();
            crate::manifests::load_str(&existing, "", &mut theirs);
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

    /// A command that runs `program args` inside a member's network
    /// namespace. On a node, `dp` commands find that node's pins
    /// (`DP_BPFFS`), and `dp` is on the PATH.
    pub fn command(&self, member: &str, program: &str) -> anyhow::Result<Command> {
        let state = self.state()?;
        let Some(m) = state.members().find(|m| m.name == member) else {
            let names: Vec<&str> = state.members().map(|m| m.name.as_str()).collect();
            bail!(
                "lab {:?} has no {member:?}; members: {}",
                self.name,
                names.join(", ")
            );
        };
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path(&m.name).display()))
            .arg(program);
        if state.nodes.iter().any(|n| n.name == member) {
            cmd.env("DP_BPFFS", self.node_bpffs(member));
        }
        let exe_dir = std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![exe_dir];
        paths.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(paths)?);
        Ok(cmd)
    }

    /// `dp lab exec`: becomes the command (its exit status is ours).
    pub fn exec(&self, member: &str, argv: &[String]) -> anyhow::Result<()> {
        let (program, args) = argv.split_first().context("a command to run")?;
        let err = self.command(member, program)?.args(args).exec();
        Err(err).context(format!("running {program}"))
    }

    /// `dp lab status`.
    pub fn status(&self, out: &mut impl Write) -> anyhow::Result<()> {
        let state = self.state()?;
        writeln!(out, "lab {:?}: {} mode", state.name, state.mode.name())?;
        for m in state.members() {
            let present = self.netns_path(&m.name).exists();
            let processes: Vec<String> = state
                .processes
                .iter()
                .filter(|p| p.member == m.name)
                .map(|p| {
                    format!(
                        "{} pid {} {}",
                        p.what,
                        p.pid,
                        if alive(p.pid) { "running" } else { "EXITED" }
                    )
                })
                .collect();
            writeln!(
                out,
                "  {:<8} {:<13} {}{}",
                m.name,
                m.ip,
                if present { "" } else { "namespace MISSING " },
                processes.join(", ")
            )?;
        }
        let (ports, skipped) = self.service_ports_for(&state.nodes[0])?;
        writeln!(out, "services ({}):", self.manifests_dir().display())?;
        for p in &ports {
            let mut addrs: Vec<String> = p
                .cluster_ips
                .iter()
                .map(|ip| format!("{ip}:{}", p.port))
                .collect();
            if let Some(node_port) = p.node_port {
                addrs.push(format!("nodePort {node_port}"));
            }
            let ready = p.cluster.ready.len();
            let terminating = p.cluster.terminating.len();
            let mut notes = Vec::new();
            if p.etp_local {
                notes.push("eTP=Local".to_string());
            }
            if p.affinity_seconds.is_some() {
                notes.push("ClientIP affinity".to_string());
            }
            writeln!(
                out,
                "  {:<28} {:<3} {:<34} {ready} ready, {terminating} terminating {}",
                p.service.to_string(),
                crate::kube_proxy::proto(p.protocol),
                addrs.join(", "),
                notes.join(" ")
            )?;
        }
        for s in &skipped {
            writeln!(out, "  skipped {}: {}", s.object, s.reason)?;
        }
        Ok(())
    }

    /// Removes the lab: its processes (and any other process left in its
    /// namespaces), pins, namespaces and state directory. Works from what
    /// is on the machine, so also after a crash; a lab that is not there
    /// is no error.
    pub fn down(&self) -> anyhow::Result<Removed> {
        let mut removed = Removed::default();
        let namespaces = self.namespaces();
        let mut pids: Vec<u32> = processes_in(
            &namespaces
                .iter()
                .map(|n| Path::new("/run/netns").join(n))
                .collect::<Vec<_>>(),
        );
        if let Ok(state) = self.state() {
            // Those whose namespace is gone already; only if still ours (a
            // recycled pid is someone else's process).
            pids.extend(
                state
                    .processes
                    .iter()
                    .map(|p| p.pid)
                    .filter(|pid| self.started(*pid)),
            );
        }
        pids.sort();
        pids.dedup();
        removed.processes = stop_processes(&pids);

        let bpffs = self.bpffs();
        if crate::pin::is_bpffs(&bpffs) {
            if let Ok(entries) = fs::read_dir(&bpffs) {
                for e in entries.flatten() {
                    let _ = crate::pin::cleanup(&e.path());
                }
            }
            crate::pin::unmount_bpffs(&bpffs);
        }
        for ns in &namespaces {
            run(Command::new("ip").args(["netns", "del", ns]))?;
            removed.namespaces += 1;
        }
        if self.root.exists() {
            fs::remove_dir_all(&self.root)
                .with_context(|| format!("removing {}", self.root.display()))?;
            removed.state = true;
        }
        ensure!(
            self.namespaces().is_empty(),
            "namespaces of lab {:?} remain",
            self.name
        );
        Ok(removed)
    }
}

impl Lab {
    /// Whether `pid` runs a command this lab started (by its command line).
    fn started(&self, pid: u32) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        cmdline.contains(&*self.root.to_string_lossy())
    }
}

/// `Kind namespace/name` of every object.
fn identities(objects: &crate::manifests::Objects) -> BTreeSet<String> {
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

fn is_lab_role(role: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    role == "net"
        || role == "client"
        || role.strip_prefix("node").is_some_and(digits)
        || role
            .strip_prefix("pod-")
            .and_then(|r| r.split_once('-'))
            .is_some_and(|(n, p)| digits(n) && digits(p))
}

fn count_syncs(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains(" synced ")
                || l.contains("programming the maps failed")
                || l.contains("cannot read manifests")
        })
        .count()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(5);
    format!("{} says:\n{}", log.display(), lines[start..].join("\n"))
}

/// Processes whose network namespace is one of `namespaces` (bind mounts
/// under /run/netns), other than this one.
fn processes_in(namespaces: &[PathBuf]) -> Vec<u32> {
    let ids: Vec<(u64, u64)> = namespaces
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| ids.contains(&(m.dev(), m.ino())))
        })
        .collect()
}

/// SIGTERM, then SIGKILL what is left after two seconds. Returns how many
/// were running.
fn stop_processes(pids: &[u32]) -> usize {
    let running: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for pid in &running {
        // SAFETY: signalling a process of the lab.
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while running.iter().any(|p| alive(*p) && !zombie(*p)) && Instant::now() < deadline {
        // Exits of processes that are not our children raise no event here.
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in &running {
        if alive(*pid) {
            // SAFETY: as above.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
    running.len()
}

fn zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_roles_are_matched_exactly() {
        for role in ["net", "client", "node1", "node12", "pod-1-0", "pod-3-11"] {
            assert!(is_lab_role(role), "{role}");
        }
        for role in [
            "x-node1", "node", "pod-1", "pod-1-x", "nodes", "net2", "b-net",
        ] {
            assert!(!is_lab_role(role), "{role}");
        }
    }

    #[test]
    fn lab_names_cannot_prefix_each_other() {
        assert!(Lab::new("a").is_ok());
        assert!(Lab::new("demo2").is_ok());
        for bad in ["", "a-b", "A", "a/b", "a.b", "abcdefghijklmnopq"] {
            assert!(Lab::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_examples_parse_without_skips() {
        let mut objects = crate::manifests::Objects::default();
        for (name, text) in EXAMPLES {
            crate::manifests::load_str(text, name, &mut objects);
        }
        assert!(objects.skipped.is_empty(), "{:?}", objects.skipped);
        assert_eq!(objects.services.len(), EXAMPLES.len());
        assert_eq!(objects.slices.len(), EXAMPLES.len());
        let files: std::collections::BTreeSet<String> =
            fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yaml"))
                .collect();
        let embedded: std::collections::BTreeSet<String> =
            EXAMPLES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(files, embedded, "every examples/*.yaml is embedded");
    }
}
