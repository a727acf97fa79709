//! Prometheus metrics (`--metrics-addr`) and health (`--healthz-addr`).
//!
//! kube-proxy's sync metrics keep their names so existing dashboards work:
//! `kubeproxy_sync_proxy_rules_duration_seconds`,
//! `kubeproxy_network_programming_duration_seconds` (from an
//! EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` to
//! its programming) and `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
//! dp's own: frontends, backends, conntrack entries, packets and bytes per
//! hook and reason, skipped objects, sync errors.
//!
//! `/healthz` and `/livez` answer like kube-proxy's health server: 200 with
//! `{"lastUpdated": ..., "currentTime": ..., "nodeEligible": true}` once the
//! first sync is done and the last one is recent enough, 503 otherwise.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{kernel::Datapath, translate::sync::MapWriter};

/// kube-proxy's buckets: 1 ms doubling, 15 of them.
fn exponential_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds = exponential_buckets();
        Histogram {
            counts: vec![0; bounds.len()],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if seconds <= *b {
                *c += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// What the agent records about its syncs.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync: Option<SystemTime>,
    /// Set by a failed sync, cleared by a successful one.
    pub failing_since: Option<SystemTime>,
    /// Failed or partial syncs by cause (`Error::cause`, `not_programmed`).
    pub sync_errors: std::collections::BTreeMap<&'static str, u64>,
    pub skipped_invalid: usize,
    pub skipped_not_served: usize,
    /// Objects the last sync could not program (full maps).
    pub not_programmed: usize,
    /// Pinned maps converted into new ones at this start (another layout
    /// or capacity: `kernel::upgrade`).
    pub maps_converted: usize,
    /// The conntrack collector's figures, when it runs.
    pub ct_gc: Option<std::sync::Arc<super::ct_gc::CtGcStats>>,
}

impl AgentMetrics {
    pub fn count_sync_error(&mut self, cause: &'static str) {
        *self.sync_errors.entry(cause).or_default() += 1;
    }
}

/// A request from an HTTP handler to the agent loop, which owns the maps.
pub enum Request {
    Metrics(oneshot::Sender<String>),
    Health(oneshot::Sender<(u16, String)>),
}

/// The metrics text.
pub fn render(m: &AgentMetrics, writer: &MapWriter, dp: &Datapath) -> String {
    let mut out = String::new();
    m.sync_duration.render(
        &mut out,
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds",
    );
    m.network_programming.render(
        &mut out,
        "kubeproxy_network_programming_duration_seconds",
        "In Cluster Network Programming Latency in seconds",
    );
    let last = m
        .last_sync
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let gauge = |out: &mut String, name: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        &mut out,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "The last time proxy rules were successfully synced",
        last.to_string(),
    );
    gauge(
        &mut out,
        "dp_frontends",
        "Service frontends programmed",
        writer.frontend_count().to_string(),
    );
    gauge(
        &mut out,
        "dp_backends",
        "Backends programmed",
        writer.backend_count().to_string(),
    );
    let entries = dp.ct_entries().unwrap_or_default();
    gauge(
        &mut out,
        "dp_conntrack_entries",
        "Conntrack entries (two per flow)",
        entries.len().to_string(),
    );
    // The same three per family, labelled as kube-proxy labels its
    // per-family metrics.
    let ct_v6 = entries
        .iter()
        .filter(|(k, _)| !common::addr::is_v4_mapped(&k.saddr))
        .count();
    let by_family = [
        (
            "dp_frontends_by_family",
            "Service frontends programmed, per IP family",
            writer.frontends_by_family(),
        ),
        (
            "dp_backends_by_family",
            "Backends programmed, per IP family",
            writer.backends_by_family(),
        ),
        (
            "dp_conntrack_entries_by_family",
            "Conntrack entries (two per flow), per IP family",
            (entries.len() - ct_v6, ct_v6),
        ),
    ];
    for (name, help, (v4, v6)) in by_family {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n\
             {name}{{ip_family=\"IPv4\"}} {v4}\n{name}{{ip_family=\"IPv6\"}} {v6}"
        );
    }
    // Against dp_conntrack_entries: how close the table is to evicting.
    gauge(
        &mut out,
        "dp_conntrack_max_entries",
        "Conntrack capacity in entries (two per flow)",
        dp.ct_max_entries().map_or(0, |n| n).to_string(),
    );
    if let Some(gc) = &m.ct_gc {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(
            out,
            "# HELP dp_conntrack_gc_runs_total Walks of the conntrack collector\n# TYPE dp_conntrack_gc_runs_total counter\ndp_conntrack_gc_runs_total {}",
            gc.runs.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dp_conntrack_gc_deleted_total Conntrack entries past their deadline the collector deleted\n# TYPE dp_conntrack_gc_deleted_total counter\ndp_conntrack_gc_deleted_total {}",
            gc.deleted.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dp_backends_retired_deleted_total Removed backends kept for their conntrack entries, deleted once none named them\n# TYPE dp_backends_retired_deleted_total counter\ndp_backends_retired_deleted_total {}",
            gc.retired_deleted.load(Relaxed)
        );
        gauge(
            &mut out,
            "dp_conntrack_gc_last_walk_seconds",
            "How long the collector's last walk took",
            (gc.last_walk_micros.load(Relaxed) as f64 / 1e6).to_string(),
        );
    }
    let _ = writeln!(
        out,
        "# HELP dp_skipped_objects Objects (or parts) skipped in the last sync\n# TYPE dp_skipped_objects gauge"
    );
    let _ = writeln!(
        out,
        "dp_skipped_objects{{kind=\"invalid\"}} {}",
        m.skipped_invalid
    );
    let _ = writeln!(
        out,
        "dp_skipped_objects{{kind=\"not_served\"}} {}",
        m.skipped_not_served
    );
    let _ = writeln!(
        out,
        "# HELP dp_unprogrammed_objects Objects the last sync could not program (full maps)\n# TYPE dp_unprogrammed_objects gauge\ndp_unprogrammed_objects {}",
        m.not_programmed
    );
    let _ = writeln!(
        out,
        "# HELP dp_sync_errors_total Syncs that failed to program the maps (or left objects out), by cause; each is retried with backoff\n# TYPE dp_sync_errors_total counter"
    );
    for (cause, n) in &m.sync_errors {
        let _ = writeln!(out, "dp_sync_errors_total{{cause=\"{cause}\"}} {n}");
    }
    pinned_state(&mut out, true, m.maps_converted);
    if let Ok(counters) = dp.counters() {
        let _ = writeln!(
            out,
            "# HELP dp_packets_total Packets by hook and reason\n# TYPE dp_packets_total counter"
        );
        for ((hook, reason), c) in &counters.by_reason {
            let _ = writeln!(
                out,
                "dp_packets_total{{hook=\"{}\",reason=\"{}\"}} {}",
                hook.name(),
                reason.id(),
                c.packets
            );
        }
        let _ = writeln!(
            out,
            "# HELP dp_bytes_total Bytes by hook and reason\n# TYPE dp_bytes_total counter"
        );
        for ((hook, reason), c) in &counters.by_reason {
            let _ = writeln!(
                out,
                "dp_bytes_total{{hook=\"{}\",reason=\"{}\"}} {}",
                hook.name(),
                reason.id(),
                c.bytes
            );
        }
    }
    out
}

/// Whether this agent could read the pinned state (0: it fails static,
/// leaving the datapath as it found it), the layout version of each map in
/// this dp, and the maps converted at start.
pub fn pinned_state(out: &mut String, readable: bool, converted: usize) {
    let _ = writeln!(
        out,
        "# HELP dp_pinned_state_readable 1 if the agent adopted or converted the pinned state; 0 if it cannot read it and leaves the datapath as it is (fail static)\n# TYPE dp_pinned_state_readable gauge\ndp_pinned_state_readable {}",
        u8::from(readable)
    );
    let _ = writeln!(
        out,
        "# HELP dp_pinned_maps_converted Pinned maps converted into new ones (another layout or capacity) when this agent started\n# TYPE dp_pinned_maps_converted gauge\ndp_pinned_maps_converted {converted}"
    );
    let _ = writeln!(
        out,
        "# HELP dp_map_layout_version Layout version of each pinned map in this agent (common::layout)\n# TYPE dp_map_layout_version gauge"
    );
    for name in crate::kernel::loader::PINNED_MAPS {
        if let Some(v) = common::layout::version_of(name) {
            let _ = writeln!(out, "dp_map_layout_version{{map=\"{name}\"}} {v}");
        }
    }
}

/// kube-proxy's health answer: healthy once the first sync is done and as
/// long as no sync has been failing for longer than `grace`.
pub fn health(m: &AgentMetrics, grace: Duration) -> (u16, String) {
    let now = SystemTime::now();
    let fmt = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let failing_too_long = m
        .failing_since
        .is_some_and(|t| now.duration_since(t).unwrap_or_default() > grace);
    let healthy = m.last_sync.is_some() && !failing_too_long;
    let body = format!(
        "{{\"lastUpdated\": \"{}\", \"currentTime\": \"{}\", \"nodeEligible\": true}}",
        m.last_sync.map_or(0.0, fmt),
        fmt(now)
    );
    (if healthy { 200 } else { 503 }, body)
}

/// Binds `addr` now (so clients can connect as soon as the agent says it
/// synced), to be served by `serve`.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = match addr {
        SocketAddr::V6(v6) => bind_v6_only(v6)?,
        SocketAddr::V4(_) => std::net::TcpListener::bind(addr)?,
    };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A listener that takes IPv6 connections only (`IPV6_V6ONLY`): the IPv4
