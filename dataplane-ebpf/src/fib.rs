//! Sending a translated packet that this host originated (tc egress) to its
//! backend: the route chosen before translation was for the service address.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_INGRESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use common::FlowTuple;

use crate::parse::ETH_HLEN;

const AF_INET: u8 = 2;

/// The FIB lookup parameters for IPv4 tuple `t` arriving on `ifindex`.
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
    p.__bindgen_anon_3.ipv4_src =
        u32::from_ne_bytes([t.saddr[12], t.saddr[13], t.saddr[14], t.saddr[15]]);
    p.__bindgen_anon_4.ipv4_dst =
        u32::from_ne_bytes([t.daddr[12], t.daddr[13], t.daddr[14], t.daddr[15]]);
    p
}

/// Redirects the (already translated) packet towards `t.daddr`: out of the
/// device the FIB picks, with the neighbour resolved by the kernel, or into
/// this host's stack if the backend is a local address.
#[inline(always)]
pub fn redirect_to(ctx: &TcContext, t: &FlowTuple) -> Result<i32, ()> {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer.
    let ifindex = unsafe { (*skb).ifindex };
    let mut p = params(t, ifindex, ctx.len() as usize - ETH_HLEN);
    // SAFETY: valid context and params of the declared size.
    let rc = unsafe { bpf_fib_lookup(skb.cast(), &mut p, size_of::<FibParams>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: helper with a valid ifindex from the FIB; no params.
            Ok(unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NOT_FWDED => {
            // The backend is this host: deliver the packet to the local
            // stack, addressed to this device's own MAC.
            let own_mac: [u8; 6] = ctx.load(6).map_err(|_| ())?;
            ctx.store(0, &own_mac, 0).map_err(|_| ())?;
            // SAFETY: helper; ifindex of the current device.
            Ok(unsafe { bpf_redirect(ifindex, u64::from(BPF_F_INGRESS)) } as i32)
        }
        _ => Err(()),
    }
}
