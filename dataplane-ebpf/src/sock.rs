//! Socket-level load balancing (cgroup sock_addr hooks, IPv4 and IPv6): a
//! connect() or an unconnected UDP sendto() to a Service goes to a
//! backend's address instead, before any packet exists, so no packet of
//! the flow is translated (tc sees a pod address and passes it).
//! getpeername() and, for UDP, recvmsg() show the service address again.
//!
//! Served here: ClusterIPs, and from the node's own namespace the external
//! frontends too (NodePorts on the node's addresses and on 127.0.0.1,
//! externalIPs, LoadBalancer IPs; eTP=Local uses the cluster-wide
//! backends for the node's traffic, as kube-proxy does), with ready or
//! serving-terminating backends, session affinity, and the reject of a
//! Service without endpoints (the call fails with ECONNREFUSED at once,
//! as kube-proxy's REJECT makes it fail). Left to tc (`SockLeftToTc`):
//! what needs the packet — source ranges (the client's address), a pod's
//! flow that kube-proxy masquerades (to an external frontend with
//! eTP=Cluster, or every flow with `--masquerade-all`), a pod's flow to a
//! backend listening in its own namespace (hairpin, masqueraded), a local
//! policy without a local endpoint (a drop), an inconsistent service.
//! The source of a translated flow from the node is the node's own
//! address, as kube-proxy's masquerade of host traffic would make it.

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    cty::c_void,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_set_retval, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release,
    },
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use common::{
    addr,
    lb::{
        sock_affinity_client, SockAddrKey, SockBackend, SockPeer, SCOPE_INTERNAL, SOCK_SCOPE_ALL,
        SOCK_SCOPE_NODE_NETNS,
    },
    proto::{IPPROTO_TCP, IPPROTO_UDP},
    rules::{self, Frontend, Origin},
    trace::{FAMILY_IPV4, FAMILY_IPV6},
    Backend, DatapathConfig, Hook, MemberKey, Reason, ServiceKey, ServiceValue, TraceEvent,
    Verdict,
};

use crate::{
    conntrack::now_ns,
    datapath::config,
    lb,
    maps::{
        DP_MEMBERS, DP_SOCK_BACKENDS, DP_SOCK_EVENT, DP_SOCK_PEERS, DP_SOCK_REVNAT, DP_SOCK_SCOPE,
    },
    stats, trace,
};

const ECONNREFUSED: i32 = 111;
/// What a sock_addr program returns to let the call go ahead.
const ALLOW: i32 = 1;
/// ... and to fail it (with the error `bpf_set_retval` set).
const DENY: i32 = 0;

/// The socket a call is made on, as the rules see it.
#[derive(Clone, Copy)]
struct Client {
    /// In the node's own network namespace (a node process, a
    /// hostNetwork pod); otherwise a pod's (`--socket-lb all`).
    host: bool,
    netns: u64,
}

/// The socket's client, if its network namespace is served.
#[inline(always)]
fn client(ctx: &SockAddrContext) -> Option<Client> {
    let node = DP_SOCK_SCOPE.get(SOCK_SCOPE_NODE_NETNS).copied()?;
    let all = DP_SOCK_SCOPE.get(SOCK_SCOPE_ALL).copied().unwrap_or(0) != 0;
    // SAFETY: a helper of sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host = netns == node;
    (host || all).then_some(Client { host, netns })
}

/// A backend picked for a socket: where it is and whose member it is.
#[derive(Clone, Copy)]
struct Picked {
    backend_id: u32,
    backend: Backend,
    service_id: u32,
}

/// A socket call's decision: the backend to send to, a refusal, or the
/// call left as it is.
enum Decision {
    Connect(Picked),
    /// Refused for this reason; the service port's id (0: none).
    Refuse(Reason, u32),
    /// Left as it is for this reason; the service port's id (0: none).
    Leave(Reason, u32),
}

