//! The datapath's log records in the agent's log.
//!
//! The datapath logs (aya-log) only what should never happen: a map update
//! failing, per-CPU scratch space missing, a packet write, checksum update
//! or redirect failing (`dataplane-ebpf/src/diag.rs`). Decisions about
//! packets are counters and trace events, never log records. aya-log hands
//! records to a `log::Log`; [`DatapathLog`] is one that passes them on to
//! `tracing` (target `datapath`), at most [`BURST`] per call site per
//! [`INTERVAL`], with a line saying how many were suppressed once the
//! interval is over: a fault that repeats per packet must not flood the log.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya_log::EbpfLogger;
use common::Reason;
use log::{Level, Log, Metadata, Record};
use tokio::io::{unix::AsyncFd, Interest};

use crate::kernel::Datapath;

/// Records logged per call site and interval; the rest are counted.
pub const BURST: u32 = 5;
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Time since some fixed start: injected, so tests need no sleeps.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Duration;
}

/// The monotonic clock.
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Per-key fixed windows: the first `burst` records of a window pass, the
/// others are counted and reported when the window is over.
pub struct RateLimiter {
    burst: u32,
    interval: Duration,
    windows: HashMap<String, Window>,
}

struct Window {
    start: Duration,
    passed: u32,
    suppressed: u64,
}

impl RateLimiter {
    pub fn new(burst: u32, interval: Duration) -> Self {
        RateLimiter {
            burst,
            interval,
            windows: HashMap::new(),
        }
    }

    /// Whether a record for `key` at `now` is logged, and how many records
    /// of `key` the window that just ended suppressed (if it ended now).
    pub fn admit(&mut self, key: &str, now: Duration) -> (bool, Option<(String, u64)>) {
        let mut ended = None;
        if let Some(w) = self.windows.get(key) {
            if now.saturating_sub(w.start) >= self.interval {
                ended = self.close(key);
            }
        }
        let w = self.windows.entry(key.to_string()).or_insert(Window {
            start: now,
            passed: 0,
            suppressed: 0,
        });
        let pass = w.passed < self.burst;
        if pass {
            w.passed += 1;
        } else {
            w.suppressed += 1;
        }
        (pass, ended)
    }

    /// Ends the windows that are over at `now` (a periodic tick: a site
    /// that goes quiet still has its suppressed records reported) and
    /// returns the keys that suppressed records, with their counts.
    pub fn expire(&mut self, now: Duration) -> Vec<(String, u64)> {
        let over: Vec<String> = self
            .windows
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.start) >= self.interval)
            .map(|(k, _)| k.clone())
            .collect();
        let mut reports: Vec<_> = over.iter().filter_map(|k| self.close(k)).collect();
        reports.sort();
        reports
    }

    fn close(&mut self, key: &str) -> Option<(String, u64)> {
        let w = self.windows.remove(key)?;
        (w.suppressed > 0).then(|| (key.to_string(), w.suppressed))
    }
}

/// Where forwarded records go: the agent's `tracing` log, or a test's list.
pub trait Sink: Send + Sync + 'static {
    /// A record from call site `site` (`file:line` in the datapath).
    fn record(&self, level: Level, site: &str, message: &str);
    /// `count` records of `site` were not logged in the last interval.
    fn suppressed(&self, site: &str, count: u64);
}

/// `tracing`, target `datapath`.
pub struct Tracing;

impl Sink for Tracing {
    fn record(&self, level: Level, site: &str, message: &str) {
        match level {
            Level::Error => tracing::error!(target: "datapath", site, "{message}"),
            Level::Warn => tracing::warn!(target: "datapath", site, "{message}"),
            Level::Info => tracing::info!(target: "datapath", site, "{message}"),
            Level::Debug => tracing::debug!(target: "datapath", site, "{message}"),
            Level::Trace => tracing::trace!(target: "datapath", site, "{message}"),
        }
    }

