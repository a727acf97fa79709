//! Bounds-checked header parsing: Ethernet, IPv4, IPv6 (with its extension
//! headers), TCP, UDP, SCTP's common header.
//!
//! Header structs have only byte fields (alignment 1): XDP frames put the IP
//! header on a 2-byte boundary, so wider fields could be misaligned.

use core::mem::size_of;

use common::{
    proto,
    trace::{FAMILY_IPV4, FAMILY_IPV6},
    FlowTuple, Reason,
};

use crate::{packet::Packet, zero::set_v4_mapped};

pub const ETH_HLEN: usize = 14;
/// Offsets of the IPv4 header's checksum and addresses in a frame.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
/// Offset of the checksum in SCTP's common header.
pub const SCTP_CSUM_OFF: usize = 8;
/// ICMP header: type, code, checksum, 4 bytes that depend on the type.
pub const ICMP_HLEN: usize = 8;
pub const IPV4_MIN_HLEN: usize = 20;
const IPV4_MAX_HLEN: usize = 60;
const TCP_MIN_HLEN: usize = 20;
/// Most header bytes the parser reads in place: Ethernet, IPv4 with options,
/// TCP.
pub const MAX_HEADERS_LEN: usize = ETH_HLEN + IPV4_MAX_HLEN + TCP_MIN_HLEN;

/// Offsets of the IPv6 header's addresses in a frame.
pub const IP6_SRC_OFF: usize = ETH_HLEN + 8;
pub const IP6_DST_OFF: usize = ETH_HLEN + 24;
pub const IPV6_HLEN: usize = 40;
/// Extension headers walked to find the L4 header (hop-by-hop, routing,
/// fragment, destination options, authentication); a packet with more is
/// left to the stack (`Ipv6HeaderChainTooLong`). Real traffic carries one
/// or two (a hop-by-hop router alert, a fragment header).
pub const IPV6_MAX_EXT_HEADERS: usize = 4;
/// Bytes of extension headers walked at most (the same limit otherwise).
pub const IPV6_MAX_EXT_LEN: usize = 128;
/// Largest L4 offset of an IPv6 packet the datapath handles.
pub const IPV6_MAX_L4_OFF: usize = ETH_HLEN + IPV6_HLEN + IPV6_MAX_EXT_LEN;

/// Fragment offset bits of the IPv4 `frag_off` field.
const IP_OFFSET_MASK: u16 = 0x1fff;

// Wire layout: every field is there, read or not.
#[allow(dead_code)]
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

// Wire layout: every field is there, read or not.
#[allow(dead_code)]
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

// Wire layout: every field is there, read or not.
#[allow(dead_code)]
#[repr(C)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

// Wire layout: every field is there, read or not.
#[allow(dead_code)]
#[repr(C)]
pub struct TcpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    pub data_offset: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg_ptr: [u8; 2],
}

// Wire layout: every field is there, read or not.
#[allow(dead_code)]
#[repr(C)]
pub struct UdpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// SCTP's common header (RFC 9260 3.1); the chunks follow.
// Wire layout: every field is there, read or not.
#[allow(dead_code)]
#[repr(C)]
pub struct SctpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub vtag: [u8; 4],
    /// CRC32c of the SCTP packet, little-endian as Linux stores it.
    pub checksum: [u8; 4],
}

/// What the parser found in a frame.
pub enum Parsed {
    /// Not IP (ARP, VLAN-tagged, ...).
    NotIp,
    /// IPv6 with more extension headers than the datapath walks.
    Ipv6ChainTooLong,
    Ip(IpPacket),
}

pub struct IpPacket {
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// The L4 protocol (for IPv6, the last next-header value).
    pub protocol: u8,
    pub tcp_flags: u8,
    /// A non-first fragment: it carries no L4 header.
    pub later_fragment: bool,
    pub v6: bool,
}

