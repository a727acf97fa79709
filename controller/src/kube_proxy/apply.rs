//! Applying generated rules the way kube-proxy does: the jump rules and a
//! full `iptables-restore --noflush` (or a full `nft -f` transaction) on the
//! first sync, partial syncs after it (only the chains of changed service
//! ports rewritten), stale chains deleted. Commands run with an optional
//! prefix (e.g. `nsenter --net=…`), so the rules land where the caller says.
//!
//! Each IP family is synced on its own, as kube-proxy's two proxiers of a
//! dual-stack node do: `iptables-*` and `ip6tables-*` (one restore each),
//! or one `nft -f` transaction per table. A family is synced when the node
//! has an address of it or a Service port is of it (`super::families`), and
//! from then on; an IPv4-only node runs exactly the IPv4 tools.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    io::{Read as _, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{categorize, iptables, nftables, ProxyConfig, LARGE_CLUSTER_ENDPOINTS};
use crate::translate::{IpFamily, ServicePortInfo, ServicePortName};

/// Which kernel API and tools carry the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// iptables mode through `iptables-nft` (nf_tables underneath).
    IptablesNft,
    /// iptables mode through `iptables-legacy` (x_tables).
    IptablesLegacy,
    /// nftables mode (`nft`).
    Nftables,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
            Backend::Nftables => "nftables",
        }
    }

    /// The iptables front end for `family`'s rules (the `-save` and
    /// `-restore` tools are named after it).
    fn iptables(self, family: IpFamily) -> &'static str {
        match (self, family) {
            (Backend::IptablesLegacy, IpFamily::V4) => "iptables-legacy",
            (Backend::IptablesLegacy, IpFamily::V6) => "ip6tables-legacy",
            (_, IpFamily::V4) => "iptables-nft",
            (_, IpFamily::V6) => "ip6tables-nft",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{command} did not finish within {seconds} s (stopped)")]
    Timeout { command: String, seconds: u64 },
}

/// What one sync did and cost (both families together on a dual-stack
/// node).
#[derive(Clone, Debug)]
pub struct SyncReport {
    pub full: bool,
    /// Building the input text.
    pub generate: Duration,
    /// Running the tools (jump rules, stale-chain scan, restore / nft).
    pub apply: Duration,
    /// Rules in the input.
    pub rules: usize,
    pub bytes: usize,
}

impl SyncReport {
    fn add(&mut self, other: SyncReport) {
        self.generate += other.generate;
        self.apply += other.apply;
        self.rules += other.rules;
        self.bytes += other.bytes;
    }
}

/// What the last sync of one family left.
#[derive(Default)]
struct FamilyState {
    /// Per-service chains (and nftables affinity sets).
    active_chains: BTreeSet<String>,
    /// nftables mode: the map and set elements.
    elements: nftables::Elements,
}

/// The synced state of one node's kube-proxy rules.
pub struct Applier {
    pub backend: Backend,
    pub config: ProxyConfig,
    prefix: Vec<OsString>,
    /// Longest a tool may run before it is killed (None: no limit).
    pub timeout: Option<Duration>,
    /// The service ports of the last sync, by family and name (a dual-stack
    /// Service port is one in each family).
    last: Option<BTreeMap<(IpFamily, ServicePortName), ServicePortInfo>>,
    /// The families synced so far.
    families: BTreeMap<IpFamily, FamilyState>,
}

impl Applier {
    /// `prefix`: a command prefix the tools run under (empty: here).
    pub fn new(backend: Backend, config: ProxyConfig, prefix: Vec<OsString>) -> Self {
        Applier {
            backend,
            config,
            prefix,
            timeout: None,
            last: None,
            families: BTreeMap::new(),
        }
    }

