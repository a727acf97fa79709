//! The input every dataplane gets, and the dataplanes themselves on a fresh
//! namespace cluster: dp (the agent with `--manifests`), kube-proxy's rules
//! in iptables mode (nft and legacy backends) and nftables mode, and no
//! service at all (pod to pod, the floor).

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use dp::{
    kube_proxy::{
        apply::{Applier, Backend},
        ProxyConfig,
    },
    source::manifests::{self, Objects},
    translate::{service_ports, NodeInfo, ServicePortInfo},
};
use e2e::Cluster;

pub const ENDPOINTS: usize = 10;
pub const TCP_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 53;
pub const UDP_TARGET_PORT: u16 = 5353;
pub const UDP_NODE_PORT: u16 = 32000;
const NODE_IP4: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const NODE_IP6: Ipv6Addr = e2e::cluster::node_network6(2);

/// The family every service, endpoint and client of this run uses
/// (`--ip-family`); set once, at the start.
static IPV6: OnceLock<bool> = OnceLock::new();

/// Runs this process's measurements over IPv6 (single-stack IPv6 Services
/// on a dual-stack cluster, kube-proxy's ip6tables and `ip6` table).
pub fn use_ipv6(on: bool) {
    let _ = IPV6.set(on);
}

pub fn ipv6() -> bool {
    IPV6.get().copied().unwrap_or(false)
}

/// node1's address in the run's family.
pub fn node_ip() -> IpAddr {
    if ipv6() {
        NODE_IP6.into()
    } else {
        NODE_IP4.into()
    }
}

/// The pods' CIDR in the run's family (kind's).
pub fn cluster_cidr() -> String {
    if ipv6() {
        let (net, len) = e2e::cluster::CLUSTER_CIDR6;
        format!("{net}/{len}")
    } else {
        "10.244.0.0/16".into()
    }
}

fn service_cidr() -> &'static str {
    if ipv6() {
        e2e::cluster::SERVICE_CIDR6
    } else {
        e2e::cluster::SERVICE_CIDR
    }
}
/// Every 20th service is a NodePort (the range holds 2 768 ports).
const NODEPORT_EVERY: usize = 20;
const SERVICES_PER_FILE: usize = 500;

/// The dataplanes compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Dataplane {
    /// No service: the client talks to pod IPs (the floor).
    Direct,
    Dp,
    /// dp with socket-level load balancing for every socket of the node
    /// (`--socket-lb all`, attached to a cgroup of the run's own that the
    /// clients join while they measure this dataplane).
    DpSocketLb,
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl Dataplane {
    pub fn name(self) -> &'static str {
        match self {
            Dataplane::Direct => "direct",
            Dataplane::Dp => "dp",
            Dataplane::DpSocketLb => "dp-socket-lb",
            Dataplane::IptablesNft => "iptables-nft",
            Dataplane::IptablesLegacy => "iptables-legacy",
            Dataplane::Nftables => "nftables",
        }
    }

    /// Every dataplane, in the tables' order.
    pub const ALL: [Dataplane; 6] = [
        Dataplane::Direct,
        Dataplane::Dp,
        Dataplane::DpSocketLb,
        Dataplane::IptablesNft,
        Dataplane::IptablesLegacy,
        Dataplane::Nftables,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    /// A dp agent (with or without socket LB).
    pub fn is_dp(self) -> bool {
        matches!(self, Dataplane::Dp | Dataplane::DpSocketLb)
    }

    fn backend(self) -> Option<Backend> {
        match self {
            Dataplane::IptablesNft => Some(Backend::IptablesNft),
            Dataplane::IptablesLegacy => Some(Backend::IptablesLegacy),
            Dataplane::Nftables => Some(Backend::Nftables),
            _ => None,
        }
    }
}

/// The backend pods: `pod-1-1` .. `pod-1-10`; `pod-1-0` is the client pod.
pub fn backend_ips() -> Vec<IpAddr> {
    (0..ENDPOINTS)
        .map(|e| {
            if ipv6() {
                e2e::cluster::pod_address6(0, 1 + e).into()
            } else {
                Ipv4Addr::new(10, 244, 1, 11 + e as u8).into()
            }
        })
        .collect()
}

