//! Running commands in lab members, and `dp lab status`.

use std::{io::Write, os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{bail, Context as _};

use super::{process::*, *};

impl Lab {
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
        let is_node = state.nodes.iter().any(|n| n.name == member);
        if is_node {
            cmd.env("DP_BPFFS", self.node_bpffs(member));
        }
        // With socket LB, a node's processes (and with `all` its pods')
        // run in the node's cgroup, where its agent's hooks are.
        let cgroup_of = match state.socket_lb {
            crate::agent::SocketLb::Host if is_node => Some(member),
            crate::agent::SocketLb::All if is_node => Some(member),
            crate::agent::SocketLb::All => m.node.as_deref(),
            _ => None,
        };
        if let Some(cgroup) = cgroup_of.and_then(|n| self.node_cgroup(n)) {
            enter_cgroup(&mut cmd, &cgroup)?;
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
        writeln!(
            out,
            "lab {:?}: {} mode, {}{}",
            state.name,
            state.mode.name(),
            state.ip_family.name(),
            match state.socket_lb {
                crate::agent::SocketLb::Off => "",
                crate::agent::SocketLb::Host => ", socket LB for the nodes",
                crate::agent::SocketLb::All => ", socket LB for nodes and pods",
            }
        )?;
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
                m.addresses(),
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
                .map(|ip| std::net::SocketAddr::new(*ip, p.port).to_string())
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
}

/// Makes `cmd` start in the cgroup v2 directory `cgroup` (it writes its
/// own pid to `cgroup.procs` before it runs the program).
fn enter_cgroup(cmd: &mut Command, cgroup: &Path) -> anyhow::Result<()> {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    // SAFETY: between fork and exec only async-signal-safe calls: open,
    // write (the "0" that means the writing process), close.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}