/// `&T` at `off` bytes into the frame, if all of it lies before `data_end`.
#[inline(always)]
pub fn header<P: Packet, T>(pkt: &P, off: usize) -> Option<&T> {
    let start = pkt.data() + off;
    if start + size_of::<T>() > pkt.data_end() {
        return None;
    }
    // SAFETY: bounds checked just above; `T` is a byte-only header (align 1).
    Some(unsafe { &*(start as *const T) })
}

/// Parses the frame's headers into `tuple` (8-byte aligned, as a decision
/// record's is: see `zero::set_v4_mapped`; IPv4 addresses IPv4-mapped; ports
/// zero when not TCP/UDP/SCTP or a later fragment). `Err` is the reason for
/// dropping it.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P, tuple: &mut FlowTuple) -> Result<Parsed, Reason> {
    let eth: &EthHdr = header(pkt, 0).ok_or(Reason::Malformed)?;
    let ether_type = u16::from_be_bytes(eth.ether_type);
    if ether_type == proto::ETH_P_IPV6 {
        return parse_v6(pkt, tuple);
    }
    if ether_type != proto::ETH_P_IP {
        return Ok(Parsed::NotIp);
    }
    let ip: &Ipv4Hdr = header(pkt, ETH_HLEN).ok_or(Reason::Malformed)?;
    if ip.version_ihl >> 4 != 4 {
        return Err(Reason::Malformed);
    }
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Reason::Malformed);
    }
    let l4_off = ETH_HLEN + ihl;
    set_v4_mapped(&mut tuple.saddr, ip.saddr);
    set_v4_mapped(&mut tuple.daddr, ip.daddr);
    tuple.protocol = ip.protocol;
    tuple.family = FAMILY_IPV4;
    let later_fragment = u16::from_be_bytes(ip.frag_off) & IP_OFFSET_MASK != 0;
    let tcp_flags = if later_fragment {
        0
    } else {
        parse_l4(pkt, l4_off, ip.protocol, tuple)?
    };
    Ok(Parsed::Ip(IpPacket {
        l4_off,
        protocol: ip.protocol,
        tcp_flags,
        later_fragment,
        v6: false,
    }))
}

/// IPv6: the fixed header in place, then the extension headers and the L4
/// header (`walk_v6`).
#[inline(always)]
fn parse_v6<P: Packet>(pkt: &P, tuple: &mut FlowTuple) -> Result<Parsed, Reason> {
    let ip: &Ipv6Hdr = header(pkt, ETH_HLEN).ok_or(Reason::Malformed)?;
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    tuple.saddr = ip.saddr;
    tuple.daddr = ip.daddr;
    tuple.family = FAMILY_IPV6;
    let walked = walk_v6(pkt, tuple, ip.next_header);
    if walked < 0 {
        return Err(Reason::Malformed);
    }
    if walked & WALK_TOO_LONG != 0 {
        return Ok(Parsed::Ipv6ChainTooLong);
    }
    Ok(Parsed::Ip(IpPacket {
        l4_off: (walked & 0xffff) as usize,
        protocol: tuple.protocol,
        tcp_flags: (walked >> 16) as u8,
        later_fragment: walked & WALK_LATER_FRAGMENT != 0,
        v6: true,
    }))
}

/// `walk_v6`'s result bits above the L4 offset (bits 0-15) and the TCP
/// flags (16-23).
const WALK_LATER_FRAGMENT: i64 = 1 << 24;
const WALK_TOO_LONG: i64 = 1 << 25;

