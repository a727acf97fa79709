//! kube-proxy's service health checks (`healthCheckNodePort`).
//!
//! A `type: LoadBalancer` Service with `externalTrafficPolicy: Local` has a
//! `healthCheckNodePort`; the cloud load balancer polls it on every node to
//! send traffic only to nodes that have a ready endpoint of the Service.
//! Like kube-proxy (`pkg/proxy/healthcheck/service_health.go`), the agent
//! listens on that TCP port (one listener per Service, not per service
//! port), on all addresses (`0.0.0.0`, kube-proxy's default) or, with
//! `--nodeport-addresses`, on each node address in those CIDRs, and answers
//! every request, whatever its method and path, with
//!
//! - `200` if the Service has a ready endpoint on this node and the agent is
//!   healthy (what its `/healthz` says), `503` otherwise;
//! - headers `Content-Type: application/json`,
//!   `X-Content-Type-Options: nosniff` and
//!   `X-Load-Balancing-Endpoint-Weight: <local endpoints>`;
//! - kube-proxy's body, byte for byte (tab-indented, no final newline):
//!   the Service's namespace and name, `localEndpoints` and
//!   `serviceProxyHealthy`.
//!
//! [`HealthCheckServer::sync`] is called after every successful apply of
//! the desired state: listeners of Services that appeared are opened, those
//! of Services that went are closed, and the counts of the others change in
//! place (the listener stays). A port that cannot be bound is logged,
//! reported in the [`SyncReport`] and tried again on the next sync; it never
//! stops the agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt,
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::metrics;
use crate::translate::DesiredState;

/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What one health check port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node (distinct IPs).
    pub local_endpoints: u32,
}

/// The health check ports the desired state asks for: port -> Service and
/// its local endpoint count.
///
/// The count is the number of distinct endpoint IPs in `endpoints.ready`
/// over all the Service's frontends that carry a `health_check_node_port`
/// (its eTP=Local external frontends, whose `endpoints` are this node's
/// endpoints only). Like kube-proxy's `LocalReadyEndpoints`, it counts ready
/// endpoints only (a node with only terminating endpoints fails the check,
/// so the load balancer drains it), across all the Service's ports, and an
/// endpoint serving several ports (10.0.0.1:80 and 10.0.0.1:443) once.
///
/// The API server allocates health check node ports uniquely; should two
/// Services still name the same port, the first by namespace/name gets it.
pub fn health_checks(desired: &DesiredState) -> BTreeMap<u16, ServiceHealth> {
    let mut by_service: BTreeMap<(&str, &str), (u16, BTreeSet<IpAddr>)> = BTreeMap::new();
    for f in desired.frontends.values() {
        let Some(port) = f.health_check_node_port else {
            continue;
        };
        let (_, ips) = by_service
            .entry((&f.service.namespace, &f.service.name))
            .or_insert((port, BTreeSet::new()));
        ips.extend(f.endpoints.ready.iter().map(|e| e.addr.ip()));
    }
    let mut out = BTreeMap::new();
    for ((namespace, name), (port, ips)) in by_service {
        out.entry(port).or_insert_with(|| ServiceHealth {
            namespace: namespace.to_string(),
            name: name.to_string(),
            local_endpoints: u32::try_from(ips.len()).unwrap_or(u32::MAX),
        });
    }
    out
}

/// kube-proxy's body for `check` (tab-indented, no final newline).
pub fn body(check: &ServiceHealth, proxy_healthy: bool) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        quote(&check.namespace),
        quote(&check.name),
        check.local_endpoints,
        proxy_healthy
    )
}

/// The whole HTTP response to a request (`head_only`: to a `HEAD`).
pub fn response(check: &ServiceHealth, proxy_healthy: bool, head_only: bool) -> String {
    let body = body(check, proxy_healthy);
    let (status, reason) = if check.local_endpoints != 0 && proxy_healthy {
        (200, "OK")
    } else {
        (503, "Service Unavailable")
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        check.local_endpoints,
        body.len()
    );
    if !head_only {
        let _ = write!(out, "{body}");
    }
    out
}

/// What a [`HealthCheckServer::sync`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Ports now listened on that were not before.
    pub opened: Vec<u16>,
    /// Ports no longer listened on.
    pub closed: Vec<u16>,
    /// Ports that could not be bound (tried again on the next sync), with
    /// the Service (`namespace/name`) and the error.
    pub failed: Vec<(u16, String, io::Error)>,
}

/// The health check listeners, kept in step with the desired state.
///
/// Listeners are tokio tasks: `sync` must be called within a tokio runtime.
/// Dropping the server closes them.
pub struct HealthCheckServer {
    bind_ips: Vec<IpAddr>,
    /// Asked for the agent's health (`/healthz`'s answer) on every request.
    health: mpsc::Sender<metrics::Request>,
    checks: Arc<Mutex<BTreeMap<u16, ServiceHealth>>>,
    /// Per port, one listener per bind address.
    listeners: BTreeMap<u16, Vec<JoinHandle<()>>>,
}