/// The rules' view of a socket's flow: from the host (a local process)
/// or from a pod.
#[inline(always)]
fn origin(cfg: &DatapathConfig, c: Client, v6: bool) -> Origin {
    let cidr_len = if v6 {
        cfg.cluster_cidr6_len
    } else {
        cfg.cluster_cidr_len
    };
    Origin {
        from_host: c.host,
        from_pod: !c.host,
        local_process: c.host,
        cluster_cidr_known: cidr_len != 0,
    }
}

/// A new flow a socket call asks for (passed by reference: BPF functions
/// take at most five arguments).
struct Request {
    ctx: *mut c_void,
    daddr: [u8; 16],
    dport: u16,
    protocol: u8,
    client: Client,
}

/// The decision for a new flow. Its own BPF function: the hooks' frames
/// stay small.
#[inline(never)]
fn decide(r: &Request) -> Decision {
    let (daddr, protocol, c) = (&r.daddr, r.protocol, r.client);
    // A pod's loopback is its own (kube-proxy has no rules in a pod's
    // namespace): only the node's 127.0.0.1 has NodePorts.
    if !c.host && addr::is_v4_mapped(daddr) && daddr[12] == 127 {
        return Decision::Leave(Reason::NoService, 0);
    }
    let (mut key, mut master) = match lb::lookup_master_first(daddr, r.dport, protocol) {
        Frontend::NotAService => return Decision::Leave(Reason::NoService, 0),
        Frontend::PortNotServed => return Decision::Refuse(Reason::PortNotServed, 0),
        Frontend::Found(found) => found,
    };
    let id = master.service_id;
    if rules::source_ranges_apply(&master) {
        return Decision::Leave(Reason::SockLeftToTc, id);
    }
    let cfg = config();
    let v6 = !addr::is_v4_mapped(daddr);
    let origin = origin(cfg, c, v6);
    // A pod's flow that kube-proxy masquerades needs the packet: the
    // backend must see the node's address, not the pod's. The host's own
    // flows leave with a node address as their source anyway.
    if !c.host && rules::masquerade(cfg, master.flags, origin, false, false) {
        return Decision::Leave(Reason::SockLeftToTc, id);
    }
    if rules::internal_scope(&master, origin) {
        key = key.with_scope(SCOPE_INTERNAL);
        master = match lb::master(&key) {
            Some(m) => m,
            None => return Decision::Leave(Reason::SockLeftToTc, id),
        };
    }
    match pick(&key, &master, &c, v6) {
        // Hairpin: kube-proxy masquerades a pod's flow to itself.
        Ok((_, backend)) if !c.host && listens_here(r.ctx, &backend, protocol) => {
            Decision::Leave(Reason::SockLeftToTc, id)
        }
        Ok((backend_id, backend)) => Decision::Connect(Picked {
            backend_id,
            backend,
            service_id: master.service_id,
        }),
        Err(Reason::NoEndpoints) => match rules::no_endpoints(&master) {
            (Verdict::Reject, why) => Decision::Refuse(why, id),
            _ => Decision::Leave(Reason::SockLeftToTc, id),
        },
        Err(_) => Decision::Leave(Reason::SockLeftToTc, id),
    }
}

/// A backend for a new flow: random, or by session affinity, where the
/// client is the node's address for the host's sockets (what tc sees as
/// their source) and the network namespace for a pod's
/// (`sock_affinity_client`). Its own BPF function, as `decide`.
#[inline(never)]
fn pick(
    key: &ServiceKey,
    master: &ServiceValue,
    c: &Client,
    v6: bool,
) -> Result<(u32, Backend), Reason> {
    if !rules::has_affinity(master) {
        return lb::select_backend(key, master);
    }
    let client = if c.host {
        *rules::node_address(config(), v6)
    } else {
        sock_affinity_client(c.netns)
    };
    let now = now_ns();
    let internal = key.scope == SCOPE_INTERNAL;
    let (id, b) = match lb::affinity_backend(master.service_id, &client, master, now, internal) {
        Some(found) => found,
        None => lb::select_backend(key, master)?,
    };
    lb::remember_affinity(master.service_id, &client, id, now);
    Ok((id, b))
}

