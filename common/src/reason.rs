//! Why the datapath did what it did.
//!
//! One enum of reasons for the whole datapath, shared with userspace (counters,
//! `dp trace`). A reason's number is part of the ABI between the programs,
//! pinned maps and tools: numbers are never reused or renumbered, retired
//! reasons keep their slot.

/// Where in the packet path a program ran.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// tc (tcx) ingress of an interface.
    TcIngress = 0,
    /// tc (tcx) egress of an interface.
    TcEgress = 1,
    /// XDP on an interface's receive path.
    Xdp = 2,
}

impl Hook {
    /// Number of hooks: the counter map has one block of reasons per hook.
    pub const COUNT: u32 = 3;
    pub const ALL: [Hook; 3] = [Hook::TcIngress, Hook::TcEgress, Hook::Xdp];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|h| *h as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::TcIngress => "tc/ingress",
            Hook::TcEgress => "tc/egress",
            Hook::Xdp => "xdp",
        }
    }
}

/// What happened to the packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Handed to the kernel stack unchanged.
    Pass = 0,
    /// Dropped by the datapath.
    Drop = 1,
}

impl Verdict {
    pub const ALL: [Verdict; 2] = [Verdict::Pass, Verdict::Drop];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|x| *x as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "passed",
            Verdict::Drop => "dropped",
        }
    }
}

/// Why a packet got its verdict. Every exit of every program carries one.
///
/// Numbers are stable (see the module comment). Slot 0 is never emitted, so an
/// all-zero record is recognisably empty.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Not an IPv4 frame (ARP, IPv6, ...): passed to the stack untouched.
    NotIpv4 = 1,
    /// IPv4 TCP or UDP packet that matches no service: passed through.
    NoService = 2,
    /// IPv4 with a protocol the datapath does not translate: passed through.
    UnsupportedProtocol = 3,
    /// A header is cut short or inconsistent (IHL < 5, total length below the
    /// header): dropped, as the stack would drop it.
    Malformed = 4,
    /// A non-first IPv4 fragment: no L4 header to look at, passed through.
    Fragment = 5,
    /// The headers were not in the skb's linear area and pulling them in
    /// failed (memory pressure): passed to the stack, which decides.
    HeaderPullFailed = 6,
}

impl Reason {
    /// Every reason, in number order.
    pub const ALL: [Reason; 6] = [
        Reason::NotIpv4,
        Reason::NoService,
        Reason::UnsupportedProtocol,
        Reason::Malformed,
        Reason::Fragment,
        Reason::HeaderPullFailed,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u32 == v)
    }

    /// Short stable identifier, used in JSON output and metric labels.
    pub fn id(self) -> &'static str {
        match self {
            Reason::NotIpv4 => "not_ipv4",
            Reason::NoService => "no_service",
            Reason::UnsupportedProtocol => "unsupported_protocol",
            Reason::Malformed => "malformed",
            Reason::Fragment => "fragment",
            Reason::HeaderPullFailed => "header_pull_failed",
        }
    }

    /// The reason in words, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::NotIpv4 => "not IPv4",
            Reason::NoService => "no service for this destination",
            Reason::UnsupportedProtocol => "protocol not handled by the datapath",
            Reason::Malformed => "malformed packet",
            Reason::Fragment => "non-first IP fragment",
            Reason::HeaderPullFailed => "headers could not be pulled into the linear skb",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers are an ABI (pinned maps, trace consumers): this list only
    /// ever grows.
    #[test]
    fn reason_numbers_are_stable() {
        let expected = [
            (Reason::NotIpv4, 1, "not_ipv4"),
            (Reason::NoService, 2, "no_service"),
            (Reason::UnsupportedProtocol, 3, "unsupported_protocol"),
            (Reason::Malformed, 4, "malformed"),
            (Reason::Fragment, 5, "fragment"),
            (Reason::HeaderPullFailed, 6, "header_pull_failed"),
        ];
        assert_eq!(Reason::ALL.len(), expected.len(), "update this list");
        for (reason, number, id) in expected {
            assert_eq!(reason as u32, number, "{reason:?}");
            assert_eq!(reason.id(), id);
            assert_eq!(Reason::from_u32(number), Some(reason));
        }
        assert_eq!(Reason::from_u32(0), None, "0 means no reason");
    }

    #[test]
    fn ids_are_unique() {
        let mut ids: Vec<_> = Reason::ALL.iter().map(|r| r.id()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), Reason::ALL.len());
    }

    #[test]
    fn hooks_and_verdicts_round_trip() {
        for h in Hook::ALL {
            assert_eq!(Hook::from_u8(h as u8), Some(h));
        }
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_u8(v as u8), Some(v));
        }
        assert_eq!(Hook::ALL.len() as u32, Hook::COUNT);
    }
}
