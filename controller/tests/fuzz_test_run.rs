//! Hostile packets (issue 22, the fuzzer's first part): random service
//! states and random frames, valid and malformed, through the real tc and
//! XDP programs (BPF_PROG_TEST_RUN). Every packet must keep these
//! properties:
//!
//! 1. exactly one decision is counted at its hook, with a known reason
//!    (the datapath never exits without a verdict);
//! 2. the return value is one the hook allows;
//! 3. a frame that leaves rewritten is whole IPv4 with valid IP and L4
//!    checksums (verified independently here) whenever it came with valid
//!    ones; a reply the datapath builds (REJECT's ICMP, a reset) always;
//! 4. a frame too short for its ports, with an IHL below 5 or a TCP data
//!    offset below 5, or a later fragment, is never translated (it leaves
//!    as it came, is dropped, or is answered).
//!
//! A fixed seed in `cargo xtask test` (`DP_FUZZ_SEED`, `DP_FUZZ_STATES`,
//! `DP_FUZZ_PACKETS` change it; `cargo xtask fuzz` runs a long one). Each
//! failure prints the seed, state and frame to replay it.

mod support;

use std::net::SocketAddr;

use common::{Hook, Reason};
use dp::{
    translate::sync::{BackendSlots, Frontend},
    Datapath, ServiceMaps,
};
use support::*;

/// splitmix64: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const NODE_IP: [u8; 4] = NODE;
const VIPS: [[u8; 4]; 4] = [
    [10, 96, 0, 1],
    [10, 96, 0, 2],
    [10, 96, 0, 3],
    [10, 96, 0, 4],
];
const LB_IPS: [[u8; 4]; 2] = [[192, 0, 2, 1], [192, 0, 2, 2]];
const PORTS: [u16; 3] = [80, 53, 30_080];
const PROTOCOLS: [u8; 3] = [6, 17, 132];

/// One random state: frontends and the backends they use.
struct State {
    frontends: Vec<(Frontend, u32, BackendSlots)>,
    backends: Vec<(u32, [u8; 4])>,
}

fn random_state(rng: &mut Rng) -> State {
    let backends: Vec<(u32, [u8; 4])> = (1..=rng.below(6) as u32 + 1)
        .map(|id| (id, [10, 244, 1 + rng.below(2) as u8, 10 + id as u8]))
        .collect();
    let ids = |rng: &mut Rng| -> Vec<u32> {
        let n = rng.below(4);
        (0..n)
            .map(|_| rng.pick(&backends).0)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let mut frontends = Vec::new();
    for sid in 1..=rng.below(8) as u32 + 1 {
        let (ready, terminating) = (ids(rng), ids(rng));
        let external = rng.chance(40);
        let addr = if !external {
            *rng.pick(&VIPS)
        } else if rng.chance(50) {
            NODE_IP
        } else {
            *rng.pick(&LB_IPS)
        };
        let frontend = Frontend {
            addr: SocketAddr::from((addr, *rng.pick(&PORTS))),
            protocol: *rng.pick(&PROTOCOLS),
        };
        if frontends.iter().any(|(f, _, _)| *f == frontend) {
            continue;
        }
        // As the translator writes them: an eTP=Local external frontend
        // has its cluster-wide set (`internal`) and may be local-only;
        // eTP=Cluster ones neither; a ClusterIP may be local-only (iTP).
        let etp_local = external && rng.chance(40);
        let internal = etp_local.then(|| (ids(rng), ids(rng)));
        let source_ranges = if external && rng.chance(30) {
            vec![(std::net::Ipv4Addr::new(203, 0, 113, 0).into(), 24)]
        } else {
            Vec::new()
        };
        let slots = BackendSlots {
            ready,
            terminating,
            local_only: (etp_local || !external) && rng.chance(30),
            external,
            internal,
            affinity_seconds: rng.chance(20).then_some(10_800),
            source_ranges,
        };
        frontends.push((frontend, sid, slots));
    }
    State {
        frontends,
        backends,
    }
}

fn program(dp: &mut Datapath, state: &State, last: Option<&State>) {
    if let Some(last) = last {
        for (f, _, _) in &last.frontends {
            dp.remove_service(f).unwrap();
        }
        for (id, _) in &last.backends {
            dp.remove_backend(*id).unwrap();
        }
    }
    for (id, ip) in &state.backends {
        dp.set_backend(*id, SocketAddr::from((*ip, 8080)), 6, false)
            .unwrap();
    }
    for (f, sid, slots) in &state.frontends {
        dp.set_service(f, *sid, slots).unwrap();
    }
}

/// What was done to a valid frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mutation {
    None,
    /// Cut inside the L4 header.
    TruncatedHeader,
    /// Cut in the payload: the IP total length exceeds the frame.
    TruncatedPayload,
    IhlBelow5,
    IpOptions,
    TotalLengthTooShort,
    FirstFragment,
    LaterFragment,
    BadIpChecksum,
    BadL4Checksum,
    TcpDataOffsetBelow5,
}

