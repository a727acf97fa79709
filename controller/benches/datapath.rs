//! Per-packet cost of the tc program, measured by the kernel
//! (BPF_PROG_TEST_RUN): each iteration runs the program once on a fresh copy
//! of the frame, and the kernel's own measurement of that run is summed, so
//! the syscall around it is not counted. Side by side in one run: a no-op
//! program (the floor), pass-through (no service), a conntrack hit, a reply
//! (reverse NAT) and a new flow, with 1 and with 100 000 services loaded;
//! the same four over IPv6 (`ipv6_*`, a dual-stack service 0).
//!
//! Run as root: `cargo xtask bench` (see BENCHMARKS.md).

use std::{net::SocketAddr, time::Duration};

use aya::programs::SchedClassifier;
use common::Hook;
#[path = "shared/test_run.rs"]
mod test_run;
use test_run::run_once;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dp::{BackendSlots, Datapath, Frontend, MapSizes, ServiceMaps};
use etherparse::PacketBuilder;

const CLIENT: [u8; 4] = [10, 244, 1, 5];
const VIP: [u8; 4] = [10, 96, 0, 10];
const BACKEND: [u8; 4] = [10, 244, 2, 7];
const ELSEWHERE: [u8; 4] = [10, 244, 3, 3];

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// The IPv6 side: kind's dual-stack ranges.
const CLIENT6: &str = "fd00:10:244:1::5";
const VIP6: &str = "fd00:10:96::10";
const BACKEND6: &str = "fd00:10:244:2::7";
const ELSEWHERE6: &str = "fd00:10:244:3::3";

/// The IPv6 `frame`: the same TCP segment and payload.
fn frame6(src: &str, sport: u16, dst: &str, dport: u16, ack: bool) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(v6(src), v6(dst), 64)
        .tcp(sport, dport, 1000, 64240);
    b = if ack { b.ack(1) } else { b.syn() };
    let mut v = Vec::new();
    b.write(&mut v, &[0u8; 64]).unwrap();
    v
}

fn frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, ack: bool) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    b = if ack { b.ack(1) } else { b.syn() };
    let mut v = Vec::new();
    b.write(&mut v, &[0u8; 64]).unwrap();
    v
}

