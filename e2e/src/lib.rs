//! Throwaway network topologies for end-to-end tests and the lab.
//!
//! A [`Topology`] owns network namespaces ("nodes", "pods", an external
//! client) joined by veth pairs. Every namespace and link it creates lives
//! inside namespaces it created (veth pairs are created directly in their
//! namespaces), so the machine's own interfaces, routes and firewall are never
//! touched. Dropping the topology deletes them, also when a test panics, and a
//! new topology first removes those left by processes that died (SIGKILL).
//!
//! Code runs inside a namespace with [`Netns::run`] (a thread that joined the
//! namespace) or [`Netns::exec`] (`ip netns exec`). Sockets keep the namespace
//! they were created in, so a server started in one namespace and a client in
//! another talk across the veth like two hosts.

#[cfg(feature = "apiserver")]
pub mod apiserver;
pub mod capture;
pub mod cluster;
mod netns;
mod servers;
mod topology;
pub mod xdp_pass;

pub use cluster::{Cluster, KIND_NODE_SYSCTLS, KIND_NODE_SYSCTLS_IPV6};
pub use netns::{run_cmd, stdout_of, Netns};
pub use servers::{
    identity_line, parse_identity, rst_on_close, tcp_echo_once, udp_echo_once, TcpEchoServer,
    UdpEchoServer,
};
pub use topology::{Topology, NETNS_PREFIX};

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Preparing a test fixture (certificates, TLS) failed.
    #[error("{0}")]
    Setup(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Fails loudly unless the process is root: network namespaces, veth pairs
/// and BPF programs need it, and a test that cannot run must not pass.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, BPF); run it as root, e.g. via `cargo xtask test`"
    );
}
