//! Socket-level load balancing, the agent's part: sockets the hooks
//! pointed at a backend that is no longer the service's are destroyed
//! (`SOCK_DESTROY`), as tc resets a TCP flow and moves a UDP flow off a
//! removed backend. A connected socket's packets never meet a service
//! lookup again (tc sees a pod address), so without this a connected UDP
//! socket would keep sending into the void.
//!
//! Which sockets: those of the network namespaces the hooks serve (the
//! node's; with `--socket-lb all` every namespace of a process in the
//! cgroup the hooks are attached to) whose cookie the hooks recorded in
//! `DP_SOCK_PEERS` (so only sockets socket LB translated), and whose peer
//! is not a backend of the frontend they asked for: not ready, not
//! serving-terminating, and for TCP not draining either (a terminating
//! endpoint keeps its connections, as kube-proxy leaves them).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
};

use common::lb::SockPeer;

use crate::{
    kernel::sock_diag::{self, Socket},
    translate::{DesiredState, FrontendKey},
};

/// The sockets of `sockets` to destroy: translated by the hooks (their
/// cookie has a service peer, `peer_of`) and no longer pointed at one of
/// their frontend's backends.
pub fn stale(
    sockets: &[Socket],
    peer_of: &dyn Fn(u64) -> Option<SockPeer>,
    desired: &DesiredState,
) -> Vec<Socket> {
    sockets
        .iter()
        .filter(|s| {
            let Some(peer) = peer_of(s.cookie) else {
                return false;
            };
            let service = IpAddr::V6(Ipv6Addr::from(peer.addr)).to_canonical();
            let key = FrontendKey {
                addr: SocketAddr::new(service, peer.port),
                protocol: s.protocol,
            };
            let Some(f) = desired.frontends.get(&key) else {
                // The Service (or its port) is gone.
                return true;
            };
            let tcp = i32::from(s.protocol) == libc::IPPROTO_TCP;
            let mut live = f
                .endpoints
                .ready
                .iter()
                .chain(&f.endpoints.terminating)
                .chain(
                    f.internal
                        .iter()
                        .flat_map(|i| i.ready.iter().chain(&i.terminating)),
                )
                .chain(f.draining.iter().filter(|_| tcp));
            !live.any(|e| e.addr == s.remote)
        })
        .copied()
        .collect()
}

/// The network namespaces (as `/proc/<pid>/ns/net` paths, one per
/// namespace) of the processes in `cgroup` and its descendants, other
/// than this process's own.
fn namespaces_in(cgroup: &Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let ns = Path::new("/proc").join(pid).join("ns/net");
                let Ok(ino) = std::fs::metadata(&ns).map(|m| m.ino()) else {
                    continue;
                };
                if Some(ino) != own && seen.insert(ino) {
                    out.push(ns);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out
}

/// Runs `f` in the network namespace at `ns` (a thread of its own enters
/// it; this thread stays where it is).
fn in_namespace<T: Send>(
    ns: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let file = std::fs::File::open(ns)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) on this thread only (a network namespace).
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    })
}

/// Destroys the stale sockets (`stale`) of the namespaces the hooks
/// serve: this one, and with `all` every one in `cgroup`. Returns how
/// many were destroyed; a namespace that cannot be read is skipped with a
/// warning.
///
/// The live sockets are listed first and their cookies looked up in
/// `DP_SOCK_PEERS` (`peer_of`), not the other way round: a sync's cost
/// then follows the sockets that exist, not the map's size. (Before the
/// release hook removed closed sockets' entries the map held tens of
/// thousands after a burst of short connections, and reading it whole
/// took the agent's sync 119 ms; BENCHMARKS.md, socket-level load
/// balancing.)
pub fn close_stale(
    peer_of: &dyn Fn(u64) -> Option<SockPeer>,
    desired: &DesiredState,
    all: bool,
    cgroup: &Path,
) -> usize {
    let mut closed = match sock_diag::connected_sockets() {
        Ok(sockets) => destroy(&stale(&sockets, peer_of, desired)),
        Err(e) => {
            tracing::warn!(error = %e, "listing this namespace's sockets");
            0
        }
    };
    if all {
        for ns in namespaces_in(cgroup) {
            let swept = in_namespace(&ns, sock_diag::connected_sockets).and_then(|sockets| {
                let doomed = stale(&sockets, peer_of, desired);
                if doomed.is_empty() {
                    return Ok(0);
                }
                in_namespace(&ns, || Ok(destroy(&doomed)))
            });
            match swept {
                Ok(n) => closed += n,
                Err(e) => {
                    tracing::warn!(error = %e, ns = %ns.display(), "listing a namespace's sockets")
                }
            }
        }
    }
    closed
}

/// `SOCK_DESTROY` for each socket (of the calling thread's namespace);
/// how many went.
fn destroy(sockets: &[Socket]) -> usize {
    let mut closed = 0;
    for s in sockets {
        match sock_diag::destroy(s) {
            Ok(()) => {
                tracing::info!(
                    local = %s.local,
                    remote = %s.remote,
                    protocol = s.protocol,
                    "destroyed a socket whose backend is gone"
                );
                closed += 1;
            }
            Err(e) => tracing::warn!(error = %e, remote = %s.remote, "destroying a socket"),
        }
    }
    closed
}
