//! The session's filter as the CLI takes it; the kernel checks it.

use std::{ffi::CString, net::IpAddr};

use common::{
    proto,
    trace::{
        TRACE_MATCH_ADDR, TRACE_MATCH_IFINDEX, TRACE_MATCH_PORT, TRACE_MATCH_PROTOCOL,
        TRACE_MATCH_REASON, TRACE_MATCH_SERVICE, TRACE_MATCH_VERDICT, TRACE_SERVICE_IDS,
    },
    Reason, TraceSession, Verdict,
};

use crate::error::{Error, Result};

use super::*;

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

/// `IPPROTO_*` of a `--proto` value: tcp, udp, sctp, icmp, icmpv6 (or
/// icmp6, ipv6-icmp) or a number.
pub fn parse_protocol(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(proto::IPPROTO_TCP),
        "udp" => Some(proto::IPPROTO_UDP),
        "icmp" => Some(proto::IPPROTO_ICMP),
        "icmpv6" | "icmp6" | "ipv6-icmp" => Some(proto::IPPROTO_ICMPV6),
        "sctp" => Some(proto::IPPROTO_SCTP),
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
            s.addr = common::addr::addr16(ip);
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
pub(super) fn service_of(port_name: &str) -> &str {
    port_name.split(':').next().unwrap_or(port_name)
}