pub fn cluster_ip(i: usize) -> IpAddr {
    if ipv6() {
        // fd00:10:96::/112 holds 65 535: more than the largest N.
        let base = u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0));
        Ipv6Addr::from(base + i as u128 + 1).into()
    } else {
        Ipv4Addr::from(0x0a60_0000 + i as u32 + 1).into() // 10.96.x.y
    }
}

/// An address nobody answers on, for endpoint change `version`.
fn moved_ip(version: usize) -> IpAddr {
    let v = (version % 60_000) as u32 + 1;
    if ipv6() {
        Ipv6Addr::new(0xfd00, 0x10, 0x250, 0, 0, 0, 0, v as u16).into()
    } else {
        Ipv4Addr::from(0x0afa_0000 + v).into()
    }
}

pub fn node_port(i: usize) -> Option<u16> {
    i.is_multiple_of(NODEPORT_EVERY)
        .then(|| 30000 + (i / NODEPORT_EVERY) as u16)
}

/// `n` TCP services `bench/svc-NNNNN` (port 80 to 8080 on all ten pods;
/// every 20th also a NodePort) and one UDP service `bench/dns` (53 to 5353,
/// NodePort 32000). `moved`: service index whose first endpoint moved to an
/// address of its own (the endpoint change of the control-plane figures).
pub struct Input {
    pub n: usize,
    pub moved: Vec<(usize, usize)>,
}

impl Input {
    pub fn udp_cluster_ip() -> IpAddr {
        if ipv6() {
            Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0xfffd).into()
        } else {
            Ipv4Addr::new(10, 96, 255, 253).into()
        }
    }

    fn endpoints(&self, i: usize) -> Vec<IpAddr> {
        let mut ips = backend_ips();
        if let Some((_, version)) = self.moved.iter().rev().find(|(s, _)| *s == i) {
            // An address nobody answers on: the change is what is measured.
            ips[0] = moved_ip(*version);
        }
        ips
    }

    /// `ipFamilies` and `addressType` of the run's family.
    fn family_yaml() -> (&'static str, &'static str) {
        if ipv6() {
            (", ipFamilies: [IPv6]", "IPv6")
        } else {
            ("", "IPv4")
        }
    }

    fn service_yaml(&self, i: usize, out: &mut String) {
        let ty = if node_port(i).is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let np = node_port(i).map_or(String::new(), |p| format!(", nodePort: {p}"));
        let (families, address_type) = Self::family_yaml();
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:05}, namespace: bench}}\n\
             spec: {{type: {ty}, clusterIP: \"{}\"{families}, ports: [{{name: http, port: {TCP_PORT}, targetPort: {TARGET_PORT}{np}}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i:05}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i:05}}}}}\n\
             addressType: {address_type}\nports: [{{name: http, port: {TARGET_PORT}}}]\nendpoints:\n",
            cluster_ip(i)
        );
        for ip in self.endpoints(i) {
            let _ = writeln!(out, "- {{addresses: [\"{ip}\"], nodeName: node1}}");
        }
        out.push_str("---\n");
    }

    fn udp_yaml(out: &mut String) {
        let (families, address_type) = Self::family_yaml();
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: bench}}\n\
             spec: {{type: NodePort, clusterIP: \"{}\"{families}, ports: [{{name: dns, protocol: UDP, port: {UDP_PORT}, targetPort: {UDP_TARGET_PORT}, nodePort: {UDP_NODE_PORT}}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: dns-1, namespace: bench, labels: {{kubernetes.io/service-name: dns}}}}\n\
             addressType: {address_type}\nports: [{{name: dns, protocol: UDP, port: {UDP_TARGET_PORT}}}]\nendpoints:\n",
            Self::udp_cluster_ip()
        );
        for ip in backend_ips() {
            let _ = writeln!(out, "- {{addresses: [\"{ip}\"], nodeName: node1}}");
        }
        out.push_str("---\n");
    }

    /// The manifests of file `f` (500 services each; file 0 also has `dns`).
    pub fn file(&self, f: usize) -> String {
        let mut out = String::new();
        if f == 0 {
            Self::udp_yaml(&mut out);
        }
        for i in f * SERVICES_PER_FILE..((f + 1) * SERVICES_PER_FILE).min(self.n) {
            self.service_yaml(i, &mut out);
        }
        out
    }

    pub fn files(&self) -> usize {
        self.n.div_ceil(SERVICES_PER_FILE).max(1)
    }

    pub fn file_of(i: usize) -> usize {
        i / SERVICES_PER_FILE
    }

    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)?;
        for f in 0..self.files() {
            fs::write(dir.join(format!("s{f:03}.yaml")), self.file(f))?;
        }
        Ok(())
    }

    /// The service ports, as kube-proxy would see them on node1.
    pub fn service_ports(&self) -> Vec<ServicePortInfo> {
        let mut objects = Objects::default();
        for f in 0..self.files() {
            manifests::load_str(&self.file(f), "bench", &mut objects);
        }
        let mut skipped = Vec::new();
        let ports = service_ports(&objects.services, &objects.slices, &node(), &mut skipped);
        assert!(skipped.is_empty(), "{:?}", &skipped[..1]);
        ports
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        ips: vec![node_ip()],
        zone: None,
    }
}

