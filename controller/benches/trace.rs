//! What tracing costs per packet, measured by the kernel
//! (BPF_PROG_TEST_RUN, as in `datapath.rs`), on a packet of an established
//! flow to a ClusterIP. Side by side in one run:
//!
//! - `noop_program`: the floor;
//! - `compiled_out`: `dp_tc_untraced`, the same datapath with tracing
//!   compiled out;
//! - `off`: `dp_tc_ingress` with no trace session open;
//! - `filter_matches_nothing`: four sessions open, none matching the packet
//!   (`--ip 192.0.2.1`, `--port 9`, `--proto udp`, `--interface` elsewhere);
//! - `all_packets`: one session tracing every packet, its ring buffer drained
//!   by a reader thread as `dp trace` does.
//!
//! Run as root: `cargo xtask bench` (see BENCHMARKS.md).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{trace::*, Hook, TraceSession};
#[path = "shared/test_run.rs"]
mod test_run;
use test_run::run_once;

use criterion::{criterion_group, criterion_main, Criterion};
use dp::{BackendSlots, Datapath, Frontend, ServiceMaps};
use etherparse::PacketBuilder;

const CLIENT: [u8; 4] = [10, 244, 1, 5];
const VIP: [u8; 4] = [10, 96, 0, 10];
const BACKEND: [u8; 4] = [10, 244, 2, 7];

fn frame(syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(CLIENT, VIP, 64)
        .tcp(40000, 80, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, &[0u8; 64]).unwrap();
    v
}

fn datapath() -> Datapath {
    let mut dp = Datapath::load().expect("load (run as root)");
    dp.set_backend(1, SocketAddr::from((BACKEND, 8080)), 6, false)
        .unwrap();
    dp.set_service(
        &Frontend::tcp(SocketAddr::from((VIP, 80))),
        1,
        &BackendSlots {
            ready: vec![1],
            ..BackendSlots::default()
        },
    )
    .unwrap();
    dp
}

/// Four sessions whose arrival filters this packet fails.
fn sessions_matching_nothing() -> [TraceSession; 4] {
    let on = |match_flags| TraceSession {
        active: 1,
        match_flags,
        addr: common::addr::v4_mapped([192, 0, 2, 1]),
        port: 9,
        protocol: 17,
        ifindex: 999_999,
        ..TraceSession::default()
    };
    [
        on(TRACE_MATCH_ADDR),
        on(TRACE_MATCH_PORT),
        on(TRACE_MATCH_PROTOCOL),
        on(TRACE_MATCH_IFINDEX),
    ]
}

fn trace_cost(c: &mut Criterion) {
    e2e::require_root();
    let mut dp = datapath();
    let mut out = vec![0u8; 512];
    let established = frame(false);
    // The flow exists: every measured run is a conntrack hit.
    run_once(
        dp.tc_program(Hook::TcIngress).unwrap(),
        &frame(true),
        &mut out,
    );
    dp.load_untraced().unwrap();
    let reader = dp.trace_reader_of(0).unwrap();

    let mut group = c.benchmark_group("trace_per_packet");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    let mut timed = |group: &mut criterion::BenchmarkGroup<_>, name: &str, dp: &Datapath| {
        let prog = match name {
            "noop_program" => dp.noop_program().unwrap(),
            "compiled_out" => dp.untraced_program().unwrap(),
            _ => dp.tc_program(Hook::TcIngress).unwrap(),
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| run_once(prog, &established, &mut out))
                    .sum()
            })
        });
    };
    timed(&mut group, "noop_program", &dp);
    timed(&mut group, "compiled_out", &dp);
    timed(&mut group, "off", &dp);

    for (slot, s) in sessions_matching_nothing().iter().enumerate() {
        dp.set_trace_session(slot as u32, s).unwrap();
    }
    timed(&mut group, "filter_matches_nothing", &dp);
    for slot in 1..TRACE_SESSIONS {
        dp.set_trace_session(slot, &TraceSession::default())
            .unwrap();
    }

    // Every packet, with a reader keeping the ring buffer from filling.
    let stop = Arc::new(AtomicBool::new(false));
    let drained = {
        let stop = stop.clone();
        let mut reader = reader;
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(_)) = reader.next_timeout(Duration::from_millis(50)) {
                    n += 1 + reader.drain().len() as u64;
                }
            }
            n
        })
    };
    dp.set_tracing(true).unwrap();
    timed(&mut group, "all_packets", &dp);
    dp.set_tracing(false).unwrap();
    stop.store(true, Ordering::Relaxed);
    let events = drained.join().unwrap();
    let lost = dp.trace_lost().unwrap();
    eprintln!("all_packets: {events} events read, {lost} lost (ring full)");
    group.finish();
}

criterion_group!(benches, trace_cost);
criterion_main!(benches);
