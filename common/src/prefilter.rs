//! The pass-through filter (`DP_PREFILTER`): marks that tell tc and XDP,
//! before any hash lookup, that a packet can belong to no tracked flow and to no
//! frontend, so it passes (`NoService`) without the conntrack and service
//! lookups.
//!
//! - Frontend addresses: a bit per hashed service address (every address
//!   with a wildcard entry in `DP_SERVICES`). Every conntrack entry of the
//!   original direction is keyed on its frontend as destination.
//! - Tracked backends: a word per hashed (address, port, protocol), and
//!   one per hashed address alone (read first, see
//!   `backend_address_word`), set to 1 by the datapath before it writes a
//!   reply entry keyed on that backend as source (every reply entry is).
//!   Only backends with flows that tc or XDP track get them: the replies
//!   of a socket-LB flow, whose backend nobody reaches through tc, skip
//!   conntrack too. Whole words, not bits, so that two CPUs marking at
//!   once cannot undo each other (a read-modify-write of shared bits
//!   could; BPF atomics would raise the kernel floor above 5.10).
//!
//! A packet whose destination has no frontend bit (and is in no Service CIDR:
//! those are dropped as unallocated ClusterIPs) and whose source is no tracked
//! backend matches no conntrack entry and no frontend. A TCP SYN to a tracked
//! backend still looks for a closing reply entry to clear (`StaleReplyEntry`).
//!
//! Marks are only ever set (two addresses may share one, so none can be cleared
//! on its own): the agent sets a frontend's bit before its wildcard entry, the
//! datapath a backend's word before the reply entry; at start the agent sets
//! those of what the maps and conntrack it adopted hold, then turns the filter
//! on (`ENABLED_WORD`). Until then, and in any map not filled so (tests, the
//! benchmarks' bare datapaths), every packet takes the lookups. A stale mark
//! costs a lookup, never a decision.
//!
//! The hashes are here, once, for the datapath and the agent alike.

/// Word 0: non-zero once the agent has filled the bit sets.
pub const ENABLED_WORD: u32 = 0;
/// 2^20 frontend-address bits (128 KiB): 1% of addresses that are none
/// pass as possible frontends with 10 000 service addresses, 9% with
/// 100 000 (with 2^16 bits, 78%: the filter did nothing there).
pub const FRONTEND_BITS_LOG2: u32 = 20;
/// 2^17 tracked-backend words (1 MiB).
pub const BACKEND_SLOTS_LOG2: u32 = 17;
/// 2^13 tracked-backend-address words (64 KiB), read first: see
/// `backend_address_word`.
pub const BACKEND_ADDRESS_SLOTS_LOG2: u32 = 13;
/// First word of the frontend bits.
pub const FRONTEND_BASE: u32 = 1;
/// Words of frontend bits.
pub const FRONTEND_WORDS: u32 = 1 << (FRONTEND_BITS_LOG2 - 6);
/// First tracked-backend word.
pub const BACKEND_BASE: u32 = FRONTEND_BASE + FRONTEND_WORDS;
/// First tracked-backend-address word.
pub const BACKEND_ADDRESS_BASE: u32 = BACKEND_BASE + (1 << BACKEND_SLOTS_LOG2);
/// Words of `DP_PREFILTER` (an array of `u64`).
pub const WORDS: u32 = BACKEND_ADDRESS_BASE + (1 << BACKEND_ADDRESS_SLOTS_LOG2);

/// A 64-bit mix of a 16-byte address and one more word (a few multiplies:
/// cheap in BPF).
#[inline(always)]
fn mix(addr: &[u8; 16], extra: u64) -> u64 {
    let lo = u64::from_le_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let hi = u64::from_le_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]);
    // murmur3's 64-bit finaliser over the folded words: a bijection whose
    // top bits spread neighbouring addresses evenly.
    let mut h = lo ^ hi.rotate_left(32) ^ extra.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The word (index into `DP_PREFILTER`) and bit of a top-`log2`-bits hash.
