//! Addresses in map keys, values and events: 16 bytes in network order, so
//! IPv6 fits. An IPv4 address is stored IPv4-mapped (`::ffff:a.b.c.d`), which
//! never collides with a real IPv6 address in the same map.

/// The 16-byte form of an IPv4 address (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// The IPv4 address in a 16-byte address, if it is IPv4-mapped.
#[inline(always)]
pub fn as_v4(a: &[u8; 16]) -> Option<[u8; 4]> {
    if a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff {
        Some([a[12], a[13], a[14], a[15]])
    } else {
        None
    }
}

/// Whether a 16-byte address is IPv4-mapped (an IPv4 address), without
/// slice comparisons (BPF programs have no `memcmp`).
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    a[10] == 0xff && a[11] == 0xff
}

/// Whether `addr` lies in `net/prefix_len` (both 16-byte; IPv4 prefixes are
/// counted in the mapped form, i.e. `/24` is `96 + 24`).
#[inline(always)]
pub fn in_prefix(addr: &[u8; 16], net: &[u8; 16], prefix_len: u8) -> bool {
    let mut i = 0;
    while i < 16 {
        let bits = (prefix_len as i32 - (i as i32) * 8).clamp(0, 8) as u32;
        if bits == 0 {
            break;
        }
        let mask = (0xffu32 << (8 - bits)) as u8;
        if addr[i] & mask != net[i] & mask {
            return false;
        }
        i += 1;
    }
    true
}

/// The 16-byte form of an address (IPv4 as `::ffff:a.b.c.d`).
pub fn addr16(ip: core::net::IpAddr) -> [u8; 16] {
    match ip {
        core::net::IpAddr::V4(v4) => v4_mapped(v4.octets()),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a 16-byte form stands for.
pub fn ip_of(a: &[u8; 16]) -> core::net::IpAddr {
    match as_v4(a) {
        Some(v4) => core::net::IpAddr::from(v4),
        None => core::net::IpAddr::from(*a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_round_trip_and_prefixes() {
        let a = v4_mapped([10, 244, 1, 5]);
        assert_eq!(as_v4(&a), Some([10, 244, 1, 5]));
        assert_eq!(as_v4(&[0xfd; 16]), None);
        assert!(is_v4_mapped(&a));
        assert!(!is_v4_mapped(&[0xfd; 16]));
        assert!(!is_v4_mapped(
            &"::1".parse::<core::net::Ipv6Addr>().unwrap().octets()
        ));
        let net = v4_mapped([10, 244, 0, 0]);
        assert!(in_prefix(&a, &net, 96 + 16));
        assert!(!in_prefix(&v4_mapped([10, 245, 0, 1]), &net, 96 + 16));
        assert!(in_prefix(&v4_mapped([10, 245, 0, 1]), &net, 96 + 15));
        assert!(in_prefix(&v4_mapped([1, 2, 3, 4]), &net, 96));
        assert!(!in_prefix(
            &v4_mapped([10, 244, 1, 5]),
            &v4_mapped([10, 244, 1, 4]),
            128
        ));
    }
}
