//! The devices the programs are attached to, as the datapath needs to know
//! them: `DP_DEVICES` maps an ifindex to its MAC address.
//!
//! A packet the datapath hands to this host's own stack through another
//! device's ingress (`bpf_redirect` with `BPF_F_INGRESS`, see
//! `dataplane-ebpf/src/fib.rs`) must carry that device's MAC as its
//! destination, or the stack takes it for a frame meant for another host.
//! The kernel offers no helper that reads a device's address, so userspace
//! records it when it attaches.

use bytemuck::{Pod, Zeroable};

/// Value of `DP_DEVICES` (key: ifindex, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DeviceInfo {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
