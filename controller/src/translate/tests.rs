//! kube-proxy's rules checked through the map writer against maps held in
//! memory: no root, no BPF object. The root tests (`tests/sync.rs`,
//! `tests/*_test_run.rs`) check the same writes on the real maps.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    sync::{BackendSlots, Frontend, MapWriter, ProgrammedServices, ServiceMaps},
    translate, DesiredState, NodeInfo, TranslateOptions,
};
use crate::error::Result;

/// The service and name maps, in memory, with a log of every write.
#[derive(Default)]
struct MemoryMaps {
    frontends: BTreeMap<Frontend, (u32, BackendSlots)>,
    backends: BTreeMap<u32, (SocketAddr, u8, bool)>,
    names: BTreeMap<(u32, u32), String>,
    writes: Vec<String>,
}

impl ServiceMaps for MemoryMaps {
    fn set_backend(&mut self, id: u32, addr: SocketAddr, protocol: u8, term: bool) -> Result<()> {
        self.writes.push(format!("backend {id} = {addr}"));
        self.backends.insert(id, (addr, protocol, term));
        Ok(())
    }
    fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.writes.push(format!("backend {id} removed"));
        self.backends.remove(&id);
        Ok(())
    }
    fn set_service(&mut self, f: &Frontend, service_id: u32, slots: &BackendSlots) -> Result<()> {
        self.writes
            .push(format!("service {} = {service_id}", f.addr));
        self.frontends.insert(*f, (service_id, slots.clone()));
        Ok(())
    }
    fn remove_service(&mut self, f: &Frontend) -> Result<()> {
        self.writes.push(format!("service {} removed", f.addr));
        self.frontends.remove(f);
        Ok(())
    }
    fn set_name(&mut self, kind: u32, id: u32, name: &str) -> Result<()> {
        self.names.insert((kind, id), name.to_string());
        Ok(())
    }
    fn remove_name(&mut self, kind: u32, id: u32) -> Result<()> {
        self.names.remove(&(kind, id));
        Ok(())
    }
    fn read_services(&mut self) -> Result<ProgrammedServices> {
        Ok(ProgrammedServices {
            frontends: self.frontends.clone(),
            backends: self.backends.clone(),
        })
    }
}

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
        ips: vec![Ipv4Addr::new(172, 18, 0, 2)],
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
