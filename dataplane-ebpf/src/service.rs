//! Service handling in tc: conntrack first (established flows and replies),
//! then the service maps (new flows, rejects). kube-proxy's semantics:
//! random backend per new flow, terminating fallback, REJECT without
//! endpoints, masquerade from outside the cluster CIDR and for hairpin. The
//! rules themselves are `common::rules`, which `dp explain` applies too;
//! here they meet the maps and the packet.
//!
//! The packet's tuple is `ev.original`; each step writes the translation to
//! `ev.translated` and records its decision in `ev` (the packet's per-CPU
//! decision record, see `trace`).

use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use common::{
    ct::{
        CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_FLAG_AFFINITY, CT_FLAG_HAIRPIN, CT_FLAG_SNAT,
        CT_STATE_NEW,
    },
    lb::{BACKEND_FLAG_RETIRED, SCOPE_INTERNAL},
    proto::{self, TCP_ACK, TCP_RST, TCP_SYN},
    rules::{self, Frontend, Origin},
    trace::FAMILY_IPV6,
    Backend, CtEntry, CtKey, CtTimeouts, DatapathConfig, FlowTuple, Hook, Reason, TraceEvent,
    Verdict,
};

use crate::{
    action::TcAction,
    conntrack::{self as ct, now_ns},
    fib, lb,
    maps::DP_REVNAT,
    nat,
    prefilter::{self, Filtered},
    reject,
    trace::{decide, decide_drop},
};

/// Masquerade ports when the client's own port is taken: up to 128 random
/// tries in the ephemeral range. Four tries were too few: once a third of
/// the ports towards one backend were held by the conntrack entries of
/// recently closed flows, about one new connection in 1 000 found no port,
/// its SYN was dropped and the client sent it again a second later
/// (BENCHMARKS.md, "Masquerade ports under short connections").
const NAT_PORT_MIN: u32 = 32_768;
const NAT_PORT_SPAN: u32 = 28_232;
const NAT_PORT_TRIES: u32 = 128;

/// One packet being handled: what every step reads. Passed by reference,
/// since BPF functions take at most five arguments. The decision steps are
/// shared by tc and XDP; only carrying a decision out needs the context.
pub struct Flow<'a> {
    pub hook: Hook,
    pub cfg: &'a DatapathConfig,
    /// Read from the clock once a packet turns out to be a tracked flow's
    /// or a service's (`first_step`, `new_flow`); 0 before. Most packets
    /// at a node are neither and never need it: a clock read is a good
    /// part of their cost in a VM.
    pub now: u64,
}

impl Flow<'_> {
    #[inline(always)]
    pub fn new(hook: Hook, cfg: &DatapathConfig) -> Flow<'_> {
        Flow { hook, cfg, now: 0 }
    }
}

/// What a step decided, in no hook's terms; the hook's `handle` carries it
/// out and records the verdict. Steps never call each other: the BPF stack
/// (512 bytes) is shared by the whole call chain, so the chain is kept at
/// entry point -> `handle` -> one step.
pub enum Step {
    /// Not a packet to translate: it passes untouched, for this reason.
    Pass(Reason),
    /// Drop the packet, for this reason.
    Drop(Reason),
    /// A backend was picked for a new flow: track it (flags for `CtEntry`),
    /// then forward with this reason.
    Track(u8, Reason),
    /// Rewrite to `ev.translated` and send on, for this reason.
    Forward(Reason),
    /// A reply: rewrite to `ev.translated` and hand it to the stack.
    Reply,
    /// Answer with ICMP port unreachable, for this reason.
    Reject(Reason),
    /// Answer a TCP packet of a flow whose backend is gone with a reset.
    Reset,
    /// The flow's backend is gone.
    BackendGone,
    /// A new connection on the tuple of a closing or dead flow.
    Reopen,
}

