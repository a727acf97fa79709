//! The devices the programs are attached to, as the datapath needs to know
//! them: `DP_DEVICES` maps an ifindex to its MAC address.
//!
//! A packet the datapath hands to this host's own stack through another
//! device's ingress (`bpf_redirect` with `BPF_F_INGRESS`, see
//! `dataplane-ebpf/src/fib.rs`) must carry that device's MAC as its
//! destination, or the stack takes it for a frame meant for another host.
//! The kernel offers no helper that reads a device's address, so userspace
//! records it when it attaches.
//!
//! The agent also marks the host side of each pod's veth (`DEVICE_POD`):
//! a packet translated at tc ingress whose next hop is a pod goes straight
//! into the pod (`bpf_redirect_peer`), without a pass through the host-side
//! veth's egress (its qdisc, dp's own egress program, and the backlog queue
//! veth uses to cross to its peer).

use bytemuck::{Pod, Zeroable};

/// Value of `DP_DEVICES` (key: ifindex, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DeviceInfo {
    pub mac: [u8; 6],
    /// `DEVICE_*` bits.
    pub flags: u8,
    pub _pad: u8,
}

/// `DeviceInfo::flags`: the host side of a pod's veth pair, whose peer is
/// the pod's interface (in the pod's network namespace).
pub const DEVICE_POD: u8 = 1;