    /// Makes the rules match `ports`: a full sync the first time (or when
    /// `force_full`), else a partial one; per family (module comment), a
    /// family synced for the first time in full.
    pub fn sync(
        &mut self,
        ports: &[ServicePortInfo],
        force_full: bool,
    ) -> Result<SyncReport, ApplyError> {
        let full = force_full || self.last.is_none();
        // A family synced before stays, so its rules follow its last
        // Service port away.
        let mut families: BTreeSet<IpFamily> =
            super::families(ports, &self.config).into_iter().collect();
        families.extend(self.families.keys());
        let mut report = SyncReport {
            full,
            generate: Duration::ZERO,
            apply: Duration::ZERO,
            rules: 0,
            bytes: 0,
        };
        for family in families {
            let family_full = full || !self.families.contains_key(&family);
            let changed: BTreeSet<ServicePortName> = match &self.last {
                Some(last) if !family_full => super::of_family(ports, family)
                    .filter(|sp| last.get(&(family, sp.service.clone())) != Some(*sp))
                    .map(|sp| sp.service.clone())
                    .collect(),
                _ => BTreeSet::new(),
            };
            report.add(match self.backend {
                Backend::Nftables => self.sync_nft(ports, family, family_full, &changed)?,
                _ => self.sync_iptables(ports, family, family_full, &changed)?,
            });
        }
        self.last = Some(
            ports
                .iter()
                .map(|sp| ((sp.family, sp.service.clone()), sp.clone()))
                .collect(),
        );
        Ok(report)
    }