/// The first decision for a packet: the pass-through filter, then
/// conntrack, then the service maps.
#[inline(always)]
pub fn first_step(f: &mut Flow, ev: &mut TraceEvent) -> Step {
    // Most packets at a node are neither a tracked flow's nor a
    // frontend's (a socket-LB flow's, pod to pod, the node's own): the
    // filter lets them pass without the two hash lookups.
    let filtered = prefilter::check(f.cfg, &ev.original, ev.tcp_flags);
    let frontend_possible = match filtered {
        Filtered::LookUp => true,
        Filtered::ConntrackOnly => false,
        Filtered::NoService => return Step::Pass(Reason::NoService),
        Filtered::SynToBackend => return direct_connection(ev),
    };
    let key = ct::key(&ev.original);
    let found = match ct::get(&key) {
        Some(e) => {
            f.now = now_ns();
            ct::live(e, f.now)
        }
        None => None,
    };
    match found {
        // SAFETY: map value pointer from a successful lookup.
        Some(e) if unsafe { (*e).direction } == CT_DIR_REPLY => reply(f, ev, e),
        // A new connection reusing the tuple of one that is closing or whose
        // backend is gone: a new flow, as netfilter conntrack does.
        Some(e) if syn_reopens(ev, e) => Step::Reopen,
        Some(e) => established(f, ev, e),
        None if frontend_possible => new_flow(f, ev),
        // No frontend has the destination: what `new_flow` would end in.
        None => direct_connection(ev),
    }
}

/// tc: decides and carries the decision out on the skb.
#[inline(never)]
pub fn handle(ctx: &TcContext, hook: Hook, cfg: &DatapathConfig, ev: &mut TraceEvent) -> TcAction {
    let l4_off = usize::from(ev.l4_off);
    let mut f = Flow::new(hook, cfg);
    let mut step = first_step(&mut f, ev);
    step = match step {
        Step::Reopen => new_flow(&mut f, ev),
        other => other,
    };
    step = match step {
        Step::BackendGone => backend_gone(&f, ev),
        Step::Track(flags, reason) => track(&f, ev, flags, reason),
        other => other,
    };
    let (verdict, reason, sent) = match step {
        Step::Pass(reason) => {
            decide(ev, Verdict::Pass, reason);
            return TcAction::Pass;
        }
        Step::Drop(reason) => return drop_packet(ev, reason),
        Step::Forward(reason) => (
            Verdict::Forward,
            reason,
            rewrite(ctx, l4_off, ev).and_then(|()| send_on(ctx, hook, ev, false)),
        ),
        Step::Reply => (
            Verdict::Forward,
            Reason::ReplyReverseNat,
            rewrite(ctx, l4_off, ev).and_then(|()| send_on(ctx, hook, ev, true)),
        ),
        Step::Reject(reason) => (Verdict::Reject, reason, reject(ctx, &f, ev)),
        Step::Reset => (
            Verdict::Reject,
            Reason::BackendGoneReset,
            reset(ctx, &f, l4_off, ev),
        ),
        Step::Track(..) | Step::BackendGone | Step::Reopen => {
            return drop_packet(ev, Reason::ServiceInconsistent)
        }
    };
    match sent {
        Ok(action) => {
            decide(ev, verdict, reason);
            action
        }
        Err(why) => drop_packet(ev, why),
    }
}

/// tc: drops the packet for `reason`.
#[inline(always)]
fn drop_packet(ev: &mut TraceEvent, reason: Reason) -> TcAction {
    decide_drop(ev, reason);
    TcAction::Drop
}

/// A TCP SYN (without ACK) on an original-direction entry that is closing or
/// whose backend is gone. Its own BPF function: kept out of `handle`'s frame.
#[inline(never)]
pub fn syn_reopens(ev: &TraceEvent, e: *mut CtEntry) -> bool {
    if ev.original.protocol != proto::IPPROTO_TCP || ev.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return false;
    }
    // SAFETY: map value pointer from a successful lookup.
    let (state, backend_id) = unsafe { ((*e).state, (*e).backend_id) };
    // Retired counts as gone: a SYN is a new connection, not the old one's.
    rules::ct_closing(state)
        || lb::backend(backend_id).is_none_or(|b| b.flags & BACKEND_FLAG_RETIRED != 0)
}

