//! Shared by the BPF_PROG_TEST_RUN benchmarks (`#[path]`-included).

use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

thread_local! {
    /// Each benchmark thread runs the programs in an empty network
    /// namespace of its own, as the tests do: the datapath's FIB lookups
    /// find no route there (a packet it would send on is left to the
    /// stack), whatever the machine's own routes are.
    static EMPTY_NETNS: () = {
        // SAFETY: affects only the calling thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): run the benchmarks as root");
    };
}

/// One program run on `data`, as the kernel timed it (the syscall around
/// it is not counted).
pub fn run_once(prog: &SchedClassifier, data: &[u8], out: &mut [u8]) -> Duration {
    EMPTY_NETNS.with(|()| ());
    let opts = TestRunOptions {
        data_in: Some(data),
        data_out: Some(out),
        repeat: 1,
        ..TestRunOptions::default()
    };
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").duration
}
