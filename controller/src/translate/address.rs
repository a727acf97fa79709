//! Addresses in API objects, read the way kube-proxy reads them
//! (`netutils.ParseIPSloppy`, `ParseCIDRSloppy`): an IPv4 octet may have
//! leading zeros and is then read as decimal (`010.096.000.010` is
//! 10.96.0.10), as Go's parser did before 1.17. The API server rejects such
//! addresses in new objects, but objects created before it did still exist
//! and kube-proxy serves them. Each normalised address is logged once.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    sync::{Mutex, OnceLock},
};

use super::Cidr;

/// An IPv4 address, leading zeros allowed: four decimal octets of one or
/// more digits, each at most 255.
pub fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        *octet = decimal(parts.next()?).filter(|n| *n <= 255)? as u8;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// One or more decimal digits, leading zeros allowed; `None` past 65535.
fn decimal(s: &str) -> Option<u32> {
    if s.is_empty() {
        return None;
    }
    s.bytes().try_fold(0u32, |n, b| {
        let n = n * 10 + u32::from(b.is_ascii_digit().then(|| b - b'0')?);
        (n <= 65_535).then_some(n)
    })
}

/// An IP address of an API object field: the strict form, else the sloppy
/// IPv4 one (logged once per object and address).
pub fn parse_ip(object: &str, field: &str, s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    let ip = parse_ipv4_sloppy(s)?;
    normalised(object, field, s, &ip.to_string());
    Some(IpAddr::V4(ip))
}

/// A CIDR of an API object field (IPv4 or IPv6; an IPv4 address and its
/// prefix length may have leading zeros), logged once when normalised.
pub fn parse_cidr(object: &str, field: &str, s: &str) -> Result<Cidr, String> {
    let s = s.trim();
    if let Ok(c) = s.parse::<Cidr>() {
        return Ok(c);
    }
    let sloppy = s.split_once('/').and_then(|(addr, len)| {
        let addr = parse_ipv4_sloppy(addr)?;
        let len = decimal(len).filter(|l| *l <= 32)?;
        Some(Cidr {
            addr: IpAddr::V4(addr),
            len: len as u8,
        })
    });
    match sloppy {
        Some(c) => {
            normalised(object, field, s, &c.to_string());
            Ok(c)
        }
        // The strict parser's message says what is wrong.
        None => s.parse::<Cidr>(),
    }
}

/// Logs a normalised address the first time it is seen in an object.
fn normalised(object: &str, field: &str, given: &str, read_as: &str) {
    static SEEN: OnceLock<Mutex<HashSet<(String, String)>>> = OnceLock::new();
    let first = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((object.to_string(), given.to_string()));
    if first {
        tracing::warn!(
            object,
            field,
            given,
            read_as,
            "address with leading zeros read as decimal, as kube-proxy does"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_are_decimal_as_in_kube_proxy() {
        let cases = [
            ("010.096.000.010", Some([10, 96, 0, 10])),
            ("10.96.0.10", Some([10, 96, 0, 10])),
            ("0010.1.2.3", Some([10, 1, 2, 3])),
            ("255.255.255.255", Some([255, 255, 255, 255])),
            ("256.1.1.1", None),
            ("0256.1.1.1", None),
            ("1.2.3", None),
            ("1.2.3.4.5", None),
            ("1..2.3", None),
            ("1.2.3.4 ", None),
            ("+1.2.3.4", None),
            ("0x1.2.3.4", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_ipv4_sloppy(s), want.map(Ipv4Addr::from), "{s:?}");
        }
        assert_eq!(
            parse_ip("Service a/b", "clusterIP", "010.096.000.010"),
            Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)))
        );
        assert_eq!(
            parse_ip("Service a/b", "clusterIP", "fd00::1"),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(parse_ip("Service a/b", "clusterIP", "10.96.0.256"), None);
    }

    #[test]
    fn cidrs_with_leading_zeros_are_read_as_decimal() {
        let c = |s: &str| parse_cidr("Service a/b", "loadBalancerSourceRanges", s);
        assert_eq!(
            c("172.018.000.000/016").unwrap().to_string(),
            "172.18.0.0/16"
        );
        assert_eq!(c(" 10.0.0.0/8 ").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(c("010.0.0.0/00").unwrap().to_string(), "10.0.0.0/0");
        assert!(c("10.0.0.0/33").is_err());
        assert!(c("10.0.0.0/0033").is_err());
        assert_eq!(c("10.0.0.0/00032").unwrap().to_string(), "10.0.0.0/32");
        assert!(c("10.0.0.0").is_err());
        assert!(c("300.0.0.0/8").is_err());
    }
}
