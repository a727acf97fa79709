//! dp: the agent and CLI of an eBPF dataplane that replaces kube-proxy.
//!
//! - [`datapath`]: loads the embedded eBPF object, attaches its programs,
//!   reads and writes its maps.
//! - [`trace`]: reads trace events from the ring buffer and renders them.
//! - [`lab`]: `dp lab`, a Kubernetes-shaped lab of network namespaces that
//!   stays up between commands; its `demo` is the README's main command.

pub mod agent;
pub mod datapath;
pub mod dump;
pub mod ebpf_log;
pub mod error;
pub mod healthcheck;
pub mod host;
pub mod inspect;
pub mod kube_proxy;
pub mod kube_source;
pub mod lab;
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
