//! The processes of a lab: starting, finding, stopping, and their logs.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};

pub(super) fn is_lab_role(role: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    role == "net"
        || role == "client"
        || role.strip_prefix("node").is_some_and(digits)
        || role
            .strip_prefix("pod-")
            .and_then(|r| r.split_once('-'))
            .is_some_and(|(n, p)| digits(n) && digits(p))
}

pub(super) fn count_syncs(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains(" synced ")
                || l.contains("programming the maps failed")
                || l.contains("cannot read manifests")
        })
        .count()
}

pub(super) fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// The last lines of a log, for an error message.
pub(super) fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(5);
    format!("{} says:\n{}", log.display(), lines[start..].join("\n"))
}

/// Processes whose network namespace is one of `namespaces` (bind mounts
/// under /run/netns), other than this one.
pub(super) fn processes_in(namespaces: &[PathBuf]) -> Vec<u32> {
    let ids: Vec<(u64, u64)> = namespaces
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| ids.contains(&(m.dev(), m.ino())))
        })
        .collect()
}

/// SIGTERM, then SIGKILL what is left after two seconds. Returns how many
/// were running.
pub(super) fn stop_processes(pids: &[u32]) -> usize {
    let running: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for pid in &running {
        // SAFETY: signalling a process of the lab.
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while running.iter().any(|p| alive(*p) && !zombie(*p)) && Instant::now() < deadline {
        // Exits of processes that are not our children raise no event here.
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in &running {
        if alive(*pid) {
            // SAFETY: as above.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
    running.len()
}

pub(super) fn zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

pub(super) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