/// kube-proxy's settings for node1, in the run's family only (its other
/// family has no Services, so no rules are written for it).
pub fn proxy_config() -> ProxyConfig {
    ProxyConfig {
        cluster_cidrs: vec![cluster_cidr().parse().expect("CIDR")],
        node_ips: vec![node_ip()],
        service_cidrs: vec![service_cidr().parse().expect("CIDR")],
        ..ProxyConfig::default()
    }
}

/// A memory cgroup the loading tools (or the agent) run in, so the kernel
/// memory their rules or maps use can be read (it stays charged to it).
pub struct MemoryCgroup {
    path: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    pub fn create(label: &str) -> Result<Self> {
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let (base, v2) = if let Some(p) = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        {
            (
                PathBuf::from("/sys/fs/cgroup/memory").join(p.trim_start_matches('/')),
                false,
            )
        } else {
            let p = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .context("no memory cgroup")?;
            (
                PathBuf::from("/sys/fs/cgroup").join(p.trim_start_matches('/')),
                true,
            )
        };
        remove_stale(&base);
        let path = base.join(format!("dp-bench-{}-{label}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(MemoryCgroup { path, v2 })
    }

    /// `sh -c` prefix that moves the command into this cgroup first.
    pub fn enter_script(&self) -> String {
        format!(
            "echo $$ > {}/cgroup.procs && exec \"$@\"",
            self.path.display()
        )
    }

    /// Kernel memory charged to the cgroup, in bytes.
    pub fn kernel_bytes(&self) -> Result<u64> {
        if self.v2 {
            let stat = fs::read_to_string(self.path.join("memory.stat"))?;
            let field = |name: &str| {
                stat.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            Ok(field("kernel ") + field("percpu "))
        } else {
            Ok(
                fs::read_to_string(self.path.join("memory.kmem.usage_in_bytes"))?
                    .trim()
                    .parse()?,
            )
        }
    }
}

/// Cgroups and work directories of dp-bench runs that died (killed, or
/// stopped by an error before they cleaned up).
fn remove_stale(cgroup_base: &Path) {
    let dead = |name: &str| {
        name.strip_prefix("dp-bench-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
    };
    for (dir, is_cgroup) in [
        (cgroup_base.to_path_buf(), true),
        (std::env::temp_dir(), false),
    ] {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !dead(&name) {
                continue;
            }
            if is_cgroup {
                let _ = fs::remove_dir(entry.path());
            } else {
                // Each agent's bpffs: `<dataplane>-bpffs`, `bpffs-watch`.
                for sub in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                    if sub.file_name().to_string_lossy().contains("bpffs") {
                        let _ = dp::kernel::pin::cleanup(&sub.path());
                        dp::kernel::pin::unmount_bpffs(&sub.path());
                    }
                }
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Charges of removed rules move to the parent; the directory goes
        // once no process is left in it.
        let _ = fs::remove_dir(&self.path);
    }
}

/// The dataplane as loaded, and what loading cost.
pub struct Loaded {
    pub load_seconds: f64,
    /// Rules written (kube-proxy modes) or frontends programmed (dp).
    pub objects: usize,
    pub kernel_bytes: u64,
    pub agent_rss_bytes: Option<u64>,
    state: State,
    _cgroup: Option<MemoryCgroup>,
    /// dp-socket-lb: where its socket hooks are attached.
    pub socket_cgroup: Option<SocketCgroup>,
}

/// The cgroup (v2) that dp-socket-lb's agent attaches its socket hooks to:
/// they see only sockets that a process inside it creates. The clients join
/// it (`join`) for that dataplane's measurements from the node and the pod,
/// and leave it for the external client's and the other dataplanes'.
pub struct SocketCgroup {
    path: PathBuf,
    /// This process's own cgroup, to go back to.
    home: PathBuf,
}

/// This process inside a `SocketCgroup`, until dropped.
pub struct Joined<'a> {
    cgroup: &'a SocketCgroup,
}

impl SocketCgroup {
    pub fn create() -> Result<Self> {
        let root = dp::agent::cgroup2_root()
            .context("no cgroup v2 hierarchy mounted: dp-socket-lb needs one")?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let home = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| root.join(p.trim_start_matches('/')))
            .context("this process has no cgroup v2 path")?;
        remove_stale(&root);
        let path = root.join(format!("dp-bench-{}-sock", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(SocketCgroup { path, home })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves this process (all its threads: cgroup v2 moves a process
    /// whole) into the cgroup; sockets it creates from then on, in any
    /// namespace, are the socket hooks'. Sockets created before keep their
    /// cgroup (the servers' are never the hooks').
    pub fn join(&self) -> Result<Joined<'_>> {
        move_to(&self.path)?;
        Ok(Joined { cgroup: self })
    }
}

fn move_to(cgroup: &Path) -> Result<()> {
    fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving dp-bench into {}", cgroup.display()))
}

impl Drop for Joined<'_> {
    /// Left in the cgroup, every later measurement of another dataplane
    /// would be translated by these hooks: that stops the run (a second
    /// panic while one unwinds would abort, so then only a word).
    fn drop(&mut self) {
        if let Err(e) = move_to(&self.cgroup.home) {
            if std::thread::panicking() {
                eprintln!("dp-bench cannot leave the socket LB cgroup: {e:#}");
            } else {
                panic!("dp-bench cannot leave the socket LB cgroup: {e:#}");
            }
        }
    }
}

impl Drop for SocketCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.path);
    }
}

enum State {
    None,
    Rules(Box<Applier>),
    Agent {
        child: Child,
        log: mpsc::Receiver<String>,
        dir: PathBuf,
        bpffs: PathBuf,
    },
}

pub fn load(
    dataplane: Dataplane,
    cluster: &Cluster,
    input: &Input,
    work: &Path,
    timeout: Duration,
) -> Result<Loaded> {
    let node_ns = cluster.node_ns(0);
    let mut loaded = Loaded {
        load_seconds: 0.0,
        objects: 0,
        kernel_bytes: 0,
        agent_rss_bytes: None,
        state: State::None,
        _cgroup: None,
        socket_cgroup: None,
    };
    if dataplane == Dataplane::Direct {
        return Ok(loaded);
    }
    let cgroup = MemoryCgroup::create(dataplane.name())?;
    if let Some(backend) = dataplane.backend() {
        let prefix = vec![
            "nsenter".into(),
            format!("--net={}", node_ns.path().display()).into(),
            "sh".into(),
            "-c".into(),
            cgroup.enter_script().into(),
            "sh".into(),
        ];
        let mut applier = Box::new(Applier::new(backend, proxy_config(), prefix));
        let ports = input.service_ports();
        applier.timeout = Some(timeout);
        let report = applier.sync(&ports, false)?;
        applier.timeout = None;
        loaded.load_seconds = (report.generate + report.apply).as_secs_f64();
        loaded.objects = report.rules;
        loaded.state = State::Rules(applier);
    } else {
        // Each agent its own: dp and dp-socket-lb are loaded side by side.
        let dir = work.join(format!("{}-manifests", dataplane.name()));
        let bpffs = work.join(format!("{}-bpffs", dataplane.name()));
        let _ = fs::remove_dir_all(&dir);
        input.write_dir(&dir)?;
        let frontends = if dataplane == Dataplane::DpSocketLb {
            expected_frontends_socket_lb(input.n)
        } else {
            expected_frontends(input.n)
        };
        let started = Instant::now();
        let mut cmd = agent_command(node_ns, input.n, Some(&cgroup.enter_script()));
        cmd.arg("--manifests").arg(&dir).arg("--bpffs").arg(&bpffs);
        if dataplane == Dataplane::DpSocketLb {
            let socket_cgroup = SocketCgroup::create()?;
            cmd.args(["--socket-lb", "all", "--cgroup-root"])
                .arg(socket_cgroup.path());
            loaded.socket_cgroup = Some(socket_cgroup);
        }
        let (child, log) = spawn_logged(cmd).context("starting dp agent")?;
        let pid = agent_pid(&child);
        // Owned by `loaded` at once: an error below stops the agent too.
        loaded.state = State::Agent {
            child,
            log,
            dir,
            bpffs,
        };
        let State::Agent { log, .. } = &loaded.state else {
            unreachable!("set above")
        };
        let line = wait_synced(log, Duration::from_secs(600))?;
        loaded.load_seconds = started.elapsed().as_secs_f64();
        loaded.objects = field(&line, "frontends=").unwrap_or(0) as usize;
        if loaded.objects != frontends {
            bail!(
                "dp agent programmed {} frontends, expected {frontends}: {line}",
                loaded.objects
            );
        }
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        loaded.agent_rss_bytes = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024);
    }
    loaded.kernel_bytes = cgroup.kernel_bytes()?;
    loaded._cgroup = Some(cgroup);
    Ok(loaded)
}