impl Mutation {
    /// Property 4: such a frame (of `len` bytes) is never rewritten.
    fn must_not_rewrite(self, len: usize) -> bool {
        // Shorter than the ports of a 20-byte IP header.
        let no_ports = len < 14 + 20 + 4;
        (self == Mutation::TruncatedHeader && no_ports)
            || matches!(
                self,
                Mutation::IhlBelow5 | Mutation::LaterFragment | Mutation::TcpDataOffsetBelow5
            )
    }

    /// Property 3 applies: the frame came with valid checksums.
    fn checksums_valid(self) -> bool {
        !matches!(
            self,
            Mutation::BadIpChecksum
                | Mutation::BadL4Checksum
                | Mutation::TruncatedHeader
                | Mutation::TruncatedPayload
                | Mutation::IhlBelow5
                | Mutation::TotalLengthTooShort
                | Mutation::TcpDataOffsetBelow5
        )
    }
}

/// A flow the datapath forwarded: the frame as it left (addresses and
/// ports after translation), to send the backend's reply or more of the
/// same flow.
#[derive(Clone, Copy, Debug)]
struct Forwarded {
    client: ([u8; 4], u16),
    service: ([u8; 4], u16),
    backend: ([u8; 4], u16),
    protocol: u8,
}

/// A frame, what was done to it, and whether it belongs to a flow already
/// forwarded.
fn random_frame(rng: &mut Rng, state: &State, flows: &[Forwarded]) -> (Vec<u8>, Mutation, bool) {
    // A third of the time, a packet of a flow already forwarded: the
    // backend's reply (reverse NAT) or the client's next one (established).
    if !flows.is_empty() && rng.chance(33) {
        let f = *rng.pick(flows);
        let ((src, sport), (dst, dport)) = if rng.chance(60) {
            (f.backend, f.client)
        } else {
            (f.client, f.service)
        };
        let payload = vec![0x42; rng.below(32) as usize];
        let frame = match f.protocol {
            6 => tcp(src, sport, dst, dport, TCP_ACK, 7, 9, &payload),
            17 => udp(src, sport, dst, dport, &payload),
            _ => sctp_init(src, sport, dst, dport, 4),
        };
        return (frame, Mutation::None, true);
    }
    let backend = state.backends.first().map_or([10, 244, 2, 10], |b| b.1);
    let src = *rng.pick(&[
        [10, 244, 1, 5],
        [10, 244, 2, 6],
        backend,
        NODE_IP,
        [203, 0, 113, 9],
        [198, 51, 100, 4],
    ]);
    let (dst, dport) = match state
        .frontends
        .get(rng.below(state.frontends.len() as u64 + 2) as usize)
    {
        Some((f, _, _)) if rng.chance(85) => {
            let std::net::IpAddr::V4(ip) = f.addr.ip() else {
                unreachable!()
            };
            let port = if rng.chance(85) {
                f.addr.port()
            } else {
                *rng.pick(&PORTS)
            };
            (ip.octets(), port)
        }
        _ => (
            *rng.pick(&[VIPS[0], [10, 96, 0, 200], [8, 8, 8, 8], NODE_IP, LB_IPS[1]]),
            rng.below(65_536) as u16,
        ),
    };
    let sport = 1024 + rng.below(60_000) as u16;
    let payload = vec![0x5a; rng.below(64) as usize];
    let mut frame = match rng.below(7) {
        0..=2 => {
            let flags = *rng.pick(&[
                TCP_SYN,
                TCP_ACK,
                TCP_SYN | TCP_ACK,
                TCP_RST,
                TCP_FIN | TCP_ACK,
                TCP_PSH | TCP_ACK,
                0,
                0x3f,
                TCP_SYN | TCP_FIN,
            ]);
            tcp(
                src,
                sport,
                dst,
                dport,
                flags,
                rng.next() as u32,
                rng.next() as u32,
                &payload,
            )
        }
        3 | 4 => udp(src, sport, dst, dport, &payload),
        5 => sctp_init(src, sport, dst, dport, rng.below(32) as usize),
        _ => {
            // ICMP: an echo request, or a port unreachable quoting a flow.
            let mut b =
                etherparse::PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC).ipv4(src, dst, 64);
            let mut out = Vec::new();
            if rng.chance(50) {
                b.icmpv4_echo_request(1, 1)
                    .write(&mut out, &payload)
                    .unwrap();
            } else {
                let quoted = udp(dst, dport, src, sport, b"q");
                b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC).ipv4(src, dst, 64);
                b.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                ))
                .write(&mut out, &quoted[14..])
                .unwrap();
            }
            out
        }
    };
    let mutation = if rng.chance(60) {
        Mutation::None
    } else {
        *rng.pick(&[
            Mutation::TruncatedHeader,
            Mutation::TruncatedPayload,
            Mutation::IhlBelow5,
            Mutation::IpOptions,
            Mutation::TotalLengthTooShort,
            Mutation::FirstFragment,
            Mutation::LaterFragment,
            Mutation::BadIpChecksum,
            Mutation::BadL4Checksum,
            Mutation::TcpDataOffsetBelow5,
        ])
    };
    let l4 = 14 + 20;
    let mutation = match mutation {
        Mutation::TruncatedHeader => {
            // Inside the L4 header. (BPF_PROG_TEST_RUN refuses an IPv4
            // frame shorter than an IP header.)
            frame.truncate(l4 + rng.below(20) as usize);
            mutation
        }
        Mutation::TruncatedPayload if frame.len() > l4 + 8 => {
            let keep = l4 + 8 + rng.below((frame.len() - l4 - 8) as u64) as usize;
            frame.truncate(keep);
            mutation
        }
        Mutation::IhlBelow5 => {
            frame[14] = 0x40 | rng.below(5) as u8;
            fix_ipv4_checksum_raw(&mut frame);
            mutation
        }
        Mutation::IpOptions => {
            let words = 1 + rng.below(10) as usize;
            let options = vec![1u8; words * 4]; // NOPs
            frame.splice(l4..l4, options);
            frame[14] = 0x40 | (5 + words) as u8;
            let tot = (frame.len() - 14) as u16;
            frame[16..18].copy_from_slice(&tot.to_be_bytes());
            fix_ipv4_checksum(&mut frame);
            mutation
        }
        Mutation::TotalLengthTooShort => {
            let tot = rng.below(20) as u16;
            frame[16..18].copy_from_slice(&tot.to_be_bytes());
            fix_ipv4_checksum(&mut frame);
            mutation
        }
        Mutation::FirstFragment => {
            frame[20] |= 0x20; // MF, offset 0
            fix_ipv4_checksum(&mut frame);
            mutation
        }
        Mutation::LaterFragment => {
            let offset = 1 + rng.below(0x1fff) as u16;
            frame[20..22].copy_from_slice(&offset.to_be_bytes());
            fix_ipv4_checksum(&mut frame);
            mutation
        }
        Mutation::BadIpChecksum => {
            frame[24] ^= 0x5a;
            mutation
        }
        Mutation::BadL4Checksum => {
            let at = match frame[23] {
                6 => l4 + 16,
                17 => l4 + 6,
                1 => l4 + 2,
                _ => l4 + 8,
            };
            if at + 1 < frame.len() {
                frame[at] ^= 0xa5;
                frame[at + 1] ^= 0x01;
            }
            mutation
        }
        Mutation::TcpDataOffsetBelow5 if frame[23] == 6 => {
            frame[l4 + 12] = (rng.below(5) as u8) << 4;
            mutation
        }
        _ => Mutation::None,
    };
    (frame, mutation, false)
}

