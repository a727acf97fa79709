//! The README's main command (`dp demo`) runs end to end and cleans up.

#[test]
fn demo_runs_and_reports_what_it_did() {
    e2e::require_root();
    let mut out = Vec::new();
    dp::demo::run(&mut out).expect("dp demo");
    let out = String::from_utf8(out).unwrap();
    for expected in [
        "attached xdp, tc/ingress and tc/egress",
        "echoed back",
        "TCP SYN passed: no service for this destination",
        "UDP passed: no service for this destination",
        "tc/egress",
        "teardown: programs detached and unloaded, namespaces deleted",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}