/// Whether a socket of this network namespace listens on the backend's
/// address and port: then the client is (probably) the backend itself. A
/// wildcard listener on the port counts too, so a pod that serves the
/// port leaves its flows to such backends to tc, which is right either
/// way.
#[inline(never)]
fn listens_here(ctx: *mut c_void, b: &Backend, protocol: u8) -> bool {
    // SAFETY: plain data, all zero is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if addr::is_v4_mapped(&b.addr) {
        tuple.__bindgen_anon_1.ipv4.daddr =
            u32::from_ne_bytes([b.addr[12], b.addr[13], b.addr[14], b.addr[15]]);
        tuple.__bindgen_anon_1.ipv4.dport = b.port.to_be();
        12
    } else {
        let word =
            |i: usize| u32::from_ne_bytes([b.addr[i], b.addr[i + 1], b.addr[i + 2], b.addr[i + 3]]);
        tuple.__bindgen_anon_1.ipv6.daddr = [word(0), word(4), word(8), word(12)];
        tuple.__bindgen_anon_1.ipv6.dport = b.port.to_be();
        36
    };
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: helpers of sock_addr programs; a socket found is released.
    unsafe {
        let sk = if protocol == IPPROTO_TCP {
            bpf_sk_lookup_tcp(ctx, &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx, &mut tuple, size, netns, 0)
        };
        if sk.is_null() {
            false
        } else {
            bpf_sk_release(sk as *mut _);
            true
        }
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

/// The call's destination, as `(address, port)` with the port in host
/// order.
#[inline(always)]
fn dest(sa: &bpf_sock_addr, v6: bool) -> ([u8; 16], u16) {
    (dest_addr(sa, v6), u16::from_be(sa.user_port as u16))
}

#[inline(always)]
fn set_dest(sa: &mut bpf_sock_addr, v6: bool, a: &[u8; 16], port: u16) {
    set_dest_addr(sa, v6, a);
    sa.user_port = u32::from(port.to_be());
}

/// The key of a socket's entry about `addr`:`port`.
#[inline(always)]
fn sock_key(cookie: u64, addr: [u8; 16], port: u16) -> SockAddrKey {
    SockAddrKey {
        cookie,
        addr,
        port,
        _pad: [0; 6],
    }
}

/// Remembers, for recvmsg(), that datagrams from the backend are the
/// service's replies to this socket.
#[inline(never)]
fn remember_revnat(cookie: u64, b: &Backend, service: [u8; 16], port: u16) {
    let peer = SockPeer {
        addr: service,
        port,
        _pad: [0; 6],
    };
    // Without the record recvmsg() shows the backend as the sender: the
    // datagrams themselves arrive either way.
    let _ = DP_SOCK_REVNAT.insert(&sock_key(cookie, b.addr, b.port), &peer, 0);
}

/// Fails the call with ECONNREFUSED, as a REJECT makes a TCP connect or a
/// UDP send fail. Kept for `dp trace --since`, as tc keeps its rejects.
/// Its own BPF function (as `leave` and `forwarded`): the hook's frame
/// stays small, `decide`'s chain needs the room.
#[inline(never)]
fn refuse(hook: Hook, r: &Request, reason: Reason, service_id: u32) -> i32 {
    stats::count(hook, reason, 0);
    let outcome = Outcome {
        verdict: Verdict::Reject,
        reason,
        service_id,
        backend: None,
    };
    trace_call(hook, r, &outcome);
    // SAFETY: a helper of cgroup programs.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// Lets the call go ahead untranslated (tc's to serve, or not a service).
#[inline(never)]
fn leave(hook: Hook, r: &Request, reason: Reason, service_id: u32) -> i32 {
    stats::count(hook, reason, 0);
    // Calls to no service at all are not news: only those left to tc are
    // traced.
    if service_id != 0 && trace::any_session() {
        let outcome = Outcome {
            verdict: Verdict::Pass,
            reason,
            service_id,
            backend: None,
        };
        trace_call(hook, r, &outcome);
    }
    ALLOW
}

/// What a socket call came to, for its trace event.
struct Outcome {
    verdict: Verdict,
    reason: Reason,
    service_id: u32,
    backend: Option<(u32, Backend)>,
}

/// The trace event of a socket call: the hook, the process (id, command,
/// network namespace), the service address as the destination and the
/// backend as the translation. No packet exists yet: no interface, no
/// source address (the kernel picks it later), no headers. Sent to the
/// open sessions it matches; a refusal is also kept in `DP_RECENT`.
///
/// Built in this CPU's `DP_SOCK_EVENT`: socket hooks run in process
/// context, and a task preempted inside one could let another task's hook
/// on the same CPU rewrite the record; the cost is at worst one garbled
/// trace event, never a decision.
#[inline(never)]
fn trace_call(hook: Hook, r: &Request, o: &Outcome) {
    let reject = o.verdict == Verdict::Reject;
    if !reject && !trace::any_session() {
        return;
    }
    let Some(ev) = DP_SOCK_EVENT.get_ptr_mut(0) else {
        return;
    };
    const WORDS: usize = core::mem::size_of::<TraceEvent>() / 8;
    // SAFETY: a per-CPU map value of exactly `WORDS` words, 8-byte aligned.
    unsafe { crate::zero::words64::<WORDS>(ev.cast::<u64>()) };
    // SAFETY: the map value, all zero: a valid `TraceEvent`.
    let ev = unsafe { &mut *ev };
    ev.hook = hook as u8;
    ev.verdict = o.verdict as u8;
    ev.reason = o.reason as u32;
    ev.service_id = o.service_id;
    ev.original.daddr = r.daddr;
    ev.original.dport = r.dport;
    ev.original.protocol = r.protocol;
    ev.original.family = if addr::is_v4_mapped(&r.daddr) {
        FAMILY_IPV4
    } else {
        FAMILY_IPV6
    };
    ev.translated = ev.original;
    if let Some((id, b)) = &o.backend {
        ev.backend_id = *id;
        ev.translated.daddr = b.addr;
        ev.translated.dport = b.port;
    }
    // SAFETY: helpers of sock_addr programs.
    unsafe {
        ev.pid_tgid = bpf_get_current_pid_tgid();
        ev.comm = bpf_get_current_comm().unwrap_or_default();
        ev.netns_cookie = bpf_get_netns_cookie(r.ctx);
    }
    ev.timestamp_ns = now_ns();
    trace::emit_built(ev);
    if reject {
        trace::remember(ev);
    }
}

/// The request of a socket call to `sa`'s destination.
#[inline(always)]
fn request(ctx: &SockAddrContext, sa: &bpf_sock_addr, v6: bool, client: Client) -> Request {
    let (daddr, dport) = dest(sa, v6);
    Request {
        ctx: ctx.as_ptr(),
        daddr,
        dport,
        protocol: sa.protocol as u8,
        client,
    }
}

/// connect4 and connect6: a Service address becomes a backend's address.
#[inline(always)]
pub fn connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let hook = if V6 {
        Hook::SockConnect6
    } else {
        Hook::SockConnect4
    };
    let Some(c) = client(ctx) else {
        return ALLOW;
    };
    let v6 = V6;
    // SAFETY: the context pointer the kernel passed.
    let r = request(ctx, unsafe { &*ctx.sock_addr }, v6, c);
    match decide(&r) {
        Decision::Connect(p) => connect_to::<V6>(ctx, hook, &r, &p),
        Decision::Refuse(reason, id) => {
            forget_peer(ctx);
            refuse(hook, &r, reason, id)
        }
        Decision::Leave(reason, id) => {
            forget_peer(ctx);
            leave(hook, &r, reason, id)
        }
    }
}

/// A socket that connects again, not to a backend this time (a UDP
/// socket may), has no service peer any more: getpeername() shows what it
/// connected to, and the agent's sweep of sockets on removed backends
/// (`agent::sock_lb`) leaves it alone.
#[inline(always)]
fn forget_peer(ctx: &SockAddrContext) {
    // SAFETY: a helper of sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DP_SOCK_PEERS.remove(&cookie);
}

/// Points a connecting socket at the picked backend. Its own BPF
/// function: its frame is not on `decide`'s call chain.
#[inline(never)]
fn connect_to<const V6: bool>(ctx: &SockAddrContext, hook: Hook, r: &Request, p: &Picked) -> i32 {
    let v6 = V6;
    // SAFETY: the context pointer the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    set_dest(sa, v6, &p.backend.addr, p.backend.port);
    // SAFETY: a helper of sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let peer = SockPeer {
        addr: r.daddr,
        port: r.dport,
        _pad: [0; 6],
    };
    // Without the record getpeername() shows the backend: the connection
    // itself is right either way.
    let _ = DP_SOCK_PEERS.insert(&cookie, &peer, 0);
    if r.protocol != IPPROTO_TCP {
        remember_revnat(cookie, &p.backend, r.daddr, r.dport);
    }
    forwarded(hook, r, p)
}

