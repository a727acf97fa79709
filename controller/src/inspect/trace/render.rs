//! Text lines and pcapng comments of records, with wall-clock times.

use std::{
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use super::*;

/// Turns event timestamps (CLOCK_MONOTONIC) into wall-clock time.
pub struct Clock {
    /// Wall-clock nanoseconds minus monotonic nanoseconds.
    offset_ns: i128,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Clock {
            offset_ns: wall - i128::from(crate::kernel::maps::monotonic_ns()),
        }
    }

    /// Nanoseconds since the Unix epoch of a monotonic timestamp.
    pub fn unix_ns(&self, monotonic_ns: u64) -> u64 {
        (i128::from(monotonic_ns) + self.offset_ns).max(0) as u64
    }

    /// `2026-11-21T12:00:02.000001Z`.
    pub fn rfc3339(&self, monotonic_ns: u64) -> String {
        let ns = self.unix_ns(monotonic_ns);
        let secs = ns / 1_000_000_000;
        let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
        let s = secs % 86_400;
        format!(
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
            s / 3600,
            s / 60 % 60,
            s % 60,
            ns % 1_000_000_000 / 1000
        )
    }
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's algorithm).
pub(super) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// One line of `dp trace`, e.g.
/// `12:00:02.000001 tc/ingress veth1 10.244.1.5:41234 (default/client) ->
/// default/db:pg (10.96.0.20:5432) TCP SYN REJECTED no usable backend:
/// default/db:pg has 0 ready and 2 serving-terminating endpoints`.
pub fn line(r: &TraceRecord) -> String {
    let time = r.time.get(11..26).unwrap_or(&r.time);
    let peer = |p: &Peer| {
        let addr = match (p.ip, p.port) {
            (Some(ip), Some(port)) => SocketAddr::new(ip, port).to_string(),
            (Some(ip), None) => ip.to_string(),
            _ => "-".to_string(),
        };
        match &p.pod {
            Some(pod) => format!("{addr} ({pod})"),
            None => addr,
        }
    };
    let to_service = r.service.is_some() && r.verdict != "reverse-nated";
    let dst = match (&r.service, to_service) {
        (Some(s), true) => format!("{} ({})", s.name, peer(&r.destination)),
        _ => peer(&r.destination),
    };
    // A socket hook's event names the process instead of an interface
    // and a source address (no packet exists yet).
    let from = match &r.process {
        Some(p) => format!("pid {} ({})", p.pid, p.command),
        None => format!("{} {}", r.interface, peer(&r.source)),
    };
    let mut out = format!("{time} {} {from} -> {dst} {}", r.hook, r.protocol);
    if !r.tcp_flags.is_empty() {
        out.push(' ');
        out.push_str(&r.tcp_flags.join("|"));
    }
    out.push(' ');
    out.push_str(&r.verdict.to_uppercase());
    out.push(' ');
    out.push_str(r.reason_text);
    if let Some(d) = &r.detail {
        out.push_str(": ");
        out.push_str(d);
    }
    if r.verdict == "forwarded" {
        if let Some(b) = &r.backend {
            let addr = match (b.ip, b.port) {
                (Some(ip), Some(port)) => SocketAddr::new(ip, port).to_string(),
                _ => format!("backend #{}", b.id),
            };
            out.push_str(&format!(" => {addr}"));
            match (&b.pod, &b.node) {
                (Some(p), Some(n)) => out.push_str(&format!(" ({p} on {n})")),
                (Some(p), None) => out.push_str(&format!(" ({p})")),
                (None, Some(n)) => out.push_str(&format!(" (on {n})")),
                (None, None) => {}
            }
        }
        if let Some(nat) = &r.nat {
            let src = r.source.ip.map(|ip| ip.to_string()).unwrap_or_default();
            if !nat.source.starts_with(&format!("{src}:")) && nat.source != src {
                out.push_str(&format!(", SNAT to {}", nat.source));
            }
        }
    }
    if r.verdict == "reverse-nated" {
        if let (Some(nat), Some(s)) = (&r.nat, &r.service) {
            out.push_str(&format!(": now from {} ({})", nat.source, s.name));
        }
    }
    if let Some(dev) = &r.sent_to {
        out.push_str(&format!("; sent to {dev}"));
    }
    if let Some(h) = &r.explain {
        out.push_str(&format!("\n    why: {}", h.cause));
        for n in &h.next {
            out.push_str(&format!("\n    next: {n}"));
        }
    }
    out
}

/// How `dp trace` prints and where it stops.
/// The packet comment in the pcapng: verdict, reason and what decided it.
pub fn pcap_comment(r: &TraceRecord) -> String {
    let mut c = format!("dp {} {}: {}", r.hook, r.verdict, r.reason_text);
    if let Some(s) = &r.service {
        c.push_str(&format!("; service {}", s.name));
    }
    if let Some(d) = &r.detail {
        c.push_str(&format!("; {d}"));
    }
    if let Some(n) = &r.nat {
        c.push_str(&format!("; now {} -> {}", n.source, n.destination));
    }
    c
}
