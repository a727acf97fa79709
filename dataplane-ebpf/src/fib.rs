//! Sending a translated packet on from tc, so that the stack's input checks
//! never see it: a node as kind builds it has strict reverse-path filtering
//! (`rp_filter = 1`) and `accept_local = 0`, and a translated packet often
//! carries a source address those checks refuse (a service address arriving
//! from a pod's veth, the node's own address after masquerade). Like
//! Cilium's host routing, the program asks the FIB where the packet goes and
//! redirects it there itself.
//!
//! - Forwarded (the FIB names an output device): `bpf_redirect` with the
//!   FIB's MAC addresses, or `bpf_redirect_neigh` when the neighbour is not
//!   known yet (the kernel resolves it). When the device is the host side of
//!   a pod's veth (`DEVICE_POD` in `DP_DEVICES`), `bpf_redirect_peer`
//!   instead: straight into the pod's interface, skipping the host-side
//!   veth's egress and the backlog queue between the two.
//! - For this host, with a translated source (the reply of a host process's
//!   service flow): into the ingress of the device the host would send to
//!   that source through, the one strict reverse-path filtering accepts it
//!   on, addressed to that device's MAC (`DP_DEVICES`).
//! - Anything else (no route, a blackhole, a packet too big for the route):
//!   left to the stack, which knows how to answer it.

use core::mem::{size_of, MaybeUninit};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_INGRESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use common::{device::DEVICE_POD, trace::FAMILY_IPV6, FlowTuple, Reason, TraceEvent};

use crate::{
    action::TcAction,
    diag,
    maps::DP_DEVICES,
    packet::{load, store},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The FIB lookup parameters for tuple `t` (IPv4 or IPv6) arriving on `ifindex`.
/// `ip_len` 0 (tc) has the kernel check the skb against the output device's
/// MTU itself, which is right for GSO packets; XDP passes the frame's length.
#[inline(always)]
pub fn params<'a>(
    slot: &'a mut MaybeUninit<FibParams>,
    t: &FlowTuple,
    ifindex: u32,
    ip_len: usize,
) -> &'a mut FibParams {
    // Plain-old-data: integers and unions of integers.
    let p = crate::zero::fill32(slot);
    p.l4_protocol = t.protocol;
    p.sport = t.sport.to_be();
    p.dport = t.dport.to_be();
    p.__bindgen_anon_1.tot_len = ip_len as u16;
    p.ifindex = ifindex;
    set_addresses(p, t.family == FAMILY_IPV6, &t.saddr, &t.daddr);
    p
}

/// Sets the family and the source and destination of a lookup.
#[inline(always)]
fn set_addresses(p: &mut FibParams, v6: bool, src: &[u8; 16], dst: &[u8; 16]) {
    if v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = v6_words(src);
        p.__bindgen_anon_4.ipv6_dst = v6_words(dst);
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = v4_word(src);
        p.__bindgen_anon_4.ipv4_dst = v4_word(dst);
    }
}

#[inline(always)]
fn v4_word(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
}

