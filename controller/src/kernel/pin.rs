//! dp's state in bpffs (`--bpffs DIR`): `DIR/maps/<MAP>` and
//! `DIR/links/<device>@<hook>`. Pinned maps and links outlive the agent, so
//! traffic keeps flowing while it restarts or after it crashes, and a new
//! agent adopts them; `dp cleanup` removes them.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
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
        // Not a device's: the socket hooks attach to a cgroup.
        Hook::SockConnect4 => "sock-connect4",
        Hook::SockConnect6 => "sock-connect6",
        Hook::SockSendmsg4 => "sock-sendmsg4",
        Hook::SockSendmsg6 => "sock-sendmsg6",
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

/// Where bpffs is mounted by convention (systemd, Cilium, bpftool).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `dir` exists on a bpffs. Under `/sys/fs/bpf` with no bpffs
/// there (a host without one, or `ip netns exec`, which mounts a fresh
/// sysfs whose `/sys/fs/bpf` is an empty directory nothing can be created
/// in), a bpffs is mounted on `/sys/fs/bpf` itself, as Cilium does;
/// elsewhere, on `dir`.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && root.is_dir() && !is_bpffs(root) {
        mount_bpffs(root)?;
        if own_mount_namespace() {
            tracing::warn!(
                "mounted a bpffs on {BPFFS_ROOT} in this process's own mount namespace \
                 (`ip netns exec` makes one; so does a container without the host's \
                 {BPFFS_ROOT}): dp's pinned state lives as long as this agent, and traffic \
                 stops when it exits; inspection commands in this network namespace find \
                 the state through the agent's process. To keep it across agent restarts, \
                 give the agent the host's bpffs (`nsenter --net=/run/netns/NAME dp agent \
                 ...`, or a hostPath volume for {BPFFS_ROOT})"
            );
        } else {
            tracing::info!("mounted a bpffs on {BPFFS_ROOT}");
        }
    }
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        context: format!("create {}", dir.display()),
        source,
    })?;
    if is_bpffs(dir) {
        return Ok(());
    }
    mount_bpffs(dir)
}

/// Whether this process sees other mounts than PID 1 (it runs under
/// `ip netns exec`, `unshare -m` or in a container).
fn own_mount_namespace() -> bool {
    let ns = |p: &str| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    ns("/proc/self/ns/mnt") != ns("/proc/1/ns/mnt")
}

fn mount_bpffs(dir: &Path) -> Result<()> {
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

/// Where a command that reads the agent's state finds it: `bpffs` itself
/// when dp's maps are pinned there; else the same path as a dp agent in
/// this network namespace sees it, through `/proc/<pid>/root` (an agent
/// started with `ip netns exec` mounted its bpffs in a mount namespace of
/// its own, which a later `ip netns exec` does not share). An error says
/// what is missing and what to check.
pub fn find_state(bpffs: &Path) -> Result<PathBuf> {
    let has_state = |dir: &Path| maps_dir(dir).join(common::map_names::CONFIG).exists();
    if has_state(bpffs) {
        return Ok(bpffs.to_path_buf());
    }
    if let Some(dir) = agents_in_this_netns()
        .into_iter()
        .map(|pid| Path::new("/proc").join(pid.to_string()).join("root"))
        .map(|root| root.join(bpffs.strip_prefix("/").unwrap_or(bpffs)))
        .find(|dir| has_state(dir))
    {
        return Ok(dir);
    }
    let detail = if !bpffs.exists() {
        format!("{} does not exist", bpffs.display())
    } else if !is_bpffs(bpffs) {
        format!("{} is not on a bpffs", bpffs.display())
    } else {
        format!("nothing is pinned in {}", maps_dir(bpffs).display())
    };
    Err(Error::NoState {
        bpffs: bpffs.to_path_buf(),
        detail,
    })
}

/// Other `dp` processes in this process's network namespace.
fn agents_in_this_netns() -> Vec<u32> {
    let ns = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(mine) = ns(Path::new("/proc/self/ns/net")) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let proc = Path::new("/proc").join(pid.to_string());
            fs::read_to_string(proc.join("comm")).is_ok_and(|c| c.trim_end() == "dp")
                && ns(&proc.join("ns/net")) == Some(mine)
        })
        .collect();
    pids.sort();
    pids
}

/// Removes dp's pins under `bpffs`: links first (each unpinned link with no
/// other holder is detached at once), then maps (and the old maps of a
/// migration that did not finish). Returns what it removed.
pub fn cleanup(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let previous = crate::kernel::upgrade::previous_dir(&maps_dir(bpffs));
    for dir in [links_dir(bpffs), maps_dir(bpffs), previous] {
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
