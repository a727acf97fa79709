//! dp's state in bpffs (`--bpffs DIR`): `DIR/maps/<MAP>` and
//! `DIR/links/<device>@<hook>`. Pinned maps and links outlive the agent, so
//! traffic keeps flowing while it restarts or after it crashes, and a new
//! agent adopts them; `dp cleanup` removes them.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use common::Hook;

use crate::error::{Error, Result};

/// `statfs` type of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("maps")
}

pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// The pin of the link for `device` at `hook`: `<device>@<hook>`. bpffs
/// refuses names with a dot (reserved), so a dot in a device name (VLANs
/// such as `eth0.100`) is written as `_`.
pub fn link_pin(bpffs: &Path, device: &str, hook: Hook) -> PathBuf {
    let hook = match hook {
        Hook::TcIngress => "tc-ingress",
        Hook::TcEgress => "tc-egress",
        Hook::Xdp => "xdp",
    };
    links_dir(bpffs).join(format!("{}@{hook}", device.replace('.', "_")))
}

/// Whether `dir` is on a bpffs.
pub fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid path and an out buffer of the right type.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Undoes `ensure_bpffs`'s mount: a lazy unmount of `dir` (the pins left
/// in it go with it). Does nothing where nothing is mounted.
pub fn unmount_bpffs(dir: &Path) {
    if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Makes sure `dir` exists on a bpffs: if it is not on one, a bpffs is
/// mounted there (as Cilium does when the host has none mounted).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        context: format!("create {}", dir.display()),
        source,
    })?;
    if is_bpffs(dir) {
        return Ok(());
    }
    let target = CString::new(dir.as_os_str().as_bytes()).map_err(|e| Error::Pin {
        context: dir.display().to_string(),
        message: e.to_string(),
    })?;
    let (source, fstype, data) = (c"bpf", c"bpf", c"mode=0700");
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(Error::Io {
            context: format!("mount bpffs on {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Removes dp's pins under `bpffs`: links first (each unpinned link with no
/// other holder is detached at once), then maps. Returns what it removed.
pub fn cleanup(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in [links_dir(bpffs), maps_dir(bpffs)] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            fs::remove_file(&p).map_err(|source| Error::Io {
                context: format!("unpin {}", p.display()),
                source,
            })?;
            removed.push(p);
        }
        let _ = fs::remove_dir(&dir);
    }
    Ok(removed)
}
