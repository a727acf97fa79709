//! `dp trace` end to end: agents on a two-node namespace cluster, real
//! clients, and `dp trace` sessions reading the agents' pins. For a
//! forwarded flow, a service without endpoints, a port not served, a
//! source-range drop and an eTP=Local drop, the trace shows the verdict and
//! reason within a second of the packet, its JSON parses, its pcapng opens
//! with tshark with the verdicts as packet comments, and `dp explain` says
//! what the traffic got.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use e2e::Netns;
use serde_json::Value;
use support::agents::*;

/// web: endpoints on both nodes. db: its only endpoint is not ready. With
/// `ADMIN_WITH_SOURCE_RANGES` and `LOCAL_TRAFFIC_POLICY` (support).
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1, targetRef: {kind: Pod, name: pod-1-0, namespace: default}}
- {addresses: [10.244.2.10], nodeName: node2, targetRef: {kind: Pod, name: pod-2-0, namespace: default}}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: default, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 8080}]
endpoints:
- {addresses: [10.244.2.11], nodeName: node2, conditions: {ready: false}}
"#;

/// How soon after the packet its trace line must be out.
const WITHIN: Duration = Duration::from_secs(1);

/// A connect given up before TCP sends its SYN again (its first
/// retransmission comes after 1 s).
const ONE_SYN: Duration = Duration::from_millis(500);

/// Sends one TCP connection from `ns` to `addr` on a thread (it may take up
/// to `ONE_SYN` when dropped) and returns the first trace line of a
/// packet to `addr` that `wanted` accepts, read within `WITHIN` of the send.
fn traced(
    trace: &TraceProcess,
    ns: &Netns,
    addr: SocketAddr,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let sent = Instant::now();
    let client = ns
        .spawn(move || {
            // Refused, timed out or answered: the trace tells which. Given
            // up before the SYN's first retransmission (1 s), so a dropped
            // connection is one event, not sometimes two.
            let _ = std::net::TcpStream::connect_timeout(&addr, ONE_SYN);
        })
        .unwrap();
    let line = loop {
        let left = WITHIN.saturating_sub(sent.elapsed());
        let line = trace
            .next_line(left)
            .unwrap_or_else(|| panic!("no trace line for {addr} within {WITHIN:?}"));
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("trace line is not JSON ({e}): {line}"));
        assert_eq!(v["schema"], "dp.trace/v1");
        let to_addr = v["destination"]["ip"] == addr.ip().to_string()
            && v["destination"]["port"] == addr.port();
        if to_addr && wanted(&v) {
            break v;
        }
    };
    client.join().unwrap();
    line
}

/// The trace verdict as `dp explain` words it.
fn explain_verdict(trace_verdict: &str) -> &'static str {
    match trace_verdict {
        "forwarded" => "forward",
        "rejected" => "reject",
        "dropped" => "drop",
        "passed" => "pass",
        other => panic!("verdict {other}"),
    }
}

fn assert_explain_agrees(pins: &Path, from: &str, to: &str, event: &Value) {
    let e = explain(pins, from, to);
    assert_eq!(
        (e["verdict"].as_str().unwrap(), &e["reason"]),
        (
            explain_verdict(event["verdict"].as_str().unwrap()),
            &event["reason"]
        ),
        "dp explain --from {from} --to {to} vs the trace: {e} / {event}"
    );
}

