//! Builds the eBPF object and puts it in OUT_DIR for `include_bytes_aligned!`.

#[path = "../xtask/src/ebpf.rs"]
mod ebpf;

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("controller/ has a parent")
        .to_path_buf();
    for dir in ["dataplane-ebpf", "common", "xtask/src/ebpf.rs"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", ebpf::EBPF_RUSTC);
    println!("cargo:rerun-if-env-changed={}", ebpf::STUB_ENV);
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join(ebpf::EBPF_BIN);
    if ebpf::stub_requested(env::var_os(ebpf::STUB_ENV).as_deref()) {
        println!(
            "cargo:warning={}=1: embedding an empty stub, not the eBPF object; this dp cannot load its datapath",
            ebpf::STUB_ENV
        );
        fs::write(&out, []).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
        return;
    }
    let cargo = PathBuf::from(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // The `layout-next` build's datapath uses its conntrack layout too.
    let built = if env::var_os("CARGO_FEATURE_LAYOUT_NEXT").is_some() {
        ebpf::build_ebpf_with(&workspace, &cargo, &["layout-next"])
    } else {
        ebpf::build_ebpf(&workspace, &cargo)
    };
    let object = match built {
        Ok(object) => object,
        Err(e) => panic!("building the eBPF object: {e}"),
    };
    fs::copy(&object, &out)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", object.display(), out.display()));
}