/// Counts and traces a call pointed at a backend.
#[inline(never)]
fn forwarded(hook: Hook, r: &Request, p: &Picked) -> i32 {
    stats::count(hook, Reason::NewFlow, 0);
    if trace::any_session() {
        let outcome = Outcome {
            verdict: Verdict::Forward,
            reason: Reason::NewFlow,
            service_id: p.service_id,
            backend: Some((p.backend_id, p.backend)),
        };
        trace_call(hook, r, &outcome);
    }
    ALLOW
}

/// The backend an unconnected socket's datagrams to a service already go
/// to, while it is still the service's (not removed, not retired).
#[inline(always)]
fn kept_backend(key: &SockAddrKey) -> Option<Backend> {
    // SAFETY: map value pointer, copied out.
    let kept: SockBackend = unsafe { *DP_SOCK_BACKENDS.get_ptr(key)? };
    let member = MemberKey {
        service_id: kept.service_id,
        backend_id: kept.backend_id,
    };
    DP_MEMBERS.get_ptr(&member)?;
    lb::backend(kept.backend_id).filter(|b| b.flags & common::lb::BACKEND_FLAG_RETIRED == 0)
}

/// sendmsg4 and sendmsg6 (sendto() on a UDP socket): a datagram to a
/// Service goes to the backend this socket's earlier ones to it went to,
/// or to a new pick once that one is gone, as conntrack moves a UDP flow
/// off a removed backend.
#[inline(always)]
pub fn sendmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let hook = if V6 {
        Hook::SockSendmsg6
    } else {
        Hook::SockSendmsg4
    };
    let Some(c) = client(ctx) else {
        return ALLOW;
    };
    let v6 = V6;
    if send_to_kept::<V6>(ctx) {
        stats::count(hook, Reason::Established, 0);
        return ALLOW;
    }
    // SAFETY: the context pointer the kernel passed.
    let r = request(ctx, unsafe { &*ctx.sock_addr }, v6, c);
    match decide(&r) {
        Decision::Connect(p) => send_to::<V6>(ctx, hook, &r, &p),
        Decision::Refuse(reason, id) => refuse(hook, &r, reason, id),
        Decision::Leave(reason, id) => leave(hook, &r, reason, id),
    }
}

