//! Socket-level load balancing (cgroup sock_addr hooks, IPv4 and IPv6): a
//! connect() to a ClusterIP goes to a backend's address instead, once,
//! before any packet exists, so no packet of the connection is translated
//! (tc sees a pod address and passes it). getpeername() shows the service
//! address again.
//!
//! Served here: ClusterIP frontends with ready (or serving-terminating)
//! backends, and the reject of one without endpoints (connect() fails
//! with ECONNREFUSED at once, as kube-proxy's REJECT does). Left to tc
//! (`SockLeftToTc`): what needs the packet or the client's address —
//! session affinity, source ranges, external frontends (NodePort,
//! externalIP, LoadBalancer), a local policy without a local endpoint (a
//! drop), an inconsistent service. The source of the translated
//! connection is the node's own address, as kube-proxy's masquerade of
//! host traffic to a ClusterIP would make it.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext,
};
use common::{
    addr,
    lb::{SockPeer, SERVICE_FLAG_EXTERNAL},
    rules::{self, Frontend},
    Hook, Reason,
};

use crate::{
    lb,
    maps::{DP_SOCK_PEERS, DP_SOCK_SCOPE},
    stats,
};

const ECONNREFUSED: i32 = 111;
/// What a sock_addr program returns to let the call go ahead.
const ALLOW: i32 = 1;
/// ... and to fail it (with the error `bpf_set_retval` set).
const DENY: i32 = 0;

/// Whether this socket's network namespace is served.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    let want = DP_SOCK_SCOPE.get(0).copied().unwrap_or(0);
    // SAFETY: a helper of sock_addr programs.
    want == 0 || want == unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// The connect4 decision: the backend to connect to, a refusal, or the
/// call left as it is.
enum Decision {
    Connect([u8; 16], u16),
    Refuse(Reason),
    Leave(Reason),
}

#[inline(always)]
fn decide(daddr: &[u8; 16], dport: u16, protocol: u8) -> Decision {
    let (key, master) = match lb::lookup(daddr, dport, protocol) {
        Frontend::NotAService => return Decision::Leave(Reason::NoService),
        Frontend::PortNotServed => return Decision::Refuse(Reason::PortNotServed),
        Frontend::Found(found) => found,
    };
    if master.flags & SERVICE_FLAG_EXTERNAL != 0
        || rules::has_affinity(&master)
        || rules::source_ranges_apply(&master)
    {
        return Decision::Leave(Reason::SockLeftToTc);
    }
    // A ClusterIP: its backends are the same for every client (with
    // internalTrafficPolicy Local, this node's), so the pick needs nothing
    // of the packet. (Only external frontends have an internal scope.)
    match lb::select_backend(&key, &master) {
        Ok((_, b)) => Decision::Connect(b.addr, b.port),
        Err(Reason::NoEndpoints) => match rules::no_endpoints(&master) {
            (common::Verdict::Reject, why) => Decision::Refuse(why),
            _ => Decision::Leave(Reason::SockLeftToTc),
        },
        Err(_) => Decision::Leave(Reason::SockLeftToTc),
    }
}

/// The destination address of a sock_addr call, 16 bytes (IPv4 mapped).
#[inline(always)]
fn dest_addr(sa: &bpf_sock_addr, v6: bool) -> [u8; 16] {
    if v6 {
        let w = sa.user_ip6;
        let mut a = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            a[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        a
    } else {
        addr::v4_mapped(sa.user_ip4.to_ne_bytes())
    }
}

/// Sets the destination address (an IPv6 socket gets an IPv4 backend as
/// its mapped form, as it would connect to one itself).
#[inline(always)]
fn set_dest_addr(sa: &mut bpf_sock_addr, v6: bool, a: &[u8; 16]) {
    let word = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if v6 {
        sa.user_ip6 = [word(0), word(4), word(8), word(12)];
    } else {
        sa.user_ip4 = word(12);
    }
}

/// connect4 and connect6: a ClusterIP becomes a backend's address.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, hook: Hook) -> i32 {
    if !in_scope(ctx) {
        return ALLOW;
    }
    let v6 = hook == Hook::SockConnect6;
    // SAFETY: the context pointer the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let daddr = dest_addr(sa, v6);
    let port = u16::from_be(sa.user_port as u16);
    match decide(&daddr, port, sa.protocol as u8) {
        Decision::Connect(baddr, bport) => {
            let peer = SockPeer {
                addr: daddr,
                port,
                _pad: [0; 6],
            };
            set_dest_addr(sa, v6, &baddr);
            sa.user_port = u32::from(bport.to_be());
            // SAFETY: a helper of sock_addr programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // Without the record getpeername() shows the backend: the
            // connection itself is right either way.
            let _ = DP_SOCK_PEERS.insert(&cookie, &peer, 0);
            stats::count(hook, Reason::NewFlow, 0);
            ALLOW
        }
        Decision::Refuse(reason) => {
            stats::count(hook, reason, 0);
            // SAFETY: a helper of cgroup programs.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            DENY
        }
        Decision::Leave(reason) => {
            stats::count(hook, reason, 0);
            ALLOW
        }
    }
}

/// getpeername4 and getpeername6: a socket `connect` pointed at a backend
/// shows the service address it asked for.
#[inline(always)]
pub fn getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: a helper of sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the map value is copied out at once.
    if let Some(peer) = unsafe { DP_SOCK_PEERS.get(&cookie) }.copied() {
        // SAFETY: the context pointer the kernel passed.
        let sa = unsafe { &mut *ctx.sock_addr };
        set_dest_addr(sa, v6, &peer.addr);
        sa.user_port = u32::from(peer.port.to_be());
    }
    ALLOW
}