impl HealthCheckServer {
    /// A server listening on `bind_ips` (the agent: `0.0.0.0`, or the node
    /// addresses `--nodeport-addresses` allows), asking the agent loop for
    /// its health through `health` (as the `/healthz` handler does: healthy
    /// is a 200 there). No answer (the loop has stopped) counts as
    /// unhealthy.
    pub fn new(bind_ips: Vec<IpAddr>, health: mpsc::Sender<metrics::Request>) -> Self {
        HealthCheckServer {
            bind_ips,
            health,
            checks: Arc::default(),
            listeners: BTreeMap::new(),
        }
    }

    /// Listens on `ips` from now on: open listeners close, and the next
    /// `sync` opens them on the new addresses. Whether anything changed.
    pub fn set_bind_ips(&mut self, ips: Vec<IpAddr>) -> bool {
        if ips == self.bind_ips {
            return false;
        }
        self.bind_ips = ips;
        for (_, tasks) in std::mem::take(&mut self.listeners) {
            tasks.iter().for_each(JoinHandle::abort);
        }
        true
    }

    /// Ports listened on.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Opens, closes and updates listeners to serve `desired`'s health
    /// checks (see [`health_checks`]).
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let wanted = health_checks(desired);
        let mut report = SyncReport::default();
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(tasks) = self.listeners.remove(&port) {
                tasks.iter().for_each(JoinHandle::abort);
            }
            info!(port, "health check closed");
            report.closed.push(port);
        }
        // Counts first, so a listener opened below answers right away.
        *self.checks.lock().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
        for (port, check) in wanted {
            if self.listeners.contains_key(&port) {
                continue;
            }
            let service = format!("{}/{}", check.namespace, check.name);
            match self.listen(port) {
                Ok(task) => {
                    info!(port, %service, "health check listening");
                    self.listeners.insert(port, task);
                    report.opened.push(port);
                }
                Err(error) => {
                    warn!(port, %service, %error, "cannot listen for the health check");
                    report.failed.push((port, service, error));
                }
            }
        }
        report
    }

    /// A listener on every bind address, or none (the first error).
    fn listen(&self, port: u16) -> io::Result<Vec<JoinHandle<()>>> {
        let mut listeners = Vec::new();
        for ip in &self.bind_ips {
            let listener = metrics::bind(SocketAddr::new(*ip, port))?;
            listeners.push(TcpListener::from_std(listener)?);
        }
        Ok(listeners
            .into_iter()
            .map(|l| {
                let (checks, health) = (Arc::clone(&self.checks), self.health.clone());
                tokio::spawn(serve(l, port, checks, health))
            })
            .collect())
    }
}

impl Drop for HealthCheckServer {
    fn drop(&mut self) {
        for task in self.listeners.values().flatten() {
            task.abort();
        }
    }
}

