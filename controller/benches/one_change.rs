//! What one endpoint change costs the control plane, by the number of
//! services (N x 10 endpoints, N = 1 000, 10 000, 30 000): the incremental
//! path the agent takes (`IncrementalTranslation` + `MapWriter::
//! apply_changes` + names) against the full one it replaced (`translate` of
//! everything + `MapWriter::apply`, at N <= 10 000). The maps are the
//! in-memory `ServiceMaps` (`translate::memory`): no root, no kernel; the
//! kernel's cost of the few writes is in `control_plane.rs`. The
//! incremental figure should not grow with N, also when every service uses
//! the same ten pods (`one_endpoint_change_shared_pods`, dp-bench's input).
//!
//! `cargo bench -p dp --bench one_change` (see BENCHMARKS.md).

use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use dp::translate::{
    incremental::IncrementalTranslation, memory::MemoryMaps, sync::MapWriter, translate, NodeInfo,
    TranslateOptions,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

const ENDPOINTS: usize = 10;

fn service(i: usize) -> Service {
    let vip = Ipv4Addr::from(0x0a60_0000 + i as u32 + 1);
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("s{i}"), "namespace": "bench"},
        "spec": {"clusterIP": vip.to_string(), "ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap()
}

/// Which pods back the services.
#[derive(Clone, Copy)]
enum Pods {
    /// Ten of its own per service.
    PerService,
    /// The same ten for all (as in dp-bench's cluster): every backend is
    /// shared by all N services.
    Shared,
}

/// Service `i`'s slice; `moved` puts its first endpoint at another address.
fn slice(i: usize, moved: bool, pods: Pods) -> EndpointSlice {
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|e| {
            let ip = match pods {
                _ if e == 0 && moved => Ipv4Addr::from(0x0afa_0000 + i as u32),
                Pods::PerService => Ipv4Addr::from(0x0af4_0000 + (i * ENDPOINTS + e) as u32),
                Pods::Shared => Ipv4Addr::from(0x0af4_0000 + e as u32),
            };
            json!({"addresses": [ip.to_string()], "nodeName": format!("node{}", e % 3 + 1)})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}-1"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        ips: vec![Ipv4Addr::new(172, 18, 0, 2).into()],
        zone: None,
    }
}

/// The service a change lands on, spread over all of them; whether it
/// moves the endpoint away or back.
fn target(change: usize, n: usize) -> (usize, bool) {
    let i = (change * 7919) % n;
    (i, (change / n).is_multiple_of(2))
}

fn one_endpoint_change(c: &mut Criterion) {
    changes(c, "one_endpoint_change", Pods::PerService, true);
    changes(c, "one_endpoint_change_shared_pods", Pods::Shared, false);
}

/// `full`: also the full path, for comparison (at N <= 10 000).
fn changes(c: &mut Criterion, name: &str, pods: Pods, full: bool) {
    let mut group = c.benchmark_group(name);
    group.sample_size(20);
    for n in [1_000, 10_000, 30_000] {
        let services: Vec<Service> = (0..n).map(service).collect();
        let mut slices: Vec<EndpointSlice> = (0..n).map(|i| slice(i, false, pods)).collect();

        let mut translation = IncrementalTranslation::new(node(), TranslateOptions::default());
        translation.replace_services(services.clone());
        translation.replace_slices(slices.clone());
        let mut maps = MemoryMaps::default();
        let mut writer = MapWriter::new();
        let changes = translation.take_changes();
        writer
            .apply_changes(&mut maps, translation.desired(), &changes.frontends)
            .unwrap();
        writer.write_names(&mut maps).unwrap();
        let mut change = 0;
        group.bench_function(BenchmarkId::new("incremental", n), |b| {
            b.iter_batched(
                || {
                    let (i, moved) = target(change, n);
                    change += 1;
                    slice(i, moved, pods)
                },
                |changed| {
                    maps.writes.clear();
                    translation.upsert_slice(changed);
                    let changes = translation.take_changes();
                    let stats = writer
                        .apply_changes(&mut maps, translation.desired(), &changes.frontends)
                        .unwrap();
                    writer.write_names(&mut maps).unwrap();
                    assert_eq!(stats.frontends_written, 1);
                },
                BatchSize::SmallInput,
            )
        });

        if !full || n > 10_000 {
            continue;
        }
        let options = TranslateOptions::default();
        let mut maps = MemoryMaps::default();
        let mut writer = MapWriter::new();
        writer
            .apply(&mut maps, &translate(&services, &slices, &node(), &options))
            .unwrap();
        let mut change = 0;
        group.bench_function(BenchmarkId::new("full", n), |b| {
            b.iter_batched(
                || {
                    change += 1;
                    target(change - 1, n)
                },
                |(i, moved)| {
                    maps.writes.clear();
                    slices[i] = slice(i, moved, pods);
                    let desired = translate(&services, &slices, &node(), &options);
                    let stats = writer.apply(&mut maps, &desired).unwrap();
                    writer.write_names(&mut maps).unwrap();
                    assert_eq!(stats.frontends_written, 1);
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, one_endpoint_change);
criterion_main!(benches);