/// Sends the datagram to the backend the socket's earlier ones to this
/// service went to, if it is still the service's.
#[inline(never)]
fn send_to_kept<const V6: bool>(ctx: &SockAddrContext) -> bool {
    let v6 = V6;
    // SAFETY: the context pointer the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (daddr, port) = dest(sa, v6);
    // SAFETY: a helper of sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match kept_backend(&sock_key(cookie, daddr, port)) {
        Some(b) => {
            set_dest(sa, v6, &b.addr, b.port);
            true
        }
        None => false,
    }
}

/// Sends the datagram to the picked backend and keeps it for the
/// socket's next ones to this service.
#[inline(never)]
fn send_to<const V6: bool>(ctx: &SockAddrContext, hook: Hook, r: &Request, p: &Picked) -> i32 {
    let v6 = V6;
    // SAFETY: the context pointer the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    set_dest(sa, v6, &p.backend.addr, p.backend.port);
    // SAFETY: a helper of sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let kept = SockBackend {
        backend_id: p.backend_id,
        service_id: p.service_id,
    };
    // Without the record the next datagram picks again.
    let _ = DP_SOCK_BACKENDS.insert(&sock_key(cookie, r.daddr, r.dport), &kept, 0);
    remember_revnat(cookie, &p.backend, r.daddr, r.dport);
    forwarded(hook, r, p)
}

