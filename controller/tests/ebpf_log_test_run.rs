//! The datapath's log records (aya-log) reach the agent's forwarder: a real
//! fault provoked with BPF_PROG_TEST_RUN. The conntrack map is swapped for a
//! plain (non-LRU) hash of two entries, pinned before the object is loaded
//! (and adopted as it is: `Datapath::load_pinned_as_is`), so the second flow's insert fails:
//! dropped with `ConntrackFull`, and `diag::fault` logs it.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use common::{map_names, CtEntry, CtKey, Hook, Reason};
use dp::{
    agent::ebpf_log::{self, DatapathLog, Sink, SystemClock},
    BackendSlots, Datapath, Frontend, MapSizes, ServiceMaps,
};
use log::Level;
use support::*;

const CLIENT: [u8; 4] = [10, 244, 1, 5];
const VIP: [u8; 4] = [10, 96, 0, 10];
const B1: [u8; 4] = [10, 244, 2, 7];

/// Sends what the forwarder passes on to the test.
struct Channel(Mutex<mpsc::Sender<String>>);

impl Sink for Channel {
    fn record(&self, level: Level, site: &str, message: &str) {
        let _ = self
            .0
            .lock()
            .unwrap()
            .send(format!("{level} {site} {message}"));
    }
    fn suppressed(&self, site: &str, count: u64) {
        let _ = self
            .0
            .lock()
            .unwrap()
            .send(format!("suppressed {count} {site}"));
    }
}

/// A bpffs mounted on a directory of its own, unmounted and removed on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("dpt-{}-ebpf-log", std::process::id()));
        dp::kernel::pin::ensure_bpffs(&dir).expect("mount a bpffs");
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        dp::kernel::pin::unmount_bpffs(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pins a plain hash map with `DP_CT`'s key and value sizes at `path`.
fn pin_small_hash(path: &Path, entries: u32) {
    let status = Command::new("bpftool")
        .arg("map")
        .arg("create")
        .arg(path)
        .args(["type", "hash", "key"])
        .arg(size_of::<CtKey>().to_string())
        .arg("value")
        .arg(size_of::<CtEntry>().to_string())
        .arg("entries")
        .arg(entries.to_string())
        .args(["name", map_names::CT])
        .status()
        .expect("run bpftool");
    assert!(status.success(), "bpftool map create");
}

#[test]
fn a_failed_conntrack_insert_is_logged_and_forwarded() {
    e2e::require_root();
    let bpffs = Bpffs::new();
    let maps = bpffs.0.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    // One flow: its two entries.
    pin_small_hash(&maps.join(map_names::CT), 2);
    // A plain hash where dp has an LRU one: adopted only as it is.
    let mut dp = Datapath::load_pinned_as_is(&maps, MapSizes::default()).expect("load");
    dp.set_backend(1, sa(B1, 8080), 6, false).unwrap();
    let slots = BackendSlots {
        ready: vec![1],
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa(VIP, 80)), 10, &slots)
        .unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let log = DatapathLog::new(
        Channel(Mutex::new(tx)),
        SystemClock::default(),
        ebpf_log::BURST,
        ebpf_log::INTERVAL,
    );
    // The reader registers with the runtime's reactor, so from inside it.
    let _reader = {
        let _in_runtime = rt.enter();
        ebpf_log::forward(&dp, Arc::new(log), ebpf_log::INTERVAL).expect("read the log")
    };

    let (first, _) = run(&dp, Hook::TcIngress, &tcp_syn(CLIENT, 40000, VIP, 80));
    assert_ne!(first, TC_ACT_SHOT, "the first flow fits");
    let (second, _) = run(&dp, Hook::TcIngress, &tcp_syn(CLIENT, 40001, VIP, 80));
    assert_eq!(second, TC_ACT_SHOT, "no room for the second flow");
    assert_eq!(
        dp.counters()
            .unwrap()
            .packets(Hook::TcIngress, Reason::ConntrackFull),
        1
    );

    // The reader runs on the runtime: drive it until the record is there.
    let line = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(line) = rx.try_recv() {
                    return line;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("a log record within 10 s")
    });
    assert!(
        line.starts_with("ERROR ") && line.contains("diag.rs:"),
        "{line}"
    );
    assert!(
        line.contains("dropped: reason 14 (conntrack_full) at tc/ingress"),
        "{line}"
    );
    assert!(line.contains("service 10, backend 1"), "{line}");
}
