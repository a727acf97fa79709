//! IPv6 frames and checks for the BPF_PROG_TEST_RUN tests: frames built
//! with etherparse (extension headers spliced in by hand), checksums
//! verified by the independent sum in `support`.

use etherparse::PacketBuilder;

use super::{fold, sum16, CLIENT_MAC, SERVER_MAC, TCP_SYN};

/// A 16-byte IPv6 address from its text form.
pub fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>()
        .expect("IPv6 address")
        .octets()
}

/// A socket address from an IPv6 address's text form.
pub fn sa6(s: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from((v6(s), port))
}

/// An Ethernet/IPv6/TCP frame with the given flags, seq/ack and payload.
#[allow(clippy::too_many_arguments)]
pub fn tcp6(
    src: [u8; 16],
    sport: u16,
    dst: [u8; 16],
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv6(src, dst, 64)
        .tcp(sport, dport, seq, 64240);
    super::write_tcp(b, flags, ack, payload)
}

pub fn tcp6_syn(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    tcp6(src, sport, dst, dport, TCP_SYN, 1000, 0, &[])
}

pub fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv6(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

/// Extension header types (RFC 8200).
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DESTINATION_OPTIONS: u8 = 60;

/// An options header (hop-by-hop or destination options) of `len` bytes
/// (a multiple of 8): its next-header byte is filled in by `with_ext`, the
/// rest is PadN.
pub fn options_header(len: usize) -> Vec<u8> {
    assert!(len >= 8 && len.is_multiple_of(8));
    let mut h = vec![0u8; len];
    h[1] = (len / 8 - 1) as u8;
    // PadN over the rest.
    h[2] = 1;
    h[3] = (len - 4) as u8;
    h
}

/// A fragment header with fragment offset `offset` (8-byte units) and the
/// more-fragments flag.
pub fn fragment_header(offset: u16, more: bool) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    h
}

/// `frame` with extension headers `(type, bytes)` inserted, in order,
/// between the IPv6 header and the L4 header (the chain's next-header bytes
/// and the payload length set). The L4 checksum does not cover them.
pub fn with_ext(frame: &[u8], headers: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let l4_proto = frame[20];
    let mut out = frame[..54].to_vec();
    out[20] = headers.first().map_or(l4_proto, |h| h.0);
    for (i, (_, bytes)) in headers.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = headers.get(i + 1).map_or(l4_proto, |n| n.0);
        out.extend_from_slice(&h);
    }
    out.extend_from_slice(&frame[54..]);
    let payload = (out.len() - 54) as u16;
    out[18..20].copy_from_slice(&payload.to_be_bytes());
    out
}

/// A parsed view of an Ethernet/IPv6 frame for assertions, past its
/// extension headers.
#[derive(Debug)]
pub struct Ipv6View<'a> {
    pub frame: &'a [u8],
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
    pub protocol: u8,
}

impl<'a> Ipv6View<'a> {
    pub fn new(frame: &'a [u8]) -> Self {
        assert!(frame.len() >= 54, "frame too short: {frame:?}");
        assert_eq!(&frame[12..14], &[0x86, 0xdd], "IPv6 ethertype");
        assert_eq!(frame[14] >> 4, 6, "IP version 6");
        let mut next = frame[20];
        let mut off = 54;
        while matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DESTINATION_OPTIONS) {
            let len = if next == FRAGMENT {
                8
            } else {
                (usize::from(frame[off + 1]) + 1) * 8
            };
            next = frame[off];
            off += len;
        }
        Ipv6View {
            frame,
            l4_off: off,
            protocol: next,
        }
    }
    pub fn dst_mac(&self) -> [u8; 6] {
        self.frame[0..6].try_into().unwrap()
    }
    pub fn src_mac(&self) -> [u8; 6] {
        self.frame[6..12].try_into().unwrap()
    }
    pub fn payload_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.frame[18], self.frame[19]]))
    }
    pub fn hop_limit(&self) -> u8 {
        self.frame[21]
    }
    pub fn src(&self) -> [u8; 16] {
        self.frame[22..38].try_into().unwrap()
    }
    pub fn dst(&self) -> [u8; 16] {
        self.frame[38..54].try_into().unwrap()
    }
    pub fn l4(&self) -> &'a [u8] {
        &self.frame[self.l4_off..54 + self.payload_len()]
    }
    pub fn sport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[0], self.l4()[1]])
    }
    pub fn dport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[2], self.l4()[3]])
    }
    /// The TCP, UDP or ICMPv6 checksum over the IPv6 pseudo-header (RFC
    /// 8200 8.1: addresses, upper-layer length, next header) and the
    /// message.
    pub fn l4_checksum_ok(&self) -> bool {
        let l4 = self.l4();
        let mut sum = sum16(&self.frame[22..54], 0);
        sum += l4.len() as u32 + u32::from(self.protocol);
        fold(sum16(l4, sum)) == 0xffff
    }
    pub fn tcp_flags(&self) -> u8 {
        self.l4()[13]
    }
    pub fn tcp_seq(&self) -> u32 {
        u32::from_be_bytes(self.l4()[4..8].try_into().unwrap())
    }
    pub fn tcp_ack(&self) -> u32 {
        u32::from_be_bytes(self.l4()[8..12].try_into().unwrap())
    }
    /// Everything after the L4 header (TCP data offset or the UDP header).
    pub fn payload(&self) -> &'a [u8] {
        let l4 = self.l4();
        let hl = if self.protocol == common::proto::IPPROTO_TCP {
            usize::from(l4[12] >> 4) * 4
        } else {
            8
        };
        &l4[hl..]
    }
}

/// A conntrack key from 16-byte addresses.
pub fn ct_key6(
    src: [u8; 16],
    sport: u16,
    dst: [u8; 16],
    dport: u16,
    protocol: u8,
) -> common::CtKey {
    common::CtKey {
        saddr: src,
        daddr: dst,
        sport,
        dport,
        protocol,
        _pad: [0; 3],
    }
}
