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
    /// Pinned connection state (or the record of its layouts) that this dp
    /// cannot read (`kernel::layout`): the agent fails static.
    #[error(
        "the pinned state holds connection state this dp cannot read ({why}); the agent leaves the programs and maps that serve the node's traffic as they are (fail static). Run the dp version that pinned it, or `dp cleanup` to remove dp's pinned state (connections through services are reset) and start the agent again"
    )]
    PinnedStateUnreadable { why: String },
    /// An inspection command over maps of another layout version.
    #[error(
        "pinned map {name} is in layout {pinned}, and this dp reads version {ours}: run the dp of the agent on this node (its container), or wait until an agent of this version has converted the state"
    )]
    OtherLayout {
        name: &'static str,
        pinned: String,
        ours: u32,
    },
    /// An inspection command found no agent state (`kernel::pin::find_state`).
    #[error(
        "no dp state under {bpffs}: {detail}. Is `dp agent` running on this node, and with this --bpffs (or DP_BPFFS)? The agent pins its maps under <bpffs>/maps when it starts; pass the same --bpffs here"
    )]
    NoState {
        bpffs: std::path::PathBuf,
        detail: String,
    },
    /// Node settings that contradict each other (an address and a CIDR of
    /// different families).
    #[error("{0}")]
    Config(String),
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

impl Error {
    /// A short label of what failed, for metrics (`dp_sync_errors_total`).
    pub fn cause(&self) -> &'static str {
        match self {
            Error::Map { .. } | Error::MissingMap(_) => "map",
            Error::Io { .. } => "io",
            Error::Pin { .. } | Error::NoState { .. } => "pin",
            Error::Load(_) | Error::Program { .. } | Error::MissingProgram(_) => "program",
            _ => "other",
        }
    }
}
