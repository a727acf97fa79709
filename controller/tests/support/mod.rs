//! Frames and checks shared by the BPF_PROG_TEST_RUN tests: frames are built
//! with etherparse, checksums verified by an independent one's-complement sum.
#![allow(dead_code)]

pub mod agents;
pub mod ipv6;

use aya::programs::{TestRun, TestRunOptions};
use common::Hook;
use dp::Datapath;
use etherparse::PacketBuilder;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

pub use common::proto::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};

pub fn load() -> Datapath {
    e2e::require_root();
    Datapath::load().expect("load the dp object")
}

/// The node the test-run files configure: 172.18.0.2 in cluster CIDR
/// 10.244.0.0/16.
pub const NODE: [u8; 4] = [172, 18, 0, 2];

/// A datapath configured as `NODE`.
pub fn load_node() -> Datapath {
    let mut dp = load();
    dp.set_node(
        std::net::IpAddr::from(NODE),
        Some((std::net::IpAddr::from([10, 244, 0, 0]), 16)),
        false,
    )
    .unwrap();
    dp
}

/// An Ethernet/IPv4/TCP frame with the given flags, seq/ack and payload.
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 64240);
    write_tcp(b, flags, ack, payload)
}

/// A TCP frame from a builder, with the given flags, ack and payload.
pub fn write_tcp(
    mut b: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    flags: u8,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    if flags & TCP_SYN != 0 {
        b = b.syn();
    }
    if flags & TCP_ACK != 0 {
        b = b.ack(ack);
    }
    if flags & TCP_FIN != 0 {
        b = b.fin();
    }
    if flags & TCP_RST != 0 {
        b = b.rst();
    }
    if flags & TCP_PSH != 0 {
        b = b.psh();
    }
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

pub fn tcp_syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    tcp(src, sport, dst, dport, TCP_SYN, 1000, 0, &[])
}

pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

/// A UDP frame whose checksum is 0 ("no checksum", allowed for IPv4).
pub fn udp_no_checksum(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = udp(src, sport, dst, dport, payload);
    f[40] = 0;
    f[41] = 0;
    f
}

/// Recomputes the IPv4 header checksum of a frame (header at offset 14).
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24] = 0;
    frame[25] = 0;
    let sum = !fold(sum16(&frame[14..14 + ihl], 0));
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// Runs `frame` through the program at `hook`: (return value, output frame).
/// The run happens in an empty network namespace (`in_empty_netns`), so the
/// program's FIB lookups find no route and a packet it would send on is
/// left to the stack (`TC_ACT_OK`), whatever the machine's own routes are;
/// tests of where packets are sent use `run_tc_on` in a namespace of theirs.
pub fn run(dp: &Datapath, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
    in_empty_netns(|| {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = match hook {
            Hook::Xdp => dp.xdp_program().unwrap().test_run(opts),
            _ => dp.tc_program(hook).unwrap().test_run(opts),
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    })
}

/// Runs `f` on a thread inside a network namespace of this test process's
/// own: unnamed, empty (only a loopback device that is down), gone with the
/// process.
pub fn in_empty_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::{AsRawFd, OwnedFd};
    static NETNS: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    let ns = NETNS.get_or_init(|| {
        std::thread::spawn(|| {
            // SAFETY: affects only this thread, which ends right after.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
        })
        .join()
        .unwrap()
    });
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a network namespace fd; this thread only.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns into the empty namespace");
                f()
            })
            .join()
            .unwrap()
    })
}