/// A 16-byte address as the four words of the lookup's IPv6 fields
/// (network byte order in memory).
#[inline(always)]
fn v6_words(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

#[inline(always)]
fn lookup(ctx: &TcContext, p: &mut FibParams) -> u32 {
    // SAFETY: valid context and params of the declared size.
    unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), p, size_of::<FibParams>() as i32, 0) as u32 }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Sends on a packet translated at tc ingress (`ev.original` ->
/// `ev.translated`, already rewritten); returns the tc action and records
/// the device in `ev.sent_ifindex`.
#[inline(always)]
pub fn send_on_from_ingress(ctx: &TcContext, ev: &mut TraceEvent) -> Result<TcAction, Reason> {
    let mut slot = MaybeUninit::uninit();
    let p = params(&mut slot, &ev.translated, ifindex(ctx), 0);
    match lookup(ctx, p) {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // MACs that cannot be written: the stack routes the packet
            // instead (as before dp sent packets on itself).
            if store(ctx, 0, &p.dmac).is_err() || store(ctx, 6, &p.smac).is_err() {
                diag::mac_store_failed(p.ifindex);
                return Ok(TcAction::Pass);
            }
            let dev = p.ifindex;
            sent(
                ev,
                dev,
                if is_pod_device(dev) {
                    redirect_peer(dev)
                } else {
                    redirect(dev, 0)
                },
            )
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => sent(ev, p.ifindex, redirect_neigh(p.ifindex)),
        BPF_FIB_LKUP_RET_NOT_FWDED if ev.translated.saddr != ev.original.saddr => {
            deliver_to_host(ctx, ev)
        }
        // For this host with the source it arrived with (which the stack
        // accepted before translation), or nothing the program should
        // decide: the stack.
        _ => Ok(TcAction::Pass),
    }
}

/// A packet for this host whose source was translated (a service address,
/// for the reply of a host process's flow): into the ingress of the device
/// that routes back to that source, where strict reverse-path filtering
/// accepts it. Its own BPF function: a second set of FIB parameters.
#[inline(never)]
fn deliver_to_host(ctx: &TcContext, ev: &mut TraceEvent) -> Result<TcAction, Reason> {
    let t = &ev.translated;
    let mut slot = MaybeUninit::uninit();
    let p = params(&mut slot, t, ifindex(ctx), 0);
    set_addresses(p, t.family == FAMILY_IPV6, &t.daddr, &t.saddr);
    p.sport = t.dport.to_be();
    p.dport = t.sport.to_be();
    // No route back, or a device dp is not attached to: the stack decides.
    match lookup(ctx, p) {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {}
        _ => return Ok(TcAction::Pass),
    }
    let dev = p.ifindex;
    let Some(info) = (unsafe { DP_DEVICES.get(&dev) }) else {
        return Ok(TcAction::Pass);
    };
    // A MAC that cannot be written: the stack, as above.
    if store(ctx, 0, &info.mac).is_err() {
        diag::mac_store_failed(dev);
        return Ok(TcAction::Pass);
    }
    sent(ev, dev, redirect(dev, u64::from(BPF_F_INGRESS)))
}

/// Redirects a packet translated at tc egress (this host's own traffic,
/// routed for the service address) towards `t.daddr`: out of the device the
/// FIB picks, with the neighbour resolved by the kernel, or into this
/// host's stack if the backend is a local address.
#[inline(always)]
pub fn redirect_from_egress(ctx: &TcContext, ev: &mut TraceEvent) -> Result<TcAction, Reason> {
    let ifindex = ifindex(ctx);
    let mut slot = MaybeUninit::uninit();
    let p = params(&mut slot, &ev.translated, ifindex, 0);
    match lookup(ctx, p) {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {
            sent(ev, p.ifindex, redirect_neigh(p.ifindex))
        }
        BPF_FIB_LKUP_RET_NOT_FWDED => {
            // The backend is this host: deliver the packet to the local
            // stack, addressed to this device's own MAC.
            let own_mac: [u8; 6] = load(ctx, 6)?;
            store(ctx, 0, &own_mac)?;
            sent(ev, ifindex, redirect(ifindex, u64::from(BPF_F_INGRESS)))
        }
        _ => Err(Reason::NoRouteToBackend),
    }
}

/// Records where a redirect that succeeded sent the packet.
#[inline(always)]
fn sent(
    ev: &mut TraceEvent,
    ifindex: u32,
    action: Result<TcAction, Reason>,
) -> Result<TcAction, Reason> {
    if action.is_ok() {
        ev.sent_ifindex = ifindex;
    }
    action
}

/// `bpf_redirect`: `TcAction::Redirect`, or `RedirectFailed` if the kernel
/// refused (it answers `TC_ACT_SHOT`).
#[inline(always)]
pub fn redirect(ifindex: u32, flags: u64) -> Result<TcAction, Reason> {
    // SAFETY: helper without pointer arguments.
    redirected(unsafe { bpf_redirect(ifindex, flags) })
}

/// Whether `ifindex` is the host side of a pod's veth (the agent marks
/// them in `DP_DEVICES`).
#[inline(always)]
fn is_pod_device(ifindex: u32) -> bool {
    // SAFETY: read of a map value.
    unsafe { DP_DEVICES.get(&ifindex) }.is_some_and(|d| d.flags & DEVICE_POD != 0)
}

/// `bpf_redirect_peer`: into the ingress of `ifindex`'s peer (the pod's
/// interface, in its own namespace). Only from tc ingress.
#[inline(always)]
fn redirect_peer(ifindex: u32) -> Result<TcAction, Reason> {
    // SAFETY: helper without pointer arguments.
    redirected(unsafe { bpf_redirect_peer(ifindex, 0) })
}

/// `bpf_redirect_neigh` without parameters: the kernel resolves the
/// neighbour of the packet's destination on `ifindex`.
#[inline(always)]
fn redirect_neigh(ifindex: u32) -> Result<TcAction, Reason> {
    // SAFETY: helper; no params (null, length 0).
    redirected(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) })
}

#[inline(always)]
fn redirected(rc: i64) -> Result<TcAction, Reason> {
    if rc == TcAction::Redirect as i64 {
        Ok(TcAction::Redirect)
    } else {
        Err(Reason::RedirectFailed)
    }
}
