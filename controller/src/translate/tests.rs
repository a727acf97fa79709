//! kube-proxy's rules checked through the map writer against maps held in
//! memory: no root, no BPF object. The root tests (`tests/sync.rs`,
//! `tests/*_test_run.rs`) check the same writes on the real maps.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    memory::MemoryMaps,
    sync::{BackendSlots, Frontend, MapWriter},
    translate, DesiredState, NodeInfo, TranslateOptions,
};

impl MemoryMaps {
    /// The addresses behind backend ids.
    fn addrs(&self, ids: &[u32]) -> Vec<String> {
        let mut a: Vec<String> = ids
            .iter()
            .map(|id| self.backends[id].0.to_string())
            .collect();
        a.sort();
        a
    }
    fn slots(&self, addr: &str) -> &BackendSlots {
        let f = Frontend::tcp(addr.parse().unwrap());
        &self
            .frontends
            .get(&f)
            .unwrap_or_else(|| panic!("no frontend {addr}"))
            .1
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        ips: vec![Ipv4Addr::new(172, 18, 0, 2).into()],
        zone: None,
    }
}

/// A Service (YAML `spec`) with one EndpointSlice (YAML `endpoints`).
fn objects(name: &str, spec: &str, endpoints: &str) -> (Service, EndpointSlice) {
    let service = serde_norway::from_str(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n{spec}"
    ))
    .unwrap();
    let slice = serde_norway::from_str(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"
    ))
    .unwrap();
    (service, slice)
}

fn desired(objs: &[(Service, EndpointSlice)]) -> DesiredState {
    let services: Vec<Service> = objs.iter().map(|o| o.0.clone()).collect();
    let slices: Vec<EndpointSlice> = objs.iter().map(|o| o.1.clone()).collect();
    let state = translate(&services, &slices, &node(), &TranslateOptions::default());
    assert!(state.skipped.is_empty(), "{:?}", state.skipped);
    state
}

fn web(endpoints: &str) -> (Service, EndpointSlice) {
    objects(
        "web",
        "  clusterIP: 10.96.0.10\n  ports: [{port: 80, targetPort: 8080}]",
        endpoints,
    )
}

#[test]
fn ready_endpoints_get_new_flows_and_terminating_ones_only_as_a_fallback() {
    let mut maps = MemoryMaps::default();
    let eps = "- {addresses: [10.244.1.1], nodeName: node1}\n\
               - {addresses: [10.244.2.1], nodeName: node2, conditions: {ready: true}}\n\
               - {addresses: [10.244.2.2], nodeName: node2, conditions: {ready: false, serving: true, terminating: true}}\n\
               - {addresses: [10.244.2.3], nodeName: node2, conditions: {ready: false, serving: false}}\n";
    MapWriter::new()
        .apply(&mut maps, &desired(&[web(eps)]))
        .unwrap();
    let slots = maps.slots("10.96.0.10:80");
    assert_eq!(
        maps.addrs(&slots.ready),
        ["10.244.1.1:8080", "10.244.2.1:8080"]
    );
    assert_eq!(maps.addrs(&slots.terminating), ["10.244.2.2:8080"]);
    assert!(!slots.local_only && !slots.external);
    // Not serving (10.244.2.3): in neither set, so it gets no new flows.
}

#[test]
fn a_service_without_endpoints_keeps_its_frontend_so_it_is_rejected() {
    let mut maps = MemoryMaps::default();
    MapWriter::new()
        .apply(&mut maps, &desired(&[web("  []\n")]))
        .unwrap();
    let slots = maps.slots("10.96.0.10:80");
    assert!(slots.ready.is_empty() && slots.terminating.is_empty());
    assert!(!slots.local_only, "Cluster policy: reject, not drop");
}

