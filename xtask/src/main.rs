//! `cargo xtask`: the project's own commands.
//!
//! - `setup`: installs every package the build and the tests need (Debian
//!   packages, bpf-linker). Idempotent; the other commands run it first.
//! - `build-ebpf`: builds the eBPF object.
//! - `test`: the whole suite: setup, fmt, clippy, build, all tests.
//! - `demo`: the README's main command (`dp lab demo`).
//! - `bench`: dp against kube-proxy's modes (dp-bench), `--micro` the
//!   criterion benches (see BENCHMARKS.md).
//! - `image`: the container image (`docker build`), or `--rootfs DIR` its
//!   runtime stage assembled without Docker.
//! - `kind up|test|down`: dp in place of kube-proxy on a kind cluster.

mod ebpf;
mod image;
mod kind;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

/// What the tests, the lab and the benchmarks need on top.
const TEST_PACKAGES: &[&str] = &[
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
    // The manifests' offline schema check runs kubernetes-validate (PyPI)
    // from a venv; the image test assembles the runtime stage's root file
    // system from Debian packages.
    "python3",
    "python3-venv",
    "mmdebstrap",
];

/// kubernetes-validate (PyPI): the Kubernetes OpenAPI schemas, offline.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The toolchain's recipe (Debian packages, bpf-linker), shared with the
/// Dockerfile's builder stage.
const TOOLCHAIN_SCRIPT: &str = "xtask/toolchain.sh";

#[derive(Parser)]
#[command(about = "dp project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and tools (apt packages, bpf-linker, a venv
    /// with kubernetes-validate).
    Setup {
        /// Only what building dp needs (the image's builder stage).
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build the eBPF object and print its path.
    BuildEbpf,
    /// Build the dp of the upgrade and rollback tests (DP_CT in another
    /// layout: the `layout-next` feature) into target/layout-next/dp.
    BuildLayoutNext,
    /// Run the whole test suite (setup, fmt, clippy, tests). Needs root.
    Test,
    /// A long run of the datapath fuzzer (controller/tests/fuzz_test_run.rs:
    /// random service states and frames, valid and malformed, through the
    /// real programs). Needs root.
    Fuzz {
        /// Frames in all.
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// The random sequence (`cargo xtask test` runs seed 21).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Service states, each with packets / states frames.
        #[arg(long, default_value_t = 10_000)]
        states: u64,
    },
    /// Endpoint churn under traffic, longer than `cargo xtask test` runs it
    /// (5 s at 1 000 changes/s): through the manifests directory and the
    /// API watch. Needs root.
    Churn {
        /// Seconds of churn, per source.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// EndpointSlice changes per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
    },
    /// The soak: churn through the API watch and mixed traffic, the agent's
    /// memory and conntrack sampled, the counters checked. Needs root.
    Soak {
        #[arg(long, default_value_t = 600.0)]
        seconds: f64,
        /// EndpointSlice changes per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 30.0)]
        sample: f64,
    },
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
        /// `ipv4`, `ipv6` or `both` (default): the IPv6 pass measures
        /// N = 1 and 1 000 (its own section of BENCHMARKS.md,
        /// docs/bench/ipv6/) against ip6tables and `table ip6`.
        #[arg(long, default_value = "both", value_parser = ["ipv4", "ipv6", "both"])]
        ip_family: String,
        /// Extra arguments: for dp-bench (e.g. `--services 1,1000`) or, with
        /// --micro, for criterion (e.g. a filter such as `new_flow`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the container image with `docker build` (needs a Docker
    /// engine), or with --rootfs assemble its runtime stage into a
    /// directory and run dp from it (needs root, no Docker).
    Image {
        #[arg(long)]
        rootfs: Option<PathBuf>,
        /// The dp binary to put in the rootfs (default: a release build).
        #[arg(long, requires = "rootfs")]
        binary: Option<PathBuf>,
    },
    /// dp in place of kube-proxy on a kind cluster (docs/kind.md). Needs a
    /// Docker engine, kind and kubectl.
    Kind {
        #[command(subcommand)]
        command: KindCommand,
    },
}

