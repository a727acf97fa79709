//! How the eBPF object is built. One recipe, used by `cargo xtask build-ebpf`
//! and by `controller/build.rs` (which includes this file by path, since a
//! build script cannot depend on the xtask binary crate).
//!
//! Debian's `rustc-web` (`/usr/bin/rustc`) ships a prebuilt `core` for
//! `bpfel-unknown-none`, so no `-Z build-std` and no rust-src are needed;
//! `RUSTC_BOOTSTRAP=1` lets aya-ebpf use the unstable `asm_experimental_arch`.
//! The target's linker is `bpf-linker` (from `cargo xtask setup`).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

pub const EBPF_TARGET: &str = "bpfel-unknown-none";
pub const EBPF_PACKAGE: &str = "dataplane-ebpf";
/// Name of the object (the eBPF crate's `[[bin]]`).
pub const EBPF_BIN: &str = "dataplane";
/// Debian's rustc-web: the compiler with a `core` for the BPF target.
pub const EBPF_RUSTC: &str = "/usr/bin/rustc";

/// Set to `1`, `controller/build.rs` embeds an empty stub instead of the
/// eBPF object, so `cargo check` and clippy run without the eBPF toolchain
/// (as aya-template's build script does). The `dp` built so refuses to load.
pub const STUB_ENV: &str = "DP_EBPF_STUB";

/// Whether the value of `STUB_ENV` asks for the stub.
pub fn stub_requested(value: Option<&std::ffi::OsStr>) -> bool {
    matches!(value.and_then(|v| v.to_str()), Some("1" | "true" | "yes"))
}

/// Builds the eBPF object in `<workspace>/target/ebpf` and returns its path.
pub fn build_ebpf(workspace: &Path, cargo: &Path) -> Result<PathBuf, String> {
    build_ebpf_with(workspace, cargo, &[])
}

/// `build_ebpf` with the eBPF crate's `features` (in a target directory of
/// their own, `target/ebpf-<features>`, so the two builds do not undo each
/// other).
pub fn build_ebpf_with(
    workspace: &Path,
    cargo: &Path,
    features: &[&str],
) -> Result<PathBuf, String> {
    if !Path::new(EBPF_RUSTC).exists() {
        return Err(format!(
            "{EBPF_RUSTC} not found: the eBPF toolchain is not installed; run `cargo xtask setup`"
        ));
    }
    let target_dir = match features {
        [] => workspace.join("target").join("ebpf"),
        _ => workspace
            .join("target")
            .join(format!("ebpf-{}", features.join("-"))),
    };
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--package", EBPF_PACKAGE])
        .args(["--target", EBPF_TARGET, "--target-dir"])
        .arg(&target_dir);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    // Called from a build script or clippy, the environment carries the outer
    // build's compiler, wrappers and flags; none of them apply to this build.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = key.starts_with("CARGO_") && key != "CARGO_HOME";
        if outer || key.starts_with("RUSTC") || key == "RUSTFLAGS" || key == "RUSTDOCFLAGS" {
            cmd.env_remove(key);
        }
    }
    // bpf_target_arch: aya-ebpf's cfg for the kernel's architecture.
    // --btf: bpf-linker emits BTF, so the verifier and bpftool show source lines.
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{}\"", env::consts::ARCH),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ]
    .join("\x1f");
    cmd.env("RUSTC", EBPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cargo.display()))?;
    if !status.success() {
        return Err(format!("eBPF build failed ({status}): {cmd:?}"));
    }
    Ok(target_dir.join(EBPF_TARGET).join("release").join(EBPF_BIN))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::stub_requested;

    #[test]
    fn only_an_explicit_yes_asks_for_the_stub() {
        for yes in ["1", "true", "yes"] {
            assert!(stub_requested(Some(OsStr::new(yes))), "{yes}");
        }
        for no in ["", "0", "false", "no"] {
            assert!(!stub_requested(Some(OsStr::new(no))), "{no:?}");
        }
        assert!(!stub_requested(None));
    }
}