#[test]
fn external_traffic_policy_local_narrows_nodeports_but_not_pod_traffic() {
    let mut maps = MemoryMaps::default();
    let svc = objects(
        "shop",
        "  type: NodePort\n  externalTrafficPolicy: Local\n  clusterIP: 10.96.0.20\n  \
         ports: [{port: 80, targetPort: 8080, nodePort: 30080}]",
        "- {addresses: [10.244.1.5], nodeName: node1}\n- {addresses: [10.244.2.5], nodeName: node2}\n",
    );
    MapWriter::new().apply(&mut maps, &desired(&[svc])).unwrap();
    let nodeport = maps.slots("172.18.0.2:30080");
    assert!(nodeport.local_only && nodeport.external);
    assert_eq!(maps.addrs(&nodeport.ready), ["10.244.1.5:8080"]);
    let (internal_ready, _) = nodeport
        .internal
        .as_ref()
        .expect("cluster-wide set for pods");
    assert_eq!(
        maps.addrs(internal_ready),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
    let cluster_ip = maps.slots("10.96.0.20:80");
    assert!(!cluster_ip.local_only && !cluster_ip.external);
    assert_eq!(
        maps.addrs(&cluster_ip.ready),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
}

/// kube-proxy's "has endpoints" is one answer per service port, cluster-wide
/// (kube-proxy-rules.md 2.5 items 1, 2 and 4): with no usable endpoint
/// anywhere, every frontend rejects, Local policies included; a Local
/// policy drops only when endpoints exist but none on this node.
#[test]
fn local_policies_reject_when_no_endpoint_is_usable_anywhere() {
    let local = "  type: NodePort\n  externalTrafficPolicy: Local\n  \
                 internalTrafficPolicy: Local\n  clusterIP: 10.96.0.20\n  \
                 ports: [{port: 80, targetPort: 8080, nodePort: 30080}]";
    let cases = [
        // (endpoints, local_only expected on both frontends, why)
        ("  []\n", false, "all endpoints deleted"),
        (
            "- {addresses: [10.244.2.5], nodeName: node2, conditions: {ready: false, serving: false}}\n",
            false,
            "the only endpoint is neither ready nor serving",
        ),
        (
            "- {addresses: [10.244.2.5], nodeName: node2, conditions: {ready: false, serving: true, terminating: true}}\n",
            true,
            "a serving terminating endpoint elsewhere is the fallback",
        ),
        (
            "- {addresses: [10.244.2.5], nodeName: node2}\n",
            true,
            "a ready endpoint elsewhere",
        ),
    ];
    for (endpoints, local_only, why) in cases {
        let mut maps = MemoryMaps::default();
        let svc = objects("shop", local, endpoints);
        MapWriter::new().apply(&mut maps, &desired(&[svc])).unwrap();
        for frontend in ["172.18.0.2:30080", "10.96.0.20:80"] {
            let slots = maps.slots(frontend);
            assert!(slots.ready.is_empty() && slots.terminating.is_empty());
            assert_eq!(slots.local_only, local_only, "{frontend}: {why}");
        }
    }
}

/// Objects created before the API validated addresses strictly: kube-proxy
/// reads leading zeros as decimal, and so does dp, in every address field.
#[test]
fn addresses_with_leading_zeros_are_served_as_kube_proxy_reads_them() {
    let svc = objects(
        "old",
        "  type: LoadBalancer\n  clusterIP: 010.096.000.030\n  \
         externalIPs: [198.051.100.001]\n  \
         loadBalancerSourceRanges: [172.018.000.000/016]\n  \
         ports: [{port: 80, targetPort: 8080, nodePort: 30090}]",
        "- {addresses: [010.244.001.007], nodeName: node1}\n",
    );
    let mut svc = svc;
    svc.0.status =
        Some(serde_norway::from_str("loadBalancer: {ingress: [{ip: 203.000.113.020}]}").unwrap());
    let state = desired(&[svc]);
    let summary = state.summary();
    for line in [
        "10.96.0.30:80/TCP ClusterIP ns/old",
        "172.18.0.2:30090/TCP NodePort ns/old",
        "198.51.100.1:80/TCP ExternalIP ns/old",
        "203.0.113.20:80/TCP LoadBalancer ns/old source-ranges=172.18.0.0/16",
        "    ready: 10.244.1.7:8080 (node1)",
    ] {
        assert!(summary.contains(line), "{line:?} in\n{summary}");
    }
    // What is not an address in any reading is still refused.
    let bad = objects(
        "bad",
        "  clusterIP: 10.96.0.256\n  ports: [{port: 80}]",
        "  []\n",
    );
    let state = translate(&[bad.0], &[bad.1], &node(), &TranslateOptions::default());
    assert!(state.frontends.is_empty());
    assert!(state.skipped[0].invalid, "{:?}", state.skipped);
}

/// kube-proxy-rules.md 2.5 item 8: when a source range contains the node,
/// the service's own LoadBalancer IPs are allowed sources too (the node
/// reaching its LB IP, SNATed to it); not otherwise.
#[test]
fn source_ranges_containing_the_node_let_the_lb_ips_through() {
    let lb = |name: &str, range: &str| {
        let mut o = objects(
            name,
            &format!(
                "  type: LoadBalancer\n  loadBalancerSourceRanges: [{range}]\n  \
                 ports: [{{port: 80, targetPort: 8080, nodePort: 30090}}]"
            ),
            "- {addresses: [10.244.1.7], nodeName: node1}\n",
        );
        o.0.status = Some(
            serde_norway::from_str(
                "loadBalancer: {ingress: [{ip: 203.0.113.13}, {ip: 203.0.113.14}]}",
            )
            .unwrap(),
        );
        o
    };
    let summary = desired(&[lb("near", "172.18.0.0/24")]).summary();
    assert!(
        summary.contains(
            "203.0.113.13:80/TCP LoadBalancer ns/near \
             source-ranges=172.18.0.0/24,203.0.113.13/32,203.0.113.14/32"
        ),
        "{summary}"
    );
    let summary = desired(&[lb("far", "172.18.1.0/24")]).summary();
    assert!(
        summary.contains("203.0.113.14:80/TCP LoadBalancer ns/far source-ranges=172.18.1.0/24\n"),
        "{summary}"
    );
}

#[test]
fn a_sync_writes_only_what_changed() {
    let mut maps = MemoryMaps::default();
    let mut writer = MapWriter::new();
    let other = objects(
        "api",
        "  clusterIP: 10.96.0.30\n  ports: [{port: 443, targetPort: 8080}]",
        "- {addresses: [10.244.3.1], nodeName: node2}\n",
    );
    let before = desired(&[web("- {addresses: [10.244.1.1]}\n"), other.clone()]);
    let stats = writer.apply(&mut maps, &before).unwrap();
    assert_eq!((stats.frontends_written, stats.backends_written), (2, 2));

    maps.writes.clear();
    assert!(writer.apply(&mut maps, &before).unwrap().is_empty());
    assert!(maps.writes.is_empty(), "{:?}", maps.writes);

    let after = desired(&[web("- {addresses: [10.244.1.2]}\n"), other]);
    writer.apply(&mut maps, &after).unwrap();
    // The new backend before the frontend that uses it, the old one after.
    assert_eq!(
        maps.writes,
        [
            "backend 3 = 10.244.1.2:8080",
            "service 10.96.0.10:80 = 1",
            "backend 1 removed",
        ],
        "web keeps service id 1; its old backend was 1, api's 2, so the new one is 3"
    );
}

#[test]
fn an_adopting_writer_keeps_the_ids_and_rewrites_in_place() {
    let mut maps = MemoryMaps::default();
    let state = desired(&[web(
        "- {addresses: [10.244.1.1]}\n- {addresses: [10.244.1.2]}\n",
    )]);
    MapWriter::new().apply(&mut maps, &state).unwrap();
    let programmed = maps.frontends.clone();

    let mut adopted = MapWriter::adopt(&mut maps).unwrap();
    maps.writes.clear();
    adopted.apply(&mut maps, &state).unwrap();
    assert_eq!(maps.frontends, programmed, "same service and backend ids");
    assert!(
        maps.writes.iter().all(|w| !w.contains("removed")),
        "nothing removed: {:?}",
        maps.writes
    );
}

/// A small deterministic generator (xorshift), so the property test needs
/// no extra crate and a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// A random Service from a small pool of names and addresses, so that
/// services share addresses (conflicts) and endpoints.
fn random_service(rng: &mut Rng) -> Service {
    let name = rng.pick(&["a", "b", "c", "d"]);
    let namespace = rng.pick(&["ns", "other"]);
    let service_type = rng.pick(&["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"]);
    let cluster_ip = format!("10.96.0.{}", 1 + rng.below(3));
    let mut ports =
        vec![serde_json::json!({"name": "http", "port": 80, "nodePort": 30000 + rng.below(3)})];
    if rng.below(2) == 0 {
        ports.push(serde_json::json!({"name": "dns", "port": 53, "protocol": "UDP"}));
    }
    let mut spec = serde_json::json!({
        "type": service_type,
        "clusterIP": cluster_ip,
        "ports": ports,
        "externalTrafficPolicy": rng.pick(&["Cluster", "Local"]),
        "internalTrafficPolicy": rng.pick(&["Cluster", "Local"]),
    });
    if rng.below(3) == 0 {
        spec["externalIPs"] = serde_json::json!([format!("192.0.2.{}", rng.below(2))]);
    }
    if rng.below(3) == 0 {
        spec["sessionAffinity"] = "ClientIP".into();
    }
    if rng.below(8) == 0 {
        spec["clusterIP"] = "not-an-ip".into();
    }
    let mut service = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    });
    if service_type == "LoadBalancer" {
        service["spec"]["healthCheckNodePort"] = 32000.into();
        service["status"] =
            serde_json::json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}});
    }
    serde_json::from_value(service).unwrap()
}

