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

        // The nodes' cgroups (socket LB), found by name (also after a
        // crash that lost the state file).
        self.remove_node_cgroups()?;
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

    /// Removes the lab's node cgroups (`Lab::node_cgroup`): what still runs
    /// in one is killed (`cgroup.kill`) and the directory goes once the
    /// kernel says it is empty (`cgroup.events`).
    fn remove_node_cgroups(&self) -> anyhow::Result<()> {
        let Some(root) = crate::agent::cgroup2_root() else {
            return Ok(());
        };
        let prefix = format!("dp-lab-{}-node", self.name);
        let Ok(entries) = fs::read_dir(&root) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name
                .strip_prefix(&prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !ours {
                continue;
            }
            let dir = e.path();
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while fs::read_to_string(dir.join("cgroup.events"))
                .is_ok_and(|ev| ev.lines().any(|l| l == "populated 1"))
                && std::time::Instant::now() < deadline
            {
                // cgroup.events can be polled for changes, but a killed
                // process leaves within milliseconds: a short wait suffices.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            fs::remove_dir(&dir)
                .with_context(|| format!("removing the cgroup {}", dir.display()))?;
        }
        Ok(())
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
