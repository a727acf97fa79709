//! Where a new flow's tail comes from in the datapath: the tc program's
//! own time (BPF_PROG_TEST_RUN, as the kernel times one run) for SYNs of
//! new flows, first while the conntrack table fills (a free slot for every
//! entry) and then once it is full (every insert makes the LRU evict).
//! Prints the percentiles of each phase. Root:
//! `cargo run --release -p dp --example ct_tail [-- CONNTRACK_ENTRIES]`.

use std::{net::SocketAddr, time::Duration};

use common::Hook;
use dp::{BackendSlots, Datapath, Frontend, MapSizes, ServiceMaps};
use etherparse::PacketBuilder;

#[path = "../benches/shared/test_run.rs"]
mod test_run;

fn main() {
    e2e::require_root();
    let entries: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(65_536);
    let mut dp = Datapath::load_with(MapSizes {
        conntrack: entries,
        ..MapSizes::default()
    })
    .expect("load");
    dp.set_backend(1, SocketAddr::from(([10, 244, 2, 7], 8080)), 6, false)
        .unwrap();
    dp.set_service(
        &Frontend::tcp(SocketAddr::from(([10, 96, 0, 10], 80))),
        1,
        &BackendSlots {
            ready: vec![1],
            ..BackendSlots::default()
        },
    )
    .unwrap();
    let tc = dp.tc_program(Hook::TcIngress).unwrap();
    let mut out = vec![0u8; 512];
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 244, 1, 5], [10, 96, 0, 10], 64)
        .tcp(1, 80, 1000, 64240)
        .syn();
    let mut syn = Vec::new();
    builder.write(&mut syn, &[0u8; 64]).unwrap();
    // Two entries per flow: the table holds entries / 2 flows.
    let filling = (entries / 2 - entries / 16) as usize;
    let full = 4 * entries as usize;
    let mut times: Vec<Duration> = Vec::with_capacity(filling + full);
    for n in 0..(filling + full) as u32 {
        syn[28] = 10 + (n >> 16) as u8;
        syn[29] = (n >> 8) as u8;
        syn[34..36].copy_from_slice(&(1024 + (n & 0xff) as u16).to_be_bytes());
        times.push(test_run::run_once(tc, &syn, &mut out));
    }
    let report = |name: &str, v: &[Duration]| {
        let mut ns: Vec<u128> = v.iter().map(|d| d.as_nanos()).collect();
        ns.sort_unstable();
        let q = |p: f64| ns[((p / 100.0 * ns.len() as f64).ceil() as usize).clamp(1, ns.len()) - 1];
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            ns.len(),
            q(50.0),
            q(90.0),
            q(99.0),
            q(99.9),
            ns[ns.len() - 1]
        );
    };
    println!("conntrack entries: {entries}");
    println!("| phase | SYNs | p50 ns | p90 ns | p99 ns | p99.9 ns | max ns |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    report("table filling (free slots)", &times[..filling]);
    report("table full (LRU evicts)", &times[filling..]);
}