async fn serve(
    listener: TcpListener,
    port: u16,
    checks: Arc<Mutex<BTreeMap<u16, ServiceHealth>>>,
    health: mpsc::Sender<metrics::Request>,
) {
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(error) => {
                // E.g. out of file descriptors: keep the port, try again.
                warn!(port, %error, "health check accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let checks = Arc::clone(&checks);
        let health = health.clone();
        tokio::spawn(async move {
            let Ok(head) = tokio::time::timeout(READ_TIMEOUT, metrics::read_head(&mut conn)).await
            else {
                return;
            };
            if head.is_empty() {
                return;
            }
            let check = checks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&port)
                .cloned();
            // Closed between accept and now: no answer (kube-proxy's
            // handler writes nothing either).
            let Some(check) = check else {
                return;
            };
            let (tx, rx) = oneshot::channel();
            let healthy = health.send(metrics::Request::Health(tx)).await.is_ok()
                && rx.await.is_ok_and(|(status, _)| status == 200);
            let head_only = head.starts_with("HEAD ");
            let _ = conn
                .write_all(response(&check, healthy, head_only).as_bytes())
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{Ipv4Addr, TcpStream},
        sync::atomic::{AtomicBool, Ordering},
    };

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    use super::*;
    use crate::translate::{translate, NodeInfo, TranslateOptions};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node1".into(),
            ips: vec![Ipv4Addr::new(172, 18, 0, 2).into()],
            zone: None,
        }
    }

    /// A Service `ns/name` of `type`, `policy`, with two ports and the
    /// health check node port `hc`; its node ports and load balancer IP
    /// derive from the last byte of its cluster IP `ip`, so that Services
    /// do not share frontends.
    fn service(ns: &str, name: &str, ty: &str, policy: &str, hc: u16, ip: &str) -> Service {
        let n: u16 = ip.rsplit('.').next().unwrap().parse().unwrap();
        let (np1, np2) = (30000 + 2 * n, 30001 + 2 * n);
        serde_norway::from_str(&format!(
            r#"
metadata: {{name: {name}, namespace: {ns}}}
spec:
  type: {ty}
  clusterIP: {ip}
  externalTrafficPolicy: {policy}
  healthCheckNodePort: {hc}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {np1}, protocol: TCP}}
  - {{name: https, port: 443, targetPort: 8443, nodePort: {np2}, protocol: TCP}}
status:
  loadBalancer:
    ingress: [{{ip: 203.0.113.{n}}}]
"#
        ))
        .unwrap()
    }

    /// `(address, node, ready, terminating)` endpoints serving both ports.
    fn slice(ns: &str, svc: &str, eps: &[(&str, &str, bool, bool)]) -> EndpointSlice {
        let endpoints: Vec<String> = eps
            .iter()
            .map(|(a, n, ready, term)| {
                format!(
                    "- {{addresses: [{a}], nodeName: {n}, conditions: {{ready: {ready}, serving: true, terminating: {term}}}}}"
                )
            })
            .collect();
        serde_norway::from_str(&format!(
            r#"
metadata:
  name: {svc}-1
  namespace: {ns}
  labels: {{kubernetes.io/service-name: {svc}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: https, port: 8443, protocol: TCP}}
endpoints:
{}
"#,
            endpoints.join("\n")
        ))
        .unwrap()
    }

    fn desired(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
        translate(services, slices, &node(), &TranslateOptions::default())
    }

    fn check(ns: &str, name: &str, n: u32) -> ServiceHealth {
        ServiceHealth {
            namespace: ns.into(),
            name: name.into(),
            local_endpoints: n,
        }
    }

    #[test]
    fn counts_distinct_local_ready_ips_per_service() {
        let state = desired(
            &[
                service("edge", "web", "LoadBalancer", "Local", 32001, "10.96.0.1"),
                service("edge", "empty", "LoadBalancer", "Local", 32002, "10.96.0.2"),
                service(
                    "edge",
                    "only-term",
                    "LoadBalancer",
                    "Local",
                    32003,
                    "10.96.0.3",
                ),
                // Not Local, not LoadBalancer: no health check.
                service(
                    "edge",
                    "cluster",
                    "LoadBalancer",
                    "Cluster",
                    32004,
                    "10.96.0.4",
                ),
                service("edge", "np", "NodePort", "Local", 32005, "10.96.0.5"),
            ],
            &[
                slice(
                    "edge",
                    "web",
                    &[
                        ("10.244.1.1", "node1", true, false),
                        ("10.244.1.2", "node1", true, false),
                        ("10.244.1.3", "node1", false, true),
                        ("10.244.2.1", "node2", true, false),
                    ],
                ),
                slice("edge", "empty", &[("10.244.2.2", "node2", true, false)]),
                slice("edge", "only-term", &[("10.244.1.4", "node1", false, true)]),
                slice("edge", "cluster", &[("10.244.1.5", "node1", true, false)]),
                slice("edge", "np", &[("10.244.1.6", "node1", true, false)]),
            ],
        );
        // Two ports, each endpoint serving both: counted once per IP.
        assert_eq!(
            health_checks(&state),
            BTreeMap::from([
                (32001, check("edge", "web", 2)),
                (32002, check("edge", "empty", 0)),
                (32003, check("edge", "only-term", 0)),
            ])
        );
        assert!(health_checks(&DesiredState::default()).is_empty());
    }

    #[test]
    fn body_is_kube_proxys() {
        assert_eq!(
            body(&check("edge", "web", 2), true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"edge\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        // JSON-quoted.
        assert!(body(&check("a\"b", "c", 0), false).contains("\"namespace\": \"a\\\"b\","));
    }

    /// Two distinct ports nothing listens on right now.
    fn free_ports() -> (u16, u16) {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        )
    }

    /// GET (or `method`) over a plain socket: (status line, headers, body).
    fn request(port: u16, method: &str) -> io::Result<(String, Vec<String>, String)> {
        let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            conn,
            "{method} /healthz HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n"
        )?;
        let mut out = String::new();
        conn.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").expect("a response head");
        let mut lines = head.split("\r\n").map(str::to_string);
        let status = lines.next().unwrap();
        Ok((status, lines.collect(), body.to_string()))
    }

    /// The agent loop's side: answers health requests with 200 or 503.
    fn agent_health(
        rt: &tokio::runtime::Runtime,
        healthy: Arc<AtomicBool>,
    ) -> mpsc::Sender<metrics::Request> {
        let (tx, mut rx) = mpsc::channel(16);
        rt.spawn(async move {
            while let Some(r) = rx.recv().await {
                if let metrics::Request::Health(reply) = r {
                    let ok = healthy.load(Ordering::SeqCst);
                    let _ = reply.send((if ok { 200 } else { 503 }, String::new()));
                }
            }
        });
        tx
    }

    #[test]
    fn serves_opens_updates_and_closes() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let healthy = Arc::new(AtomicBool::new(true));
        let mut server = HealthCheckServer::new(
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            agent_health(&rt, Arc::clone(&healthy)),
        );
        let (p1, p2) = free_ports();
        let svc = |name: &str, port: u16, ip: &str| {
            service("edge", name, "LoadBalancer", "Local", port, ip)
        };
        let local = |name: &str, ip: &str, ready: bool| {
            slice("edge", name, &[(ip, "node1", ready, !ready)])
        };

        // web has a ready local endpoint, other none.
        let report = server.sync(&desired(
            &[svc("web", p1, "10.96.0.1"), svc("other", p2, "10.96.0.2")],
            &[local("web", "10.244.1.1", true)],
        ));
        let mut opened = vec![p1, p2];
        opened.sort();
        assert_eq!(report.opened, opened);
        assert!(report.closed.is_empty() && report.failed.is_empty());

        let (status, headers, body) = request(p1, "GET").unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        for h in [
            "Content-Type: application/json",
            "X-Content-Type-Options: nosniff",
            "X-Load-Balancing-Endpoint-Weight: 1",
        ] {
            assert!(headers.iter().any(|l| l == h), "{h} in {headers:?}");
        }
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"edge\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
        );

        let (status, headers, body) = request(p2, "GET").unwrap();
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert!(headers
            .iter()
            .any(|l| l == "X-Load-Balancing-Endpoint-Weight: 0"));
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"edge\",\n\t\t\"name\": \"other\"\n\t},\n\t\"localEndpoints\": 0,\n\t\"serviceProxyHealthy\": true\n}"
        );

        // HEAD: same head, no body.
        let (status, _, body) = request(p1, "HEAD").unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "");

        // The agent unhealthy: 503 even with endpoints.
        healthy.store(false, Ordering::SeqCst);
        let (status, _, body) = request(p1, "GET").unwrap();
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert!(body.ends_with("\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": false\n}"));
        healthy.store(true, Ordering::SeqCst);

        // Counts change in place; other's listener goes.
        let report = server.sync(&desired(
            &[svc("web", p1, "10.96.0.1")],
            &[slice(
                "edge",
                "web",
                &[
                    ("10.244.1.1", "node1", true, false),
                    ("10.244.1.2", "node1", true, false),
                ],
            )],
        ));
        assert!(report.opened.is_empty() && report.failed.is_empty());
        assert_eq!(report.closed, vec![p2]);
        assert_eq!(server.ports(), vec![p1]);
        let (status, headers, body) = request(p1, "GET").unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers
            .iter()
            .any(|l| l == "X-Load-Balancing-Endpoint-Weight: 2"));
        assert!(body.contains("\t\"localEndpoints\": 2,\n"));
        let refused = (0..100).any(|_| {
            let gone = TcpStream::connect((Ipv4Addr::LOCALHOST, p2)).is_err();
            if !gone {
                std::thread::sleep(Duration::from_millis(20));
            }
            gone
        });
        assert!(refused, "port {p2} still open after its Service went");

        // Only a terminating endpoint left: 503.
        server.sync(&desired(
            &[svc("web", p1, "10.96.0.1")],
            &[local("web", "10.244.1.1", false)],
        ));
        let (status, _, _) = request(p1, "GET").unwrap();
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");

        // A port taken by someone else: reported, the rest served, and
        // retried on the next sync.
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let p3 = taken.local_addr().unwrap().port();
        let both = desired(
            &[svc("web", p1, "10.96.0.1"), svc("blocked", p3, "10.96.0.3")],
            &[local("web", "10.244.1.1", true)],
        );
        let report = server.sync(&both);
        assert!(report.opened.is_empty());
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, p3);
        assert_eq!(report.failed[0].1, "edge/blocked");
        assert_eq!(server.ports(), vec![p1]);
        assert_eq!(request(p1, "GET").unwrap().0, "HTTP/1.1 200 OK");
        drop(taken);
        let report = server.sync(&both);
        assert_eq!(report.opened, vec![p3]);
        assert_eq!(
            request(p3, "GET").unwrap().0,
            "HTTP/1.1 503 Service Unavailable"
        );

        // Dropping the server closes everything.
        drop(server);
        let closed = (0..100).any(|_| {
            let gone = TcpStream::connect((Ipv4Addr::LOCALHOST, p1)).is_err();
            if !gone {
                std::thread::sleep(Duration::from_millis(20));
            }
            gone
        });
        assert!(closed);
    }
}
