//! `dp lab up`: building the namespaces, starting servers and agents (or
//! loading kube-proxy's rules), and waiting until each is ready.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};

use super::{process::*, *};

impl Lab {
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
                    "lab {:?} up in {:.1} s ({} mode{})",
                    self.name,
                    started.elapsed().as_secs_f64(),
                    opts.mode.name(),
                    match opts.ip_family {
                        IpFamilies::Ipv4 => "",
                        IpFamilies::Ipv6 => ", IPv6",
                        IpFamilies::Dual => ", dual-stack",
                    }
                )?;
                Ok(state)
            }
            Err(e) => {
                let _ = self.down();
                Err(e)
            }
        }
    }

    pub(super) fn build(&self, opts: &UpOptions, out: &mut impl Write) -> anyhow::Result<State> {
        fs::create_dir_all(self.root.join("logs"))?;
        fs::create_dir_all(self.manifests_dir())?;
        crate::kernel::pin::ensure_bpffs(&self.bpffs())?;
        let links = self.bpffs().join("lab");
        fs::create_dir_all(&links)?;

        let family = opts.ip_family;
        let cluster = e2e::Cluster::build_with(
            e2e::Topology::named(&self.prefix()),
            &vec![PODS_PER_NODE; opts.nodes],
            family.has_ipv6(),
        )
        .context("creating the namespaces")?;
        let mut state = State {
            name: self.name.clone(),
            mode: opts.mode,
            ip_family: family,
            socket_lb: opts.socket_lb,
            nodes: cluster
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Member {
                    name: n.name.clone(),
                    ip: n.ip,
                    node: None,
                    pod_gateway: Some(e2e::cluster::pod_gateway(i)),
                    ip6: n.ip6,
                    pod_gateway6: n.ip6.map(|_| e2e::cluster::pod_gateway6(i)),
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
                    ip6: p.ip6,
                    pod_gateway6: None,
                })
                .collect(),
            client: Member {
                name: "client".into(),
                ip: e2e::cluster::CLIENT_IP,
                node: None,
                pod_gateway: None,
                ip6: family.has_ipv6().then_some(e2e::cluster::CLIENT_IP6),
                pod_gateway6: None,
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
                .map(|p| format!("{} {}", p.name, p.addresses()))
                .collect();
            writeln!(
                out,
                "  {} {}: {}",
                node.name,
                node.addresses(),
                pods.join(", ")
            )?;
        }
        writeln!(
            out,
            "  client {} (outside the cluster CIDR {}; routes the service CIDR {} via node1)",
            state.client.addresses(),
            family.cluster_cidrs().join(","),
            family.service_cidrs().join(","),
        )?;

        match &opts.manifests {
            Some(dir) => {
                let mut n = 0;
                for entry in fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
                    let path = entry?.path();
                    if crate::source::manifests::is_manifest(&path) {
                        let text = fs::read_to_string(&path)
                            .with_context(|| format!("{}", path.display()))?;
                        let name = path.file_name().unwrap();
                        fs::write(self.manifests_dir().join(name), family.manifest(&text)?)?;
                        n += 1;
                    }
                }
                writeln!(out, "  {n} manifest files from {}", dir.display())?;
            }
            None => {
                let (examples, dir) = if family == IpFamilies::Ipv4 {
                    (EXAMPLES, "examples/")
                } else {
                    (EXAMPLES_DUAL_STACK, "examples/dual-stack/")
                };
                for (name, text) in examples {
                    fs::write(self.manifests_dir().join(name), family.manifest(text)?)?;
                }
                writeln!(
                    out,
                    "  the {} example manifests ({dir}{})",
                    examples.len(),
                    if family == IpFamilies::Ipv6 {
                        ", their IPv6 half"
                    } else {
                        ""
                    }
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
                    let pid = self.start_agent(&node, family, opts.socket_lb)?;
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
                if opts.socket_lb != crate::agent::SocketLb::Off {
                    writeln!(
                        out,
                        "  socket-level load balancing ({:?}): each node's hooks on its cgroup; `dp lab exec <node>` runs in it",
                        opts.socket_lb
                    )?;
                }
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
    pub(super) fn start_servers(&self, pod: &Member) -> anyhow::Result<u32> {
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
    pub(super) fn start_agent(
        &self,
        node: &Member,
        family: IpFamilies,
        socket_lb: crate::agent::SocketLb,
    ) -> anyhow::Result<u32> {
        let exe = std::env::current_exe()?;
        let mut node_ips = Vec::new();
        if family.has_ipv4() {
            node_ips.push(node.ip.to_string());
        }
        node_ips.extend(node.ip6.map(|ip| ip.to_string()));
        let mut cmd = self.detached(&node.name, &exe, &self.log(&node.name, "agent"))?;
        cmd.arg("agent");
        if socket_lb != crate::agent::SocketLb::Off {
            let cgroup = self
                .node_cgroup(&node.name)
                .context("--socket-lb: no cgroup v2 hierarchy is mounted")?;
            fs::create_dir_all(&cgroup)
                .with_context(|| format!("creating {}", cgroup.display()))?;
            let mode = match socket_lb {
                crate::agent::SocketLb::All => "all",
                _ => "host",
            };
            cmd.args(["--socket-lb", mode])
                .arg("--cgroup-root")
                .arg(&cgroup);
        }
        let child = cmd
            .arg("--manifests")
            .arg(self.manifests_dir())
            .arg("--bpffs")
            .arg(self.node_bpffs(&node.name))
            .args(["--node-name", &node.name, "--node-ip", &node_ips.join(",")])
            .args(["--devices", "eth0"])
            .args(["--cluster-cidr", &family.cluster_cidrs().join(",")])
            .args(["--service-cidr", &family.service_cidrs().join(",")])
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
    pub(super) fn detached(
        &self,
        member: &str,
        program: &Path,
        log: &Path,
    ) -> anyhow::Result<Command> {
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
    pub(super) fn wait_for_log(&self, pid: u32, log: &Path, seen: usize) -> anyhow::Result<()> {
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
}