pub fn node_ports(n: usize) -> usize {
    (0..n).filter(|i| node_port(*i).is_some()).count()
}

fn dp_binary() -> PathBuf {
    // dp-bench is built next to dp.
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("dp")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("dp"))
}

/// The agent runs as `sh` that exec'd `dp`: same pid.
fn agent_pid(child: &Child) -> u32 {
    child.id()
}

fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

fn wait_synced(log: &mpsc::Receiver<String>, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log
            .recv_timeout(left)
            .context("dp agent: no `synced` line (exited or timed out)")?;
        if line.contains("ERROR") {
            bail!("dp agent: {line}");
        }
        if line.contains(" synced") {
            return Ok(line);
        }
    }
}

impl Loaded {
    /// Moves the first endpoint of service `i` (version `v`) and waits until
    /// the dataplane has it: the kube-proxy way (partial sync) or dp's
    /// (the agent sees the edited file and updates its maps). Returns the
    /// time it took and, for dp, the agent's own sync time.
    pub fn change_endpoint(
        &mut self,
        input: &mut Input,
        i: usize,
        v: usize,
    ) -> Result<(Duration, Option<Duration>)> {
        input.moved.push((i, v));
        match &mut self.state {
            State::None => Ok((Duration::ZERO, None)),
            State::Rules(applier) => {
                // kube-proxy translates its caches into rules on each sync;
                // translation of the objects is not timed for either side.
                let ports = input.service_ports();
                let report = applier.sync(&ports, false)?;
                if report.full {
                    bail!("expected a partial sync");
                }
                Ok((report.generate + report.apply, None))
            }
            State::Agent { log, dir, .. } => {
                while log.try_recv().is_ok() {}
                let f = Input::file_of(i);
                let text = input.file(f);
                // Written aside and renamed into place, as editors and
                // ConfigMap updates do: the agent never reads half a file.
                let staged = dir.join(format!(".s{f:03}.yaml.tmp"));
                fs::write(&staged, text)?;
                let t = Instant::now();
                fs::rename(&staged, dir.join(format!("s{f:03}.yaml")))?;
                loop {
                    let line = wait_synced(log, Duration::from_secs(60))?;
                    match field(&line, "backends_written=") {
                        Some(1) => {
                            let micros = field(&line, "micros=").unwrap_or(0);
                            return Ok((t.elapsed(), Some(Duration::from_micros(micros))));
                        }
                        // A second event for the same rename: nothing to do.
                        Some(0) if field(&line, "backends_removed=") == Some(0) => {}
                        _ => bail!("dp agent: unexpected sync for one endpoint change: {line}"),
                    }
                }
            }
        }
    }

