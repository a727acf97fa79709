//! `cargo xtask`: the project's own commands.
//!
//! - `setup`: installs every package the build and the tests need (Debian
//!   packages, bpf-linker). Idempotent; the other commands run it first.
//! - `build-ebpf`: builds the eBPF object.
//! - `test`: the whole suite: setup, fmt, clippy, build, all tests.
//! - `demo`: the README's main command (`dp lab demo`).
//! - `bench`: dp against kube-proxy's modes (dp-bench), `--micro` the
//!   criterion benches (see BENCHMARKS.md).

mod ebpf;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

/// Debian packages the project needs on a fresh Debian 12 machine.
const DEBIAN_PACKAGES: &[&str] = &[
    // eBPF toolchain: rustc with a prebuilt `core` for bpfel-unknown-none,
    // and the LLVM that bpf-linker is built against.
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // What the tests and the demo call: namespaces and links (ip), and the
    // tools kube-proxy's modes use (for the comparisons in later work).
    "iproute2",
    "procps",
    // veth peers that must receive XDP_TX frames need NAPI (GRO on).
    "ethtool",
    "iptables",
    "nftables",
    "conntrack",
    "bpftool",
    // Reads the pcapng `dp trace -w` writes (its test checks the comments).
    "tshark",
    // The lab's clients (the demo and its tests use curl and dig) and the
    // tools its exercises use: `nsenter` is in util-linux.
    "util-linux",
    "curl",
    "bind9-dnsutils",
    "netcat-openbsd",
    "tcpdump",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

#[derive(Parser)]
#[command(about = "dp project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and tools (apt packages, bpf-linker).
    Setup,
    /// Build the eBPF object and print its path.
    BuildEbpf,
    /// Run the whole test suite (setup, fmt, clippy, tests). Needs root.
    Test,
    /// Set up, build, and run `dp lab demo` (the README's main command).
    /// Needs root.
    Demo,
    /// dp vs kube-proxy's iptables and nftables modes (dp-bench; results in
    /// docs/bench and BENCHMARKS.md), or with --micro the criterion benches.
    /// Needs root.
    Bench {
        /// A short run (N up to 1 000) that proves the harness; results in
        /// target/dp-bench-quick, BENCHMARKS.md untouched.
        #[arg(long)]
        quick: bool,
        /// Also 30 000 services (slow: kube-proxy's full loads).
        #[arg(long)]
        with_30k: bool,
        /// The criterion micro-benchmarks instead (per-packet cost with
        /// BPF_PROG_TEST_RUN, control plane, NodePort rate, trace cost).
        #[arg(long)]
        micro: bool,
        /// Extra arguments: for dp-bench (e.g. `--services 1,1000`) or, with
        /// --micro, for criterion (e.g. a filter such as `new_flow`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::BuildEbpf => {
            let object = build_ebpf()?;
            println!("{}", object.display());
            Ok(())
        }
        Task::Test => test(),
        Task::Demo => demo(),
        Task::Bench {
            quick,
            with_30k,
            micro,
            args,
        } => {
            if micro {
                micro_bench(&args)
            } else {
                bench(quick, with_30k, &args)
            }
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ is in the workspace")
        .to_path_buf()
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| "cargo".into(), PathBuf::from)
}

fn step(what: &str) {
    println!("==> {what}");
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    // `id -u` avoids an unsafe libc call for one number.
    let out = Command::new("id").arg("-u").output().context("id -u")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("{what} needs root (apt-get, network namespaces, BPF); run it as root");
    }
    Ok(())
}

fn setup() -> Result<()> {
    require_root("cargo xtask setup")?;
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        step("Debian packages: all installed");
    } else {
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
    }
    if bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: installed"));
    } else {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)"
        ));
        run(Command::new(cargo())
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args(["install", "bpf-linker", "--locked", "--force"])
            .args(["--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"]))?;
    }
    Ok(())
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

/// `bpf-linker --version` prints `bpf-linker 0.13.0`.
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace().nth(1).map(str::to_string)
}

fn build_ebpf() -> Result<PathBuf> {
    step("building the eBPF object");
    ebpf::build_ebpf(&workspace(), &cargo()).map_err(anyhow::Error::msg)
}

fn test() -> Result<()> {
    require_root("cargo xtask test")?;
    setup()?;
    let ws = workspace();
    step("cargo fmt --check");
    run(Command::new(cargo())
        .current_dir(&ws)
        .args(["fmt", "--all", "--", "--check"]))?;
    build_ebpf()?;
    step("cargo clippy -D warnings (userspace crates)");
    run(Command::new(cargo()).current_dir(&ws).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo test");
    run(Command::new(cargo()).current_dir(&ws).args(["test"]))?;
    Ok(())
}

fn bench(quick: bool, with_30k: bool, args: &[String]) -> Result<()> {
    require_root("cargo xtask bench")?;
    setup()?;
    let ws = workspace();
    step("building dp and dp-bench (release)");
    run(Command::new(cargo())
        .current_dir(&ws)
        .args(["build", "--release", "-p", "dp", "--bins"]))?;
    let mut typed = String::from("cargo xtask bench");
    for (on, flag) in [(quick, "--quick"), (with_30k, "--with-30k")] {
        if on {
            typed.push(' ');
            typed.push_str(flag);
        }
    }
    if !args.is_empty() {
        typed.push_str(" -- ");
        typed.push_str(&args.join(" "));
    }
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&ws)
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "dp",
            "--bin",
            "dp-bench",
            "--",
        ])
        .args(["--command", &typed]);
    if quick {
        cmd.args(["--quick", "--out", "target/dp-bench-quick"]);
    } else {
        cmd.args(["--out", "docs/bench", "--update-markdown", "BENCHMARKS.md"]);
    }
    if with_30k {
        cmd.arg("--with-30k");
    }
    step(&format!(
        "{typed}: dp vs kube-proxy (iptables nft/legacy, nftables) vs direct"
    ));
    run(cmd.args(args))
}

fn micro_bench(args: &[String]) -> Result<()> {
    require_root("cargo xtask bench --micro")?;
    setup()?;
    step("cargo bench: per-packet cost (BPF_PROG_TEST_RUN), control plane at scale, NodePort rate, trace cost");
    run(Command::new(cargo())
        .current_dir(workspace())
        .args([
            "bench",
            "-p",
            "dp",
            "--bench",
            "datapath",
            "--bench",
            "control_plane",
            "--bench",
            "nodeport",
            "--bench",
            "trace",
            "--",
        ])
        .args(args))
}

fn demo() -> Result<()> {
    require_root("cargo xtask demo")?;
    setup()?;
    let ws = workspace();
    step("building dp");
    run(Command::new(cargo())
        .current_dir(&ws)
        .args(["build", "--bin", "dp"]))?;
    step("dp lab demo");
    run(Command::new(ws.join("target/debug/dp")).args(["lab", "demo"]))
}
