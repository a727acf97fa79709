//! BPF_PROG_TEST_RUN tests of the pass-through filter (`common::prefilter`):
//! with it on, what no frontend and no tracked flow can match skips the
//! conntrack and service lookups, and everything else is decided as
//! before.

mod support;

use aya::maps::{HashMap, Map, MapData};
use common::{
    ct::{CT_DIR_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED},
    map_names, CtEntry, CtKey, Hook, Reason,
};
use dp::{BackendSlots, Datapath, Frontend, MapSizes, ServiceMaps};
use support::{agents::Bpffs, *};

const CLIENT: [u8; 4] = [10, 244, 1, 5];
const VIP: [u8; 4] = [10, 96, 0, 10];
const B1: [u8; 4] = [10, 244, 2, 7];
/// A pod that is no backend of any service.
const OTHER: [u8; 4] = [10, 244, 3, 30];
const SERVICE_ID: u32 = 10;

/// A datapath configured as `NODE` (service CIDR 10.96.0.0/12), its maps
/// pinned under `bpffs` (so the test can write conntrack behind its back),
/// with one TCP frontend 10.96.0.10:80 -> B1:8080.
fn setup(bpffs: &Bpffs) -> Datapath {
    let maps = dp::kernel::pin::maps_dir(&bpffs.node("n1"));
    let mut dp = Datapath::load_pinned(&maps, MapSizes::default()).expect("load");
    dp.set_node(
        std::net::IpAddr::from(NODE),
        Some((std::net::IpAddr::from([10, 244, 0, 0]), 16)),
        false,
    )
    .unwrap();
    dp.set_service_cidrs(&[(std::net::IpAddr::from([10, 96, 0, 0]), 12)])
        .unwrap();
    dp.set_backend(1, sa(B1, 8080), 6, false).unwrap();
    let slots = BackendSlots {
        ready: vec![1],
        ..BackendSlots::default()
    };
    dp.set_service(&Frontend::tcp(sa(VIP, 80)), SERVICE_ID, &slots)
        .unwrap();
    dp
}

fn conntrack(bpffs: &Bpffs) -> HashMap<MapData, CtKey, CtEntry> {
    let maps = dp::kernel::pin::maps_dir(&bpffs.node("n1"));
    let data = MapData::from_pin(maps.join(map_names::CT)).unwrap();
    HashMap::try_from(Map::LruHashMap(data)).unwrap()
}

/// A reply-direction entry of service `SERVICE_ID`, live for ten minutes.
fn reply_entry(state: u8) -> CtEntry {
    CtEntry {
        expires_ns: dp::kernel::maps::monotonic_ns() + 600_000_000_000,
        backend_id: 1,
        service_id: SERVICE_ID,
        state,
        direction: CT_DIR_REPLY,
        ..CtEntry::default()
    }
}

fn count(dp: &Datapath, reason: Reason) -> u64 {
    dp.counters().unwrap().packets(Hook::TcIngress, reason)
}

#[test]
fn with_the_filter_on_a_tuple_without_bits_skips_conntrack_until_a_fill_finds_its_entry() {
    e2e::require_root();
    let bpffs = Bpffs::new("prefilter-skip");
    let mut dp = setup(&bpffs);
    // A reply entry the datapath did not write (an older agent's programs
    // did, which did not mark its backend): OTHER:9090 -> CLIENT:40300.
    conntrack(&bpffs)
        .insert(
            ct_key(OTHER, 9090, CLIENT, 40300, 6),
            reply_entry(CT_STATE_ESTABLISHED),
            0,
        )
        .unwrap();
    let reply = tcp(OTHER, 9090, CLIENT, 40300, TCP_ACK, 7000, 1000, b"hi");

    // Filter off: the lookup finds the entry, the reply is reverse NATed.
    let v = forward(&dp, &reply);
    assert_eq!(Ipv4View::new(&v).src(), VIP, "filter off: looked up");
    assert_eq!(count(&dp, Reason::ReplyReverseNat), 1);

    // On, without a fill: nothing admits OTHER:9090, so conntrack is not
    // even looked at and the packet passes as it came.
    dp.enable_prefilter().unwrap();
    let (ret, out) = run(&dp, Hook::TcIngress, &reply);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(out, reply, "untouched: the entry was never looked up");
    assert_eq!(count(&dp, Reason::NoService), 1);
    assert_eq!(count(&dp, Reason::ReplyReverseNat), 1);

    // The agent's start: the fill walks conntrack, the entry's backend is
    // admitted, its replies are translated again.
    let filled = dp.fill_prefilter().unwrap();
    assert_eq!(filled.conntrack_entries, 1);
    assert_eq!(filled.frontend_addresses, 1);
    let v = forward(&dp, &reply);
    assert_eq!(Ipv4View::new(&v).src(), VIP, "admitted by the fill");
    assert_eq!(count(&dp, Reason::ReplyReverseNat), 2);
}