    /// This process inside dp-socket-lb's socket cgroup until the guard
    /// drops; nothing for the other dataplanes.
    pub fn join_socket_cgroup(&self) -> Result<Option<Joined<'_>>> {
        self.socket_cgroup.as_ref().map(|c| c.join()).transpose()
    }

    /// The agent's pid (dp only).
    pub fn agent_pid(&self) -> Option<u32> {
        match &self.state {
            State::Agent { child, .. } => Some(agent_pid(child)),
            _ => None,
        }
    }

    /// dp's socket hooks' connect decisions so far (None for the other
    /// dataplanes): (translated to a backend, left to tc).
    pub fn socket_connects(&self) -> Result<Option<(u64, u64)>> {
        let State::Agent { bpffs, .. } = &self.state else {
            return Ok(None);
        };
        let rows = dp::inspect::pinned::PinnedMaps::open(bpffs)?.stats()?;
        let count = |reasons: &[&str]| {
            rows.iter()
                .filter(|r| r.hook.starts_with("sock/connect") && reasons.contains(&r.reason))
                .map(|r| r.packets)
                .sum::<u64>()
        };
        Ok(Some((
            count(&["new_flow", "new_flow_affinity"]),
            count(&["sock_left_to_tc"]),
        )))
    }

    pub fn unload(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, State::None) {
            State::None => {}
            State::Rules(mut applier) => applier.cleanup()?,
            State::Agent {
                mut child,
                bpffs,
                dir,
                ..
            } => {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
                let _ = dp::kernel::pin::cleanup(&bpffs);
                dp::kernel::pin::unmount_bpffs(&bpffs);
                let _ = fs::remove_dir_all(&bpffs);
                let _ = fs::remove_dir_all(&dir);
            }
        }
        Ok(())
    }
}

