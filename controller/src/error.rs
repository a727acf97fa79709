use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "this dp was built with DP_EBPF_STUB=1 and has no eBPF object; build it without that variable"
    )]
    StubObject,
    #[error("loading the dp eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object (or was already taken)")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{0:?} is not a tc hook")]
    NotTcHook(common::Hook),
    #[error("interface {0} not found in this network namespace")]
    NoSuchInterface(String),
    #[error("all {0} trace session slots are in use by running `dp trace` processes")]
    TraceSessionsBusy(u32),
    #[error("reading the map definitions of the dp eBPF object: {0}")]
    Object(String),
    /// A pinned map an earlier dp made holds datapath state in a layout
    /// this one cannot use (`kernel::layout`).
    #[error(
        "pinned map {name} ({path}) was made by a dp with another layout ({pinned}; this dp's: {wanted}) and its state cannot be carried over: run `dp cleanup` to remove dp's pinned state (connections through services are reset), then start the agent again"
    )]
    PinnedMapLayout {
        name: &'static str,
        path: std::path::PathBuf,
        pinned: String,
        wanted: String,
    },
    /// An inspection command found no agent state (`kernel::pin::find_state`).
    #[error(
        "no dp state under {bpffs}: {detail}. Is `dp agent` running on this node, and with this --bpffs (or DP_BPFFS)? The agent pins its maps under <bpffs>/maps when it starts; pass the same --bpffs here"
    )]
    NoState {
        bpffs: std::path::PathBuf,
        detail: String,
    },
    #[error("pinning {context}: {message}")]
    Pin { context: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
