//! What each hook does with a packet. The decision steps (`service`) are
//! hook-neutral: they return a `service::Step` with a `Reason`. tc and XDP
//! each carry a decision out with their own action type, so a tc code can
//! never reach an XDP program (their numbers overlap: 2 is `TC_ACT_SHOT`
//! and `XDP_PASS`); the entry points in `main.rs` turn it into the
//! kernel's number, once.

use aya_ebpf::bindings::{xdp_action, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

/// A tc program's outcome.
#[repr(i32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TcAction {
    /// `TC_ACT_OK`: the stack carries on with the packet.
    Pass = TC_ACT_OK,
    /// `TC_ACT_SHOT`.
    Drop = TC_ACT_SHOT,
    /// `TC_ACT_REDIRECT`: a redirect helper said where the packet goes.
    Redirect = TC_ACT_REDIRECT,
}

/// An XDP program's outcome.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum XdpAction {
    /// `XDP_PASS`: on to the stack (and tc).
    Pass = xdp_action::XDP_PASS,
    /// `XDP_DROP`.
    Drop = xdp_action::XDP_DROP,
    /// `XDP_TX`: back out of the device it came in on.
    Tx = xdp_action::XDP_TX,
}
