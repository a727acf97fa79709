//! dp's datapath programs.
//!
//! The entry points are thin: each names its hook and hands the packet to
//! `datapath::run`, which decides, counts and traces. Every exit carries a
//! verdict and a `Reason` (see `common::reason`).
#![no_std]
#![no_main]

mod datapath;
mod maps;
mod packet;
mod parse;
mod stats;
mod trace;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use common::{Hook, Verdict};

use crate::packet::{SkbPacket, XdpPacket};

#[classifier]
pub fn dp_tc_ingress(ctx: TcContext) -> i32 {
    tc_action(datapath::run(&mut SkbPacket::new(&ctx), Hook::TcIngress))
}

#[classifier]
pub fn dp_tc_egress(ctx: TcContext) -> i32 {
    tc_action(datapath::run(&mut SkbPacket::new(&ctx), Hook::TcEgress))
}

#[xdp]
pub fn dp_xdp(ctx: XdpContext) -> u32 {
    match datapath::run(&mut XdpPacket::new(&ctx), Hook::Xdp) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn tc_action(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this is
    // never called at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
