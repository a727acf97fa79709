//! dp: the agent and CLI of an eBPF dataplane that replaces kube-proxy.
//!
//! - [`datapath`]: loads the embedded eBPF object, attaches its programs,
//!   reads and writes its maps.
//! - [`trace`]: reads trace events from the ring buffer and renders them.
//! - [`demo`]: the README's main command for now: the datapath in a
//!   throwaway namespace pair, counting and tracing real traffic.

pub mod agent;
pub mod datapath;
pub mod demo;
pub mod dump;
pub mod error;
pub mod healthcheck;
pub mod inspect;
pub mod kube_proxy;
pub mod kube_source;
pub mod labels;
pub mod manifests;
pub mod metrics;
pub mod netlink;
pub mod pcapng;
pub mod pin;
pub mod services;
pub mod sync;
pub mod trace;
pub mod trace_view;
pub mod translate;

pub use datapath::{Counters, Datapath, MapSizes};
pub use error::Error;
pub use services::{BackendSlots, Frontend};
