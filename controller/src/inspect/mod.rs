//! What users run to look inside a node: read-only views of the pinned
//! maps and trace rings, in Kubernetes terms.
//!
//! - `pinned`: the pinned maps opened by a CLI process; `dp explain`.
//! - `dump`: `dp dump` of services, backends and conntrack.
//! - `trace`: `dp trace` (filter, naming, hints, text and JSON lines).
//! - `pcapng`: the pcapng writer behind `dp trace --pcap`.
//!
//! Uses: `kernel`, `translate`, `error`; never `agent` or `lab`.

pub mod dump;
pub mod pcapng;
pub mod pinned;
pub mod trace;