impl Drop for Loaded {
    /// Also on the error path: no agent, pins or mounts are left behind.
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Where the client pod sends: (ClusterIP targets ..).
pub fn last_service(n: usize) -> SocketAddr {
    SocketAddr::from((cluster_ip(n - 1), TCP_PORT))
}

pub fn last_node_port(n: usize) -> SocketAddr {
    let i = (0..n).rev().find(|i| node_port(*i).is_some()).unwrap_or(0);
    SocketAddr::from((node_ip(), node_port(i).unwrap_or(30000)))
}

/// The fake API server process (`e2e`'s `fake-apiserver`, built next to
/// dp-bench by `cargo xtask bench`): not linked into dp-bench, so `dp`'s
/// dependencies hold no test server.
pub fn fake_apiserver_binary() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("fake-apiserver")))
        .filter(|p| p.exists())
}

/// A running fake API server, driven over its stdin.
struct FakeApi {
    child: Child,
    requests: std::process::ChildStdin,
    versions: BufReader<std::process::ChildStdout>,
}

impl FakeApi {
    fn start(binary: &Path, node_ns: &e2e::Netns, kubeconfig: &Path) -> Result<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", node_ns.path().display()))
            .arg(binary)
            .arg(kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fake API server")?;
        let requests = child.stdin.take().context("fake API stdin")?;
        let mut versions = BufReader::new(child.stdout.take().context("fake API stdout")?);
        let mut ready = String::new();
        versions.read_line(&mut ready)?;
        if ready.trim() != "ready" {
            bail!("fake API server did not start: {ready:?}");
        }
        Ok(FakeApi {
            child,
            requests,
            versions,
        })
    }

