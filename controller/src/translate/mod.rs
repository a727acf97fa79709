//! From Kubernetes objects to what the datapath should hold, by kube-proxy's
//! rules, and the writer that brings the maps there. Pure logic: nothing
//! here touches the kernel, so it is unit-tested without root.
//!
//! - `rules`: Services, EndpointSlices and Nodes to a `DesiredState`
//!   (frontends, eligible endpoints, policies).
//! - `sync`: `MapWriter`, the incremental diff from a `DesiredState` to map
//!   writes, through the `ServiceMaps` trait the kernel side implements.
//! - `incremental`: the same translation kept current object by object, so
//!   a change costs what changed (the agent's path).
//! - `memory`: `ServiceMaps` in memory (tests, benchmarks).
//! - `labels`: the names services and backends get in traces and dumps.
//! - `address`: addresses in objects read as kube-proxy reads them (leading
//!   zeros), each normalisation logged once.
//!
//! Uses: `error`, the `common` crate, and `tracing` for that one log.

pub mod address;
pub mod incremental;
pub mod labels;
pub mod memory;
mod rules;
pub mod sync;

pub use rules::*;

#[cfg(test)]
mod tests;
