//! A set of namespaces and links that lives as long as a test (or the lab).

use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{netns::run_cmd, Netns, Result};

/// Every namespace a topology creates is named `dpt-<pid>-<seq>-<role>`.
pub const NETNS_PREFIX: &str = "dpt-";

static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(1);

/// Namespaces joined by veth pairs. Dropping it deletes them all.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    namespaces: BTreeMap<String, Netns>,
}

impl Topology {
    /// An empty topology. First removes namespaces left behind by dead
    /// processes (a killed test run cannot clean up after itself).
    pub fn new() -> Result<Self> {
        sweep_stale();
        let seq = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
        Ok(Topology {
            prefix: format!("{NETNS_PREFIX}{}-{seq}-", std::process::id()),
            namespaces: BTreeMap::new(),
        })
    }

    /// An empty topology whose namespaces are named `<prefix><role>`, for
    /// one that outlives its process (the lab): no sweep of other
    /// processes' namespaces, and [`Topology::keep`] instead of deletion.
    pub fn named(prefix: &str) -> Self {
        Topology {
            prefix: prefix.to_string(),
            namespaces: BTreeMap::new(),
        }
    }

    /// Leaves every namespace in place when this goes; whoever owns the
    /// prefix deletes them later (`ip netns del`).
    pub fn keep(mut self) {
        for (_, ns) in std::mem::take(&mut self.namespaces) {
            std::mem::forget(ns);
        }
    }

    /// Adds a namespace called `role` in this topology.
    pub fn add_ns(&mut self, role: &str) -> Result<&Netns> {
        let name = format!("{}{role}", self.prefix);
        let ns = Netns::create(&name)?;
        Ok(self.namespaces.entry(role.to_string()).or_insert(ns))
    }

    /// Deletes the namespace called `role` (and every interface in it).
    pub fn remove_ns(&mut self, role: &str) {
        self.namespaces.remove(role);
    }

    /// The namespace called `role`. Panics if there is none: a test bug.
    pub fn ns(&self, role: &str) -> &Netns {
        self.namespaces
            .get(role)
            .unwrap_or_else(|| panic!("topology has no namespace {role:?}"))
    }

    /// Names of all namespaces this topology created.
    pub fn netns_names(&self) -> Vec<String> {
        self.namespaces
            .values()
            .map(|n| n.name().to_string())
            .collect()
    }

    /// A veth pair `a_if` in `a` <-> `b_if` in `b`, both up. Created directly
    /// in the two namespaces, never in the caller's.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        let (na, nb) = (self.ns(a), self.ns(b));
        run_cmd(Command::new("ip").args([
            "-n",
            na.name(),
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            nb.name(),
        ]))?;
        na.ip(&["link", "set", a_if, "up"])?;
        nb.ip(&["link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Two namespaces `a` and `b` joined by a veth pair `eth0`, with
    /// `<subnet>.1/24` on `a` and `<subnet>.2/24` on `b` (e.g. subnet "10.200.0").
    pub fn pair(a: &str, b: &str, subnet: &str) -> Result<Self> {
        let mut topo = Topology::new()?;
        topo.add_ns(a)?;
        topo.add_ns(b)?;
        topo.link(
            (a, "eth0", &format!("{subnet}.1/24")),
            (b, "eth0", &format!("{subnet}.2/24")),
        )?;
        Ok(topo)
    }

    /// A veth pair with an address on each end: `(ns, ifname, cidr)`.
    pub fn link(&self, a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<()> {
        self.veth(a.0, a.1, b.0, b.1)?;
        self.ns(a.0).add_addr(a.1, a.2)?;
        self.ns(b.0).add_addr(b.1, b.2)?;
        Ok(())
    }
}

/// Deletes `dpt-<pid>-...` namespaces whose process no longer exists.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_cmd(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}