#[test]
fn trace_names_each_verdict_and_reason_as_it_happens() {
    let f = AgentCluster::new(
        &[MANIFESTS, ADMIN_WITH_SOURCE_RANGES, LOCAL_TRAFFIC_POLICY],
        "trace",
    );
    let pins1 = f.pins("node1");
    let pins2 = f.pins("node2");
    let pod11 = f.cluster.pod_ns("pod-1-1");
    let pcap = std::env::temp_dir().join(format!("dp-trace-{}.pcapng", std::process::id()));

    // node1: everything pod-1-1 sends or receives, as JSON and pcapng.
    let mut t1 = TraceProcess::start(
        f.cluster.node_ns(0),
        &pins1,
        &[
            "-o",
            "json",
            "--ip",
            "10.244.1.11",
            "--explain",
            "-w",
            pcap.to_str().unwrap(),
        ],
    );

    // A forwarded flow, named in the cluster's terms.
    let web: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let fwd = traced(&t1, pod11, web, |v| {
        v["tcp_flags"] == serde_json::json!(["SYN"])
    });
    eprintln!("forwarded: {fwd}");
    assert_eq!(fwd["verdict"], "forwarded", "{fwd}");
    assert_eq!(fwd["reason"], "new_flow");
    assert_eq!(fwd["service"]["name"], "default/web:http");
    assert_eq!(fwd["hook"], "tc/ingress");
    let backend = fwd["backend"]["pod"].as_str().unwrap();
    assert!(
        backend == "default/pod-1-0" || backend == "default/pod-2-0",
        "{fwd}"
    );
    assert_eq!(
        fwd["nat"]["destination"].as_str().unwrap(),
        format!("{}:8080", fwd["backend"]["ip"].as_str().unwrap())
    );
    assert!(
        fwd.get("explain").is_none(),
        "hints only for drops and rejects"
    );
    // Sent on by the datapath itself: to the local backend's veth, or out
    // of eth0 towards node2.
    let sent_to = fwd["sent_to"].as_str().unwrap_or_else(|| panic!("{fwd}"));
    let expected_device = if backend == "default/pod-1-0" {
        f.cluster.pod("pod-1-0").host_device.clone()
    } else {
        "eth0".to_string()
    };
    assert_eq!(sent_to, expected_device, "{fwd}");
    assert_explain_agrees(&pins1, "10.244.1.11", "10.96.0.10:80/tcp", &fwd);

    // A service whose only endpoint is not ready: rejected, with the count.
    let db: SocketAddr = "10.96.0.20:5432".parse().unwrap();
    let rej = traced(&t1, pod11, db, |v| v["verdict"] != "forwarded");
    assert_eq!(
        (&rej["verdict"], &rej["reason"]),
        (&"rejected".into(), &"no_endpoints".into())
    );
    assert_eq!(rej["service"]["name"], "default/db:pg");
    assert_eq!(
        rej["detail"],
        "default/db:pg has 0 ready and 0 serving-terminating endpoints"
    );
    let hint = rej["explain"]["next"][0].as_str().unwrap();
    assert!(hint.contains("kubernetes.io/service-name=db"), "{hint}");
    assert_explain_agrees(&pins1, "10.244.1.11", "10.96.0.20:5432/tcp", &rej);

    // A port the ClusterIP does not serve.
    let wrong_port: SocketAddr = "10.96.0.10:81".parse().unwrap();
    let unserved = traced(&t1, pod11, wrong_port, |v| v["reason"] != "new_flow");
    assert_eq!(
        (&unserved["verdict"], &unserved["reason"]),
        (&"rejected".into(), &"port_not_served".into())
    );
    assert_eq!(
        unserved["detail"],
        "10.96.0.10 serves only 80/TCP (default/web:http)"
    );
    assert_explain_agrees(&pins1, "10.244.1.11", "10.96.0.10:81/tcp", &unserved);
    // Ctrl-C ends the session cleanly and frees its slot.
    assert!(t1.interrupt().success());

    // node2: two sessions at once, each with its own in-kernel filter.
    let ranges = TraceProcess::start(
        f.cluster.node_ns(1),
        &pins2,
        &["-o", "json", "--reason", "source_range_denied"],
    );
    let local = TraceProcess::start(
        f.cluster.node_ns(1),
        &pins2,
        &[
            "-o",
            "json",
            "--verdict",
            "dropped",
            "--service",
            "default/local",
        ],
    );
    // A pod outside admin's loadBalancerSourceRanges.
    let admin: SocketAddr = "203.0.113.11:80".parse().unwrap();
    let denied = traced(&ranges, f.cluster.pod_ns("pod-2-0"), admin, |_| true);
    assert_eq!(
        (&denied["verdict"], &denied["reason"]),
        (&"dropped".into(), &"source_range_denied".into())
    );
    assert_eq!(
        denied["detail"],
        "10.244.2.10 is not in loadBalancerSourceRanges of default/admin (172.18.0.100/32)"
    );
    assert_explain_agrees(&pins2, "10.244.2.10", "203.0.113.11:80/tcp", &denied);
    // An external client at node2, where `local` has no endpoint.
    let node_port: SocketAddr = "172.18.0.3:30083".parse().unwrap();
    let no_local = traced(&local, f.cluster.client_ns(), node_port, |_| true);
    assert_eq!(
        (&no_local["verdict"], &no_local["reason"]),
        (&"dropped".into(), &"no_local_endpoints".into())
    );
    assert_eq!(no_local["hook"], "xdp", "dropped at the earliest hook");
    assert_eq!(no_local["service"]["name"], "default/local");
    assert_explain_agrees(&pins2, "172.18.0.100", "172.18.0.3:30083/tcp", &no_local);
    // Each session saw only its own: the other one's drop is not here.
    assert!(ranges.next_line(Duration::from_millis(200)).is_none());
    assert!(local.next_line(Duration::from_millis(200)).is_none());

    // After the fact: the datapath kept the drop, `--since` shows it.
    drop(ranges);
    let mut later = TraceProcess::start(
        f.cluster.node_ns(1),
        &pins2,
        &[
            "-o",
            "json",
            "--since",
            "1m",
            "--reason",
            "source_range_denied",
            "--count",
            "1",
        ],
    );
    let kept: Value =
        serde_json::from_str(&later.next_line(WITHIN).expect("the kept drop")).unwrap();
    assert_eq!(kept["monotonic_ns"], denied["monotonic_ns"], "{kept}");
    assert_eq!(kept["source"]["ip"], "10.244.2.10");
    assert!(later.interrupt().success(), "--count 1: done after one");

    // The pcapng: tshark reads it, decodes the headers, shows the comments.
    let out = Command::new("tshark")
        .arg("-r")
        .arg(&pcap)
        .args([
            "-T",
            "fields",
            "-e",
            "ip.dst",
            "-e",
            "tcp.dstport",
            "-e",
            "frame.comment",
        ])
        .output()
        .expect("tshark (installed by cargo xtask setup)");
    let _ = std::fs::remove_file(&pcap);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().collect();
    let row = |dst: &str, port: &str| {
        rows.iter()
            .find(|r| r.starts_with(&format!("{dst}\t{port}\t")))
            .unwrap_or_else(|| panic!("no packet to {dst}:{port} in {text}"))
            .to_string()
    };
    assert!(
        row("10.96.0.10", "80").contains("forwarded: new flow to a backend"),
        "{text}"
    );
    assert!(row("10.96.0.20", "5432").contains("rejected"), "{text}");
    assert!(row("10.96.0.10", "81").contains("rejected"), "{text}");
}