/// Runs `frame` through the tc program at `hook` as if it came through
/// `ifname` in `ns` (the run happens in that namespace, so FIB lookups see
/// its routes and neighbours): (return value, output frame).
pub fn run_tc_on(
    dp: &Datapath,
    hook: Hook,
    ns: &e2e::Netns,
    ifname: &str,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    // struct __sk_buff up to and including ifindex (offset 40).
    let ctx = |ifindex: u32| {
        let mut ctx = vec![0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        ctx
    };
    run_in(ns, ifname, frame, ctx, |opts| {
        dp.tc_program(hook).unwrap().test_run(opts)
    })
}

/// Runs a program on `frame` in `ns` with the context `ctx(ifindex of
/// ifname)`: (return value, output frame). Always on CPU 0, so per-CPU
/// state (the decision record) carries from one run to the next as it does
/// on a busy CPU.
fn run_in(
    ns: &e2e::Netns,
    ifname: &str,
    frame: &[u8],
    ctx: impl FnOnce(u32) -> Vec<u8> + Send,
    test_run: impl FnOnce(TestRunOptions) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>
        + Send,
) -> (u32, Vec<u8>) {
    ns.run(|| {
        // SAFETY: a zeroed cpu set with CPU 0 in it; this thread only.
        unsafe {
            let mut cpus: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut cpus);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &cpus),
                0
            );
        }
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "{ifname} exists in {}", ns.name());
        let ctx = ctx(ifindex);
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        };
        let result = test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    })
    .expect("enter the namespace")
}

pub fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
    }
    sum
}

pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A parsed view of an Ethernet/IPv4 frame for assertions.
#[derive(Debug)]
pub struct Ipv4View<'a> {
    pub frame: &'a [u8],
    pub ihl: usize,
}

impl<'a> Ipv4View<'a> {
    pub fn new(frame: &'a [u8]) -> Self {
        assert!(frame.len() >= 34, "frame too short: {frame:?}");
        assert_eq!(&frame[12..14], &[0x08, 0x00], "IPv4 ethertype");
        Ipv4View {
            frame,
            ihl: usize::from(frame[14] & 0x0f) * 4,
        }
    }
    pub fn dst_mac(&self) -> [u8; 6] {
        self.frame[0..6].try_into().unwrap()
    }
    pub fn src_mac(&self) -> [u8; 6] {
        self.frame[6..12].try_into().unwrap()
    }
    pub fn protocol(&self) -> u8 {
        self.frame[23]
    }
    pub fn src(&self) -> [u8; 4] {
        self.frame[26..30].try_into().unwrap()
    }
    pub fn dst(&self) -> [u8; 4] {
        self.frame[30..34].try_into().unwrap()
    }
    pub fn tot_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.frame[16], self.frame[17]]))
    }
    pub fn l4(&self) -> &'a [u8] {
        &self.frame[14 + self.ihl..14 + self.tot_len()]
    }
    pub fn sport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[0], self.l4()[1]])
    }
    pub fn dport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[2], self.l4()[3]])
    }
    pub fn ip_checksum_ok(&self) -> bool {
        fold(sum16(&self.frame[14..14 + self.ihl], 0)) == 0xffff
    }
    /// TCP or UDP checksum over the pseudo header (UDP 0 = none: true).
    pub fn l4_checksum_ok(&self) -> bool {
        let l4 = self.l4();
        if self.protocol() == 17 && l4[6] == 0 && l4[7] == 0 {
            return true;
        }
        let mut sum = sum16(&self.frame[26..34], 0);
        sum += u32::from(self.protocol()) + l4.len() as u32;
        fold(sum16(l4, sum)) == 0xffff
    }
    pub fn udp_checksum(&self) -> u16 {
        u16::from_be_bytes([self.l4()[6], self.l4()[7]])
    }
    /// ICMP checksum over the whole ICMP message.
    pub fn icmp_checksum_ok(&self) -> bool {
        fold(sum16(self.l4(), 0)) == 0xffff
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
        let hl = if self.protocol() == common::proto::IPPROTO_TCP {
            usize::from(l4[12] >> 4) * 4
        } else {
            8
        };
        &l4[hl..]
    }
}

pub const XDP_TX: u32 = 3;