    /// Sends `{"apply": object}`; the event's resourceVersion.
    fn apply(&mut self, object: &serde_json::Value) -> Result<u64> {
        use std::io::Write as _;
        writeln!(self.requests, "{}", serde_json::json!({ "apply": object }))?;
        self.requests.flush()?;
        let mut line = String::new();
        self.versions.read_line(&mut line)?;
        line.trim()
            .parse()
            .with_context(|| format!("fake API server answered {line:?}"))
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The objects of a YAML text, as JSON.
fn documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// dp's one-endpoint changes as a cluster delivers them: the agent with
/// `--kubeconfig` on the fake API server (list, then watch), in the node's
/// namespace of `cluster` (no other dataplane loaded). Each change is one
/// EndpointSlice MODIFIED event; measured from the event handed to the
/// server until the agent logs the sync that carries its resourceVersion
/// (maps written). Returns (those times, the agent's own sync times).
pub fn watch_changes(
    binary: &Path,
    cluster: &Cluster,
    input: &mut Input,
    work: &Path,
    changes: usize,
    first_version: usize,
) -> Result<(Duration, Vec<Duration>, Vec<Duration>)> {
    let node_ns = cluster.node_ns(0);
    fs::create_dir_all(work)?;
    let kubeconfig = work.join("kubeconfig");
    let bpffs = work.join("bpffs-watch");
    let mut api = FakeApi::start(binary, node_ns, &kubeconfig)?;
    for f in 0..input.files() {
        for object in documents(&input.file(f))? {
            api.apply(&object)?;
        }
    }
    let n = input.n;
    let frontends = expected_frontends(n);
    let mut cmd = agent_command(node_ns, n, None);
    cmd.arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--bpffs")
        .arg(&bpffs);
    let started = Instant::now();
    let (mut child, log) = spawn_logged(cmd).context("starting dp agent --kubeconfig")?;
    let measured = (|| -> Result<(Duration, Vec<Duration>, Vec<Duration>)> {
        let line = wait_synced(&log, Duration::from_secs(600))?;
        let start = started.elapsed();
        if field(&line, "frontends=") != Some(frontends as u64) {
            bail!("dp agent (watch) programmed other than {frontends} frontends: {line}");
        }
        let (mut total, mut agent) = (Vec::new(), Vec::new());
        for c in 0..changes {
            let i = (c * 7919) % n;
            input.moved.push((i, first_version + c));
            let mut yaml = String::new();
            input.service_yaml(i, &mut yaml);
            let slice = documents(&yaml)?
                .into_iter()
                .find(|o| o["kind"] == "EndpointSlice")
                .context("no slice")?;
            while log.try_recv().is_ok() {}
            let t = Instant::now();
            let version = api.apply(&slice)?;
            loop {
                let line = wait_synced(&log, Duration::from_secs(60))?;
                if field(&line, "resource_version=") != Some(version) {
                    continue;
                }
                if field(&line, "backends_written=") != Some(1) {
                    bail!("dp agent (watch): unexpected sync for one endpoint change: {line}");
                }
                total.push(t.elapsed());
                agent.push(Duration::from_micros(field(&line, "micros=").unwrap_or(0)));
                break;
            }
        }
        Ok((start, total, agent))
    })();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = dp::kernel::pin::cleanup(&bpffs);
    dp::kernel::pin::unmount_bpffs(&bpffs);
    let _ = fs::remove_dir_all(&bpffs);
    let _ = fs::remove_file(&kubeconfig);
    measured
}

/// `dp agent` for node1 of the bench cluster, its maps sized for `n`
/// services (the caller adds the source and the bpffs), run in the node's
/// namespace and, with `enter`, through that `sh -c` prefix first (the
/// memory cgroup).
fn agent_command(node_ns: &e2e::Netns, n: usize, enter: Option<&str>) -> Command {
    let frontends = expected_frontends(n);
    let services = ((frontends * (ENDPOINTS + 2)) as u32).next_power_of_two();
    let backends = ((frontends * ENDPOINTS) as u32).next_power_of_two();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node_ns.path().display()));
    if let Some(script) = enter {
        cmd.args(["sh", "-c", script, "sh"]);
    }
    cmd.arg(dp_binary())
        .args(["agent", "--node-name", "node1", "--node-ip"])
        .arg(node_ip().to_string())
        .args(["--devices", "eth0"])
        .args(["--cluster-cidr", &cluster_cidr()])
        .args([
            "--map-size-services",
            &services.max(common::map_sizes::SERVICES).to_string(),
        ])
        .args([
            "--map-size-backends",
            &backends.max(common::map_sizes::BACKENDS).to_string(),
        ])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--healthz-addr",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The frontends dp programs for `n` services: each ClusterIP, the
/// NodePorts, and `bench/dns`'s two.
fn expected_frontends(n: usize) -> usize {
    n + node_ports(n) + 2
}

/// With socket LB on, every NodePort on 127.0.0.1 too (TCP ones and
/// `bench/dns`'s UDP one); IPv4 only: kube-proxy never serves NodePorts
/// on `::1`.
fn expected_frontends_socket_lb(n: usize) -> usize {
    if ipv6() {
        expected_frontends(n)
    } else {
        expected_frontends(n) + node_ports(n) + 1
    }
}

/// Starts `cmd` and forwards its stderr lines to the returned receiver.
fn spawn_logged(mut cmd: Command) -> Result<(Child, mpsc::Receiver<String>)> {
    let mut child = cmd.spawn()?;
    let (tx, log) = mpsc::channel();
    let stderr = child.stderr.take().context("agent stderr")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((child, log))
}
