//! The README's main command (`dp demo`) runs end to end and cleans up.

#[test]
fn demo_runs_and_reports_what_it_did() {
    e2e::require_root();
    let mut out = Vec::new();
    dp::demo::run(&mut out).expect("dp demo");
    let out = String::from_utf8(out).unwrap();
    for expected in [
        "loaded one datapath per node",
        "answered by pod-1-1 x",
        "pod-2-0 x",
        "Connection refused",
        "forwarded: new flow to a backend; service 1",
        "reply, reverse-NATed to the service address",
        "rejected: no endpoints; service 2",
        "teardown: programs detached and unloaded, namespaces deleted",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}