/// Runs `frame` through the XDP program as if received on `ifname` in `ns`
/// (the test run happens in that namespace, so the program's FIB lookups see
/// its routes and neighbours): (return value, output frame).
pub fn run_xdp_on(dp: &Datapath, ns: &e2e::Netns, ifname: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex.
    let len = frame.len() as u32;
    let ctx = move |ifindex: u32| {
        let md: [u32; 6] = [0, len, 0, ifindex, 0, 0];
        md.iter().flat_map(|w| w.to_ne_bytes()).collect()
    };
    run_in(ns, ifname, frame, ctx, |opts| {
        dp.xdp_program().unwrap().test_run(opts)
    })
}

/// A conntrack key from plain IPv4 addresses.
pub fn ct_key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, protocol: u8) -> common::CtKey {
    common::CtKey {
        saddr: common::addr::v4_mapped(src),
        daddr: common::addr::v4_mapped(dst),
        sport,
        dport,
        protocol,
        _pad: [0; 3],
    }
}

/// The conntrack entry at `key`, if any.
pub fn ct_get(dp: &Datapath, key: &common::CtKey) -> Option<common::CtEntry> {
    dp.ct_lookup(key).unwrap()
}

/// Runs at tc ingress and checks it was forwarded with valid checksums.
pub fn forward(dp: &Datapath, frame: &[u8]) -> Vec<u8> {
    let (ret, out) = run(dp, Hook::TcIngress, frame);
    assert_eq!(ret, TC_ACT_OK, "forwarded");
    let v = Ipv4View::new(&out);
    assert!(v.ip_checksum_ok(), "IP checksum");
    assert!(v.l4_checksum_ok(), "L4 checksum");
    out
}

/// A socket address from plain IPv4 octets.
pub fn sa(ip: [u8; 4], port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from((ip, port))
}

/// CRC32c bit by bit (RFC 9260 appendix A), independent of the datapath's
/// incremental update: initial value and final inversion all ones.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An Ethernet/IPv4/SCTP frame: the common header (verification tag
/// `vtag`) and one chunk of `chunk_type` with `body` (padded to 4 bytes),
/// the CRC32c filled in (little-endian, as Linux writes it).
pub fn sctp(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    vtag: u32,
    chunk_type: u8,
    body: &[u8],
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&vtag.to_be_bytes());
    l4.extend_from_slice(&[0; 4]);
    l4.push(chunk_type);
    l4.push(0);
    l4.extend_from_slice(&((4 + body.len()) as u16).to_be_bytes());
    l4.extend_from_slice(body);
    while l4.len() % 4 != 0 {
        l4.push(0);
    }
    let sum = crc32c(&l4);
    l4[8..12].copy_from_slice(&sum.to_le_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&SERVER_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, common::proto::IPPROTO_SCTP, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&l4);
    fix_ipv4_checksum(&mut f);
    f
}

/// An SCTP INIT (chunk type 1) with `body` bytes of parameters.
pub fn sctp_init(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, body_len: usize) -> Vec<u8> {
    let mut body = vec![0u8; 16];
    body[0..4].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // initiate tag
    body[4..8].copy_from_slice(&65_536u32.to_be_bytes()); // a_rwnd
    body[8..10].copy_from_slice(&10u16.to_be_bytes()); // outbound streams
    body[10..12].copy_from_slice(&10u16.to_be_bytes()); // inbound streams
    body[12..16].copy_from_slice(&1u32.to_be_bytes()); // initial TSN
    body.resize(16 + body_len, 0xab);
    sctp(src, sport, dst, dport, 0, 1, &body)
}

impl Ipv4View<'_> {
    /// The SCTP packet's CRC32c as stored equals one computed afresh.
    pub fn sctp_checksum_ok(&self) -> bool {
        let mut l4 = self.l4().to_vec();
        let stored = u32::from_le_bytes(l4[8..12].try_into().unwrap());
        l4[8..12].fill(0);
        stored == crc32c(&l4)
    }
}
