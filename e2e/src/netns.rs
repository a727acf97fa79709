//! One network namespace, created with iproute2 and entered with setns(2).

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    thread,
};

use crate::{io_err, Error, Result};

/// A named network namespace (`ip netns`). Deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        run_cmd(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_cmd(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// Runs a command inside the namespace; fails unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name, program])
                .args(args),
        )
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Sets a sysctl inside the namespace (e.g. `net.ipv4.ip_forward`, `1`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", ifname])
    }

    pub fn add_route(&self, dst: &str, via: &str) -> Result<()> {
        self.ip(&["route", "add", dst, "via", via])
    }

    /// Runs `f` on a thread that has joined this namespace, and returns its
    /// result. Everything `f` creates (sockets, netlink attachments, ifindex
    /// lookups) belongs to this namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        thread::scope(|s| {
            s.spawn(move || {
                enter(&file)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts a long-lived thread inside this namespace (servers).
    pub fn spawn<F, R>(&self, f: F) -> Result<thread::JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                enter(&file).expect("setns into a namespace we just opened");
                f()
            })
            .map_err(io_err("spawn namespace thread"))
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).map_err(io_err(format!("open {}", self.path().display())))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys every interface in it (veth peers
        // too) and with them any tc/XDP program attached there.
        if let Err(e) = run_cmd(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("e2e: could not delete namespace {}: {e}", self.name);
        }
    }
}

fn enter(file: &File) -> Result<()> {
    // SAFETY: a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(Error::Io {
            context: "setns".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs `cmd`; an error unless it exits 0 (with its stderr).
pub fn run_cmd(cmd: &mut Command) -> Result<Output> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(io_err(format!("run {command}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// For tests: `cmd`'s standard output; panics (with its stderr) unless it
/// exits 0.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = run_cmd(cmd).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