/// A datapath with `services` TCP services of 2 backends each (4 map entries
/// each: master, 2 slots, wildcard); service 0 is
/// VIP:80 -> BACKEND:8080, and [VIP6]:80 -> [BACKEND6]:8080 its IPv6 side.
fn datapath(services: u32) -> Datapath {
    let mut dp = Datapath::load_with(MapSizes {
        services: 4 * services.max(1024) + 1024,
        backends: 2 * services.max(1024) + 1024,
        revnat: services.max(1024) + 1024,
        conntrack: 262_144,
        affinity: common::map_sizes::AFFINITY,
    })
    .expect("load (run as root)");
    dp.set_backend(1, SocketAddr::from((BACKEND, 8080)), 6, false)
        .unwrap();
    dp.set_service(
        &Frontend::tcp(SocketAddr::from((VIP, 80))),
        1,
        &BackendSlots {
            ready: vec![1],
            terminating: vec![],
            local_only: false,
            ..BackendSlots::default()
        },
    )
    .unwrap();
    dp.set_backend(2, SocketAddr::from((v6(BACKEND6), 8080)), 6, false)
        .unwrap();
    dp.set_service(
        &Frontend::tcp(SocketAddr::from((v6(VIP6), 80))),
        services + 1,
        &BackendSlots {
            ready: vec![2],
            ..BackendSlots::default()
        },
    )
    .unwrap();
    for i in 1..services {
        let vip = [10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
        let ids = [2 * i + 3, 2 * i + 4];
        for (n, id) in ids.iter().enumerate() {
            let backend = SocketAddr::from(([10, 250, (i >> 8) as u8, i as u8], 8080 + n as u16));
            dp.set_backend(*id, backend, 6, false).unwrap();
        }
        let slots = BackendSlots {
            ready: ids.to_vec(),
            terminating: vec![],
            local_only: false,
            ..BackendSlots::default()
        };
        dp.set_service(&Frontend::tcp(SocketAddr::from((vip, 80))), i + 1, &slots)
            .unwrap();
    }
    dp
}

fn per_packet(c: &mut Criterion) {
    e2e::require_root();
    let mut group = c.benchmark_group("tc_per_packet");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    let mut out = vec![0u8; 512];
    for services in [1u32, 100_000] {
        let mut dp = datapath(services);
        let tc = dp.tc_program(Hook::TcIngress).unwrap();
        let noop = dp.noop_program().unwrap();
        let established = frame(CLIENT, 40000, VIP, 80, true);
        run_once(tc, &frame(CLIENT, 40000, VIP, 80, false), &mut out);
        run_once(tc, &frame6(CLIENT6, 40000, VIP6, 80, false), &mut out);
        let reply = frame(BACKEND, 8080, CLIENT, 40000, true);
        let pass = frame(CLIENT, 40000, ELSEWHERE, 80, true);

        let mut timed = |name: &str, prog: &SchedClassifier, data: &[u8]| {
            group.bench_function(BenchmarkId::new(name, services), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| run_once(prog, data, &mut out)).sum())
            });
        };
        timed("noop_program", noop, &established);
        timed("pass_through_no_service", tc, &pass);
        timed("conntrack_hit", tc, &established);
        timed("reply_reverse_nat", tc, &reply);
        timed(
            "ipv6_pass_through_no_service",
            tc,
            &frame6(CLIENT6, 40000, ELSEWHERE6, 80, true),
        );
        timed(
            "ipv6_conntrack_hit",
            tc,
            &frame6(CLIENT6, 40000, VIP6, 80, true),
        );
        timed(
            "ipv6_reply_reverse_nat",
            tc,
            &frame6(BACKEND6, 8080, CLIENT6, 40000, true),
        );

        // New flows: a fresh source (2^20 of them, more than the table holds,
        // so an old tuple's entries are long evicted when it comes round).
        let mut syn = frame(CLIENT, 0, VIP, 80, false);
        let mut n: u32 = 0;
        group.bench_function(BenchmarkId::new("new_flow", services), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n = (n + 1) & 0xf_ffff;
                    syn[28] = 10 + (n >> 16) as u8; // source 10.24x.y.z
                    syn[29] = (n >> 8) as u8;
                    syn[34..36].copy_from_slice(&(1024 + (n as u16 & 0xff) * 200).to_be_bytes());
                    total += run_once(tc, &syn, &mut out);
                }
                total
            })
        });
        // The same over IPv6: the source's last bytes and port vary.
        let mut syn6 = frame6(CLIENT6, 0, VIP6, 80, false);
        group.bench_function(BenchmarkId::new("ipv6_new_flow", services), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n = (n + 1) & 0xf_ffff;
                    syn6[36] = (n >> 16) as u8;
                    syn6[37] = (n >> 8) as u8;
                    syn6[54..56].copy_from_slice(&(1024 + (n as u16 & 0xff) * 200).to_be_bytes());
                    total += run_once(tc, &syn6, &mut out);
                }
                total
            })
        });

        // The pass-through filter on, as the agent turns it on: the same
        // pass-through packets skip both lookups.
        dp.fill_prefilter().unwrap();
        dp.enable_prefilter().unwrap();
        let tc = dp.tc_program(Hook::TcIngress).unwrap();
        for (name, data) in [
            ("pass_through_filtered", pass.clone()),
            (
                "ipv6_pass_through_filtered",
                frame6(CLIENT6, 40000, ELSEWHERE6, 80, true),
            ),
        ] {
            group.bench_function(BenchmarkId::new(name, services), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| run_once(tc, &data, &mut out)).sum())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, per_packet);
criterion_main!(benches);
