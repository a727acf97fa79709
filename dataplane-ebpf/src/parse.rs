//! Bounds-checked header parsing: Ethernet, IPv4, TCP, UDP, SCTP's common
//! header.
//!
//! Header structs have only byte fields (alignment 1): XDP frames put the IPv4
//! header on a 2-byte boundary, so wider fields could be misaligned.

use core::mem::size_of;

use common::{proto, trace::FAMILY_IPV4, FlowTuple, Reason};

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
const IPV4_MIN_HLEN: usize = 20;
const IPV4_MAX_HLEN: usize = 60;
const TCP_MIN_HLEN: usize = 20;
/// Most header bytes the datapath reads: Ethernet, IPv4 with options, TCP.
pub const MAX_HEADERS_LEN: usize = ETH_HLEN + IPV4_MAX_HLEN + TCP_MIN_HLEN;

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
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...).
    NotIpv4,
    Ipv4(Ipv4Packet),
}

pub struct Ipv4Packet {
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// A non-first fragment: it carries no L4 header.
    pub later_fragment: bool,
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
/// record's is: see `zero::set_v4_mapped`; addresses IPv4-mapped; ports
/// zero when not TCP/UDP/SCTP or a later fragment). `Err` is the reason for
/// dropping it.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P, tuple: &mut FlowTuple) -> Result<Parsed, Reason> {
    let eth: &EthHdr = header(pkt, 0).ok_or(Reason::Malformed)?;
    if u16::from_be_bytes(eth.ether_type) != proto::ETH_P_IP {
        return Ok(Parsed::NotIpv4);
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
    let mut tcp_flags = 0;
    if !later_fragment {
        match ip.protocol {
            proto::IPPROTO_TCP => {
                let tcp: &TcpHdr = header(pkt, l4_off).ok_or(Reason::Malformed)?;
                // A header shorter than its fixed part: the kernel's TCP
                // and conntrack (INVALID, never NATed) refuse it too.
                if tcp.data_offset >> 4 < 5 {
                    return Err(Reason::Malformed);
                }
                tuple.sport = u16::from_be_bytes(tcp.source);
                tuple.dport = u16::from_be_bytes(tcp.dest);
                tcp_flags = tcp.flags;
            }
            proto::IPPROTO_UDP => {
                let udp: &UdpHdr = header(pkt, l4_off).ok_or(Reason::Malformed)?;
                tuple.sport = u16::from_be_bytes(udp.source);
                tuple.dport = u16::from_be_bytes(udp.dest);
            }
            proto::IPPROTO_SCTP => {
                let sctp: &SctpHdr = header(pkt, l4_off).ok_or(Reason::Malformed)?;
                tuple.sport = u16::from_be_bytes(sctp.source);
                tuple.dport = u16::from_be_bytes(sctp.dest);
            }
            _ => {}
        }
    }
    Ok(Parsed::Ipv4(Ipv4Packet {
        l4_off,
        protocol: ip.protocol,
        tcp_flags,
        later_fragment,
    }))
}
