//! `dp trace`: the session's filter, and trace events in Kubernetes terms
//! (services, pods, nodes), as text lines or JSON objects (schema
//! `dp.trace/v1`, docs/trace-json.md), with hints for drops and rejects.

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{
    proto,
    trace::{
        TRACE_MATCH_ADDR, TRACE_MATCH_IFINDEX, TRACE_MATCH_PORT, TRACE_MATCH_PROTOCOL,
        TRACE_MATCH_REASON, TRACE_MATCH_SERVICE, TRACE_MATCH_VERDICT, TRACE_SERVICE_IDS,
    },
    Hook, Reason, TraceEvent, TraceSession, Verdict,
};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    inspect::{PinnedMaps, ServiceRow},
    labels::{split_backend_label, split_service_label},
    services::ip_of,
    trace::{tcp_flags_names, tuple_addr},
};

/// The JSON schema of `dp trace -o json` lines.
pub const SCHEMA: &str = "dp.trace/v1";

/// What a `dp trace` session wants to see. Address, port, protocol,
/// interface, verdict, reason and service are checked in the kernel.
#[derive(Clone, Debug, Default)]
pub struct TraceFilter {
    /// `namespace/name` of a Service.
    pub service: Option<String>,
    /// Source or destination address of the packet as it arrived.
    pub ip: Option<IpAddr>,
    /// Source or destination port of the packet as it arrived.
    pub port: Option<u16>,
    pub protocol: Option<u8>,
    pub verdicts: Vec<Verdict>,
    pub reasons: Vec<Reason>,
    pub interface: Option<String>,
}

/// Parses a `--verdict` value: `forwarded`, `rejected`, `dropped`, `passed`
/// (or `forward`, `reject`, `drop`, `pass`).
pub fn parse_verdict(s: &str) -> Option<Verdict> {
    match s.to_ascii_lowercase().as_str() {
        "forwarded" | "forward" => Some(Verdict::Forward),
        "rejected" | "reject" => Some(Verdict::Reject),
        "dropped" | "drop" => Some(Verdict::Drop),
        "passed" | "pass" => Some(Verdict::Pass),
        _ => None,
    }
}

/// Parses a `--reason` value: its id (`no_endpoints`) or number (`10`).
pub fn parse_reason(s: &str) -> Option<Reason> {
    match s.parse::<u32>() {
        Ok(n) => Reason::from_u32(n),
        Err(_) => Reason::ALL
            .into_iter()
            .find(|r| r.id() == s.replace('-', "_").to_ascii_lowercase()),
    }
}

/// `IPPROTO_*` of a `--proto` value.
pub fn parse_protocol(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(proto::IPPROTO_TCP),
        "udp" => Some(proto::IPPROTO_UDP),
        "icmp" => Some(proto::IPPROTO_ICMP),
        n => n.parse().ok(),
    }
}

/// The ifindex of an interface in this network namespace.
pub fn ifindex_of(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| Error::NoSuchInterface(name.into()))?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::NoSuchInterface(name.into())),
        i => Ok(i),
    }
}

/// The name of interface `ifindex` in this network namespace.
pub fn ifname_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

impl TraceFilter {
    /// The in-kernel part of the filter; `service_ids` are the ids of the
    /// service's ports (more than fit are checked here instead: see
    /// [`TraceFilter::matches`]).
    pub fn session(&self, service_ids: &[u32]) -> Result<TraceSession> {
        let mut s = TraceSession::default();
        if let Some(ip) = self.ip {
            s.match_flags |= TRACE_MATCH_ADDR;
            s.addr = crate::services::addr16(ip);
        }
        if let Some(port) = self.port {
            s.match_flags |= TRACE_MATCH_PORT;
            s.port = port;
        }
        if let Some(p) = self.protocol {
            s.match_flags |= TRACE_MATCH_PROTOCOL;
            s.protocol = p;
        }
        if let Some(name) = &self.interface {
            s.match_flags |= TRACE_MATCH_IFINDEX;
            s.ifindex = ifindex_of(name)?;
        }
        if !self.verdicts.is_empty() {
            s.match_flags |= TRACE_MATCH_VERDICT;
            for v in &self.verdicts {
                s.verdicts |= 1 << (*v as u8);
            }
        }
        if !self.reasons.is_empty() {
            s.match_flags |= TRACE_MATCH_REASON;
            for r in &self.reasons {
                s.add_reason(*r as u32);
            }
        }
        if self.service.is_some() && service_ids.len() <= TRACE_SERVICE_IDS {
            s.match_flags |= TRACE_MATCH_SERVICE;
            s.service_count = service_ids.len() as u32;
            s.service_ids[..service_ids.len()].copy_from_slice(service_ids);
        }
        Ok(s)
    }