/// side has a listener of its own on the same port, as kube-proxy has a
/// server per family; `[::]` would otherwise take the IPv4 port too (with
/// the kernel's default `bindv6only = 0`) and the IPv4 bind would fail.
fn bind_v6_only(addr: std::net::SocketAddrV6) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd as _;
    let last = std::io::Error::last_os_error;
    // SAFETY: plain socket calls on a descriptor this function owns (the
    // listener closes it on every return path); the option and address
    // pointers are valid for the sizes given.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(last());
        }
        let listener = std::net::TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for (level, name) in [
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
        ] {
            let rc = libc::setsockopt(
                fd,
                level,
                name,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            if rc != 0 {
                return Err(last());
            }
        }
        let sa = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: addr.port().to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: addr.ip().octets(),
            },
            sin6_scope_id: addr.scope_id(),
        };
        let rc = libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        if rc != 0 || libc::listen(fd, 128) != 0 {
            return Err(last());
        }
        Ok(listener)
    }
}

/// Reads up to the end of an HTTP request head (it may come in pieces; at
/// most 2 KiB), or until the peer stops sending.
pub(crate) async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(m) => n += m,
        }
    }
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Serves `/metrics` (if `metrics`) or `/healthz` and `/livez` on
/// `listener`, asking the agent loop through `requests`.
pub async fn serve(
    listener: std::net::TcpListener,
    metrics: bool,
    requests: mpsc::Sender<Request>,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let requests = requests.clone();
        tokio::spawn(async move {
            let head = read_head(&mut conn).await;
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, content_type, body) = match (metrics, path.as_str()) {
                (true, "/metrics") => {
                    let (tx, rx) = oneshot::channel();
                    let _ = requests.send(Request::Metrics(tx)).await;
                    (
                        200,
                        "text/plain; version=0.0.4",
                        rx.await.unwrap_or_default(),
                    )
                }
                (false, "/healthz" | "/livez") => {
                    let (tx, rx) = oneshot::channel();
                    let _ = requests.send(Request::Health(tx)).await;
                    let (status, body) = rx.await.unwrap_or((503, String::new()));
                    (status, "application/json", body)
                }
                _ => (404, "text/plain", "not found\n".to_string()),
            };
            let reason = match status {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}