fn random_slice(rng: &mut Rng) -> EndpointSlice {
    let service = rng.pick(&["a", "b", "c", "d"]);
    let namespace = rng.pick(&["ns", "other"]);
    let name = format!("{service}-{}", rng.below(3));
    let endpoints: Vec<serde_json::Value> = (0..rng.below(4))
        .map(|_| {
            let mut ep = serde_json::json!({
                "addresses": [format!("10.244.{}.{}", 1 + rng.below(2), 1 + rng.below(4))],
                "nodeName": rng.pick(&["node1", "node2"]),
                "conditions": {
                    "ready": rng.below(3) != 0,
                    "serving": rng.below(2) == 0,
                    "terminating": rng.below(3) == 0,
                },
            });
            if rng.below(2) == 0 {
                ep["targetRef"] = serde_json::json!({"kind": "Pod", "namespace": namespace, "name": format!("p{}", rng.below(4))});
            }
            if rng.below(4) == 0 {
                ep["hints"] = serde_json::json!({"forNodes": [{"name": rng.pick(&["node1", "node2"])}]});
            }
            ep
        })
        .collect();
    let mut labels = serde_json::json!({"kubernetes.io/service-name": service});
    if rng.below(10) == 0 {
        labels = serde_json::json!({});
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "addressType": rng.pick(&["IPv4", "IPv4", "IPv4", "IPv6"]),
        "ports": [
            {"name": "http", "port": 8080 + rng.below(2) as i32},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
        ],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn meta_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

#[test]
fn changes_applied_one_by_one_give_the_maps_a_full_translation_gives() {
    use super::incremental::IncrementalTranslation;
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut node = node();
        let options = TranslateOptions::default();
        let mut services: BTreeMap<(String, String), Service> = BTreeMap::new();
        let mut slices: BTreeMap<(String, String), EndpointSlice> = BTreeMap::new();
        let mut incremental = IncrementalTranslation::new(node.clone(), options.clone());
        let (mut maps_incremental, mut maps_full) = (MemoryMaps::default(), MemoryMaps::default());
        let (mut writer_incremental, mut writer_full) = (MapWriter::new(), MapWriter::new());
        for step in 0..150 {
            match rng.below(10) {
                0..=2 => {
                    let s = random_service(&mut rng);
                    services.insert(meta_key(&s.metadata), s.clone());
                    if rng.below(3) == 0 {
                        // A relist, or the manifest files read again.
                        incremental.replace_services(services.values().cloned().collect());
                    } else {
                        incremental.upsert_service(s);
                    }
                }
                3 => {
                    let s = random_service(&mut rng);
                    let (ns, name) = meta_key(&s.metadata);
                    services.remove(&(ns.clone(), name.clone()));
                    incremental.remove_service(&ns, &name);
                }
                4..=7 => {
                    let s = random_slice(&mut rng);
                    slices.insert(meta_key(&s.metadata), s.clone());
                    if rng.below(3) == 0 {
                        incremental.replace_slices(slices.values().cloned().collect());
                    } else {
                        incremental.upsert_slice(s);
                    }
                }
                8 => {
                    let s = random_slice(&mut rng);
                    let (ns, name) = meta_key(&s.metadata);
                    slices.remove(&(ns.clone(), name.clone()));
                    incremental.remove_slice(&ns, &name);
                }
                _ => {
                    node.ips = vec![Ipv4Addr::new(172, 18, 0, 2 + rng.below(2) as u8).into()];
                    node.zone = (rng.below(2) == 0).then(|| "z1".to_string());
                    incremental.set_node(node.clone());
                }
            }
            let all_services: Vec<Service> = services.values().cloned().collect();
            let all_slices: Vec<EndpointSlice> = slices.values().cloned().collect();
            let full = translate(&all_services, &all_slices, &node, &options);
            let context = format!("seed {seed} step {step}");
            assert_eq!(incremental.state(), full, "{context}");
            let invalid = full.skipped.iter().filter(|s| s.invalid).count();
            assert_eq!(
                incremental.skip_counts(),
                (invalid, full.skipped.len() - invalid),
                "{context}"
            );

            let changes = incremental.take_changes();
            writer_incremental
                .apply_changes(
                    &mut maps_incremental,
                    incremental.desired(),
                    &changes.frontends,
                )
                .unwrap();
            writer_incremental
                .write_names(&mut maps_incremental)
                .unwrap();
            writer_full.apply(&mut maps_full, &full).unwrap();
            writer_full.write_names(&mut maps_full).unwrap();
            assert_eq!(maps_incremental.frontends, maps_full.frontends, "{context}");
            assert_eq!(maps_incremental.backends, maps_full.backends, "{context}");
            assert_eq!(maps_incremental.names, maps_full.names, "{context}");
        }
    }
}

/// kube-proxy serves SCTP Service ports: they get frontends like TCP and
/// UDP ones (protocol 132), and their endpoints are SCTP backends.
#[test]
fn sctp_service_ports_are_served() {
    let svc = objects(
        "signalling",
        "  type: NodePort\n  clusterIP: 10.96.0.40\n  \
         ports: [{name: s1ap, port: 36412, targetPort: 36412, protocol: SCTP, nodePort: 30412}]",
        "- {addresses: [10.244.1.9], nodeName: node1}\n",
    );
    let mut svc = svc;
    svc.1.ports = Some(vec![serde_norway::from_str(
        "{name: s1ap, port: 36412, protocol: SCTP}",
    )
    .unwrap()]);
    let summary = desired(&[svc]).summary();
    for line in [
        "10.96.0.40:36412/SCTP ClusterIP ns/signalling:s1ap",
        "172.18.0.2:30412/SCTP NodePort ns/signalling:s1ap",
        "    ready: 10.244.1.9:36412 (node1)",
    ] {
        assert!(summary.contains(line), "{line:?} in\n{summary}");
    }
}

/// A dual-stack node: kind's docker network, both families.
fn dual_node() -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        ips: vec![
            Ipv4Addr::new(172, 18, 0, 2).into(),
            "fc00:f853:ccd:e793::2".parse().unwrap(),
        ],
        zone: None,
    }
}