#[inline(always)]
fn slot(h: u64, log2: u32, base: u32) -> (u32, u64) {
    let bit = (h >> (64 - log2)) as u32;
    (base + (bit >> 6), 1u64 << (bit & 63))
}

/// The frontend bit of a service address (16 bytes, IPv4 mapped).
#[inline(always)]
pub fn frontend_slot(addr: &[u8; 16]) -> (u32, u64) {
    slot(mix(addr, 0), FRONTEND_BITS_LOG2, FRONTEND_BASE)
}

/// The tracked-backend word of a backend's address, port and protocol.
#[inline(always)]
pub fn backend_word(addr: &[u8; 16], port: u16, protocol: u8) -> u32 {
    let extra = (u64::from(port) << 8) | u64::from(protocol) | (1 << 40);
    BACKEND_BASE + (mix(addr, extra) >> (64 - BACKEND_SLOTS_LOG2)) as u32
}

/// The tracked-backend-address word of a backend's address alone, marked
/// with its `backend_word` and read before it. A packet's source port is
/// a client's ephemeral port on half of all packets, so its
/// `backend_word` is a different word of 1 MiB for every connection: a
/// cache miss in real traffic (`dp-bench tc-floor --run-time`:
/// BENCHMARKS.md). The words of the few source addresses a node sees stay
/// in cache, and a source whose address word is unset never reads the
/// port's word. A client whose address is also a tracked backend's (a pod
/// that serves as well as calls; the node, when a hostNetwork pod is a
/// backend) still does, as does one whose word another address set:
/// about 11% of addresses with 1 000 tracked backend addresses, 70% with
/// 10 000 (marks are never cleared, so a node's churn adds up until the
/// agent restarts).
#[inline(always)]
pub fn backend_address_word(addr: &[u8; 16]) -> u32 {
    BACKEND_ADDRESS_BASE + (mix(addr, 2 << 40) >> (64 - BACKEND_ADDRESS_SLOTS_LOG2)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;

    #[test]
    fn slots_stay_in_their_ranges() {
        for i in 0..5000u32 {
            let a = v4_mapped((0x0a60_0000 + i).to_be_bytes());
            let (w, m) = frontend_slot(&a);
            assert!((FRONTEND_BASE..BACKEND_BASE).contains(&w));
            assert_eq!(m.count_ones(), 1);
            let w = backend_word(&a, 8080, 6);
            assert!((BACKEND_BASE..BACKEND_ADDRESS_BASE).contains(&w));
            let w = backend_address_word(&a);
            assert!((BACKEND_ADDRESS_BASE..WORDS).contains(&w));
        }
    }

    #[test]
    fn neighbouring_addresses_spread_over_the_bits() {
        // 10 000 ClusterIPs in a row set nearly as many distinct bits as a
        // perfect hash would (m (1 - e^(-n/m)) of m = 2^20: 9 952).
        let mut frontend = std::collections::HashSet::new();
        let mut backend = std::collections::HashSet::new();
        let mut backend_address = std::collections::HashSet::new();
        for i in 0..10_000u32 {
            let a = v4_mapped((0x0a60_0000 + i).to_be_bytes());
            frontend.insert(frontend_slot(&a));
            backend.insert(backend_word(&a, 8080, 6));
            backend_address.insert(backend_address_word(&a));
        }
        assert!(frontend.len() > 9_900, "{}", frontend.len());
        // m (1 - e^(-n/m)) of m = 2^17: 9 628.
        assert!(backend.len() > 9_500, "{}", backend.len());
        // Of m = 2^13: 5 955 (1 000 pods' addresses: 940).
        assert!(backend_address.len() > 5_800, "{}", backend_address.len());
        // Ports and protocols of one address differ too.
        let a = v4_mapped([10, 244, 1, 11]);
        assert_ne!(backend_word(&a, 8080, 6), backend_word(&a, 8080, 17));
        assert_ne!(backend_word(&a, 8080, 6), backend_word(&a, 8081, 6));
    }
}
