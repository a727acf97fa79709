//! dp-bench's measuring tools besides the main run: `pair` (socket LB's
//! target judged on paired rounds), `socket-direct` (that target on one
//! cluster), `tc-floor` (what any tc program on the path costs) and
//! `hook-cost` (BPF run time per program and connection).
//! Each runs once, briefly, on its real clusters and programs, and must
//! print its whole table with figures in it. Figures are not judged here
//! (speed is for the benchmarks, not for tests).

use std::process::Command;

/// Runs dp-bench with `args`; its stdout, after checking it succeeded.
fn dp_bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dp-bench"))
        .args(args)
        .output()
        .expect("run dp-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dp-bench {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The table rows (not the header or its rule) whose cells start with
/// `prefix` (`| a | b |` -> cells `a`, `b`).
fn rows<'a>(table: &'a str, prefix: &[&str]) -> Vec<Vec<&'a str>> {
    table
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("| ---"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .filter(|cells| cells.len() >= prefix.len() && cells[..prefix.len()] == *prefix)
        .collect()
}

/// A positive number at the start of a cell (`0.981x (...)`, `35210`).
fn number(cell: &str) -> f64 {
    let n: String = cell
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    n.parse()
        .unwrap_or_else(|_| panic!("no number in cell {cell:?}"))
}

#[test]
fn pair_tc_floor_and_hook_cost_print_their_tables() {
    e2e::require_root();

    let pair = dp_bench(&[
        "pair",
        "--services",
        "1",
        "--dataplanes",
        "direct,dp-socket-lb",
        "--rounds",
        "1",
        "--seconds",
        "0.3",
        "--first",
        "20",
    ]);
    for client in ["node", "pod"] {
        let direct = rows(&pair, &["1", client, "direct"]);
        assert_eq!(direct.len(), 1, "{pair}");
        assert_eq!(number(direct[0][4]), 1.0, "{pair}");
        let sock = rows(&pair, &["1", client, "dp-socket-lb"]);
        assert_eq!(sock.len(), 1, "{pair}");
        let row = &sock[0];
        for cell in &row[3..9] {
            assert!(number(cell) > 0.0, "{pair}");
        }
        assert!(row[9] == "met" || row[9] == "missed", "{pair}");
    }

    let floor = dp_bench(&[
        "tc-floor",
        "--rounds",
        "1",
        "--seconds",
        "0.3",
        "--run-time",
    ]);
    for client in ["node", "pod"] {
        for variant in [
            "nothing",
            "no-op tc program",
            "dp's tc programs, no services",
            "dp's tc programs and socket hooks (all), no services",
        ] {
            let r = rows(&floor, &[client, variant]);
            assert_eq!(r.len(), 1, "{client} {variant}: {floor}");
            assert!(number(r[0][2]) > 0.0, "{floor}");
            assert!(number(r[0][3]) > 0.0, "{floor}");
            // BPF time per tc run and per connection: none with nothing
            // attached, some with any program.
            let expect_time = variant != "nothing";
            assert_eq!(number(r[0][4]) > 0.0, expect_time, "{floor}");
            assert_eq!(number(r[0][5]) > 0.0, expect_time, "{floor}");
        }
    }

    let cost = dp_bench(&[
        "hook-cost",
        "--services",
        "1",
        "--dataplanes",
        "dp-socket-lb",
        "--seconds",
        "0.3",
    ]);
    for client in ["node", "pod"] {
        // The socket hook ran once per connection to a ClusterIP, and tc's
        // programs on its packets.
        let connect = rows(&cost, &["dp-socket-lb", client, "ClusterIPs"]);
        let by_program = |name: &str| {
            connect
                .iter()
                .find(|r| r[4] == name)
                .unwrap_or_else(|| panic!("no {name} row for {client}: {cost}"))
        };
        assert!(number(by_program("dp_sock_connect")[5]) >= 1.0, "{cost}");
        assert!(number(by_program("dp_tc_ingress")[5]) > 0.0, "{cost}");
        assert!(number(by_program("dp_tc_egress")[5]) > 0.0, "{cost}");
    }
}

#[test]
fn socket_direct_prints_its_table() {
    e2e::require_root();
    // Connections to the ClusterIPs fail on a cluster without a dataplane:
    // the tool stops at the first failed one, so a table means dp's socket
    // hooks translated every one.
    let out = dp_bench(&[
        "socket-direct",
        "--services",
        "2",
        "--rounds",
        "2",
        "--seconds",
        "0.3",
        "--first",
        "20",
    ]);
    for client in ["node", "pod"] {
        let direct = rows(&out, &["2", client, "direct"]);
        assert_eq!(direct.len(), 1, "{out}");
        assert_eq!(number(direct[0][4]), 1.0, "{out}");
        let sock = rows(&out, &["2", client, "dp-socket-lb"]);
        assert_eq!(sock.len(), 1, "{out}");
        for cell in &sock[0][3..7] {
            assert!(number(cell) > 0.0, "{out}");
        }
        assert!(sock[0][7] == "met" || sock[0][7] == "missed", "{out}");
    }
}