/// A dual-stack NodePort Service with one slice per family.
fn dual_stack(v4_endpoints: &str, v6_endpoints: &str) -> (Service, Vec<EndpointSlice>) {
    let (service, v4) = objects(
        "dual",
        "  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         clusterIP: 10.96.0.30\n  clusterIPs: [10.96.0.30, 'fd00:10:96::30']\n  \
         ports: [{port: 80, targetPort: 8080, nodePort: 30030}]",
        v4_endpoints,
    );
    let v6: EndpointSlice = serde_norway::from_str(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: dual-2, namespace: ns, labels: {{kubernetes.io/service-name: dual}}}}\n\
         addressType: IPv6\nports: [{{port: 8080}}]\nendpoints:\n{v6_endpoints}"
    ))
    .unwrap();
    (service, vec![v4, v6])
}

#[test]
fn a_dual_stack_service_is_served_in_each_family_from_that_familys_endpoints() {
    let (service, slices) = dual_stack(
        "- {addresses: [10.244.1.5], nodeName: node1}\n",
        "- {addresses: ['fd00:10:244:1::5'], nodeName: node1}\n\
         - {addresses: ['fd00:10:244:2::5'], nodeName: node2}\n",
    );
    let state = translate(
        &[service],
        &slices,
        &dual_node(),
        &TranslateOptions::default(),
    );
    assert!(state.skipped.is_empty(), "{:?}", state.skipped);
    let mut maps = MemoryMaps::default();
    MapWriter::new().apply(&mut maps, &state).unwrap();
    for v4 in ["10.96.0.30:80", "172.18.0.2:30030"] {
        assert_eq!(
            maps.addrs(&maps.slots(v4).ready),
            ["10.244.1.5:8080"],
            "{v4}"
        );
    }
    for v6 in ["[fd00:10:96::30]:80", "[fc00:f853:ccd:e793::2]:30030"] {
        assert_eq!(
            maps.addrs(&maps.slots(v6).ready),
            ["[fd00:10:244:1::5]:8080", "[fd00:10:244:2::5]:8080"],
            "{v6}: IPv6 endpoints only"
        );
    }
    assert_eq!(maps.frontends.len(), 4);
}

