//! The kernel side: the embedded eBPF object and everything that touches it.
//!
//! - `loader`: loads the object, attaches the programs (tcx or netlink tc,
//!   XDP), owns the maps (`Datapath`).
//! - `maps`: programs services, backends and names into the maps in an
//!   order no packet sees half-written; implements `translate::sync`'s
//!   `ServiceMaps`; reads conntrack and the services back.
//! - `prefilter`: the pass-through filter's marks (`common::prefilter`):
//!   frontends, set by `maps` before each wildcard write; at start, those
//!   of the adopted state.
//! - `pin`: the bpffs layout, so CLI commands open what the agent pinned.
//! - `ring`: trace sessions and their ring buffers.
//! - `host`: kernel release and sysctls of the node.
//! - `sizing`: the capacities of conntrack and affinity from the node's
//!   cores and memory.
//! - `layout`: whether maps pinned by an earlier (or later) agent fit this
//!   dp's definitions, and what is done when they do not; `upgrade` carries
//!   it out at load (pins, `DP_LAYOUTS`) and `migrate` converts the entries
//!   field by field (`rawmap`: a map's entries as bytes).
//!
//! Uses: `translate` (the writer's vocabulary) and `error`; never `inspect`,
//! `agent` or `lab`.

pub mod host;
pub mod layout;
pub mod loader;
pub mod maps;
pub mod migrate;
pub mod pin;
pub mod prefilter;
pub mod rawmap;
pub mod ring;
pub mod sizing;
pub mod sock_diag;
pub mod upgrade;

pub use loader::{Counters, Datapath, MapSizes, TcAttach};
