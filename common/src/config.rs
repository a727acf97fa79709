//! Datapath configuration written by userspace, read per packet.

use bytemuck::{Pod, Zeroable};

use crate::ct::CtTimeouts;

/// `DatapathConfig::flags`: masquerade all service traffic
/// (kube-proxy `--masquerade-all`).
pub const CONFIG_MASQUERADE_ALL: u32 = 1 << 0;
/// `DatapathConfig::flags`: the agent attached the socket hooks for the
/// node's own sockets (`--socket-lb host` or `all`). Read by the tools
/// (`dp explain`), not by the programs.
pub const CONFIG_SOCKET_LB_HOST: u32 = 1 << 1;
/// `DatapathConfig::flags`: ... and for every namespace's (`all`: pods).
pub const CONFIG_SOCKET_LB_ALL: u32 = 1 << 2;

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
    /// Replies the datapath builds (ICMP port unreachable, TCP resets) per
    /// second and CPU; 0: `DEFAULT_REPLY_RATE`; `REPLY_RATE_UNLIMITED`: no
    /// limit.
    pub reply_rate_per_s: u32,
    /// How many such replies may go at once (the bucket's depth); 0:
    /// `DEFAULT_REPLY_BURST`.
    pub reply_burst: u32,
    /// The node's IPv6 address: the source of masqueraded and hairpin IPv6
    /// traffic. All zero: the node has none (such flows are dropped,
    /// `NoNodeAddress`). `node_ip` is the IPv4 one.
    pub node_ip6: [u8; 16],
    /// The IPv6 cluster CIDR (kube-proxy's `--cluster-cidr` takes one per
    /// family): IPv6 service traffic from outside it is masqueraded. Prefix
    /// length 0: not set. `cluster_cidr` is the IPv4 one.
    pub cluster_cidr6: [u8; 16],
    /// Prefix length of `cluster_cidr6` (an IPv6 length, 0..=128).
    pub cluster_cidr6_len: u8,
    pub _pad6: [u8; 3],
}

/// The kernel's `net.ipv4.icmp_msgs_per_sec` and `icmp_msgs_burst`
/// defaults (there for all CPUs; here per CPU).
pub const DEFAULT_REPLY_RATE: u32 = 1000;
pub const DEFAULT_REPLY_BURST: u32 = 50;
pub const REPLY_RATE_UNLIMITED: u32 = u32::MAX;

/// Value of `DP_REPLY_BUDGET` (per-CPU array, one entry): a token bucket
/// of replies, kept as time. Each reply costs `1 s / rate`; the credit
/// grows with time up to `burst` replies' worth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReplyBudget {
    pub credit_ns: u64,
    pub last_ns: u64,
}

impl ReplyBudget {
    /// Whether a reply may go at `now_ns` (then its cost is taken).
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, rate_per_s: u32, burst: u32) -> bool {
        let rate = if rate_per_s == 0 {
            DEFAULT_REPLY_RATE
        } else {
            rate_per_s
        };
        if rate == REPLY_RATE_UNLIMITED {
            return true;
        }
        let burst = if burst == 0 {
            DEFAULT_REPLY_BURST
        } else {
            burst
        };
        let cost = 1_000_000_000 / u64::from(rate.max(1));
        let cap = cost.saturating_mul(u64::from(burst));
        // A first use starts full.
        let elapsed = if self.last_ns == 0 {
            cap
        } else {
            now_ns.saturating_sub(self.last_ns)
        };
        self.last_ns = now_ns;
        self.credit_ns = self.credit_ns.saturating_add(elapsed).min(cap);
        if self.credit_ns >= cost {
            self.credit_ns -= cost;
            true
        } else {
            false
        }
    }
}

/// Service CIDRs the datapath knows (a cluster has one per family, more
/// when ServiceCIDR objects extend the range).
pub const SERVICE_CIDR_SLOTS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_budget_is_a_token_bucket() {
        const S: u64 = 1_000_000_000;
        let mut b = ReplyBudget::default();
        // Burst 3 at 10/s: three at once, then one per 100 ms.
        let now = 5 * S;
        assert!((0..3).all(|_| b.take(now, 10, 3)));
        assert!(!b.take(now, 10, 3));
        assert!(!b.take(now + 99_000_000, 10, 3));
        assert!(b.take(now + 100_000_000, 10, 3));
        assert!(!b.take(now + 150_000_000, 10, 3));
        // A long pause refills up to the burst only.
        let later = now + 60 * S;
        assert_eq!((0..10).filter(|_| b.take(later, 10, 3)).count(), 3);
        // Unlimited.
        assert!((0..10_000).all(|_| b.take(later, REPLY_RATE_UNLIMITED, 1)));
        // Zero: the defaults (burst 50).
        let mut d = ReplyBudget::default();
        assert_eq!((0..100).filter(|_| d.take(S, 0, 0)).count(), 50);
    }
}