/// recvmsg4 and recvmsg6 (UDP): a datagram from a backend this socket
/// sent to as a service shows the service address as its sender.
#[inline(always)]
pub fn recvmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let v6 = V6;
    // SAFETY: the context pointer the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (from, port) = dest(sa, v6);
    // SAFETY: a helper of sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the map value is copied out at once.
    if let Some(peer) = unsafe { DP_SOCK_REVNAT.get(&sock_key(cookie, from, port)) }.copied() {
        set_dest(sa, v6, &peer.addr, peer.port);
    }
    ALLOW
}

/// getpeername4 and getpeername6: a socket `connect` pointed at a backend
/// shows the service address it asked for.
#[inline(always)]
pub fn getpeername<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let v6 = V6;
    // SAFETY: a helper of sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the map value is copied out at once.
    if let Some(peer) = unsafe { DP_SOCK_PEERS.get(&cookie) }.copied() {
        // SAFETY: the context pointer the kernel passed.
        let sa = unsafe { &mut *ctx.sock_addr };
        set_dest(sa, v6, &peer.addr, peer.port);
    }
    ALLOW
}

/// sock_release: a closing socket's service peer (`DP_SOCK_PEERS`) goes
/// with it, and a connected UDP socket's reverse entry (`DP_SOCK_REVNAT`,
/// keyed by the backend it is connected to). Bookkeeping, not a decision:
/// nothing is counted or traced.
///
/// Without it these LRU maps fill with the entries of closed sockets and
/// every connect() pays for an eviction: 1.6 µs per connect4 call instead
/// of 0.6 µs, and 0.1 µs here (BENCHMARKS.md, socket-level load
/// balancing); and a long-lived socket's entry could be evicted by later
/// short ones. An unconnected UDP socket's entries (one per service and
/// backend it sent to) are not known here: they age out of their LRUs.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    // SAFETY: a helper of cgroup sock programs; the context is the socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if DP_SOCK_PEERS.remove(&cookie).is_err() {
        // Never pointed at a backend by connect().
        return ALLOW;
    }
    let sk = ctx.sock;
    // Each context field is read whole, at its own offset: the verifier
    // refuses loads through a ctx pointer moved to a field.
    // SAFETY: the context pointer the kernel passed; read-only fields.
    let field = |f: *const u32| unsafe { core::ptr::read_volatile(f) };
    // SAFETY: as above.
    let (protocol, family) = unsafe {
        (
            field(core::ptr::addr_of!((*sk).protocol)),
            field(core::ptr::addr_of!((*sk).family)),
        )
    };
    if protocol != u32::from(IPPROTO_UDP) {
        return ALLOW;
    }
    // Both families' fields are read before choosing: LLVM merges two
    // branches' loads into one through a selected ctx pointer otherwise.
    // SAFETY: as above.
    let (v4, w) = unsafe {
        (
            field(core::ptr::addr_of!((*sk).dst_ip4)),
            [
                field(core::ptr::addr_of!((*sk).dst_ip6[0])),
                field(core::ptr::addr_of!((*sk).dst_ip6[1])),
                field(core::ptr::addr_of!((*sk).dst_ip6[2])),
                field(core::ptr::addr_of!((*sk).dst_ip6[3])),
            ],
        )
    };
    let backend = if family == AF_INET6 {
        let mut a = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            a[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        a
    } else {
        addr::v4_mapped(v4.to_ne_bytes())
    };
    // SAFETY: as above (a 2-byte field: its own load).
    let port =
        u16::from_be(unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).dst_port)) });
    let _ = DP_SOCK_REVNAT.remove(&sock_key(cookie, backend, port));
    ALLOW
}

/// `AF_INET6`, as `bpf_sock.family` has it.
const AF_INET6: u32 = 10;
