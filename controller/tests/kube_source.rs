//! The Kubernetes API source (kube-rs reflectors) against a fake API server
//! speaking the real list/watch wire format: initial list then watch,
//! bookmarks, 410 Gone and relist, dropped connections, an API that is down
//! at start. No test contacts a real cluster.

use std::time::Duration;

use dp::source::api::{self as kube_source, KubeChange, KubeSource};
use e2e::apiserver::FakeApiServer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(20);

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]}})
}

fn slice(service: &str, ip: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"port": 8080}],
        "endpoints": [{"addresses": [ip]}]})
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}})
}

struct Harness {
    server: FakeApiServer,
    source: KubeSource,
    changed: mpsc::UnboundedReceiver<KubeChange>,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn start(server: FakeApiServer, test: &str) -> Harness {
    let dir = std::env::temp_dir().join(format!("dp-kube-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let config = kube_source::config(Some(&kubeconfig)).await.unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let (tx, changed) = mpsc::unbounded_channel();
    let source = KubeSource::start(client, "node1", tx);
    Harness {
        server,
        source,
        changed,
        _dir: tempdir::Dir(dir),
    }
}

impl Harness {
    /// Waits (on change notifications) until `check` holds for a ready source.
    async fn until(&mut self, what: &str, check: impl Fn(&dp::source::manifests::Objects) -> bool) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if self.source.ready() && check(&self.source.snapshot()) {
                return;
            }
            match tokio::time::timeout_at(deadline, self.changed.recv()).await {
                Ok(Some(_)) => {}
                _ => panic!("never saw: {what}"),
            }
        }
    }
}

fn services(o: &dp::source::manifests::Objects) -> Vec<String> {
    let mut names: Vec<String> = o
        .services
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    names.sort();
    names
}

fn lists(server: &FakeApiServer, path: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.contains(path) && !r.contains("watch=true"))
        .count()
}

#[tokio::test]
async fn lists_then_follows_the_watch_stream() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", "10.96.0.10"));
    server.apply(slice("web", "10.244.1.5"));
    server.apply(node("node1"));
    server.apply(node("node2"));
    let mut h = start(server, "watch").await;
    h.until("the initial list", |o| {
        services(o) == ["web"] && o.slices.len() == 1 && o.nodes.len() == 1
    })
    .await;
    assert_eq!(
        h.source.snapshot().nodes[0].metadata.name.as_deref(),
        Some("node1"),
        "only the agent's own Node (field selector)"
    );
    h.server.apply(service("api", "10.96.0.11"));
    h.until("an ADDED service", |o| services(o) == ["api", "web"])
        .await;
    h.server.apply(slice("web", "10.244.1.6"));
    h.until("a MODIFIED slice", |o| {
        o.slices[0].endpoints[0].addresses[0] == "10.244.1.6"
    })
    .await;
    h.server.delete(&service("web", ""));
    h.until("a DELETED service", |o| services(o) == ["api"])
        .await;
    // Bookmarks move the resourceVersion on, nothing else.
    h.server.bookmark();
    h.server.apply(service("db", "10.96.0.12"));
    h.until("events after a bookmark", |o| services(o) == ["api", "db"])
        .await;
    assert_eq!(lists(&h.server, "/api/v1/services"), 1, "no relist needed");
}

#[tokio::test]
async fn a_410_gone_watch_is_followed_by_a_relist() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", "10.96.0.10"));
    let mut h = start(server, "gone").await;
    h.until("the initial list", |o| services(o) == ["web"])
        .await;
    // The watch follows the list: expired before it is open, there would be
    // nothing to expire (and the change below would come by the watch).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !h
        .server
        .requests()
        .iter()
        .any(|r| r.contains("/api/v1/services") && r.contains("watch=true"))
    {
        assert!(tokio::time::Instant::now() < deadline, "no watch opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.server.expire_watches();
    // Changed while the client had no watch: only a relist shows it.
    h.server.apply(service("late", "10.96.0.13"));
    h.until("the relisted state", |o| services(o) == ["late", "web"])
        .await;
    assert!(
        lists(&h.server, "/api/v1/services") >= 2,
        "{:?}",
        h.server.requests()
    );
}

#[tokio::test]
async fn dropped_watch_connections_are_resumed() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", "10.96.0.10"));
    let mut h = start(server, "dropped").await;
    h.until("the initial list", |o| services(o) == ["web"])
        .await;
    h.server.drop_connections();
    h.server.apply(service("after", "10.96.0.14"));
    h.until("changes after the drop", |o| {
        services(o) == ["after", "web"]
    })
    .await;
}