// The steps below are separate BPF functions (not inlined), each with its
// own stack frame.

/// No conntrack entry: a new flow to a service, a reject, or not a service.
#[inline(never)]
pub fn new_flow(f: &mut Flow, ev: &mut TraceEvent) -> Step {
    let t = &ev.original;
    let frontend = lb::lookup(&t.daddr, t.dport, t.protocol);
    if let Frontend::NotAService = frontend {
        return if rules::unallocated_cluster_ip(f.cfg, &t.daddr) {
            Step::Drop(Reason::UnallocatedClusterIp)
        } else {
            direct_connection(ev)
        };
    }
    // A service's: from here on every step may need the time (affinity,
    // conntrack deadlines, the reject budget). Read unconditionally: a
    // branch on `f.now` here let LLVM merge paths the verifier then
    // refused (a register read before it was written).
    f.now = now_ns();
    let (mut key, mut master) = match frontend {
        Frontend::Found(found) => found,
        Frontend::PortNotServed => return Step::Reject(Reason::PortNotServed),
        Frontend::NotAService => return Step::Pass(Reason::NoService),
    };
    ev.service_id = master.service_id;
    if rules::source_ranges_apply(&master) && !lb::source_allowed(master.service_id, &t.saddr) {
        return Step::Drop(Reason::SourceRangeDenied);
    }
    let cfg = f.cfg;
    let origin = Origin::of(cfg, &t.saddr, f.hook == Hook::TcEgress);
    // The masquerade rule reads the frontend's own flags.
    let frontend_flags = master.flags;
    let internal = rules::internal_scope(&master, origin);
    if internal {
        key = key.with_scope(SCOPE_INTERNAL);
        master = match lb::master(&key) {
            Some(m) => m,
            None => return Step::Drop(Reason::ServiceInconsistent),
        };
    }
    let affinity = rules::has_affinity(&master);
    let remembered = if affinity {
        lb::affinity_backend(master.service_id, &t.saddr, &master, f.now, internal)
    } else {
        None
    };
    let (reason, picked) = match remembered {
        Some(b) => (Reason::NewFlowAffinity, Ok(b)),
        None => (Reason::NewFlow, lb::select_backend(&key, &master)),
    };
    let (backend_id, backend) = match picked {
        Ok(b) => b,
        Err(Reason::NoEndpoints) => {
            return match rules::no_endpoints(&master) {
                (Verdict::Drop, why) => Step::Drop(why),
                (_, why) => Step::Reject(why),
            }
        }
        Err(r) => return Step::Drop(r),
    };
    ev.backend_id = backend_id;
    let t = &ev.original;
    let hairpin = t.saddr == backend.addr;
    let to_this_node = rules::reaches_this_node(cfg, &backend.addr, origin);
    let masquerade = rules::masquerade(cfg, frontend_flags, origin, hairpin, to_this_node);
    // Recorded when the flow is tracked: XDP may still leave it to tc.
    let affinity = if affinity { CT_FLAG_AFFINITY } else { 0 };
    let x = &mut ev.translated;
    x.daddr = backend.addr;
    x.dport = backend.port;
    if !masquerade {
        return Step::Track(affinity, reason);
    }
    let node = rules::node_address(cfg, t.family == FAMILY_IPV6);
    if *node == [0; 16] {
        return Step::Drop(Reason::NoNodeAddress);
    }
    x.saddr = *node;
    match free_nat_port(x, f.now, &cfg.ct_timeouts) {
        Some(port) => x.sport = port,
        None => return Step::Drop(Reason::NatPortsExhausted),
    }
    let hairpin = if hairpin { CT_FLAG_HAIRPIN } else { 0 };
    Step::Track(CT_FLAG_SNAT | hairpin | affinity, reason)
}

