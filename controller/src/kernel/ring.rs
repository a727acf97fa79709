//! Trace sessions: claiming a session slot in the pinned `DP_TRACE_SESS`
//! and reading its ring buffer (rendering is in `inspect::trace`).

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData, RingBuf};
use common::{map_names, trace::TRACE_SESSIONS, TraceEvent, TraceSession};

use super::pin;
use crate::error::{Error, Result};

/// A session slot this process claimed in the pinned `DP_TRACE_SESS`;
/// released (the datapath stops tracing for it) when dropped.
pub struct PinnedSession {
    sessions: Array<MapData, TraceSession>,
    slot: u32,
}

impl PinnedSession {
    /// Claims a free slot (or one whose owner died) of the agent's pinned
    /// maps under `bpffs`, writes `filter` there and opens its ring buffer.
    pub fn open(bpffs: &Path, mut filter: TraceSession) -> Result<(Self, TraceReader)> {
        let maps = pin::maps_dir(bpffs);
        let io = |context: String| move |source| Error::Io { context, source };
        // Claims are serialised by a lock on the maps directory, so two
        // sessions starting together never take the same slot.
        let lock = File::open(&maps).map_err(io(format!("open {}", maps.display())))?;
        // SAFETY: a valid open descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Io {
                context: format!("lock {}", maps.display()),
                source: std::io::Error::last_os_error(),
            });
        }
        let name = map_names::TRACE_SESSIONS;
        let data =
            MapData::from_pin(maps.join(name)).map_err(|source| Error::Map { name, source })?;
        let mut sessions: Array<MapData, TraceSession> =
            Array::try_from(Map::Array(data)).map_err(|source| Error::Map { name, source })?;
        let map_err = |source| Error::Map { name, source };
        let mut free = None;
        for slot in 0..TRACE_SESSIONS {
            let s = sessions.get(&slot, 0).map_err(map_err)?;
            if s.active == 0 || !owner_alive(s.owner_pid) {
                free = Some(slot);
                break;
            }
        }
        let slot = free.ok_or(Error::TraceSessionsBusy(TRACE_SESSIONS))?;
        sessions
            .set(slot, TraceSession::default(), 0)
            .map_err(map_err)?;
        let ring_name = map_names::TRACE_RINGS[slot as usize];
        let data = MapData::from_pin(maps.join(ring_name)).map_err(|source| Error::Map {
            name: ring_name,
            source,
        })?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(|source| Error::Map {
            name: ring_name,
            source,
        })?;
        let mut reader = TraceReader::new(ring)?;
        // Whatever a previous owner left unread is not ours.
        reader.drain();
        filter.active = 1;
        filter.owner_pid = std::process::id();
        sessions.set(slot, filter, 0).map_err(map_err)?;
        Ok((PinnedSession { sessions, slot }, reader))
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for PinnedSession {
    fn drop(&mut self) {
        let _ = self.sessions.set(self.slot, TraceSession::default(), 0);
    }
}

/// Whether the process that claimed a slot still runs (a `dp` process: a
/// reused pid of something else does not hold the slot).
fn owner_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "dp")
}

/// The drops and rejects the datapath kept (`DP_RECENT`, per CPU), oldest
/// first.
pub fn recent_events(bpffs: &Path) -> Result<Vec<TraceEvent>> {
    use aya::maps::PerCpuArray;
    let name = map_names::RECENT;
    let data = MapData::from_pin(pin::maps_dir(bpffs).join(name))
        .map_err(|source| Error::Map { name, source })?;
    let ring: PerCpuArray<MapData, TraceEvent> = PerCpuArray::try_from(Map::PerCpuArray(data))
        .map_err(|source| Error::Map { name, source })?;
    let mut out = Vec::new();
    for i in 0..common::trace::RECENT_EVENTS {
        let per_cpu = ring
            .get(&i, 0)
            .map_err(|source| Error::Map { name, source })?;
        out.extend(per_cpu.iter().filter(|e| e.timestamp_ns != 0).copied());
    }
    out.sort_by_key(|e| e.timestamp_ns);
    Ok(out)
}

/// Reads `TraceEvent`s as the datapath submits them.
pub struct TraceReader {
    ring: RingBuf<MapData>,
}

impl TraceReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Result<Self> {
        Ok(TraceReader { ring })
    }

    /// The next event already in the buffer, without waiting.
    pub fn try_next(&mut self) -> Option<TraceEvent> {
        let item = self.ring.next()?;
        // Records are written by the datapath as whole `TraceEvent`s.
        Some(bytemuck::pod_read_unaligned(
            &item[..std::mem::size_of::<TraceEvent>()],
        ))
    }

    /// The next event, waiting up to `timeout` for one to be submitted
    /// (poll(2) on the ring buffer: woken by the kernel, no busy loop).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<TraceEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.try_next() {
                return Ok(Some(event));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut fds = libc::pollfd {
                fd: self.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut fds, 1, ms) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::Io {
                        context: "poll trace ring buffer".into(),
                        source: err,
                    });
                }
            }
        }
    }

    /// Every event currently in the buffer.
    pub fn drain(&mut self) -> Vec<TraceEvent> {
        std::iter::from_fn(|| self.try_next()).collect()
    }
}