/// `fix_ipv4_checksum` for a header length that may be out of range.
fn fix_ipv4_checksum_raw(frame: &mut [u8]) {
    let ihl = (usize::from(frame[14] & 0x0f) * 4).clamp(0, frame.len() - 14);
    if ihl >= 12 {
        frame[24] = 0;
        frame[25] = 0;
        let sum = !fold(sum16(&frame[14..14 + ihl], 0));
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
    }
}

/// Property 3: a rewritten frame is whole IPv4 with valid checksums.
fn rewritten_frame_is_valid(out: &[u8]) -> Result<(), String> {
    if out.len() < 34 || out[12..14] != [0x08, 0x00] || out[14] >> 4 != 4 {
        return Err("not an IPv4 frame".into());
    }
    let v = Ipv4View::new(out);
    if v.ihl < 20 || 14 + v.tot_len() > out.len() || v.tot_len() < v.ihl {
        return Err(format!(
            "IHL {} / total length {} / frame {}",
            v.ihl,
            v.tot_len(),
            out.len()
        ));
    }
    if !v.ip_checksum_ok() {
        return Err("IP checksum".into());
    }
    let ok = match v.protocol() {
        6 | 17 => v.l4_checksum_ok(),
        1 => v.icmp_checksum_ok(),
        132 => v.sctp_checksum_ok(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("L4 checksum (protocol {})", v.protocol()))
    }
}

