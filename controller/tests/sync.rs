//! The map writer: incremental (an event writes only what it changes), ids
//! kept across syncs and adoption, and a full map reported per object while
//! everything that fits is programmed.

use std::net::Ipv4Addr;

use dp::{
    source::manifests::{self, Objects},
    translate::sync::MapWriter,
    translate::{translate, DesiredState, NodeInfo, TranslateOptions},
    Datapath, MapSizes,
};

fn node() -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        ips: vec![Ipv4Addr::new(172, 18, 0, 2).into()],
        zone: None,
    }
}

/// `n` services (10.96.0.1.. :80), each with the given endpoint addresses.
fn state(n: u8, endpoints: &[&str]) -> DesiredState {
    let mut objects = Objects::default();
    for i in 1..=n {
        let eps: String = endpoints
            .iter()
            .map(|ip| format!("- {{addresses: [{ip}], nodeName: node2}}\n"))
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\n\
             spec:\n  clusterIP: 10.96.0.{i}\n  ports: [{{port: 80}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
        );
        manifests::load_str(&yaml, "test", &mut objects);
    }
    assert!(objects.skipped.is_empty(), "{:?}", objects.skipped);
    translate(
        &objects.services,
        &objects.slices,
        &node(),
        &TranslateOptions::default(),
    )
}

#[test]
fn syncs_write_only_what_changed_and_keep_ids() {
    e2e::require_root();
    let mut dp = Datapath::load().unwrap();
    let mut writer = MapWriter::new();
    let a = state(3, &["10.244.2.1", "10.244.2.2"]);
    let s = writer.apply(&mut dp, &a).unwrap();
    assert_eq!((s.frontends_written, s.backends_written), (3, 2));
    let before = dp
        .dump(&writer.service_names(), &writer.backend_nodes())
        .unwrap();

    let s = writer.apply(&mut dp, &a).unwrap();
    assert!(s.is_empty(), "nothing changed, nothing written: {s:?}");

    // One endpoint replaced.
    let b = state(3, &["10.244.2.1", "10.244.2.3"]);
    let s = writer.apply(&mut dp, &b).unwrap();
    assert_eq!(
        (
            s.frontends_written,
            s.backends_written,
            s.backends_removed,
            s.frontends_removed
        ),
        (3, 1, 1, 0),
        "{s:?}"
    );
    let after = dp
        .dump(&writer.service_names(), &writer.backend_nodes())
        .unwrap();
    assert!(
        after.contains("  1 10.244.2.1:8080/TCP"),
        "backend 1 keeps its id:\n{after}"
    );
    assert!(!after.contains("10.244.2.2:8080"), "removed:\n{after}");
    assert_ne!(before, after);

    // A new writer adopting the maps (a restarted agent) keeps every id and
    // writes no backend.
    let mut adopted = MapWriter::adopt(&mut dp).unwrap();
    let s = adopted.apply(&mut dp, &b).unwrap();
    assert_eq!((s.backends_written, s.backends_removed), (0, 0), "{s:?}");
    let readopted = dp
        .dump(&adopted.service_names(), &adopted.backend_nodes())
        .unwrap();
    assert_eq!(readopted, after);

    // Everything removed.
    let s = writer.apply(&mut dp, &DesiredState::default()).unwrap();
    assert_eq!((s.frontends_removed, s.backends_removed), (3, 2));
    let empty = dp
        .dump(&writer.service_names(), &writer.backend_nodes())
        .unwrap();
    assert_eq!(
        empty,
        "frontends:\nservice addresses: \nbackends:\nreverse nat:\n"
    );
}

#[test]
fn objects_that_do_not_fit_are_reported_and_the_rest_is_programmed() {
    e2e::require_root();
    // 8 service entries: each frontend here needs 3 (master, slot, address).
    let mut dp = Datapath::load_with(MapSizes {
        services: 8,
        ..MapSizes::default()
    })
    .unwrap();
    let mut writer = MapWriter::new();
    let s = writer.apply(&mut dp, &state(5, &["10.244.2.1"])).unwrap();
    assert!(s.frontends_written >= 2, "{s:?}");
    assert!(!s.not_programmed.is_empty(), "{s:?}");
    assert_eq!(s.frontends_written + s.not_programmed.len(), 5, "{s:?}");
    assert!(
        s.not_programmed
            .iter()
            .all(|(what, _)| what.starts_with("frontend 10.96.0.")),
        "{s:?}"
    );
    let dump = dp
        .dump(&writer.service_names(), &writer.backend_nodes())
        .unwrap();
    assert!(dump.contains("10.96.0.1:80/TCP service 1 ns/s1"), "{dump}");
}