#[tokio::test]
async fn an_api_that_is_down_at_start_is_waited_for() {
    let server = FakeApiServer::start().unwrap();
    server.set_down(true);
    server.apply(service("web", "10.96.0.10"));
    let mut h = start(server, "down").await;
    // Not ready while the API answers 503: the agent syncs nothing (the
    // pinned state stays).
    let waited = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            h.changed.recv().await;
            if h.source.ready() {
                break;
            }
        }
    })
    .await;
    assert!(
        waited.is_err() && !h.source.ready(),
        "ready while the API is down"
    );
    assert!(h
        .server
        .requests()
        .iter()
        .any(|r| r.contains("/api/v1/services")));
    h.server.set_down(false);
    h.until("the list once the API is up", |o| services(o) == ["web"])
        .await;
}

fn service_cidr(name: &str, cidrs: &[&str]) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": name}, "spec": {"cidrs": cidrs}})
}

impl Harness {
    /// The next ServiceCIDR report, skipping other changes.
    async fn next_service_cidrs(&mut self) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.changed.recv()).await {
                Ok(Some(KubeChange::ServiceCidrs(c))) => return c,
                Ok(Some(_)) => {}
                _ => panic!("no ServiceCidrs change"),
            }
        }
    }
}

/// Where the API serves ServiceCIDR objects, their CIDRs are reported on
/// every change (the agent drops traffic to unallocated ClusterIPs in
/// them); the stores' readiness does not wait for them.
#[tokio::test]
async fn service_cidrs_are_followed_where_the_api_serves_them() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service_cidr(
        "kubernetes",
        &["10.96.0.0/16", "fd00:10:96::/108"],
    ));
    let mut h = start(server, "cidrs").await;
    assert_eq!(
        h.next_service_cidrs().await,
        ["10.96.0.0/16", "fd00:10:96::/108"]
    );
    h.server.apply(service_cidr("extra", &["10.97.0.0/24"]));
    let mut cidrs = h.next_service_cidrs().await;
    cidrs.sort();
    assert_eq!(cidrs, ["10.96.0.0/16", "10.97.0.0/24", "fd00:10:96::/108"]);
}

/// An API server without ServiceCIDRs (before Kubernetes 1.33) answers 404:
/// one request, no report, and the other kinds are served as ever.
#[tokio::test]
async fn an_api_without_service_cidrs_is_asked_once() {
    let server = FakeApiServer::start().unwrap();
    server.serve_service_cidrs(false);
    server.apply(service("web", "10.96.0.10"));
    let mut h = start(server, "no-cidrs").await;
    h.until("the initial list", |o| services(o) == ["web"])
        .await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while lists(&h.server, "/servicecidrs") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ServiceCIDRs never asked for"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.server.apply(service("late", "10.96.0.13"));
    loop {
        match tokio::time::timeout(TIMEOUT, h.changed.recv()).await {
            Ok(Some(KubeChange::ServiceCidrs(c))) => panic!("reported {c:?}"),
            Ok(Some(KubeChange::Service(_))) if services(&h.source.snapshot()).len() == 2 => break,
            Ok(Some(_)) => {}
            _ => panic!("never saw the late service"),
        }
    }
    assert_eq!(
        lists(&h.server, "/servicecidrs"),
        1,
        "{:?}",
        h.server.requests()
    );
}
