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
//!   known yet (the kernel resolves it).
//! - For this host, with a translated source (the reply of a host process's
//!   service flow): into the ingress of the device the host would send to
//!   that source through, the one strict reverse-path filtering accepts it
//!   on, addressed to that device's MAC (`DP_DEVICES`).
//! - Anything else (no route, a blackhole, a packet too big for the route):
//!   left to the stack, which knows how to answer it.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_INGRESS, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use common::{FlowTuple, TraceEvent};

use crate::maps::DP_DEVICES;

const AF_INET: u8 = 2;

/// The FIB lookup parameters for IPv4 tuple `t` arriving on `ifindex`.
/// `ip_len` 0 (tc) has the kernel check the skb against the output device's
/// MTU itself, which is right for GSO packets; XDP passes the frame's length.
#[inline(always)]
pub fn params(t: &FlowTuple, ifindex: u32, ip_len: usize) -> FibParams {
    // SAFETY: plain-old-data struct of integers and unions of integers.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = t.protocol;
    p.sport = t.sport.to_be();
    p.dport = t.dport.to_be();
    p.__bindgen_anon_1.tot_len = ip_len as u16;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = v4_word(&t.saddr);
    p.__bindgen_anon_4.ipv4_dst = v4_word(&t.daddr);
    p
}

#[inline(always)]
fn v4_word(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
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
pub fn send_on_from_ingress(ctx: &TcContext, ev: &mut TraceEvent) -> i32 {
    let mut p = params(&ev.translated, ifindex(ctx), 0);
    match lookup(ctx, &mut p) {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(6, &p.smac, 0).is_err() {
                return TC_ACT_OK;
            }
            ev.sent_ifindex = p.ifindex;
            // SAFETY: helper; an ifindex from the FIB.
            unsafe { bpf_redirect(p.ifindex, 0) as i32 }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            ev.sent_ifindex = p.ifindex;
            // SAFETY: helper; an ifindex from the FIB, no params.
            unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
        }
        BPF_FIB_LKUP_RET_NOT_FWDED if ev.translated.saddr != ev.original.saddr => {
            deliver_to_host(ctx, ev)
        }
        // For this host with the source it arrived with (which the stack
        // accepted before translation), or nothing the program should
        // decide: the stack.
        _ => TC_ACT_OK,
    }
}

/// A packet for this host whose source was translated (a service address,
/// for the reply of a host process's flow): into the ingress of the device
/// that routes back to that source, where strict reverse-path filtering
/// accepts it. Its own BPF function: a second set of FIB parameters.
#[inline(never)]
fn deliver_to_host(ctx: &TcContext, ev: &mut TraceEvent) -> i32 {
    let t = &ev.translated;
    let mut p = params(t, ifindex(ctx), 0);
    p.__bindgen_anon_3.ipv4_src = v4_word(&t.daddr);
    p.__bindgen_anon_4.ipv4_dst = v4_word(&t.saddr);
    p.sport = t.dport.to_be();
    p.dport = t.sport.to_be();
    match lookup(ctx, &mut p) {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {}
        _ => return TC_ACT_OK,
    }
    let dev = p.ifindex;
    let Some(info) = (unsafe { DP_DEVICES.get(&dev) }) else {
        return TC_ACT_OK;
    };
    if ctx.store(0, &info.mac, 0).is_err() {
        return TC_ACT_OK;
    }
    ev.sent_ifindex = dev;
    // SAFETY: helper; an ifindex from the FIB.
    unsafe { bpf_redirect(dev, u64::from(BPF_F_INGRESS)) as i32 }
}

/// Redirects a packet translated at tc egress (this host's own traffic,
/// routed for the service address) towards `t.daddr`: out of the device the
/// FIB picks, with the neighbour resolved by the kernel, or into this
/// host's stack if the backend is a local address.
#[inline(always)]
pub fn redirect_from_egress(ctx: &TcContext, ev: &mut TraceEvent) -> Result<i32, ()> {
    let ifindex = ifindex(ctx);
    let mut p = params(&ev.translated, ifindex, 0);
    match lookup(ctx, &mut p) {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {
            ev.sent_ifindex = p.ifindex;
            // SAFETY: helper with a valid ifindex from the FIB; no params.
            Ok(unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NOT_FWDED => {
            // The backend is this host: deliver the packet to the local
            // stack, addressed to this device's own MAC.
            let own_mac: [u8; 6] = ctx.load(6).map_err(|_| ())?;
            ctx.store(0, &own_mac, 0).map_err(|_| ())?;
            ev.sent_ifindex = ifindex;
            // SAFETY: helper; ifindex of the current device.
            Ok(unsafe { bpf_redirect(ifindex, u64::from(BPF_F_INGRESS)) } as i32)
        }
        _ => Err(()),
    }
}
