//! The image's runtime stage as far as this machine allows without a
//! Docker engine: `cargo xtask image --rootfs` assembles it (the
//! Dockerfile's Debian release and packages, dp where the builder stage
//! puts it) and runs `dp --version` there; then, from that directory, the
//! tools `dp` calls are found, the DaemonSet's bpffs init container's
//! command mounts a bpffs, and the image's `dp cleanup-kube-proxy` removes
//! kube-proxy's rules from a test network namespace with the image's
//! iptables and nft.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use e2e::{require_root, stdout_of as output, Topology};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The init container's shell command in deploy/daemonset.yaml.
fn init_container_command() -> String {
    let text = std::fs::read_to_string(workspace().join("deploy/daemonset.yaml")).unwrap();
    let ds: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["command"][0], "sh");
    assert_eq!(init["command"][1], "-c");
    init["command"][2].as_str().unwrap().to_string()
}

#[test]
fn the_runtime_stage_assembled_into_a_directory_runs_dp_and_its_tools() {
    require_root();
    let xtask = PathBuf::from(env!("CARGO_BIN_EXE_xtask"));
    let build_dir = xtask.parent().unwrap();
    let dp = build_dir.join("dp");
    assert!(
        dp.exists(),
        "{}: build dp first (cargo build --bin dp)",
        dp.display()
    );
    let rootfs = build_dir.parent().unwrap().join("image-rootfs");

    let text = output(
        Command::new(&xtask)
            .args(["image", "--rootfs"])
            .arg(&rootfs)
            .arg("--binary")
            .arg(&dp),
    );
    assert!(
        text.contains(&format!("dp {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );

    // What dp and the DaemonSet run, from the image's own packages.
    let tools = "iptables-nft-save iptables-nft-restore iptables-legacy-save \
                 iptables-legacy-restore ip6tables-nft-save ip6tables-legacy-save nft ip \
                 mount grep sh";
    output(Command::new("chroot").arg(&rootfs).args([
        "sh",
        "-c",
        &format!(
            "for t in {tools}; do command -v $t >/dev/null || {{ echo missing $t; exit 1; }}; done"
        ),
    ]));

    // The init container's command mounts a bpffs on /sys/fs/bpf, which is
    // a bind mount of a plain directory there, as a hostPath volume is on a
    // host without a bpffs (in a mount namespace of the test's, gone with
    // it). Run twice: the second finds the bpffs and leaves it.
    let script = format!(
        "set -e; mount -t proc proc /proc; mkdir -p /sys/fs/bpf /tmp/hostpath; \
         mount --bind /tmp/hostpath /sys/fs/bpf; {cmd}; {cmd}; \
         grep -c ' /sys/fs/bpf bpf ' /proc/mounts",
        cmd = init_container_command()
    );
    let text = output(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "chroot"])
            .arg(&rootfs)
            .args(["sh", "-c", &script]),
    );
    assert_eq!(text.trim(), "1", "one bpffs on /sys/fs/bpf");

    // The image's dp cleans up kube-proxy's rules with the image's tools.
    let mut topo = Topology::new().unwrap();
    let ns = topo.add_ns("node").unwrap();
    let examples = workspace().join("examples");
    for mode in [&["--mode", "iptables"][..], &["--mode", "nftables"]] {
        output(
            ns.command(dp.to_str().unwrap())
                .args(["kube-proxy-rules", "--manifests"])
                .arg(&examples)
                .args(["--node-name", "node1", "--node-ip", "172.18.0.2", "--apply"])
                .args(mode),
        );
    }
    let text = output(
        ns.command("chroot")
            .arg(&rootfs)
            .args(["/usr/local/bin/dp", "cleanup-kube-proxy"]),
    );
    assert!(text.contains("removed iptables-nft nat:"), "{text}");
    assert!(
        text.contains("removed nftables: table ip kube-proxy"),
        "{text}"
    );
    let left = output(ns.command("iptables-nft-save").args(["-t", "nat"]));
    assert!(!left.contains("KUBE-SERVICES"), "{left}");
}

/// The builder stage installs the toolchain from its recipe alone, before
/// the sources come in, so a code change reuses those layers; the recipe
/// is the one `cargo xtask setup` runs, and running it again on this
/// machine (where the toolchain is installed) installs nothing.
#[test]
fn the_builder_installs_the_toolchain_before_the_sources_and_from_the_setup_recipe() {
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile")).unwrap();
    let builder: Vec<&str> = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("FROM ") || !l.ends_with(" AS builder"))
        .take_while(|l| !l.ends_with(" AS runtime"))
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    let position = |what: &str| {
        builder
            .iter()
            .position(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what:?} in the builder stage: {builder:#?}"))
    };
    let copy_recipe = position("COPY xtask/toolchain.sh ");
    let run_recipe = position("RUN sh ");
    let copy_sources = position("COPY . .");
    assert!(
        copy_recipe < run_recipe && run_recipe < copy_sources,
        "{builder:#?}"
    );
    let copies_before: Vec<&&str> = builder[..copy_sources]
        .iter()
        .filter(|l| l.starts_with("COPY"))
        .collect();
    assert_eq!(copies_before.len(), 1, "only the recipe: {copies_before:?}");
    assert!(builder[run_recipe].contains("toolchain.sh"));

    let setup = std::fs::read_to_string(workspace().join("xtask/src/main.rs")).unwrap();
    assert!(
        setup.contains("\"xtask/toolchain.sh\""),
        "cargo xtask setup runs it"
    );
    require_root();
    let out = Command::new("sh")
        .arg(workspace().join("xtask/toolchain.sh"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("toolchain packages: all installed"), "{text}");
    assert!(text.contains("bpf-linker 0.13.0: installed"), "{text}");
}
