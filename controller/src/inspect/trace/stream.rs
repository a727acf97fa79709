//! `dp trace` itself: open a session, read events, print them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::TraceEvent;

use super::*;

#[derive(Clone, Debug, Default)]
pub struct StreamOptions {
    pub json: bool,
    pub explain: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Write the packets here as pcapng.
    pub pcapng: Option<PathBuf>,
    /// First the drops and rejects the datapath kept from this long ago.
    pub since: Option<Duration>,
}

/// Parses `--since`: `90`, `90s`, `5m`, `2h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `dp trace`: opens a session on the agent's pinned maps, prints events
/// as they come until interrupted (SIGINT, SIGTERM), `count` or `duration`;
/// the session slot is released on the way out.
pub fn stream(
    bpffs: &Path,
    filter: &TraceFilter,
    opts: &StreamOptions,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<u64> {
    let bpffs = &crate::kernel::pin::find_state(bpffs)?;
    let mut names = TraceNames::new(bpffs);
    names.refresh()?;
    let ids = match &filter.service {
        Some(svc) => {
            let ids = names.service_ids(svc);
            if ids.is_empty() {
                anyhow::bail!(
                    "--service {svc}: no such service is programmed (see `dp service list`)"
                );
            }
            ids
        }
        None => vec![],
    };
    let session = filter.session(&ids)?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            request_stop as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            request_stop as *const () as libc::sighandler_t,
        );
    }
    let (claim, mut reader) = crate::kernel::ring::PinnedSession::open(bpffs, session)?;
    // On stderr, so scripts (and tests) know the filter is in place.
    eprintln!(
        "dp trace: session {} open on {} (Ctrl-C stops)",
        claim.slot(),
        bpffs.display()
    );
    let mut pcap = match &opts.pcapng {
        Some(path) => Some(crate::inspect::pcapng::PcapngWriter::new(
            std::io::BufWriter::new(std::fs::File::create(path)?),
            common::trace::TRACE_HEADER_BYTES as u32,
        )?),
        None => None,
    };
    let clock = Clock::new();
    let started = Instant::now();
    let mut seen = 0u64;
    let mut show = |ev: &TraceEvent,
                    names: &mut TraceNames,
                    out: &mut dyn std::io::Write,
                    seen: &mut u64|
     -> anyhow::Result<()> {
        let record = names.record(ev, &clock, opts.explain);
        if !filter.matches(&record) {
            return Ok(());
        }
        *seen += 1;
        if opts.json {
            writeln!(out, "{}", serde_json::to_string(&record)?)?;
        } else {
            writeln!(out, "{}", line(&record))?;
        }
        out.flush()?;
        // A socket hook's event has no packet to write.
        if let Some(w) = pcap.as_mut().filter(|_| record.process.is_none()) {
            let data = &ev.headers[..usize::from(ev.headers_len).min(ev.headers.len())];
            w.packet(
                ev.ifindex,
                &record.interface,
                clock.unix_ns(ev.timestamp_ns),
                data,
                ev.packet_len,
                &pcap_comment(&record),
            )?;
            w.flush()?;
        }
        Ok(())
    };
    if let Some(since) = opts.since {
        // Kept before the session opened; later ones arrive live.
        let opened = crate::kernel::maps::monotonic_ns();
        let from = opened.saturating_sub(since.as_nanos() as u64);
        for ev in crate::kernel::ring::recent_events(bpffs)? {
            let wanted = ev.timestamp_ns >= from
                && ev.timestamp_ns < opened
                && session.arrival_matches(&ev)
                && session.decision_matches(&ev);
            if wanted && opts.count.is_none_or(|c| seen < c) {
                show(&ev, &mut names, out, &mut seen)?;
            }
        }
    }
    let result = loop {
        if STOP.load(std::sync::atomic::Ordering::Relaxed) {
            // What the datapath handed over before the stop is still shown.
            while opts.count.is_none_or(|c| seen < c) {
                match reader.next_timeout(Duration::ZERO) {
                    Ok(Some(ev)) => show(&ev, &mut names, out, &mut seen)?,
                    _ => break,
                }
            }
            break Ok(());
        }
        if opts.count.is_some_and(|c| seen >= c) {
            break Ok(());
        }
        let wait = match opts.duration {
            Some(d) => match d.checked_sub(started.elapsed()) {
                Some(left) => left.min(Duration::from_millis(200)),
                None => break Ok(()),
            },
            None => Duration::from_millis(200),
        };
        let ev = match reader.next_timeout(wait) {
            Ok(Some(ev)) => ev,
            Ok(None) => continue,
            Err(e) => break Err(e.into()),
        };
        if let Err(e) = show(&ev, &mut names, out, &mut seen) {
            break Err(e);
        }
    };
    drop(claim);
    result.map(|()| seen)
}