    fn suppressed(&self, site: &str, count: u64) {
        tracing::warn!(
            target: "datapath",
            site,
            suppressed = count,
            "suppressed {count} more datapath log records from this site"
        );
    }
}

/// The `log::Log` aya-log writes the datapath's records to: rate-limited
/// per call site, then to `S`.
pub struct DatapathLog<S: Sink = Tracing, C: Clock = SystemClock> {
    sink: S,
    clock: C,
    limiter: Mutex<RateLimiter>,
}

impl<S: Sink, C: Clock> DatapathLog<S, C> {
    pub fn new(sink: S, clock: C, burst: u32, interval: Duration) -> Self {
        DatapathLog {
            sink,
            clock,
            limiter: Mutex::new(RateLimiter::new(burst, interval)),
        }
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Reports the sites whose interval is over with suppressed records.
    pub fn tick(&self) {
        let now = self.clock.now();
        let reports = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expire(now);
        for (site, count) in reports {
            self.sink.suppressed(&site, count);
        }
    }
}

impl<S: Sink, C: Clock> Log for DatapathLog<S, C> {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let site = format!(
            "{}:{}",
            record.file().unwrap_or("?"),
            record.line().unwrap_or(0)
        );
        let now = self.clock.now();
        let (pass, ended) = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(&site, now);
        if let Some((site, count)) = ended {
            self.sink.suppressed(&site, count);
        }
        if pass {
            let message = name_reasons(&record.args().to_string());
            self.sink.record(record.level(), &site, &message);
        }
    }

    fn flush(&self) {}
}

/// The datapath names reasons by number (a string per reason would cost
/// the verifier a path each); adds the name: `reason 14` ->
/// `reason 14 (conntrack_full)`.
pub fn name_reasons(message: &str) -> String {
    const WORD: &str = "reason ";
    let mut out = String::with_capacity(message.len() + 24);
    let mut rest = message;
    while let Some(i) = rest.find(WORD) {
        let (before, after) = rest.split_at(i + WORD.len());
        out.push_str(before);
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, tail) = after.split_at(digits);
        out.push_str(number);
        if let Some(r) = number.parse().ok().and_then(Reason::from_u32) {
            out.push_str(&format!(" ({})", r.id()));
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// Reads the datapath's log records (the `AYA_LOGS` ring buffer of the
/// loaded programs) into `log` until the runtime stops; `log.tick()` runs
/// every `interval`. Nobody has to read them: the programs work the same
/// without a reader (records that do not fit are dropped in the kernel).
pub fn forward<S: Sink, C: Clock>(
    dp: &Datapath,
    log: Arc<DatapathLog<S, C>>,
    interval: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // Any of the object's programs names the map; it is shared by all.
    let program = *dp
        .program_ids()?
        .first()
        .ok_or_else(|| anyhow::anyhow!("no program loaded"))?;
    let logger = EbpfLogger::init_from_id_with_logger(program, log.clone())?;
    // SAFETY: the logger owns the ring buffer's fd; it stays open, the same
    // fd, for as long as the logger lives, which is inside the `AsyncFd`.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    Ok(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        loop {
            tokio::select! {
                ready = fd.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "datapath log: stopped reading");
                        return;
                    }
                },
                _ = ticks.tick() => log.tick(),
            }
        }
    }))
}

