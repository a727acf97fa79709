//! dp's datapath programs.
//!
//! The entry points are thin: each names its hook and hands the packet to
//! `datapath`, which decides, counts and traces, and turns the hook's
//! action (`action`) into the kernel's return code. Every exit carries a verdict
//! and a `Reason` (see `common::reason`). One module per concern: `parse`,
//! `lb` (service maps), `conntrack`, `nat` (rewrites), `reject` (ICMP/RST
//! answers), `icmp`/`icmp6` (errors about flows), `fib` (redirects), `service` (the flow logic, shared by tc and XDP),
//! `xdp` (the XDP fast path), `stats`, `trace`, `diag` (log records for
//! what should never happen), `zero` (zeroing without the byte-wise `memset`).
#![no_std]
#![no_main]

mod action;
mod conntrack;
mod csum;
mod datapath;
mod diag;
mod fib;
mod icmp;
mod icmp6;
mod lb;
mod maps;
mod nat;
mod packet;
mod parse;
mod prefilter;
mod reject;
mod service;
mod sock;
mod stats;
mod trace;
mod xdp;
mod zero;

use action::TcAction;
use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use common::Hook;

#[classifier]
pub fn dp_tc_ingress(ctx: TcContext) -> i32 {
    datapath::run_tc::<true>(&ctx, Hook::TcIngress) as i32
}

#[classifier]
pub fn dp_tc_egress(ctx: TcContext) -> i32 {
    datapath::run_tc::<true>(&ctx, Hook::TcEgress) as i32
}

#[xdp]
pub fn dp_xdp(ctx: XdpContext) -> u32 {
    datapath::run_xdp(&ctx) as u32
}

/// `dp_tc_ingress` with tracing compiled out: only for the benchmarks,
/// which compare it with `dp_tc_ingress` with no trace session open.
#[classifier]
pub fn dp_tc_untraced(ctx: TcContext) -> i32 {
    datapath::run_tc::<false>(&ctx, Hook::TcIngress) as i32
}

/// Socket-level load balancing: a connect() to a Service goes to a
/// backend (`sock.rs`).
#[cgroup_sock_addr(connect4)]
pub fn dp_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn dp_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect::<true>(&ctx)
}

/// Unconnected UDP: a datagram to a Service goes to a backend
/// (`sock.rs`).
#[cgroup_sock_addr(sendmsg4)]
pub fn dp_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dp_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<true>(&ctx)
}

/// UDP replies from a backend show the service address as their sender.
#[cgroup_sock_addr(recvmsg4)]
pub fn dp_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::recvmsg::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dp_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::recvmsg::<true>(&ctx)
}

/// Socket-level load balancing: getpeername() shows the service address.
#[cgroup_sock_addr(getpeername4)]
pub fn dp_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::getpeername::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn dp_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::getpeername::<true>(&ctx)
}

/// A socket closes: its service peer goes (`sock.rs`).
#[cgroup_sock(sock_release)]
pub fn dp_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

/// Does nothing: the floor the benchmarks compare the datapath with.
#[classifier]
pub fn dp_tc_noop(_ctx: TcContext) -> i32 {
    TcAction::Pass as i32
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
