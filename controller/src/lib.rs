//! dp: the agent and CLI of an eBPF dataplane that replaces kube-proxy.
//!
//! The modules are layered; a module uses only those listed before it
//! (ARCHITECTURE.md has the map):
//!
//! - [`error`]: the one error type.
//! - [`translate`]: kube-proxy's rules, from Kubernetes objects to the
//!   desired state, and the writer that brings maps to it (pure logic).
//! - [`source`]: where the objects come from (API reflectors, manifests).
//! - [`kernel`]: the eBPF object, its pins, its maps and trace rings.
//! - [`inspect`]: what users run to look inside (`dp explain`, `dp trace`,
//!   dumps, pcapng).
//! - [`agent`]: the node agent and its services (health checks, metrics,
//!   link events).
//! - [`kube_proxy`]: kube-proxy's own rules (iptables, nftables), for the
//!   lab and the benchmark to compare with.
//! - [`lab`]: `dp lab`, a Kubernetes-shaped lab of network namespaces that
//!   stays up between commands; its `demo` is the README's main command.

pub mod error;
pub mod translate;

pub mod source;

pub mod kernel;

pub mod inspect;

pub mod agent;

pub mod kube_proxy;

pub mod lab;

pub use error::Error;
pub use kernel::{Counters, Datapath, MapSizes};
pub use translate::sync::{BackendSlots, Frontend, ServiceMaps};
