//! How much of the verifier's budget each program takes. The kernel
//! verifies a program by walking its paths, up to 1 000 000 instructions;
//! beyond that the program does not load at all. A datapath change that
//! nears the limit fails here, with the figures, before it fails to load
//! on a kernel whose verifier prunes less.

mod support;

use common::Hook;

/// The kernel's limit on instructions processed per program
/// (`BPF_COMPLEXITY_LIMIT_INSNS`).
const VERIFIER_LIMIT: u32 = 1_000_000;
/// Headroom kept: no program may take more than this share of the limit.
const MAX_SHARE_PERCENT: u32 = 60;

#[test]
fn every_program_keeps_headroom_under_the_verifier_limit() {
    let mut dp = support::load();
    // The socket hooks load only with `--socket-lb`; verified here too.
    dp.load_socket_programs().expect("the socket hooks load");
    let text = |r: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>| {
        r.map_err(|e| e.to_string())
    };
    let programs = [
        (
            "dp_tc_ingress",
            text(dp.tc_program(Hook::TcIngress).unwrap().info()),
        ),
        (
            "dp_tc_egress",
            text(dp.tc_program(Hook::TcEgress).unwrap().info()),
        ),
        ("dp_xdp", text(dp.xdp_program().unwrap().info())),
    ]
    .into_iter()
    .chain(
        dp.socket_programs()
            .into_iter()
            .map(|(name, info)| (name, info.map_err(|e| e.to_string()))),
    );
    let mut over = Vec::new();
    for (name, info) in programs {
        let n = info
            .expect("program info")
            .verified_instruction_count()
            .expect("the kernel reports verified instructions (5.16+)");
        let share = u64::from(n) * 100 / u64::from(VERIFIER_LIMIT);
        println!("{name}: {n} instructions verified ({share} % of the limit)");
        if n > VERIFIER_LIMIT / 100 * MAX_SHARE_PERCENT {
            over.push(format!("{name}: {n}"));
        }
    }
    assert!(
        over.is_empty(),
        "over {MAX_SHARE_PERCENT} % of the verifier's limit: {over:?}"
    );
}