#[test]
fn each_family_has_endpoints_of_its_own_or_rejects() {
    // IPv6 endpoints only: the IPv4 side has none (kube-proxy's IPv4
    // proxier rejects), the IPv6 side serves.
    let (service, slices) = dual_stack(
        "  []\n",
        "- {addresses: ['fd00:10:244:1::5'], nodeName: node1}\n",
    );
    let state = translate(
        &[service],
        &slices,
        &dual_node(),
        &TranslateOptions::default(),
    );
    let mut maps = MemoryMaps::default();
    MapWriter::new().apply(&mut maps, &state).unwrap();
    assert!(maps.slots("10.96.0.30:80").ready.is_empty());
    assert_eq!(maps.slots("[fd00:10:96::30]:80").ready.len(), 1);
}

#[test]
fn an_endpoint_of_the_wrong_family_for_its_slice_is_bad_input() {
    let (service, slices) = dual_stack(
        "- {addresses: ['fd00:10:244:1::7'], nodeName: node1}\n",
        "- {addresses: [10.244.1.7], nodeName: node1}\n",
    );
    let state = translate(
        &[service],
        &slices,
        &dual_node(),
        &TranslateOptions::default(),
    );
    assert_eq!(state.skipped.len(), 2, "{:?}", state.skipped);
    assert!(state.skipped.iter().all(|s| s.invalid));
    let mut maps = MemoryMaps::default();
    MapWriter::new().apply(&mut maps, &state).unwrap();
    assert!(maps.slots("10.96.0.30:80").ready.is_empty());
    assert!(maps.slots("[fd00:10:96::30]:80").ready.is_empty());
}

