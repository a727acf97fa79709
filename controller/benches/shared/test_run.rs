//! Shared by the BPF_PROG_TEST_RUN benchmarks (`#[path]`-included).

use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

/// One program run on `data`, as the kernel timed it (the syscall around
/// it is not counted).
pub fn run_once(prog: &SchedClassifier, data: &[u8], out: &mut [u8]) -> Duration {
    let opts = TestRunOptions {
        data_in: Some(data),
        data_out: Some(out),
        repeat: 1,
        ..TestRunOptions::default()
    };
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").duration
}
