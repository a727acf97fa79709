//! One trace event in Kubernetes terms (`TraceRecord`, the JSON line) and
//! the names it is told in (`TraceNames`: services, pods, nodes).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{proto, Hook, Reason, TraceEvent, Verdict};
use serde::Serialize;

use crate::{
    error::Result,
    inspect::pinned::{PinnedMaps, ServiceRow},
    translate::labels::{split_backend_label, split_service_label},
};
use common::addr::ip_of;

use super::describe::{tcp_flags_names, tuple_addr};
use super::*;

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
    /// Socket hooks (`sock/*`): the process whose call it was. No packet
    /// exists yet, so no interface and no source address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
}

/// The process a socket hook ran for.
#[derive(Clone, Debug, Serialize)]
pub struct Process {
    pub pid: u32,
    /// Its command name (`comm`).
    pub command: String,
    /// Its network namespace's cookie (the node's or a pod's).
    pub netns_cookie: u64,
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
        let socket_hook = Hook::from_u8(ev.hook).is_some_and(Hook::is_socket);
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
            interface: if socket_hook {
                "-".to_string()
            } else {
                self.interface(ev.ifindex)
            },
            ifindex: ev.ifindex,
            protocol: match t.family {
                0 => "non-IP".to_string(),
                _ => crate::inspect::trace::describe::protocol_name(t.protocol),
            },
            tcp_flags: if t.protocol == proto::IPPROTO_TCP {
                tcp_flag_list(ev.tcp_flags)
            } else {
                vec![]
            },
            source: if socket_hook {
                Peer {
                    ip: None,
                    port: None,
                    pod: None,
                }
            } else {
                peer(&t.saddr, t.sport, self)
            },
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
            process: socket_hook.then(|| Process {
                pid: (ev.pid_tgid >> 32) as u32,
                command: String::from_utf8_lossy(&ev.comm)
                    .trim_end_matches('\0')
                    .to_string(),
                netns_cookie: ev.netns_cookie,
            }),
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
pub(super) fn tcp_flag_list(flags: u8) -> Vec<&'static str> {
    let names = tcp_flags_names(flags);
    ["SYN", "ACK", "PSH", "FIN", "RST", "URG"]
        .into_iter()
        .filter(|n| names.split('|').any(|x| x == *n))
        .collect()
}