#[test]
fn a_single_stack_ipv6_service_has_ipv6_frontends_only() {
    let (service, slices) = dual_stack("  []\n", "- {addresses: ['fd00:10:244:1::5']}\n");
    let mut service = service;
    let spec = service.spec.as_mut().unwrap();
    spec.cluster_ip = Some("fd00:10:96::31".into());
    spec.cluster_ips = Some(vec!["fd00:10:96::31".into()]);
    spec.ip_families = Some(vec!["IPv6".into()]);
    spec.external_ips = Some(vec!["198.51.100.7".into(), "2001:db8::7".into()]);
    let state = translate(
        &[service],
        &slices,
        &dual_node(),
        &TranslateOptions::default(),
    );
    let keys: Vec<String> = state.frontends.keys().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        [
            "[2001:db8::7]:80/TCP",
            "[fc00:f853:ccd:e793::2]:30030/TCP",
            "[fd00:10:96::31]:80/TCP"
        ],
        "no IPv4 frontend: the Service has no IPv4 ClusterIP"
    );
}

#[test]
fn nodeport_addresses_apply_per_family() {
    let (service, slices) = dual_stack("  []\n", "  []\n");
    let only_v4 = TranslateOptions {
        nodeport_addresses: vec!["172.18.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    let keys = |o: &TranslateOptions| -> Vec<String> {
        translate(std::slice::from_ref(&service), &slices, &dual_node(), o)
            .frontends
            .iter()
            .filter(|(_, f)| f.kind == super::FrontendKind::NodePort)
            .map(|(k, _)| k.to_string())
            .collect()
    };
    // No IPv6 CIDR given: every IPv6 node address (kube-proxy reads the
    // flag per family).
    assert_eq!(
        keys(&only_v4),
        ["172.18.0.2:30030/TCP", "[fc00:f853:ccd:e793::2]:30030/TCP"]
    );
    let elsewhere = TranslateOptions {
        nodeport_addresses: vec![
            "10.0.0.0/8".parse().unwrap(),
            "fc00:f853:ccd:e793::/64".parse().unwrap(),
        ],
        ..Default::default()
    };
    assert_eq!(keys(&elsewhere), ["[fc00:f853:ccd:e793::2]:30030/TCP"]);
    // With socket-level load balancing, 127.0.0.1 too (never ::1), unless
    // the flag's IPv4 CIDRs leave loopback out.
    let loopback = TranslateOptions {
        loopback_nodeports: true,
        ..Default::default()
    };
    assert_eq!(
        keys(&loopback),
        [
            "127.0.0.1:30030/TCP",
            "172.18.0.2:30030/TCP",
            "[fc00:f853:ccd:e793::2]:30030/TCP"
        ]
    );
    let without = TranslateOptions {
        loopback_nodeports: true,
        ..only_v4
    };
    assert_eq!(
        keys(&without),
        ["172.18.0.2:30030/TCP", "[fc00:f853:ccd:e793::2]:30030/TCP"]
    );
}

#[test]
fn source_ranges_are_split_by_family() {
    let (service, slices) = dual_stack("  []\n", "  []\n");
    let mut service = service;
    let spec = service.spec.as_mut().unwrap();
    spec.type_ = Some("LoadBalancer".into());
    spec.load_balancer_source_ranges = Some(vec!["192.0.2.0/24".into(), "2001:db8:1::/48".into()]);
    service.status = Some(
        serde_norway::from_str(
            "loadBalancer: {ingress: [{ip: 203.0.113.9}, {ip: '2001:db8:ff::9'}]}",
        )
        .unwrap(),
    );
    let state = translate(
        &[service],
        &slices,
        &dual_node(),
        &TranslateOptions::default(),
    );
    let ranges = |key: &str| -> Vec<String> {
        let (_, f) = state
            .frontends
            .iter()
            .find(|(k, _)| k.to_string() == key)
            .unwrap_or_else(|| panic!("{key}"));
        f.source_ranges.iter().map(ToString::to_string).collect()
    };
    assert_eq!(ranges("203.0.113.9:80/TCP"), ["192.0.2.0/24"]);
    assert_eq!(ranges("[2001:db8:ff::9]:80/TCP"), ["2001:db8:1::/48"]);
}
