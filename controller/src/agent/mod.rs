//! The node agent (`dp agent`): watches the objects, keeps the maps in step,
//! and serves what a kube-proxy replacement must.
//!
//! - `run`: the agent's loop (source → translate → sync), its options.
//! - `healthcheck`: the per-service health check ports of eTP=Local
//!   services and the proxy's own healthz.
//! - `metrics`: the Prometheus endpoint.
//! - `links`: netlink link events (pod veths coming and going).
//! - `ct_gc`: conntrack garbage collection, on a thread of its own.
//! - `ebpf_log`: the datapath's rare diagnostics (aya-log) into this log,
//!   rate-limited.
//!
//! Uses: `source`, `translate`, `kernel`, `error`.

pub mod ct_gc;
pub mod ebpf_log;
pub mod healthcheck;
pub mod links;
pub mod metrics;
mod run;
pub mod sock_lb;

pub use run::*;