/// What kube-proxy's rules do with the first packet of a new flow at a
/// node device's ingress, from the programmed state alone (written here
/// from kube-proxy's semantics, docs/deploy.md and the rule reference, not
/// from the datapath's code).
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Pass,
    Reject,
    Drop,
    /// To one of these backends, masqueraded to the node address or not.
    Forward {
        backends: Vec<[u8; 4]>,
        masquerade: bool,
    },
}

const CLUSTER_CIDR: ([u8; 4], u8) = ([10, 244, 0, 0], 16);

fn in_cidr(ip: [u8; 4], (net, len): ([u8; 4], u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from_be_bytes(ip) & mask == u32::from_be_bytes(net) & mask
}

fn model(state: &State, src: [u8; 4], dst: [u8; 4], dport: u16, protocol: u8) -> Expected {
    let address = |f: &Frontend| match f.addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets(),
        _ => unreachable!(),
    };
    let Some((_, _, slots)) = state
        .frontends
        .iter()
        .find(|(f, _, _)| address(f) == dst && f.addr.port() == dport && f.protocol == protocol)
    else {
        // A ClusterIP on a port it does not serve: rejected (nftables
        // mode's cluster-ips check). Anything else is not a service's.
        let cluster_ip = state
            .frontends
            .iter()
            .any(|(f, _, s)| address(f) == dst && !s.external);
        return if cluster_ip {
            Expected::Reject
        } else {
            Expected::Pass
        };
    };
    let from_pod = in_cidr(src, CLUSTER_CIDR);
    let from_node = src == NODE_IP;
    // loadBalancerSourceRanges: the firewall chain drops the rest.
    if !slots.source_ranges.is_empty()
        && !slots.source_ranges.iter().any(|(net, len)| match net {
            std::net::IpAddr::V4(net) => in_cidr(src, (net.octets(), *len)),
            std::net::IpAddr::V6(_) => false,
        })
    {
        return Expected::Drop;
    }
    // eTP=Local external frontends: pods and the node itself use the
    // cluster-wide endpoints.
    let (ready, terminating, cluster_wide) = match &slots.internal {
        Some((r, t)) if from_pod || from_node => (r, t, true),
        _ => (&slots.ready, &slots.terminating, false),
    };
    let eligible = if ready.is_empty() { terminating } else { ready };
    if eligible.is_empty() {
        return if slots.local_only && !cluster_wide {
            Expected::Drop
        } else {
            Expected::Reject
        };
    }
    let backends: Vec<[u8; 4]> = eligible
        .iter()
        .map(|id| state.backends.iter().find(|(b, _)| b == id).unwrap().1)
        .collect();
    let masquerade = if slots.external {
        // eTP=Cluster: always; eTP=Local (a cluster-wide set is
        // programmed): only the node's own traffic.
        slots.internal.is_none() || from_node
    } else {
        !from_pod
    };
    Expected::Forward {
        backends,
        masquerade,
    }
}