/// Walks the IPv6 extension headers from `next` (the fixed header's next
/// header) to the L4 header and reads its ports into `tuple` (and the
/// protocol). Negative: malformed; else the L4 offset, the TCP flags and
/// the `WALK_*` bits.
///
/// A BPF function of its own, reading the packet only through the load
/// helper, never in place: an offset used for direct packet access is
/// tracked exactly by the verifier, and each length of the chain was then a
/// state of its own through all the service handling that follows (the tc
/// programs went past the verifier's 1 000 000 instructions that way). Here
/// the copies live and die in this function's frame, and the callers get
/// plain numbers.
#[inline(never)]
fn walk_v6<P: Packet>(pkt: &P, tuple: &mut FlowTuple, mut next: u8) -> i64 {
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut later_fragment = false;
    let mut h = [0u8; 4];
    let mut i = 0;
    while i <= IPV6_MAX_EXT_HEADERS {
        match next {
            proto::IPV6_HOPOPTS
            | proto::IPV6_ROUTING
            | proto::IPV6_DSTOPTS
            | proto::IPV6_AUTH
            | proto::IPV6_FRAGMENT => {}
            _ => break,
        }
        if pkt.load(off, &mut h).is_err() {
            return -1;
        }
        let len = match next {
            // In 4-byte units beyond the first 8.
            proto::IPV6_AUTH => (usize::from(h[1]) + 2) * 4,
            proto::IPV6_FRAGMENT => {
                // The offset is the top 13 bits; a first fragment (offset
                // 0) carries the L4 header.
                later_fragment = u16::from_be_bytes([h[2], h[3]]) >> 3 != 0;
                8
            }
            // In 8-byte units beyond the first 8.
            _ => (usize::from(h[1]) + 1) * 8,
        };
        next = h[0];
        if later_fragment {
            break;
        }
        if i == IPV6_MAX_EXT_HEADERS || off + len > IPV6_MAX_L4_OFF {
            return WALK_TOO_LONG;
        }
        off += len;
        i += 1;
    }
    tuple.protocol = next;
    if later_fragment {
        return off as i64 | WALK_LATER_FRAGMENT;
    }
    // TCP: ports, sequence numbers, data offset and flags; UDP's and SCTP's
    // ports are their first 4 bytes (of 8 and 12).
    let mut l4 = [0u8; 14];
    let want = match next {
        proto::IPPROTO_TCP => 14,
        proto::IPPROTO_UDP => 8,
        proto::IPPROTO_SCTP => 12,
        _ => return off as i64,
    };
    if pkt.load(off, &mut l4[..want]).is_err() {
        return -1;
    }
    let mut tcp_flags = 0;
    if next == proto::IPPROTO_TCP {
        // A header shorter than its fixed part (see `parse_l4`).
        if l4[12] >> 4 < 5 {
            return -1;
        }
        tcp_flags = l4[13];
    }
    tuple.sport = u16::from_be_bytes([l4[0], l4[1]]);
    tuple.dport = u16::from_be_bytes([l4[2], l4[3]]);
    off as i64 | i64::from(tcp_flags) << 16
}

/// The ports of a TCP, UDP or SCTP header at `l4_off` into `tuple`; the TCP
/// flags (0 for the others).
#[inline(always)]
fn parse_l4<P: Packet>(
    pkt: &P,
    l4_off: usize,
    protocol: u8,
    tuple: &mut FlowTuple,
) -> Result<u8, Reason> {
    match protocol {
        proto::IPPROTO_TCP => {
            let tcp: &TcpHdr = header(pkt, l4_off).ok_or(Reason::Malformed)?;
            // A header shorter than its fixed part: the kernel's TCP
            // and conntrack (INVALID, never NATed) refuse it too.
            if tcp.data_offset >> 4 < 5 {
                return Err(Reason::Malformed);
            }
            tuple.sport = u16::from_be_bytes(tcp.source);
            tuple.dport = u16::from_be_bytes(tcp.dest);
            Ok(tcp.flags)
        }
        proto::IPPROTO_UDP => {
            let udp: &UdpHdr = header(pkt, l4_off).ok_or(Reason::Malformed)?;
            tuple.sport = u16::from_be_bytes(udp.source);
            tuple.dport = u16::from_be_bytes(udp.dest);
            Ok(0)
        }
        proto::IPPROTO_SCTP => {
            let sctp: &SctpHdr = header(pkt, l4_off).ok_or(Reason::Malformed)?;
            tuple.sport = u16::from_be_bytes(sctp.source);
            tuple.dport = u16::from_be_bytes(sctp.dest);
            Ok(0)
        }
        _ => Ok(0),
    }
}
