//! Where the Kubernetes objects come from.
//!
//! - `api`: reflectors on the API server (Services, EndpointSlices, Nodes).
//! - `manifests`: the same objects read from YAML files (the lab, `dp
//!   explain --manifests`, tests).
//!
//! Uses: `translate` (the object set and what it skips) and `error`.

pub mod api;
pub mod manifests;
