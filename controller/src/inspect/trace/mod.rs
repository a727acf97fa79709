//! `dp trace`: the session's filter, and trace events in Kubernetes terms
//! (services, pods, nodes), as text lines or JSON objects (schema
//! `dp.trace/v1`, docs/trace-json.md), with hints for drops and rejects.
//!
//! - `filter`: the session's filter as the CLI takes it.
//! - `record`: an event in Kubernetes terms, and the names it is told in.
//! - `hint`: what a drop or reject means and what to run next.
//! - `render`: text lines and pcapng comments.
//! - `stream`: the `dp trace` loop.
//! - `describe`: the plain rendering, without Kubernetes names.

pub mod describe;
mod filter;
mod hint;
mod record;
mod render;
mod stream;

pub use filter::*;
pub use hint::*;
pub use record::*;
pub use render::*;
pub use stream::*;

/// The JSON schema of `dp trace -o json` lines.
pub const SCHEMA: &str = "dp.trace/v1";

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use common::{Reason, Verdict};

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
            process: None,
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
