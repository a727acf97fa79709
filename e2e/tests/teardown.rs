//! Topologies and programs leave nothing behind: no namespaces, no links in
//! the caller's namespace, no loaded programs, no pins; also after a panic
//! and after a killed run.

use std::{
    collections::BTreeSet,
    fs, panic,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::Hook;
use dp::Datapath;
use e2e::{require_root, Topology, NETNS_PREFIX};

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn links_here() -> BTreeSet<String> {
    fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn dp_pins() -> Vec<String> {
    fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("dp"))
                .collect()
        })
        .unwrap_or_default()
}

fn two_namespaces() -> Topology {
    let mut topo = Topology::new().unwrap();
    topo.add_ns("a").unwrap();
    topo.add_ns("b").unwrap();
    topo.link(
        ("a", "eth0", "10.203.0.1/24"),
        ("b", "eth0", "10.203.0.2/24"),
    )
    .unwrap();
    topo
}

#[test]
fn dropping_a_topology_removes_its_namespaces_and_links() {
    require_root();
    let before = links_here();
    let topo = two_namespaces();
    let names = topo.netns_names();
    assert_eq!(names.len(), 2);
    assert!(names.iter().all(|n| netns_exists(n)));
    // The veth pair exists only inside the two namespaces.
    assert_eq!(
        links_here(),
        before,
        "a link appeared in the caller's namespace"
    );
    topo.ns("a").exec("ip", &["link", "show", "eth0"]).unwrap();
    drop(topo);
    for n in &names {
        assert!(!netns_exists(n), "{n} is left behind");
    }
    assert_eq!(links_here(), before);
}

#[test]
fn a_panicking_test_still_removes_its_topology() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = panic::catch_unwind(move || {
        let topo = two_namespaces();
        tx.send(topo.netns_names()).unwrap();
        panic!("a test failing half-way");
    });
    assert!(result.is_err());
    let names = rx.recv().unwrap();
    for n in &names {
        assert!(!netns_exists(n), "{n} survived the panic");
    }
}

#[test]
fn namespaces_of_a_killed_run_are_swept() {
    require_root();
    // A pid above pid_max cannot be alive.
    let pid_max: u64 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stale = format!("{NETNS_PREFIX}{}-1-left", pid_max + 1);
    let status = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(netns_exists(&stale));
    let _topo = Topology::new().unwrap();
    assert!(
        !netns_exists(&stale),
        "stale namespace {stale} was not swept"
    );
}

#[test]
fn programs_are_detached_and_unloaded_and_nothing_is_pinned() {
    require_root();
    let pins_before = dp_pins();
    let topo = two_namespaces();
    let mut dp = Datapath::load().unwrap();
    topo.ns("b")
        .run(|| -> dp::error::Result<()> {
            dp.attach_xdp("eth0")?;
            dp.attach_tc("eth0", Hook::TcIngress)?;
            dp.attach_tc("eth0", Hook::TcEgress)
        })
        .unwrap()
        .unwrap();
    let ids = dp.program_ids().unwrap();
    assert_eq!(ids.len(), 3);
    let loaded = || -> BTreeSet<u32> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .collect()
    };
    assert!(ids.iter().all(|id| loaded().contains(id)));
    assert_eq!(dp_pins(), pins_before, "dp pins nothing by itself");
    drop(dp);
    drop(topo);
    // The kernel frees a program after an RCU grace period; there is no event
    // to wait on, so poll with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let still: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| loaded().contains(id))
            .collect();
        if still.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "programs {still:?} still loaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dp_pins(), pins_before);
}