/// What the agent runs: the datapath's records in its `tracing` log.
pub fn forward_to_tracing(dp: &Datapath) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let log = DatapathLog::new(Tracing, SystemClock::default(), BURST, INTERVAL);
    forward(dp, Arc::new(log), INTERVAL)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A clock the test moves by hand.
    #[derive(Clone, Default)]
    struct TestClock(Arc<AtomicU64>);

    impl TestClock {
        fn set(&self, secs: u64) {
            self.0.store(secs * 1_000_000_000, Ordering::SeqCst);
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl Sink for Lines {
        fn record(&self, level: Level, site: &str, message: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{level} {site} {message}"));
        }
        fn suppressed(&self, site: &str, count: u64) {
            self.0
                .lock()
                .unwrap()
                .push(format!("suppressed {count} {site}"));
        }
    }

    impl Lines {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_passes_then_records_are_counted_per_key_and_window() {
        let mut r = RateLimiter::new(2, 10 * S);
        let admitted = |r: &mut RateLimiter, key, t| r.admit(key, t * S);
        assert_eq!(admitted(&mut r, "a", 0), (true, None));
        assert_eq!(admitted(&mut r, "a", 1), (true, None));
        assert_eq!(admitted(&mut r, "a", 2), (false, None));
        assert_eq!(admitted(&mut r, "a", 9), (false, None));
        // Another key has its own budget.
        assert_eq!(admitted(&mut r, "b", 9), (true, None));
        // The window of "a" is over: the next record passes and reports
        // what the old one suppressed.
        assert_eq!(
            admitted(&mut r, "a", 10),
            (true, Some(("a".to_string(), 2)))
        );
        assert_eq!(admitted(&mut r, "a", 11), (true, None));
        assert_eq!(admitted(&mut r, "a", 12), (false, None));
    }

    #[test]
    fn expire_reports_quiet_sites_once_and_forgets_them() {
        let mut r = RateLimiter::new(1, 10 * S);
        for t in 0..4 {
            r.admit("a", t * S);
        }
        r.admit("b", 5 * S);
        assert_eq!(r.expire(9 * S), vec![]);
        // "a" is over with 3 suppressed; "b" suppressed nothing and is
        // still in its window.
        assert_eq!(r.expire(10 * S), vec![("a".to_string(), 3)]);
        assert_eq!(r.expire(11 * S), vec![]);
        assert_eq!(r.expire(15 * S), vec![], "b: nothing suppressed");
        assert!(r.windows.is_empty());
        assert_eq!(r.admit("a", 16 * S), (true, None), "a fresh window");
    }

    #[test]
    fn the_log_passes_a_burst_per_call_site_and_reports_the_rest() {
        let clock = TestClock::default();
        let log = DatapathLog::new(Lines::default(), clock.clone(), 2, 10 * S);
        let record = |line: u32, msg: &str| {
            log.log(
                &Record::builder()
                    .level(Level::Error)
                    .file(Some("src/diag.rs"))
                    .line(Some(line))
                    .args(format_args!("{msg}"))
                    .build(),
            )
        };
        for _ in 0..5 {
            record(20, "dropped: reason 27 at tc/ingress");
        }
        record(40, "other site");
        assert_eq!(
            log.sink().take(),
            vec![
                "ERROR src/diag.rs:20 dropped: reason 27 (packet_store_failed) at tc/ingress",
                "ERROR src/diag.rs:20 dropped: reason 27 (packet_store_failed) at tc/ingress",
                "ERROR src/diag.rs:40 other site",
            ]
        );
        clock.set(9);
        log.tick();
        assert!(log.sink().take().is_empty(), "interval not over");
        clock.set(10);
        log.tick();
        assert_eq!(log.sink().take(), vec!["suppressed 3 src/diag.rs:20"]);
        record(20, "again");
        assert_eq!(log.sink().take(), vec!["ERROR src/diag.rs:20 again"]);
    }

    #[test]
    fn reason_numbers_get_their_names() {
        assert_eq!(
            name_reasons("dropped: reason 14 at xdp"),
            "dropped: reason 14 (conntrack_full) at xdp"
        );
        assert_eq!(name_reasons("reason 999 reason x"), "reason 999 reason x");
        assert_eq!(
            name_reasons("reason 29, reason 22"),
            "reason 29 (redirect_failed), reason 22 (scratch_unavailable)"
        );
        assert_eq!(name_reasons("no reasons"), "no reasons");
    }
}
