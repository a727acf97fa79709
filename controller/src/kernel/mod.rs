//! The kernel side: the embedded eBPF object and everything that touches it.
//!
//! - `loader`: loads the object, attaches the programs (tcx or netlink tc,
//!   XDP), owns the maps (`Datapath`).
//! - `maps`: programs services, backends and names into the maps in an
//!   order no packet sees half-written; implements `translate::sync`'s
//!   `ServiceMaps`; reads conntrack and the services back.
//! - `pin`: the bpffs layout, so CLI commands open what the agent pinned.
//! - `ring`: trace sessions and their ring buffers.
//! - `host`: kernel release and sysctls of the node.
//!
//! Uses: `translate` (the writer's vocabulary) and `error`; never `inspect`,
//! `agent` or `lab`.

pub mod host;
pub mod loader;
pub mod maps;
pub mod pin;
pub mod ring;

pub use loader::{Counters, Datapath, MapSizes, TcAttach};
