//! What dp needs of the node it runs on, checked at agent start and shown
//! by `dp status`: the kernel (`common::kernel`), and the sysctls a kind
//! node keeps strict, which dp's datapath does not need relaxed (it sends
//! translated packets on itself; see `dataplane-ebpf/src/fib.rs`).

use serde::Serialize;

use common::kernel::{self, KERNEL_RELEASE_OVERRIDE};

/// The running kernel's release (`uname -r`), or `DP_KERNEL_RELEASE` if set.
pub fn kernel_release() -> String {
    std::env::var(KERNEL_RELEASE_OVERRIDE)
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/osrelease"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Fails with what dp needs if this kernel is too old.
pub fn check_kernel() -> anyhow::Result<String> {
    let release = kernel_release();
    kernel::check(&release).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(release)
}

/// The node's reverse-path and local-source settings, as the stack applies
/// them (the kernel uses the larger of `all` and a device's `rp_filter`,
/// and `accept_local` if either is set).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Sysctls {
    pub rp_filter_all: Option<u8>,
    pub rp_filter_default: Option<u8>,
    pub accept_local_all: Option<u8>,
    pub accept_local_default: Option<u8>,
}

impl Sysctls {
    /// Read from `/proc/sys` of this process's network namespace.
    pub fn read() -> Sysctls {
        let get = |dev: &str, key: &str| -> Option<u8> {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/{key}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Sysctls {
            rp_filter_all: get("all", "rp_filter"),
            rp_filter_default: get("default", "rp_filter"),
            accept_local_all: get("all", "accept_local"),
            accept_local_default: get("default", "accept_local"),
        }
    }

    /// One line for logs and `dp status`.
    pub fn describe(&self) -> String {
        let v = |x: Option<u8>| x.map_or("?".to_string(), |x| x.to_string());
        format!(
            "rp_filter all={} default={}, accept_local all={} default={} \
             (dp works with any of these; kind sets rp_filter=1, accept_local=0)",
            v(self.rp_filter_all),
            v(self.rp_filter_default),
            v(self.accept_local_all),
            v(self.accept_local_default),
        )
    }
}