/// A packet to no service: it passes untouched. When it opens a TCP
/// connection (SYN without ACK) from a client port whose reversed tuple is
/// still a closing service flow's reply entry, that entry goes
/// (`Reason::StaleReplyEntry`): a pod's service flows are not masqueraded,
/// so their reply entries are keyed (backend -> pod:port), and the new
/// connection's replies would otherwise be taken for the old flow's and
/// rewritten to the service address (the client resets them). netfilter
/// gives such a connection another source port; dp has no NAT on this
/// path, and the client's new SYN is the proof the old flow is over. The
/// SYN is the trigger, not the reply: a late duplicate SYN-ACK of the old
/// flow itself (after the client's FIN) stays translated.
#[inline(never)]
fn direct_connection(ev: &TraceEvent) -> Step {
    let t = &ev.original;
    if t.protocol != proto::IPPROTO_TCP || ev.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Step::Pass(Reason::NoService);
    }
    let reply_key = reversed_key(t);
    let stale = ct::get(&reply_key).is_some_and(|e| {
        // SAFETY: map value pointer from a successful lookup.
        let (direction, state) = unsafe { ((*e).direction, (*e).state) };
        direction == CT_DIR_REPLY && rules::ct_closing(state)
    });
    if !stale {
        return Step::Pass(Reason::NoService);
    }
    ct::remove(&reply_key);
    Step::Pass(Reason::StaleReplyEntry)
}

/// Creates the conntrack entries of a new flow (`ev.original` ->
/// `ev.translated`): the reply direction first, so a reply never misses it.
#[inline(never)]
pub fn track(f: &Flow, ev: &mut TraceEvent, flags: u8, reason: Reason) -> Step {
    let (t, x) = (&ev.original, &ev.translated);
    let mut entry = CtEntry {
        expires_ns: f.now + ct::lifetime_ns(t.protocol, CT_STATE_NEW, &f.cfg.ct_timeouts),
        backend_id: ev.backend_id,
        service_id: ev.service_id,
        nat_addr: t.saddr,
        nat_port: t.sport,
        state: CT_STATE_NEW,
        flags,
        direction: CT_DIR_REPLY,
        // Padding, and fields of other builds' layouts (`layout-next`).
        ..CtEntry::default()
    };
    let reply_key = reversed_key(x);
    prefilter::mark_backend(&reply_key);
    if let Err(reason) = ct::insert(&reply_key, &entry) {
        return Step::Drop(reason);
    }
    entry.nat_addr = x.saddr;
    entry.nat_port = x.sport;
    entry.direction = CT_DIR_ORIGINAL;
    if let Err(reason) = ct::insert(&ct::key(t), &entry) {
        ct::remove(&reply_key);
        return Step::Drop(reason);
    }
    if flags & CT_FLAG_AFFINITY != 0 {
        lb::remember_affinity(ev.service_id, &ev.original.saddr, ev.backend_id, f.now);
    }
    Step::Forward(reason)
}

/// A packet of a tracked flow, client -> service.
#[inline(never)]
pub fn established(f: &Flow, ev: &mut TraceEvent, e: *mut CtEntry) -> Step {
    // SAFETY: map value pointer from the lookup in `handle`.
    let entry = unsafe { &*e };
    ev.service_id = entry.service_id;
    let Some(backend) = lb::backend(entry.backend_id) else {
        return Step::BackendGone;
    };
    let mut reason = Reason::Established;
    if backend.flags & BACKEND_FLAG_RETIRED != 0 {
        // Out of every service: gone, but for the client's own reset,
        // which the backend's end of the connection needs to close.
        if ev.original.protocol != proto::IPPROTO_TCP || ev.tcp_flags & TCP_RST == 0 {
            return Step::BackendGone;
        }
        reason = Reason::BackendGoneClosed;
    }
    ev.backend_id = entry.backend_id;
    translate(&mut ev.translated, &backend, entry);
    refresh_both(f, ev, e, false);
    Step::Forward(reason)
}