/// Whether what `hook` did with a first packet is what the model expects.
/// tc carries every decision out itself. XDP carries out what leaves by the
/// device it came in on (`XDP_TX`) and drops; it leaves rejects to tc
/// untouched (`xdp_pass_to_tc`), and a new flow it cannot send it still
/// decides (tracked, counted as forwarded) and passes untouched: then the
/// conntrack entry it made says which backend and whether masqueraded.
#[allow(clippy::too_many_arguments)]
fn agrees(
    dp: &Datapath,
    state: &State,
    hook: Hook,
    expected: &Expected,
    reason: Reason,
    ret: u32,
    frame: &[u8],
    out: &[u8],
) -> bool {
    let xdp = hook == Hook::Xdp;
    let (pass, drop) = if xdp {
        (XDP_PASS, XDP_DROP)
    } else {
        (TC_ACT_OK, TC_ACT_SHOT)
    };
    let v = Ipv4View::new(frame);
    // Masqueraded (or hairpin): from the node; else the client's own.
    let source_ok = |src: [u8; 4], backend: [u8; 4], masquerade: bool| {
        if masquerade || backend == v.src() {
            src == NODE_IP
        } else {
            src == v.src()
        }
    };
    match expected {
        Expected::Pass => ret == pass && out == frame,
        Expected::Reject if xdp => ret == XDP_PASS && out == frame && reason == Reason::XdpPassToTc,
        Expected::Reject => matches!(reason, Reason::NoEndpoints | Reason::PortNotServed),
        Expected::Drop => ret == drop,
        Expected::Forward {
            backends,
            masquerade,
        } => {
            let new_flow = matches!(
                reason,
                Reason::NewFlow | Reason::NewFlowAffinity | Reason::NoRouteToBackend
            );
            if xdp && ret == XDP_PASS {
                // Decided here, carried out by tc: the entry says how.
                let Some(e) = ct_get(
                    dp,
                    &ct_key(v.src(), v.sport(), v.dst(), v.dport(), v.protocol()),
                ) else {
                    return false;
                };
                let Some(backend) = state.backends.iter().find(|(id, _)| *id == e.backend_id)
                else {
                    return false;
                };
                let snat = e.flags & common::ct::CT_FLAG_SNAT != 0;
                let src = if snat {
                    e.nat_addr[12..].try_into().unwrap()
                } else {
                    v.src()
                };
                new_flow
                    && out == frame
                    && backends.contains(&backend.1)
                    && source_ok(src, backend.1, *masquerade)
            } else {
                let o = Ipv4View::new(out);
                new_flow
                    && backends.contains(&o.dst())
                    && o.dport() == 8080
                    && source_ok(o.src(), o.dst(), *masquerade)
            }
        }
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_states_and_hostile_frames_keep_the_datapath_properties() {
    let seed = env_or("DP_FUZZ_SEED", 21);
    let states = env_or("DP_FUZZ_STATES", 100);
    let per_state = env_or("DP_FUZZ_PACKETS", 10_000) / states.max(1);
    let mut rng = Rng(seed);
    let mut dp = load_node();
    // Replies are what is being checked: no budget in the way.
    dp.set_reply_limit(0, 1).unwrap();
    let mut last: Option<State> = None;
    let mut runs = 0u64;
    let mut by_reason: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut rewritten = 0u64;
    let mut flows: Vec<Forwarded> = Vec::new();
    let (mut modelled, mut disagreements) = (0u64, 0u64);
    let mut modelled_at: std::collections::BTreeMap<Hook, u64> = Default::default();
    for s in 0..states {
        let state = random_state(&mut rng);
        program(&mut dp, &state, last.as_ref());
        for p in 0..per_state {
            let (frame, mutation, replayed) = random_frame(&mut rng, &state, &flows);
            let hook = *rng.pick(&[Hook::TcIngress, Hook::TcEgress, Hook::Xdp]);
            let replay = || {
                format!(
                    "seed {seed}, state {s}, packet {p}, {hook:?}, {mutation:?}\nfrontends: {:?}\nframe: {frame:02x?}",
                    state.frontends
                )
            };
            if std::env::var_os("DP_FUZZ_DEBUG").is_some() {
                eprintln!("run {hook:?} {mutation:?} len {}", frame.len());
            }
            // A random tuple may repeat one tracked earlier: then it is no
            // new flow (conntrack outlives states, as on a node).
            let tracked_before = mutation == Mutation::None && frame.len() >= 38 && {
                let v = Ipv4View::new(&frame);
                ct_get(
                    &dp,
                    &ct_key(v.src(), v.sport(), v.dst(), v.dport(), v.protocol()),
                )
                .is_some()
            };
            let before = dp.counters().unwrap();
            let (ret, out) = run(&dp, hook, &frame);
            let after = dp.counters().unwrap();
            runs += 1;
            // 1. One decision, a known reason.
            let decided: Vec<(Reason, u64)> = after
                .by_reason
                .iter()
                .filter(|((h, _), _)| *h == hook)
                .filter_map(|((_, r), c)| {
                    let was = before.packets(hook, *r);
                    (c.packets != was).then_some((*r, c.packets - was))
                })
                .collect();
            assert!(
                decided.len() == 1 && decided[0].1 == 1,
                "not one decision: {decided:?}\n{}",
                replay()
            );
            *by_reason.entry(decided[0].0.id()).or_default() += 1;
            // 5. The decision for a new flow at a node device's ingress (tc
            // or XDP) is kube-proxy's (the model's), for first packets only.
            if hook != Hook::TcEgress && mutation == Mutation::None && !replayed {
                let v = Ipv4View::new(&frame);
                let first = match v.protocol() {
                    6 => v.tcp_flags() == TCP_SYN,
                    17 | 132 => true,
                    _ => false,
                } && !tracked_before;
                if first {
                    let expected = model(&state, v.src(), v.dst(), v.dport(), v.protocol());
                    let reason = decided[0].0;
                    let agrees = agrees(&dp, &state, hook, &expected, reason, ret, &frame, &out);
                    disagreements += u64::from(!agrees);
                    assert!(
                        agrees,
                        "the datapath disagrees with the model: expected {expected:?}, got {reason:?} (return {ret})\nout: {out:02x?}\n{}",
                        replay()
                    );
                    modelled += 1;
                    *modelled_at.entry(hook).or_default() += 1;
                }
            }
            // 2. A return value the hook has.
            let allowed: &[u32] = match hook {
                Hook::Xdp => &[XDP_DROP, XDP_PASS, XDP_TX, 4],
                _ => &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
            };
            assert!(allowed.contains(&ret), "return {ret}\n{}", replay());
            let dropped =
                ret == TC_ACT_SHOT && hook != Hook::Xdp || ret == XDP_DROP && hook == Hook::Xdp;
            if dropped || out == frame {
                continue;
            }
            rewritten += 1;
            let reason = decided[0].0;
            if matches!(reason, Reason::NewFlow | Reason::NewFlowAffinity)
                && mutation == Mutation::None
                && flows.len() < 64
            {
                let (i, o) = (Ipv4View::new(&frame), Ipv4View::new(&out));
                flows.push(Forwarded {
                    client: (o.src(), o.sport()),
                    service: (i.dst(), i.dport()),
                    backend: (o.dst(), o.dport()),
                    protocol: i.protocol(),
                });
            }
            // A reply the datapath built (REJECT's ICMP, a reset) is a new
            // packet: valid whatever the frame it answers.
            let reply = matches!(
                reason,
                Reason::NoEndpoints | Reason::PortNotServed | Reason::BackendGoneReset
            );
            // 4. Malformed frames are not translated.
            assert!(
                reply || !mutation.must_not_rewrite(frame.len()),
                "a malformed frame was translated ({reason:?})\nout: {out:02x?}\n{}",
                replay()
            );
            // 3. What leaves rewritten is valid.
            if reply || mutation.checksums_valid() {
                if let Err(e) = rewritten_frame_is_valid(&out) {
                    panic!(
                        "rewritten frame invalid: {e} ({reason:?})\nout: {out:02x?}\n{}",
                        replay()
                    );
                }
            }
        }
        last = Some(state);
        flows.clear();
    }
    eprintln!("fuzz: seed {seed}, {states} states, {runs} frames, {rewritten} rewritten, {modelled} new flows compared with the model ({modelled_at:?}; {disagreements} disagreements); by reason: {by_reason:?}");
    assert!(
        modelled > runs / 20,
        "too few new flows compared: {modelled}"
    );
    assert!(runs >= states * per_state);
}
