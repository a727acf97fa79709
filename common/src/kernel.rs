//! The kernels dp runs on, checked by the agent at start and by
//! `cargo xtask kind up` before it creates anything (kind nodes run the
//! host's kernel).
//!
//! What each feature dp uses needs (docs/kind.md and docs/deploy.md list
//! the same): tcx attachment of the tc programs 6.6 (older kernels get
//! netlink tc filters on a clsact qdisc instead); `bpf_redirect_neigh` 5.10;
//! XDP bpf links 5.9; BPF ring buffers 5.8; `bpf_fib_lookup`, LRU and LPM
//! maps older. `bpf_redirect_neigh` sets the floor.

use core::fmt;

/// The oldest kernel (major, minor) dp runs on.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// The feature that sets `MIN_KERNEL`.
pub const MIN_KERNEL_FEATURE: &str =
    "bpf_redirect_neigh, with which dp's tc programs send translated packets on";

/// The first kernel with tcx; older ones get netlink tc filters.
pub const TCX_KERNEL: (u32, u32) = (6, 6);

/// Environment variable that replaces the running kernel's release in the
/// checks (to see what a host with another kernel would get).
pub const KERNEL_RELEASE_OVERRIDE: &str = "DP_KERNEL_RELEASE";

/// (major, minor) of a release string such as `6.1.0-28-amd64` or
/// `5.15.0-91-generic`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// `Ok` if dp runs on kernel `release`, else why not (displayable).
pub fn check(release: &str) -> Result<(), TooOld<'_>> {
    match parse_release(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(TooOld { release }),
    }
}

/// Whether kernel `release` has tcx (else dp attaches with netlink tc).
pub fn has_tcx(release: &str) -> bool {
    parse_release(release).is_some_and(|v| v >= TCX_KERNEL)
}

/// A kernel dp cannot run on.
#[derive(Debug)]
pub struct TooOld<'a> {
    pub release: &'a str,
}

impl fmt::Display for TooOld<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = MIN_KERNEL;
        write!(
            f,
            "Linux {} is too old for dp: it needs Linux {major}.{minor} or newer for \
             {MIN_KERNEL_FEATURE} (Ubuntu 20.04 ships 5.4, RHEL 8 4.18; Debian 12, \
             Ubuntu 22.04 and RHEL 9 are new enough). kind nodes run the host's kernel: \
             use a host with a newer one",
            self.release.trim()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_and_compare() {
        assert_eq!(parse_release("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("6.18.0+"), Some((6, 18)));
        assert_eq!(parse_release("garbage"), None);
        for supported in [
            "5.10.0-32-amd64",
            "5.14.0-427.el9.x86_64",
            "6.1.0-28-amd64",
            "6.18.3",
        ] {
            assert!(check(supported).is_ok(), "{supported}");
        }
        for old in ["5.4.0-150-generic", "4.18.0-553.el8_10.x86_64", ""] {
            assert!(check(old).is_err(), "{old}");
        }
        assert!(!has_tcx("6.1.0-28-amd64") && !has_tcx("5.15.0"));
        assert!(has_tcx("6.6.0") && has_tcx("6.18.44") && has_tcx("7.0"));
        let msg = check("5.4.0-150-generic").unwrap_err().to_string();
        assert!(
            msg.starts_with("Linux 5.4.0-150-generic is too old for dp"),
            "{msg}"
        );
        assert!(
            msg.contains("5.10 or newer for bpf_redirect_neigh"),
            "{msg}"
        );
    }
}
