//! The kernels dp runs on, checked by the agent at start and by
//! `cargo xtask kind up` before it creates anything (kind nodes run the
//! host's kernel).
//!
//! What each feature dp uses needs (docs/kind.md and docs/deploy.md list
//! the same): tcx attachment of the tc programs 6.6; `bpf_redirect_neigh`
//! 5.10; XDP bpf links 5.9; BPF ring buffers 5.8; `bpf_fib_lookup`, LRU and
//! LPM maps older. tcx sets the floor.

use core::fmt;

/// The oldest kernel (major, minor) dp runs on.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

/// The feature that sets `MIN_KERNEL`.
pub const MIN_KERNEL_FEATURE: &str = "tcx, the tc attachment dp's programs use";

/// Environment variable that replaces the running kernel's release in the
/// check (to see what a host with another kernel would be told).
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
             {MIN_KERNEL_FEATURE} (Debian 12 ships 6.1, Ubuntu 22.04 5.15, RHEL 9 5.14; \
             Ubuntu 24.04 and Debian 13 are new enough). kind nodes run the host's kernel: \
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
        assert!(check("6.6.0").is_ok());
        assert!(check("6.18.3-cloud").is_ok());
        assert!(check("7.0").is_ok());
        assert!(check("6.1.0-28-amd64").is_err());
        assert!(check("5.14.0-427.el9.x86_64").is_err());
        assert!(check("").is_err());
        let msg = check("5.15.0-91-generic").unwrap_err().to_string();
        assert!(
            msg.starts_with("Linux 5.15.0-91-generic is too old for dp"),
            "{msg}"
        );
        assert!(msg.contains("6.6 or newer for tcx"), "{msg}");
    }
}