/// The flow's backend was removed. UDP: move the flow to a live backend (no
/// stale conntrack). TCP: reset the client so it fails fast.
#[inline(never)]
fn backend_gone(f: &Flow, ev: &mut TraceEvent) -> Step {
    let t = &ev.original;
    // Looked up again (rare path): a map pointer does not survive `Step`.
    let Some(e) = ct::lookup(&ct::key(t), f.now) else {
        return Step::Drop(Reason::ServiceInconsistent);
    };
    if rules::resets_when_backend_gone(t.protocol) {
        // SAFETY: map value pointer from the lookup above.
        let entry = unsafe { *e };
        // Retired, its address is still known: the reply side's entry goes
        // too (it would otherwise wait out the established timeout).
        if let Some(backend) = lb::backend(entry.backend_id) {
            let mut x = *t;
            translate(&mut x, &backend, &entry);
            ct::remove(&reversed_key(&x));
        }
        ct::remove(&ct::key(t));
        return Step::Reset;
    }
    let picked = match lb::lookup(&t.daddr, t.dport, t.protocol) {
        Frontend::Found((key, master)) => lb::select_backend(&key, &master),
        _ => Err(Reason::NoEndpoints),
    };
    let (backend_id, backend) = match picked {
        Ok(b) => b,
        Err(Reason::NoEndpoints) => {
            ct::remove(&ct::key(t));
            return Step::Reject(Reason::NoEndpoints);
        }
        Err(r) => return Step::Drop(r),
    };
    // SAFETY: map value pointer from the lookup in `handle`.
    let entry = unsafe { &mut *e };
    entry.backend_id = backend_id;
    ev.backend_id = backend_id;
    translate(&mut ev.translated, &backend, entry);
    let t = &ev.original;
    let reply_entry = CtEntry {
        nat_addr: t.saddr,
        nat_port: t.sport,
        direction: CT_DIR_REPLY,
        ..*entry
    };
    let reply_key = reversed_key(&ev.translated);
    prefilter::mark_backend(&reply_key);
    if let Err(reason) = ct::insert(&reply_key, &reply_entry) {
        return Step::Drop(reason);
    }
    Step::Forward(Reason::BackendGoneRepicked)
}

/// A reply of a tracked flow, backend -> client: back to the service address
/// (and to the client's own address if it was masqueraded).
#[inline(never)]
pub fn reply(f: &Flow, ev: &mut TraceEvent, e: *mut CtEntry) -> Step {
    // SAFETY: map value pointer from the lookup in `handle`.
    let entry = unsafe { &*e };
    ev.service_id = entry.service_id;
    ev.backend_id = entry.backend_id;
    let Some(frontend) = DP_REVNAT.get_ptr(&entry.service_id) else {
        return Step::Drop(Reason::ServiceInconsistent);
    };
    let x = &mut ev.translated;
    // SAFETY: map value pointer.
    unsafe {
        x.saddr = (*frontend).addr;
        x.sport = (*frontend).port;
    }
    if entry.flags & CT_FLAG_SNAT != 0 {
        x.daddr = entry.nat_addr;
        x.dport = entry.nat_port;
    }
    refresh_both(f, ev, e, true);
    Step::Reply
}

/// Refreshes the packet's conntrack entry `e`; a state change (reply seen,
/// FIN/RST) goes to the other direction's entry too.
#[inline(always)]
fn refresh_both(f: &Flow, ev: &TraceEvent, e: *mut CtEntry, is_reply: bool) {
    let (protocol, timeouts) = (ev.original.protocol, &f.cfg.ct_timeouts);
    if let Some(state) = ct::refresh(e, protocol, ev.tcp_flags, is_reply, f.now, timeouts) {
        let other = reversed_key(&ev.translated);
        ct::set_state(&other, protocol, state, f.now, timeouts);
    }
}

