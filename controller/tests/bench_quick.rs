//! `dp-bench --quick` (what `cargo xtask bench --quick` runs): the whole
//! harness end to end on N = 1 and 1 000, every dataplane (dp with socket
//! LB too), from a pod, the node and the external client. Proves that it
//! loads each dataplane, carries traffic through it, measures changes and
//! memory, and writes JSON, tables and plots. Figures are not judged here
//! (speed is for `cargo xtask bench`, not for tests).

use std::{path::PathBuf, process::Command};

#[test]
fn quick_bench_measures_every_dataplane() {
    e2e::require_root();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dp-bench-quick");
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_dp-bench"))
        .args(["--quick", "--command", "cargo test --test bench_quick"])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run dp-bench");
    assert!(status.success(), "dp-bench --quick failed: {status}");

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["schema"], "dp.bench/v1");
    let points = results["points"].as_array().unwrap();
    let planes = [
        "Direct",
        "Dp",
        "DpSocketLb",
        "IptablesNft",
        "IptablesLegacy",
        "Nftables",
    ];
    assert_eq!(points.len(), 2 * planes.len(), "{points:#?}");
    for p in points {
        let (plane, n) = (
            p["dataplane"].as_str().unwrap(),
            p["services"].as_u64().unwrap(),
        );
        let at = format!("{plane} at N={n}");
        for entry in ["cluster_ip", "node_port", "from_node"] {
            let t = &p[entry];
            assert!(
                t["first_packet_last"]["p50"]["median"].as_f64().unwrap() > 0.0,
                "{at} {entry}"
            );
            assert_eq!(t["first_packet_last"]["errors"], 0, "{at} {entry}");
            assert!(
                t["connections_per_second"]["median"].as_f64().unwrap() > 0.0,
                "{at} {entry}"
            );
            assert!(
                t["rr_latency"]["p99"]["median"].as_f64().unwrap() > 0.0,
                "{at} {entry}"
            );
            assert!(
                t["udp_packets_per_second"]["median"].as_f64().unwrap() > 0.0,
                "{at} {entry}"
            );
        }
        assert_eq!(p["cluster_ip"]["first_packet_random"]["errors"], 0, "{at}");
        assert_eq!(p["from_node"]["first_packet_random"]["errors"], 0, "{at}");
        // The socket hooks served dp-socket-lb's clients (pod and node), at
        // the connect, none left to tc; no other dataplane has the figure.
        if plane == "DpSocketLb" {
            let c = &p["socket_connects"];
            assert!(c["translated"].as_u64().unwrap() > 1000, "{at}: {c}");
            assert_eq!(c["left_to_tc"], 0, "{at}");
        } else {
            assert!(p["socket_connects"].is_null(), "{at}");
        }
        if plane == "Direct" {
            assert!(p["endpoint_change"].is_null(), "{at}");
            continue;
        }
        assert!(p["load_seconds"].as_f64().unwrap() > 0.0, "{at}");
        assert!(p["kernel_memory_bytes"].as_u64().unwrap() > 0, "{at}");
        let change = &p["endpoint_change"];
        assert_eq!(change["changes"], 10, "{at}");
        assert!(change["p50_ms"].as_f64().unwrap() > 0.0, "{at}");
        let objects = p["objects"].as_u64().unwrap();
        match plane {
            // ClusterIPs, NodePorts (every 20th) and the UDP service's two.
            "Dp" => assert_eq!(objects, n + n.div_ceil(20) + 2, "{at}"),
            // The same, and the NodePorts on 127.0.0.1 (socket LB serves them).
            "DpSocketLb" => assert_eq!(objects, n + 2 * n.div_ceil(20) + 3, "{at}"),
            // 3M + 2 nat rules per ClusterIP service with M = 10 endpoints.
            "IptablesNft" | "IptablesLegacy" => assert!(objects >= 32 * (n + 1), "{at}: {objects}"),
            // 2M + 2 rules per service.
            _ => assert!(objects >= 22 * (n + 1), "{at}: {objects}"),
        }
        if plane.starts_with("Dp") {
            assert!(p["agent_rss_bytes"].as_u64().unwrap() > 0, "{at}");
            assert!(change["agent_p50_ms"].as_f64().unwrap() > 0.0, "{at}");
        }
    }
    let tables = std::fs::read_to_string(out.join("tables.md")).unwrap();
    for heading in [
        "#### 1000 services x 10 endpoints: ClusterIP from a pod",
        "#### 1000 services x 10 endpoints: NodePort from the external client",
        "#### 1000 services x 10 endpoints: ClusterIP from the node (a host process)",
        "#### Socket-level load balancing against direct",
        "#### Control plane and memory",
    ] {
        assert!(tables.contains(heading), "{heading} missing:\n{tables}");
    }
    for plot in [
        "first-connection-last-service.svg",
        "first-connection-random-service.svg",
        "first-connection-nodeport.svg",
        "connection-rate.svg",
        "endpoint-change.svg",
        "initial-load.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
    }
}