#[test]
fn with_the_filter_on_services_flows_rejects_and_stale_entries_are_decided_as_before() {
    e2e::require_root();
    let bpffs = Bpffs::new("prefilter-same");
    let mut dp = setup(&bpffs);
    dp.fill_prefilter().unwrap();
    dp.enable_prefilter().unwrap();

    // A new flow to the ClusterIP, and its reply.
    let out = forward(&dp, &tcp_syn(CLIENT, 40400, VIP, 80));
    assert_eq!(Ipv4View::new(&out).dst(), B1);
    let syn_ack = tcp(B1, 8080, CLIENT, 40400, TCP_SYN | TCP_ACK, 5000, 1001, &[]);
    let out = forward(&dp, &syn_ack);
    assert_eq!(
        (Ipv4View::new(&out).src(), Ipv4View::new(&out).sport()),
        (VIP, 80)
    );
    assert_eq!(count(&dp, Reason::NewFlow), 1);
    assert_eq!(count(&dp, Reason::ReplyReverseNat), 1);

    // A port the ClusterIP does not serve is rejected; an unallocated
    // ClusterIP is dropped: both need the frontend lookup.
    run(&dp, Hook::TcIngress, &tcp_syn(CLIENT, 40401, VIP, 81));
    assert_eq!(count(&dp, Reason::PortNotServed), 1);
    let (ret, _) = run(
        &dp,
        Hook::TcIngress,
        &tcp_syn(CLIENT, 40402, [10, 96, 9, 9], 80),
    );
    assert_eq!(ret, TC_ACT_SHOT);
    assert_eq!(count(&dp, Reason::UnallocatedClusterIp), 1);

    // A SYN straight to the backend from the port of a closing service
    // flow clears the flow's reply entry (it would rewrite the SYN-ACK).
    let stale = ct_key(B1, 8080, CLIENT, 40500, 6);
    conntrack(&bpffs)
        .insert(stale, reply_entry(CT_STATE_CLOSING), 0)
        .unwrap();
    let (ret, out) = run(&dp, Hook::TcIngress, &tcp_syn(CLIENT, 40500, B1, 8080));
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(Ipv4View::new(&out).dst(), B1, "untouched");
    assert_eq!(count(&dp, Reason::StaleReplyEntry), 1);
    assert!(ct_get(&dp, &stale).is_none(), "the stale entry is gone");

    // Pod to pod, no service: passes untouched.
    let direct = tcp(CLIENT, 40600, OTHER, 9090, TCP_ACK, 1, 1, b"x");
    let (ret, out) = run(&dp, Hook::TcIngress, &direct);
    assert_eq!((ret, out), (TC_ACT_OK, direct));
    assert_eq!(count(&dp, Reason::NoService), 1);

    // From a tracked backend's port (B1, since the 40400 flow) but of no
    // flow: conntrack is looked up, finds nothing, the packet passes as
    // what no service has (not dropped, not rejected).
    let from_backend = tcp(B1, 8080, OTHER, 40700, TCP_ACK, 1, 1, b"y");
    let (ret, out) = run(&dp, Hook::TcIngress, &from_backend);
    assert_eq!((ret, out), (TC_ACT_OK, from_backend));
    assert_eq!(count(&dp, Reason::NoService), 2);
}

#[test]
fn a_backend_is_marked_when_tc_tracks_a_flow_to_it_not_before() {
    e2e::require_root();
    let bpffs = Bpffs::new("prefilter-tracked");
    let mut dp = setup(&bpffs);
    dp.fill_prefilter().unwrap();
    dp.enable_prefilter().unwrap();
    // B1 is a backend, but no flow to it went through tc (a socket-LB
    // flow's packets are addressed to B1 already): a reply entry for it
    // written behind the datapath's back is not looked for.
    let key = ct_key(B1, 8080, CLIENT, 40800, 6);
    conntrack(&bpffs)
        .insert(key, reply_entry(CT_STATE_ESTABLISHED), 0)
        .unwrap();
    let reply = tcp(B1, 8080, CLIENT, 40800, TCP_ACK, 7000, 1000, b"hi");
    let (ret, out) = run(&dp, Hook::TcIngress, &reply);
    assert_eq!((ret, &out), (TC_ACT_OK, &reply), "B1 not marked yet");
    assert_eq!(count(&dp, Reason::NoService), 1);

    // tc tracks a flow to the ClusterIP, to B1: B1 is marked before its
    // reply entry is written, and from then on its replies are looked up.
    let out = forward(&dp, &tcp_syn(CLIENT, 40801, VIP, 80));
    assert_eq!(Ipv4View::new(&out).dst(), B1);
    let out = forward(&dp, &reply);
    assert_eq!(Ipv4View::new(&out).src(), VIP, "marked by the new flow");
    assert_eq!(count(&dp, Reason::ReplyReverseNat), 1);
}

#[test]
fn a_udp_flow_moved_to_another_backend_marks_that_backend() {
    e2e::require_root();
    let bpffs = Bpffs::new("prefilter-repick");
    let mut dp = setup(&bpffs);
    const B2: [u8; 4] = [10, 244, 2, 8];
    dp.set_backend(2, sa(B1, 5353), 17, false).unwrap();
    let udp_vip = Frontend::udp(sa(VIP, 53));
    let slots = |id| BackendSlots {
        ready: vec![id],
        ..BackendSlots::default()
    };
    dp.set_service(&udp_vip, SERVICE_ID + 1, &slots(2)).unwrap();
    dp.fill_prefilter().unwrap();
    dp.enable_prefilter().unwrap();
    let query = udp(CLIENT, 40900, VIP, 53, b"q");
    assert_eq!(Ipv4View::new(&forward(&dp, &query)).dst(), B1);

    // B1 leaves the service, B2 (never tracked) joins: the flow's next
    // datagram moves to B2, which the re-pick marks before its reply
    // entry, so B2's answers are translated back.
    dp.set_backend(3, sa(B2, 5353), 17, false).unwrap();
    dp.set_service(&udp_vip, SERVICE_ID + 1, &slots(3)).unwrap();
    dp.remove_backend(2).unwrap();
    assert_eq!(Ipv4View::new(&forward(&dp, &query)).dst(), B2);
    assert_eq!(count(&dp, Reason::BackendGoneRepicked), 1);
    let answer = udp(B2, 5353, CLIENT, 40900, b"a");
    let out = forward(&dp, &answer);
    assert_eq!(
        (Ipv4View::new(&out).src(), Ipv4View::new(&out).sport()),
        (VIP, 53),
        "B2 marked by the re-pick"
    );
}