/// Client -> service tuple `x` translated to `backend` (and the masquerade
/// source, if the flow has one).
#[inline(always)]
fn translate(x: &mut FlowTuple, backend: &Backend, entry: &CtEntry) {
    x.daddr = backend.addr;
    x.dport = backend.port;
    if entry.flags & CT_FLAG_SNAT != 0 {
        x.saddr = entry.nat_addr;
        x.sport = entry.nat_port;
    }
}

/// The conntrack key of the packets coming back for translated tuple `x`.
#[inline(always)]
fn reversed_key(x: &FlowTuple) -> CtKey {
    CtKey {
        saddr: x.daddr,
        daddr: x.saddr,
        sport: x.dport,
        dport: x.sport,
        protocol: x.protocol,
        _pad: [0; 3],
    }
}

/// A masquerade source port for `x` (whose `saddr` is the masquerade
/// address): the client's own port if free, else a few random tries.
#[inline(always)]
fn free_nat_port(x: &FlowTuple, now: u64, t: &CtTimeouts) -> Option<u16> {
    let mut key = reversed_key(x);
    let mut i = 0;
    while i <= NAT_PORT_TRIES {
        if !ct::holds_tuple(&key, now, t) {
            return Some(key.dport);
        }
        // SAFETY: helper without preconditions.
        let r = unsafe { bpf_get_prandom_u32() } % NAT_PORT_SPAN;
        key.dport = (NAT_PORT_MIN + r) as u16;
        i += 1;
    }
    None
}

/// Rewrites the packet to `ev.translated` (addresses, ports, checksums).
/// Then `send_on`: separate BPF functions called one after the other, so
/// the rewrite's and the FIB lookup's stack frames are never stacked.
#[inline(never)]
fn rewrite(ctx: &TcContext, l4_off: usize, ev: &TraceEvent) -> Result<(), Reason> {
    nat::rewrite(ctx, l4_off, &ev.original, &ev.translated)
}

/// Sends a rewritten packet on. At ingress the program sends it where the
/// FIB says (`fib`: the stack's reverse-path and local-source checks never
/// see it). At egress (this host's own traffic) a packet to a backend was
/// routed for the service address, so it is redirected towards the backend;
/// a reply leaves as routed.
#[inline(never)]
pub fn send_on(
    ctx: &TcContext,
    hook: Hook,
    ev: &mut TraceEvent,
    reply: bool,
) -> Result<TcAction, Reason> {
    match hook {
        Hook::TcEgress if reply => Ok(TcAction::Pass),
        Hook::TcEgress => fib::redirect_from_egress(ctx, ev),
        _ => fib::send_on_from_ingress(ctx, ev),
    }
}

/// Answers with ICMP port unreachable (kube-proxy's REJECT), within the
/// reply budget.
#[inline(never)]
fn reject(ctx: &TcContext, f: &Flow, ev: &TraceEvent) -> Result<TcAction, Reason> {
    reject::budget(f.cfg, f.now, Reason::RejectRateLimited)?;
    if ev.original.family == FAMILY_IPV6 {
        reject::icmp6_port_unreachable(ctx, f.hook)
    } else {
        reject::icmp_port_unreachable(ctx, f.hook)
    }
}

/// Resets a TCP flow whose backend is gone, within the reply budget.
#[inline(never)]
fn reset(ctx: &TcContext, f: &Flow, l4_off: usize, ev: &TraceEvent) -> Result<TcAction, Reason> {
    reject::budget(f.cfg, f.now, Reason::ResetRateLimited)?;
    if ev.original.family == FAMILY_IPV6 {
        reject::tcp6_reset(ctx, f.hook, l4_off)
    } else {
        reject::tcp_reset(ctx, f.hook, l4_off)
    }
}
