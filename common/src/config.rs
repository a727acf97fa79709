//! Datapath configuration written by userspace, read per packet.

use bytemuck::{Pod, Zeroable};

use crate::ct::CtTimeouts;

/// `DatapathConfig::flags`: masquerade all service traffic
/// (kube-proxy `--masquerade-all`).
pub const CONFIG_MASQUERADE_ALL: u32 = 1 << 0;

/// The single value of the `DP_CONFIG` array (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Prefix length of `cluster_cidr` in the 16-byte form (IPv4 /16 is 112).
    pub cluster_cidr_len: u8,
    pub _pad: [u8; 3],
    /// The node's address: the source of masqueraded and hairpin traffic.
    pub node_ip: [u8; 16],
    /// kube-proxy's `--cluster-cidr`: service traffic from outside it is
    /// masqueraded. Prefix length 0: not set (nothing is masqueraded for it).
    pub cluster_cidr: [u8; 16],
    pub ct_timeouts: CtTimeouts,
    /// The Service CIDRs (from ServiceCIDR objects or `--service-cidr`):
    /// a destination in one that no Service has is dropped, as kube-proxy's
    /// nftables mode does. Prefix length 0: an unused slot.
    pub service_cidrs: [[u8; 16]; SERVICE_CIDR_SLOTS],
    /// Prefix lengths of `service_cidrs`, in the 16-byte form.
    pub service_cidr_lens: [u8; SERVICE_CIDR_SLOTS],
    pub _pad2: [u8; 4],
}

/// Service CIDRs the datapath knows (a cluster has one per family, more
/// when ServiceCIDR objects extend the range).
pub const SERVICE_CIDR_SLOTS: usize = 4;