    fn sync_iptables(
        &mut self,
        ports: &[ServicePortInfo],
        family: IpFamily,
        full: bool,
        changed: &BTreeSet<ServicePortName>,
    ) -> Result<SyncReport, ApplyError> {
        let t = Instant::now();
        let ipt = self.backend.iptables(family);
        if full {
            // Ensured on full syncs only (about 20 execs otherwise).
            for (table, chain, args) in iptables::jump_rules() {
                // The target chain must exist first (kube-proxy's EnsureChain).
                let target = args.last().copied().unwrap_or_default();
                let _ = self.run(ipt, &["-w", "5", "-t", table, "-N", target], None);
                let mut check = vec!["-w", "5", "-t", table, "-C", chain];
                check.extend(&args);
                if self.run(ipt, &check, None).is_err() {
                    let mut insert = vec!["-w", "5", "-t", table, "-I", chain];
                    insert.extend(&args);
                    self.run(ipt, &insert, None)?;
                }
            }
        }
        let total: usize = super::of_family(ports, family)
            .map(|sp| categorize(sp).all.len())
            .sum();
        let mut stale = self
            .families
            .get(&family)
            .map(|state| state.active_chains.clone())
            .unwrap_or_default();
        if !full && total <= LARGE_CLUSTER_ENDPOINTS {
            // kube-proxy scans for stale chains on every sync unless the
            // cluster is large (then once per sync period).
            let save = format!("{ipt}-save");
            let listing = self.run(&save, &["-t", "nat"], None)?;
            stale.extend(
                listing
                    .lines()
                    .filter_map(|l| l.strip_prefix(':'))
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|c| {
                        [
                            "KUBE-SVC-",
                            "KUBE-SVL-",
                            "KUBE-EXT-",
                            "KUBE-FW-",
                            "KUBE-SEP-",
                        ]
                        .iter()
                        .any(|p| c.starts_with(p))
                    })
                    .map(str::to_string),
            );
        }
        let jumps = t.elapsed();
        let g = Instant::now();
        let restore = iptables::restore(
            ports,
            &self.config,
            family,
            (!full).then_some(changed),
            &stale,
        );
        let generate = g.elapsed();
        let a = Instant::now();
        let tool = format!("{ipt}-restore");
        self.run(
            &tool,
            &["-w", "5", "-W", "100000", "--noflush", "--counters"],
            Some(&restore.text),
        )?;
        self.families.entry(family).or_default().active_chains = restore.active_chains;
        Ok(SyncReport {
            full,
            generate,
            apply: jumps + a.elapsed(),
            rules: restore.rules,
            bytes: restore.text.len(),
        })
    }

    fn sync_nft(
        &mut self,
        ports: &[ServicePortInfo],
        family: IpFamily,
        full: bool,
        changed: &BTreeSet<ServicePortName>,
    ) -> Result<SyncReport, ApplyError> {
        let g = Instant::now();
        let last = self.families.get(&family);
        let previous = match last {
            Some(state) if !full => Some((&state.active_chains, &state.elements, changed)),
            _ => None,
        };
        let tx = nftables::transaction(ports, &self.config, family, previous);
        let generate = g.elapsed();
        let a = Instant::now();
        self.run("nft", &["-f", "-"], Some(&tx.text))?;
        let state = self.families.entry(family).or_default();
        state.active_chains = tx.active_chains;
        state.elements = tx.elements;
        Ok(SyncReport {
            full,
            generate,
            apply: a.elapsed(),
            rules: tx.rules,
            bytes: tx.text.len(),
        })
    }

    /// Removes every rule and chain this mode wrote (kube-proxy's
    /// `--cleanup`): IPv4's always, IPv6's when it was synced or the node
    /// has an IPv6 address (another process may have synced it).
    pub fn cleanup(&mut self) -> Result<(), ApplyError> {
        let mut families = vec![IpFamily::V4];
        if self.families.contains_key(&IpFamily::V6)
            || !self.config.node_ips_of(IpFamily::V6).is_empty()
        {
            families.push(IpFamily::V6);
        }
        for family in families {
            self.cleanup_family(family)?;
        }
        self.last = None;
        self.families.clear();
        Ok(())
    }

    fn cleanup_family(&self, family: IpFamily) -> Result<(), ApplyError> {
        match self.backend {
            Backend::Nftables => {
                let nft_family = nftables::nft_family(family);
                let _ = self.run("nft", &["delete", "table", nft_family, "kube-proxy"], None);
            }
            _ => {
                let ipt = self.backend.iptables(family);
                for (table, chain, args) in iptables::jump_rules() {
                    let mut delete = vec!["-w", "5", "-t", table, "-D", chain];
                    delete.extend(&args);
                    while self.run(ipt, &delete, None).is_ok() {}
                }
                // One restore flushes and deletes every KUBE-* chain (one
                // `iptables -X` per chain would reload the table each time).
                let save = format!("{ipt}-save");
                let mut input = String::new();
                for table in ["filter", "nat"] {
                    let listing = self.run(&save, &["-t", table], None)?;
                    let chains: Vec<&str> = listing
                        .lines()
                        .filter_map(|l| l.strip_prefix(':'))
                        .filter_map(|l| l.split_whitespace().next())
                        .filter(|c| c.starts_with("KUBE-"))
                        .collect();
                    input.push_str(&format!("*{table}\n"));
                    for c in &chains {
                        input.push_str(&format!(":{c} - [0:0]\n"));
                    }
                    for c in &chains {
                        input.push_str(&format!("-X {c}\n"));
                    }
                    input.push_str("COMMIT\n");
                }
                let restore = format!("{ipt}-restore");
                self.run(&restore, &["-w", "5", "--noflush"], Some(&input))?;
            }
        }
        Ok(())
    }

    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = format!("{program} {}", args.join(" "));
        let mut child = cmd.spawn().map_err(|source| ApplyError::Spawn {
            command: command.clone(),
            source,
        })?;
        // Pipes are served by threads, so a slow tool cannot block the
        // deadline check (and a large input cannot deadlock on full pipes).
        let writer = match (stdin, child.stdin.take()) {
            (Some(text), Some(mut pipe)) => {
                let text = text.to_string();
                // A failing tool closes its stdin early; its status says why.
                Some(std::thread::spawn(move || {
                    let _ = pipe.write_all(text.as_bytes());
                }))
            }
            _ => None,
        };
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
        // The exit is an event (a waiter thread's message), so the deadline
        // costs nothing when the tool finishes in time.
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let waited = match self.timeout {
            None => rx.recv().ok(),
            Some(limit) => match rx.recv_timeout(limit) {
                Ok(r) => Some(r),
                Err(_) => {
                    // SAFETY: our own child, not yet reaped (the waiter
                    // thread reaps it after this).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    let _ = rx.recv();
                    return Err(ApplyError::Timeout {
                        command,
                        seconds: limit.as_secs(),
                    });
                }
            },
        };
        let status = waited
            .unwrap_or_else(|| Err(std::io::Error::other("waiter thread gone")))
            .map_err(|source| ApplyError::Spawn {
                command: command.clone(),
                source,
            })?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        let out_bytes = stdout.join().unwrap_or_default();
        let err_bytes = stderr.join().unwrap_or_default();
        if !status.success() {
            let stderr = String::from_utf8_lossy(&err_bytes);
            return Err(ApplyError::Failed {
                command,
                stderr: stderr.lines().take(5).collect::<Vec<_>>().join("; "),
            });
        }
        Ok(String::from_utf8_lossy(&out_bytes).into_owned())
    }
}