#[derive(Subcommand)]
enum KindCommand {
    /// Create the cluster without kube-proxy, build and load the image,
    /// deploy dp, wait until it serves.
    Up {
        /// `ipv4` (e2e/kind/cluster.yaml) or `dual` (cluster-dual.yaml:
        /// kind's `ipFamily: dual`, dp given both cluster CIDRs).
        #[arg(long, default_value = "ipv4", value_parser = ["ipv4", "dual"])]
        ip_family: String,
    },
    /// Run workloads and check ClusterIP, DNS, NodePort, no endpoints,
    /// externalTrafficPolicy: Local and `dp trace`; on a dual-stack
    /// cluster the Service checks run in both families.
    Test,
    /// Delete the cluster.
    Down,
}

fn main() -> Result<()> {
    // xtask's commands (test, demo, bench, image) need the real object; a
    // DP_EBPF_STUB=1 left in the shell from a check would embed a stub.
    if ebpf::stub_requested(std::env::var_os(ebpf::STUB_ENV).as_deref()) {
        eprintln!(
            "==> ignoring {}=1: cargo xtask always builds the real eBPF object",
            ebpf::STUB_ENV
        );
        std::env::remove_var(ebpf::STUB_ENV);
    }
    match Cli::parse().command {
        Task::Setup { toolchain_only } => setup(toolchain_only),
        Task::BuildEbpf => {
            let object = build_ebpf()?;
            println!("{}", object.display());
            Ok(())
        }
        Task::BuildLayoutNext => {
            let dp = build_layout_next()?;
            println!("{}", dp.display());
            Ok(())
        }
        Task::Test => test(),
        Task::Fuzz {
            packets,
            seed,
            states,
        } => {
            require_root("cargo xtask fuzz")?;
            step(&format!(
                "fuzzing: {packets} frames over {states} states, seed {seed}"
            ));
            run(Command::new(cargo())
                .current_dir(workspace())
                .env("DP_FUZZ_PACKETS", packets.to_string())
                .env("DP_FUZZ_SEED", seed.to_string())
                .env("DP_FUZZ_STATES", states.to_string())
                .args(["test", "--release", "-p", "dp", "--test", "fuzz_test_run"])
                .args(["--", "--nocapture"]))
        }
        Task::Churn { seconds, rate } => {
            require_root("cargo xtask churn")?;
            setup(false)?;
            step(&format!(
                "churn: {seconds} s at {rate} changes/s per source"
            ));
            run(Command::new(cargo())
                .current_dir(workspace())
                .env("DP_CHURN_SECONDS", seconds.to_string())
                .env("DP_CHURN_RATE", rate.to_string())
                .args(["test", "--release", "-p", "dp", "--test", "churn"])
                .args(["--", "--nocapture", "churn_through"]))
        }
        Task::Soak {
            seconds,
            rate,
            sample,
        } => {
            require_root("cargo xtask soak")?;
            setup(false)?;
            step(&format!(
                "soak: {seconds} s, {rate} changes/s, a sample every {sample} s"
            ));
            run(Command::new(cargo())
                .current_dir(workspace())
                .env("DP_SOAK_SECONDS", seconds.to_string())
                .env("DP_CHURN_RATE", rate.to_string())
                .env("DP_SOAK_SAMPLE_SECONDS", sample.to_string())
                .args(["test", "--release", "-p", "dp", "--test", "churn"])
                .args(["--", "--ignored", "--nocapture", "soak"]))
        }
        Task::Image { rootfs, binary } => match rootfs {
            None => image::build(&workspace()),
            Some(rootfs) => {
                require_root("cargo xtask image --rootfs")?;
                setup(false)?;
                let ws = workspace();
                let dp = match binary {
                    Some(b) => b,
                    None => {
                        step("building dp (release)");
                        run(Command::new(cargo()).current_dir(&ws).args([
                            "build",
                            "--release",
                            "-p",
                            "dp",
                            "--bin",
                            "dp",
                        ]))?;
                        ws.join("target/release/dp")
                    }
                };
                image::assemble_rootfs(&ws, &rootfs, &dp)
            }
        },
        Task::Kind { command } => match command {
            KindCommand::Up { ip_family } => kind::up(&workspace(), ip_family == "dual"),
            KindCommand::Test => kind::test(&workspace()),
            KindCommand::Down => kind::down(),
        },
        Task::Demo => demo(),
        Task::Bench {
            quick,
            with_30k,
            micro,
            ip_family,
            args,
        } => {
            if micro {
                micro_bench(&args)
            } else {
                bench(quick, with_30k, &ip_family, &args)
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

pub(crate) fn step(what: &str) {
    println!("==> {what}");
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
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

fn setup(toolchain_only: bool) -> Result<()> {
    require_root("cargo xtask setup")?;
    run(Command::new("sh")
        .arg(workspace().join(TOOLCHAIN_SCRIPT))
        .env("CARGO", cargo()))?;
    if toolchain_only {
        return Ok(());
    }
    let missing: Vec<&str> = TEST_PACKAGES
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
    python_tools()
}

/// The venv with kubernetes-validate, under target/tools (the deploy
/// tests call it there).
fn python_venv() -> PathBuf {
    workspace().join("target/tools/venv")
}

fn python_tools() -> Result<()> {
    let venv = python_venv();
    let validator = venv.join("bin/kubernetes-validate");
    let installed = Command::new(venv.join("bin/pip"))
        .args(["show", "-q", "kubernetes-validate"])
        .output()
        .is_ok_and(|o| o.status.success())
        && validator.exists();
    if installed {
        step("kubernetes-validate: installed");
        return Ok(());
    }
    step(&format!(
        "installing {KUBERNETES_VALIDATE} in {}",
        venv.display()
    ));
    run(Command::new("/usr/bin/python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", KUBERNETES_VALIDATE]))
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

fn build_ebpf() -> Result<PathBuf> {
    step("building the eBPF object");
    ebpf::build_ebpf(&workspace(), &cargo()).map_err(anyhow::Error::msg)
}

/// Where `build_layout_next` puts its dp (read by controller/tests/upgrade.rs).
const LAYOUT_NEXT_DP: &str = "target/layout-next/dp";

/// Builds dp with the `layout-next` feature (the tests' profile, so only dp
/// and common build again) and copies it to `LAYOUT_NEXT_DP`, since the
/// next plain build overwrites target/debug/dp.
fn build_layout_next() -> Result<PathBuf> {
    step("building the dp of the upgrade tests (--features layout-next)");
    let ws = workspace();
    run(Command::new(cargo()).current_dir(&ws).args([
        "build",
        "-p",
        "dp",
        "--bin",
        "dp",
        "--features",
        "layout-next",
    ]))?;
    let to = ws.join(LAYOUT_NEXT_DP);
    std::fs::create_dir_all(to.parent().expect("a directory"))?;
    std::fs::copy(ws.join("target/debug/dp"), &to)?;
    Ok(to)
}

fn test() -> Result<()> {
    require_root("cargo xtask test")?;
    setup(false)?;
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
    build_layout_next()?;
    step("cargo test");
    run(Command::new(cargo()).current_dir(&ws).args(["test"]))?;
    // The attachment for kernels before 6.6, forced on this one: the
    // datapath's end-to-end tests again with netlink tc filters.
    step("the datapath's end-to-end tests with netlink tc (DP_TC_ATTACH=netlink)");
    run(Command::new(cargo())
        .current_dir(&ws)
        .env("DP_TC_ATTACH", "netlink")
        .args([
            "test",
            "-p",
            "e2e",
            "--test",
            "clusterip",
            "--test",
            "skeleton",
        ])
        .args([
            "-p", "dp", "--test", "external", "--test", "trace", "--test", "upgrade",
        ]))?;
    Ok(())
}

fn bench(quick: bool, with_30k: bool, ip_family: &str, args: &[String]) -> Result<()> {
    require_root("cargo xtask bench")?;
    setup(false)?;
    let ws = workspace();
    step("building dp and dp-bench (release)");
    run(Command::new(cargo())
        .current_dir(&ws)
        .args(["build", "--release", "-p", "dp", "--bins"]))?;
    // The fake API server of the watch variant, a process of its own next
    // to dp-bench: dp links no test server.
    run(Command::new(cargo()).current_dir(&ws).args([
        "build",
        "--release",
        "-p",
        "e2e",
        "--features",
        "apiserver",
        "--bin",
        "fake-apiserver",
    ]))?;
    let mut typed = String::from("cargo xtask bench");
    for (on, flag) in [(quick, "--quick"), (with_30k, "--with-30k")] {
        if on {
            typed.push(' ');
            typed.push_str(flag);
        }
    }
    if ip_family != "both" {
        typed.push_str(&format!(" --ip-family {ip_family}"));
    }
    if !args.is_empty() {
        typed.push_str(" -- ");
        typed.push_str(&args.join(" "));
    }
    let dp_bench = |family: &str| {
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
            .args(["--command", &typed, "--ip-family", family]);
        let out = match (quick, family) {
            (true, "ipv6") => "target/dp-bench-quick-ipv6",
            (true, _) => "target/dp-bench-quick",
            (false, "ipv6") => "docs/bench/ipv6",
            (false, _) => "docs/bench",
        };
        cmd.args(["--out", out]);
        if quick {
            cmd.arg("--quick");
        } else {
            cmd.args(["--update-markdown", "BENCHMARKS.md"]);
        }
        cmd
    };
    if ip_family != "ipv6" {
        let mut cmd = dp_bench("ipv4");
        if with_30k {
            cmd.arg("--with-30k");
        }
        step(&format!(
            "{typed}: dp vs kube-proxy (iptables nft/legacy, nftables) vs direct"
        ));
        run(cmd.args(args))?;
    }
    if ip_family != "ipv4" {
        let mut cmd = dp_bench("ipv6");
        if !args.iter().any(|a| a.starts_with("--services")) {
            cmd.args(["--services", "1,1000"]);
        }
        step(&format!(
            "{typed}: over IPv6, dp vs kube-proxy (ip6tables nft/legacy, table ip6) vs direct"
        ));
        run(cmd.args(args))?;
    }
    if quick || ip_family == "ipv6" {
        return Ok(());
    }
    // The sender is not the bottleneck there: CPU per forwarded packet at a
    // fixed offered load, dp XDP / tc vs kube-proxy's modes.
    step("NodePort forwarding cost: CPU per packet (cargo bench --bench nodeport)");
    // Absolute: cargo runs a bench in its package's directory.
    let markdown = ws.join("BENCHMARKS.md");
    run(Command::new(cargo())
        .current_dir(&ws)
        .args([
            "bench",
            "-p",
            "dp",
            "--bench",
            "nodeport",
            "--",
            "--update-markdown",
        ])
        .arg(&markdown))
}

fn micro_bench(args: &[String]) -> Result<()> {
    require_root("cargo xtask bench --micro")?;
    setup(false)?;
    step("cargo bench: per-packet cost (BPF_PROG_TEST_RUN), control plane at scale, one change by N, NodePort rate, trace cost");
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
            "one_change",
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
    setup(false)?;
    let ws = workspace();
    step("building dp");
    run(Command::new(cargo())
        .current_dir(&ws)
        .args(["build", "--bin", "dp"]))?;
    step("dp lab demo");
    run(Command::new(ws.join("target/debug/dp")).args(["lab", "demo"]))
}
