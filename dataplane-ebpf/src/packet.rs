//! The packet as the programs see it, the same for tc (skb) and XDP.

use aya_ebpf::{
    helpers::{bpf_skb_load_bytes, bpf_skb_store_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use common::{proto, Reason};

use crate::parse::{SctpHdr, TcpHdr, UdpHdr, ETH_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, MAX_HEADERS_LEN};

/// Direct packet access to a frame's linear bytes `[data, data_end)`.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Whole frame length (may exceed `data_end - data` for an skb).
    fn len(&self) -> u32;
    fn ifindex(&self) -> u32;
    /// The headers were not in the linear area and could not be pulled in.
    fn pull_failed(&self) -> bool {
        false
    }
    /// Copies `dst.len()` bytes at `off` (linear or not) into `dst`.
    fn load(&self, off: usize, dst: &mut [u8]) -> Result<(), Reason>;
}

pub struct SkbPacket<'a> {
    ctx: &'a TcContext,
    pull_failed: bool,
}

impl<'a> SkbPacket<'a> {
    /// Makes sure the headers the parser reads in place are in the linear
    /// area, so it never mistakes a paged skb for a truncated packet.
    ///
    /// Only those: a pull of more (into the payload) costs a packet from a
    /// local TCP socket a copy of its head, since TCP keeps a clone for
    /// retransmission and its payload is in pages. Pulling a fixed 94 bytes
    /// did that to every data segment a pod or the node sent, service or
    /// not (BENCHMARKS.md, "Two cuts to the pass-through").
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        let linear = ctx.data_end().saturating_sub(ctx.data());
        let len = ctx.len() as usize;
        let need = read_in_place(ctx);
        let want = if len < need { len } else { need };
        let pull_failed = linear < want && ctx.pull_data(want as u32).is_err();
        Self { ctx, pull_failed }
    }
}

/// How many of the frame's first bytes the parser reads in place: the
/// Ethernet header, the IPv4 header with its options and the fixed part of
/// the TCP, UDP or SCTP header; for IPv6 the fixed header (the extension
/// headers and the L4 header are read with the load helper, `walk_v6`).
/// Where the linear area does not even hold an IPv4 header, the most the
/// parser could read.
#[inline(always)]
fn read_in_place(ctx: &TcContext) -> usize {
    let (data, end) = (ctx.data(), ctx.data_end());
    // The Ethernet header is always in the linear area in tc.
    if data + ETH_HLEN > end {
        return MAX_HEADERS_LEN;
    }
    // SAFETY: the 14 bytes at `data` are in bounds (checked above).
    let ty = u16::from_be_bytes(unsafe { *((data + 12) as *const [u8; 2]) });
    if ty == proto::ETH_P_IPV6 {
        return ETH_HLEN + IPV6_HLEN;
    }
    if ty != proto::ETH_P_IP {
        return ETH_HLEN;
    }
    if data + ETH_HLEN + IPV4_MIN_HLEN > end {
        return MAX_HEADERS_LEN;
    }
    // SAFETY: the IPv4 fixed header is in bounds (checked above).
    let (version_ihl, frag_off, protocol) = unsafe {
        (
            *((data + ETH_HLEN) as *const u8),
            *((data + ETH_HLEN + 6) as *const [u8; 2]),
            *((data + ETH_HLEN + 9) as *const u8),
        )
    };
    // A later fragment carries no L4 header (the parser reads none).
    let later_fragment = u16::from_be_bytes(frag_off) & 0x1fff != 0;
    let l4 = match protocol {
        _ if later_fragment => 0,
        proto::IPPROTO_TCP => size_of::<TcpHdr>(),
        proto::IPPROTO_UDP => size_of::<UdpHdr>(),
        proto::IPPROTO_SCTP => size_of::<SctpHdr>(),
        _ => 0,
    };
    ETH_HLEN + usize::from(version_ihl & 0x0f) * 4 + l4
}

impl Packet for SkbPacket<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        self.ctx.len()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: `skb` is the context pointer the kernel passed in.
        unsafe { (*self.ctx.skb.skb).ifindex }
    }
    #[inline(always)]
    fn pull_failed(&self) -> bool {
        self.pull_failed
    }
    #[inline(always)]
    fn load(&self, off: usize, dst: &mut [u8]) -> Result<(), Reason> {
        skb_load(self.ctx, off, dst)
    }
}

pub struct XdpPacket<'a> {
    ctx: &'a XdpContext,
}

impl<'a> XdpPacket<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext) -> Self {
        Self { ctx }
    }
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (self.ctx.data_end() - self.ctx.data()) as u32
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ctx.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn load(&self, off: usize, dst: &mut [u8]) -> Result<(), Reason> {
        // SAFETY: `dst` is valid for `dst.len()` bytes.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                self.ctx.ctx.cast(),
                off as u32,
                dst.as_mut_ptr().cast(),
                dst.len() as u32,
            )
        };
        helper_result(rc, Reason::PacketLoadFailed)
    }
}

/// Copies `dst.len()` bytes at `off` out of the skb. The helper directly:
/// aya's `load_bytes` clamps the length to the packet, which the verifier
/// then sees as possibly zero. Callers bound `dst.len()` explicitly.
#[inline(always)]
pub fn skb_load(ctx: &TcContext, off: usize, dst: &mut [u8]) -> Result<(), Reason> {
    // SAFETY: `dst` is valid for `dst.len()` bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off as u32,
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
        )
    };
    helper_result(rc, Reason::PacketLoadFailed)
}

/// Writes `src` into the skb at `off` (a variable but bounded length).
#[inline(always)]
pub fn skb_store(ctx: &TcContext, off: usize, src: &[u8]) -> Result<(), Reason> {
    // SAFETY: `src` is valid for `src.len()` bytes.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb.cast(),
            off as u32,
            src.as_ptr().cast(),
            src.len() as u32,
            0,
        )
    };
    helper_result(rc, Reason::PacketStoreFailed)
}

/// A `T` read from the skb at `off` (aya's `load`, with the reason).
#[inline(always)]
pub fn load<T>(ctx: &TcContext, off: usize) -> Result<T, Reason> {
    ctx.load(off).map_err(|_| Reason::PacketLoadFailed)
}

/// Writes `v` into the skb at `off` (aya's `store`, with the reason).
#[inline(always)]
pub fn store<T>(ctx: &TcContext, off: usize, v: &T) -> Result<(), Reason> {
    ctx.store(off, v, 0).map_err(|_| Reason::PacketStoreFailed)
}

/// `bpf_l3_csum_replace` at `off` (the IP header checksum).
#[inline(always)]
pub fn l3_csum_replace(
    ctx: &TcContext,
    off: usize,
    from: u64,
    to: u64,
    size: u64,
) -> Result<(), Reason> {
    ctx.l3_csum_replace(off, from, to, size)
        .map_err(|_| Reason::ChecksumUpdateFailed)
}

/// `bpf_l4_csum_replace` at `off` (a TCP or UDP checksum).
#[inline(always)]
pub fn l4_csum_replace(
    ctx: &TcContext,
    off: usize,
    from: u64,
    to: u64,
    flags: u64,
) -> Result<(), Reason> {
    ctx.l4_csum_replace(off, from, to, flags)
        .map_err(|_| Reason::ChecksumUpdateFailed)
}

/// A helper's return code: 0 is success, anything else fails for `reason`.
#[inline(always)]
fn helper_result(rc: i64, reason: Reason) -> Result<(), Reason> {
    if rc == 0 {
        Ok(())
    } else {
        Err(reason)
    }
}
