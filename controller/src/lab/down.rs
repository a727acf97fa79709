//! `dp lab down`: everything of a lab found by name and removed, also
//! after a crash; the processes a lab started.

use std::{fs, path::Path, process::Command};

use anyhow::{ensure, Context as _};

use super::{process::*, *};

impl Lab {
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

        // The nodes' cgroups (socket LB), empty once their processes are
        // gone; a lab without them has none to remove.
        if let Ok(state) = self.state() {
            for node in &state.nodes {
                if let Some(cgroup) = self.node_cgroup(&node.name) {
                    let _ = fs::remove_dir(cgroup);
                }
            }
        }
        let bpffs = self.bpffs();
        if crate::kernel::pin::is_bpffs(&bpffs) {
            if let Ok(entries) = fs::read_dir(&bpffs) {
                for e in entries.flatten() {
                    let _ = crate::kernel::pin::cleanup(&e.path());
                }
            }
            crate::kernel::pin::unmount_bpffs(&bpffs);
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

    /// Whether `pid` runs a command this lab started (by its command line).
    pub(super) fn started(&self, pid: u32) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        cmdline.contains(&*self.root.to_string_lossy())
    }
}