    /// The userspace check: the service by name (the kernel checks ids, and
    /// only up to `TRACE_SERVICE_IDS` of them).
    pub fn matches(&self, record: &TraceRecord) -> bool {
        match &self.service {
            Some(want) => record
                .service
                .as_ref()
                .is_some_and(|s| service_of(&s.name) == want),
            None => true,
        }
    }
}

/// `ns/name` of a service port name `ns/name:port` (or `ns/name`).
fn service_of(port_name: &str) -> &str {
    port_name.split(':').next().unwrap_or(port_name)
}

/// One trace event in Kubernetes terms: a line of `dp trace -o json`.
#[derive(Clone, Debug, Serialize)]
pub struct TraceRecord {
    pub schema: &'static str,
    /// Wall-clock time, RFC 3339 UTC with microseconds.
    pub time: String,
    /// The event's CLOCK_MONOTONIC nanoseconds (orders events exactly).
    pub monotonic_ns: u64,
    /// `tc/ingress`, `tc/egress` or `xdp`.
    pub hook: &'static str,
    pub interface: String,
    pub ifindex: u32,
    /// `TCP`, `UDP`, `ICMP`, `proto-N`, or `non-IP`.
    pub protocol: String,
    pub tcp_flags: Vec<&'static str>,
    pub source: Peer,
    pub destination: Peer,
    /// `forwarded`, `reverse-nated`, `rejected`, `dropped` or `passed`.
    pub verdict: &'static str,
    /// The reason's id (`no_endpoints`), as in `dp stats` and `--reason`.
    pub reason: &'static str,
    pub reason_code: u32,
    pub reason_text: &'static str,
    /// What made the decision, in the cluster's terms.
    pub detail: Option<String>,
    pub service: Option<ServiceRef>,
    pub backend: Option<BackendInfo>,
    /// The packet's addresses after translation, when translated.
    pub nat: Option<Nat>,
    /// The device the datapath sent the packet to itself (bypassing the
    /// stack's routing and its reverse-path checks); `null`: left to the
    /// stack (or dropped).
    pub sent_to: Option<String>,
    pub packet_len: u32,
    /// With `--explain`, for drops and rejects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Hint>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Peer {
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    /// `namespace/name` of the pod with this address, if dp knows it.
    pub pod: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceRef {
    pub id: u32,
    /// `namespace/name:port-name` (`namespace/name` for an unnamed port).
    pub name: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
    pub kind: Option<String>,
    /// The service address and port the packet was for.
    pub frontend: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendInfo {
    pub id: u32,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub pod: Option<String>,
    pub node: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Nat {
    /// `ip:port` the packet left with as its source.
    pub source: String,
    /// `ip:port` the packet left with as its destination.
    pub destination: String,
}

/// `--explain`: the likely cause of a drop or reject, and what to run next.
#[derive(Clone, Debug, Serialize)]
pub struct Hint {
    pub cause: String,
    pub next: Vec<String>,
}

/// What the pinned maps say about services, backends and pods, refreshed
/// when an event names something not seen yet (at most once a second).
pub struct TraceNames {
    bpffs: PathBuf,
    services: BTreeMap<u32, ServiceRow>,
    backends: BTreeMap<u32, KnownBackend>,
    /// Pod address -> "ns/pod".
    pods: BTreeMap<IpAddr, String>,
    /// Service id -> its source ranges.
    source_ranges: BTreeMap<u32, Vec<String>>,
    interfaces: BTreeMap<u32, String>,
    refreshed: Option<Instant>,
}

/// A backend id's address, `ns/pod` and node, as far as known.
type KnownBackend = (Option<SocketAddr>, Option<String>, Option<String>);

impl TraceNames {
    pub fn new(bpffs: &Path) -> Self {
        TraceNames {
            bpffs: bpffs.to_path_buf(),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            pods: BTreeMap::new(),
            source_ranges: BTreeMap::new(),
            interfaces: BTreeMap::new(),
            refreshed: None,
        }
    }

    /// Reads names again from the pins.
    pub fn refresh(&mut self) -> Result<()> {
        self.refreshed = Some(Instant::now());
        let maps = PinnedMaps::open(&self.bpffs)?;
        self.services = maps
            .services()?
            .into_iter()
            .map(|r| (r.service_id, r))
            .collect();
        self.backends.clear();
        self.pods.clear();
        for b in maps.backends()? {
            let addr = b.addr.split('/').next().and_then(|a| a.parse().ok());
            let (pod, node) = b
                .name
                .as_deref()
                .map(split_backend_label)
                .unwrap_or((None, None));
            if let (Some(a), Some(p)) = (addr, &pod) {
                self.pods.insert(SocketAddr::ip(&a), p.clone());
            }
            self.backends.insert(b.id, (addr, pod, node));
        }
        self.source_ranges = maps.source_ranges()?;
        Ok(())
    }

    fn refresh_for(&mut self, ev: &TraceEvent) {
        let unknown = (ev.service_id != 0 && !self.services.contains_key(&ev.service_id))
            || (ev.backend_id != 0 && !self.backends.contains_key(&ev.backend_id));
        let stale = self
            .refreshed
            .is_none_or(|t| t.elapsed() > Duration::from_secs(1));
        if (unknown || self.refreshed.is_none()) && stale {
            // Names are a courtesy: a failed read leaves ids in the output.
            let _ = self.refresh();
        }
    }

    /// The service port ids of `ns/name`.
    pub fn service_ids(&self, service: &str) -> Vec<u32> {
        self.services
            .values()
            .filter(|r| {
                r.name
                    .as_deref()
                    .is_some_and(|n| service_of(split_service_label(n).0) == service)
            })
            .map(|r| r.service_id)
            .collect()
    }

    fn interface(&mut self, ifindex: u32) -> String {
        self.interfaces
            .entry(ifindex)
            .or_insert_with(|| ifname_of(ifindex).unwrap_or_else(|| format!("if{ifindex}")))
            .clone()
    }

    /// `(port name, kind)` of a service id: names are `ns/name:port (Kind)`.
    fn service_name(&self, id: u32) -> Option<(String, Option<String>)> {
        let n = self.services.get(&id)?.name.clone()?;
        let (name, kind) = split_service_label(&n);
        Some((name.to_string(), kind.map(str::to_string)))
    }

    /// The event in Kubernetes terms.
    pub fn record(&mut self, ev: &TraceEvent, clock: &Clock, explain: bool) -> TraceRecord {
        self.refresh_for(ev);
        let verdict = Verdict::from_u8(ev.verdict);
        let reason = Reason::from_u32(ev.reason);
        let t = &ev.original;
        let l4 = matches!(t.protocol, proto::IPPROTO_TCP | proto::IPPROTO_UDP);
        let peer = |addr: &[u8; 16], port: u16, names: &Self| {
            let ip = tuple_addr(t.family, addr);
            Peer {
                ip,
                port: (ip.is_some() && l4).then_some(port),
                pod: ip.and_then(|ip| names.pods.get(&ip).cloned()),
            }
        };
        let service = (ev.service_id != 0).then(|| {
            let (name, kind) = self
                .service_name(ev.service_id)
                .unwrap_or_else(|| (format!("service #{}", ev.service_id), None));
            let frontend = self
                .services
                .get(&ev.service_id)
                .map(|r| r.frontend.clone());
            ServiceRef {
                id: ev.service_id,
                name,
                kind,
                frontend,
            }
        });
        let backend = (ev.backend_id != 0).then(|| {
            let (addr, pod, node) = self
                .backends
                .get(&ev.backend_id)
                .cloned()
                .unwrap_or((None, None, None));
            BackendInfo {
                id: ev.backend_id,
                ip: addr.map(|a| a.ip()),
                port: addr.map(|a| a.port()),
                pod,
                node,
            }
        });
        let forwarded = verdict == Some(Verdict::Forward);
        let nat = (forwarded && ev.translated != ev.original).then(|| {
            let x = &ev.translated;
            let sa = |a: &[u8; 16], p: u16| {
                let ip = ip_of(a);
                if l4 {
                    SocketAddr::new(ip, p).to_string()
                } else {
                    ip.to_string()
                }
            };
            Nat {
                source: sa(&x.saddr, x.sport),
                destination: sa(&x.daddr, x.dport),
            }
        });
        let verdict_id = match (verdict, reason) {
            (
                Some(Verdict::Forward),
                Some(Reason::ReplyReverseNat | Reason::IcmpErrorTranslated),
            ) => "reverse-nated",
            (Some(v), _) => v.name(),
            (None, _) => "unknown",
        };
        let mut record = TraceRecord {
            schema: SCHEMA,
            time: clock.rfc3339(ev.timestamp_ns),
            monotonic_ns: ev.timestamp_ns,
            hook: Hook::from_u8(ev.hook).map_or("unknown", Hook::name),
            interface: self.interface(ev.ifindex),
            ifindex: ev.ifindex,
            protocol: match t.family {
                0 => "non-IP".to_string(),
                _ => crate::trace::protocol_name(t.protocol),
            },
            tcp_flags: if t.protocol == proto::IPPROTO_TCP {
                tcp_flag_list(ev.tcp_flags)
            } else {
                vec![]
            },
            source: peer(&t.saddr, t.sport, self),
            destination: peer(&t.daddr, t.dport, self),
            verdict: verdict_id,
            reason: reason.map_or("unknown", Reason::id),
            reason_code: ev.reason,
            reason_text: reason.map_or("unknown reason", Reason::describe),
            detail: None,
            service,
            backend,
            nat,
            sent_to: (ev.sent_ifindex != 0).then(|| self.interface(ev.sent_ifindex)),
            packet_len: ev.packet_len,
            explain: None,
        };
        record.detail = reason.and_then(|r| self.detail(r, &record));
        if explain && matches!(verdict, Some(Verdict::Drop | Verdict::Reject)) {
            record.explain = reason.map(|r| hint(r, &record));
        }
        record
    }

    /// The facts behind a drop or reject, from the live maps.
    fn detail(&self, reason: Reason, r: &TraceRecord) -> Option<String> {
        let row = r.service.as_ref().and_then(|s| self.services.get(&s.id));
        let name = r.service.as_ref().map(|s| s.name.clone());
        match reason {
            Reason::NoEndpoints => {
                let row = row?;
                Some(format!(
                    "{} has {} ready and {} serving-terminating endpoints",
                    name?,
                    row.ready.len(),
                    row.terminating.len()
                ))
            }
            Reason::NoLocalEndpoints => Some(format!(
                "{} has a Local traffic policy and no endpoint on this node",
                name?
            )),
            Reason::SourceRangeDenied => {
                let ranges = self.source_ranges.get(&r.service.as_ref()?.id);
                Some(format!(
                    "{} is not in loadBalancerSourceRanges of {} ({})",
                    r.source.ip?,
                    name?,
                    ranges.map_or_else(|| "none".to_string(), |v| v.join(", "))
                ))
            }
            Reason::PortNotServed => {
                let ip = r.destination.ip?;
                let served: Vec<String> = self
                    .services
                    .values()
                    .filter(|s| s.frontend.starts_with(&format!("{ip}:")))
                    .filter_map(|s| {
                        let port = s.frontend.rsplit_once(':')?.1;
                        let svc = split_service_label(s.name.as_deref()?).0;
                        Some(format!("{port} ({svc})"))
                    })
                    .collect();
                Some(format!("{ip} serves only {}", served.join(", ")))
            }
            Reason::BackendGoneReset | Reason::BackendGoneRepicked => {
                Some("the flow's backend left the service".to_string())
            }
            _ => None,
        }
    }
}

/// TCP flag names, SYN first.
fn tcp_flag_list(flags: u8) -> Vec<&'static str> {
    let names = tcp_flags_names(flags);
    ["SYN", "ACK", "PSH", "FIN", "RST", "URG"]
        .into_iter()
        .filter(|n| names.split('|').any(|x| x == *n))
        .collect()
}

/// `--explain` for one reason, with the commands to run next.
pub fn hint(reason: Reason, r: &TraceRecord) -> Hint {
    let svc = r.service.as_ref().map(|s| service_of(&s.name).to_string());
    let (ns, name) = svc.as_deref().and_then(|s| s.split_once('/')).map_or(
        ("NAMESPACE".to_string(), "SERVICE".to_string()),
        |(a, b)| (a.to_string(), b.to_string()),
    );
    let from = match (r.source.ip, r.source.port) {
        (Some(ip), Some(p)) => SocketAddr::new(ip, p).to_string(),
        (Some(ip), None) => ip.to_string(),
        _ => "IP".to_string(),
    };
    let to = match (r.destination.ip, r.destination.port) {
        (Some(ip), Some(p)) => format!("{}/{}", SocketAddr::new(ip, p), r.protocol.to_lowercase()),
        _ => "IP:PORT".to_string(),
    };
    let explain = format!("dp explain --from {from} --to {to}");
    let endpoints =
        format!("kubectl get endpointslices -n {ns} -l kubernetes.io/service-name={name} -o wide");
    let (cause, next): (&str, Vec<String>) = match reason {
        Reason::NoEndpoints => (
            "the Service has no ready endpoint: its pods are not Ready (readiness probe), \
             none match its selector, or they are all terminating without serving",
            vec![
                endpoints,
                format!("kubectl get pods -n {ns} -o wide   # Ready? labels match the selector?"),
                format!("dp service list   # what dp programmed for {ns}/{name}"),
            ],
        ),
        Reason::NoLocalEndpoints => (
            "externalTrafficPolicy (or internalTrafficPolicy) is Local and no endpoint of the \
             Service runs on this node; kube-proxy drops such traffic too (the load balancer \
             should stop sending it here once the health check fails)",
            vec![
                format!("kubectl get svc -n {ns} {name} -o jsonpath='{{.spec.externalTrafficPolicy}} {{.spec.internalTrafficPolicy}}'"),
                endpoints,
                "dp service list   # the backends this node uses".to_string(),
            ],
        ),
        Reason::SourceRangeDenied => (
            "the client's address is outside the Service's loadBalancerSourceRanges",
            vec![
                format!("kubectl get svc -n {ns} {name} -o jsonpath='{{.spec.loadBalancerSourceRanges}}'"),
                explain,
            ],
        ),
        Reason::PortNotServed => (
            "the destination is a ClusterIP but the Service does not expose this port or \
             protocol (wrong port, or TCP vs UDP)",
            vec![
                "kubectl get svc -A -o wide   # the ports of the Service with this IP".to_string(),
                explain,
            ],
        ),
        Reason::BackendGoneReset => (
            "the connection's backend was removed from the Service (pod deleted or no longer \
             serving); the client got a TCP reset and must reconnect",
            vec![endpoints, format!("dp ct list --service {ns}/{name}")],
        ),
        Reason::ConntrackFull => (
            "the conntrack table could not take the new flow",
            vec![
                "dp status   # map fill levels".to_string(),
                "dp agent --map-size-conntrack N   # a bigger table".to_string(),
            ],
        ),
        Reason::NatPortsExhausted => (
            "no free source port on the node address for masquerading this flow",
            vec!["dp ct list --ip NODE_IP   # flows using the node address".to_string()],
        ),
        Reason::ServiceInconsistent => (
            "a service slot or backend entry is missing: the maps were being rewritten or a \
             writer broke the write order",
            vec!["dp service list".to_string(), "dp status".to_string()],
        ),
        Reason::NoRouteToBackend => (
            "the node has no route to the backend's address",
            vec!["ip route get BACKEND_IP".to_string(), explain],
        ),
        Reason::Malformed | Reason::PacketLoadFailed => (
            "the packet's headers are cut short or inconsistent; the kernel would drop it too",
            vec!["dp trace -w FILE.pcapng   # look at the headers".to_string()],
        ),
        Reason::RejectFailed
        | Reason::RewriteFailed
        | Reason::PacketStoreFailed
        | Reason::ChecksumUpdateFailed
        | Reason::RedirectFailed => (
            "the datapath could not rewrite or send the packet (resizing, storing bytes, a \
             checksum update or a redirect failed); the agent's log has a line from the \
             datapath about it",
            vec!["dp stats".to_string()],
        ),
        _ => ("dp dropped this packet", vec![explain, "dp stats".to_string()]),
    };
    Hint {
        cause: cause.to_string(),
        next,
    }
}

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
            offset_ns: wall - i128::from(crate::services::monotonic_ns()),
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
fn civil_from_days(z: i64) -> (i64, u32, u32) {
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
    let mut out = format!(
        "{time} {} {} {} -> {dst} {}",
        r.hook,
        r.interface,
        peer(&r.source),
        r.protocol
    );
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
    let (claim, mut reader) = crate::trace::PinnedSession::open(bpffs, session)?;
    // On stderr, so scripts (and tests) know the filter is in place.
    eprintln!(
        "dp trace: session {} open on {} (Ctrl-C stops)",
        claim.slot(),
        bpffs.display()
    );
    let mut pcap = match &opts.pcapng {
        Some(path) => Some(crate::pcapng::PcapngWriter::new(
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
        if let Some(w) = pcap.as_mut() {
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
        let opened = crate::services::monotonic_ns();
        let from = opened.saturating_sub(since.as_nanos() as u64);
        for ev in crate::trace::recent_events(bpffs)? {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verdict: &'static str, reason: Reason) -> TraceRecord {
        TraceRecord {
            schema: SCHEMA,
            time: "2026-11-21T12:00:02.000001Z".into(),
            monotonic_ns: 1,
            hook: "tc/ingress",
            interface: "lxc1".into(),
            ifindex: 4,
            protocol: "TCP".into(),
            tcp_flags: vec!["SYN"],
            source: Peer {
                ip: Some("10.244.1.11".parse().unwrap()),
                port: Some(41234),
                pod: Some("default/client".into()),
            },
            destination: Peer {
                ip: Some("10.96.0.20".parse().unwrap()),
                port: Some(5432),
                pod: None,
            },
            verdict,
            reason: reason.id(),
            reason_code: reason as u32,
            reason_text: reason.describe(),
            detail: None,
            service: Some(ServiceRef {
                id: 3,
                name: "default/db:pg".into(),
                kind: Some("ClusterIP".into()),
                frontend: Some("10.96.0.20:5432/TCP".into()),
            }),
            backend: None,
            nat: None,
            sent_to: None,
            packet_len: 74,
            explain: None,
        }
    }

    #[test]
    fn a_reject_line_names_the_service_and_the_cause() {
        let mut r = record("rejected", Reason::NoEndpoints);
        r.detail = Some("default/db:pg has 0 ready and 2 serving-terminating endpoints".into());
        assert_eq!(
            line(&r),
            "12:00:02.000001 tc/ingress lxc1 10.244.1.11:41234 (default/client) -> \
             default/db:pg (10.96.0.20:5432) TCP SYN REJECTED no endpoints: default/db:pg \
             has 0 ready and 2 serving-terminating endpoints"
        );
    }

    #[test]
    fn a_forward_line_names_the_backend_and_the_nat() {
        let mut r = record("forwarded", Reason::NewFlow);
        r.backend = Some(BackendInfo {
            id: 7,
            ip: Some("10.244.2.10".parse().unwrap()),
            port: Some(5432),
            pod: Some("default/db-0".into()),
            node: Some("node2".into()),
        });
        r.nat = Some(Nat {
            source: "172.18.0.2:61000".into(),
            destination: "10.244.2.10:5432".into(),
        });
        assert_eq!(
            line(&r),
            "12:00:02.000001 tc/ingress lxc1 10.244.1.11:41234 (default/client) -> \
             default/db:pg (10.96.0.20:5432) TCP SYN FORWARDED new flow to a backend => \
             10.244.2.10:5432 (default/db-0 on node2), SNAT to 172.18.0.2:61000"
        );
    }

    #[test]
    fn filters_parse_as_the_cli_takes_them() {
        assert_eq!(parse_verdict("dropped"), Some(Verdict::Drop));
        assert_eq!(parse_verdict("reject"), Some(Verdict::Reject));
        assert_eq!(parse_reason("no_endpoints"), Some(Reason::NoEndpoints));
        assert_eq!(parse_reason("24"), Some(Reason::SourceRangeDenied));
        assert_eq!(parse_reason("nonsense"), None);
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1d"), None);
    }

    #[test]
    fn dates_are_gregorian() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_778), (2026, 11, 21));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
