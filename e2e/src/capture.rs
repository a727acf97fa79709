//! What reaches a backend, seen on the wire: a packet socket in the
//! backend's namespace logs every TCP SYN and every UDP datagram to chosen
//! ports, with the time it saw it. Unlike a server's `accept`, it also sees
//! connections that never complete (a handshake cut short by a reset).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::SystemTime,
};

use crate::{io_err, Netns, Result};

/// A new flow's first packet at a backend: a TCP SYN or a UDP datagram.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub at: SystemTime,
    /// The capture's name (the backend's).
    pub backend: String,
    /// `tcp` (a SYN) or `udp`.
    pub protocol: &'static str,
    /// Where it came from, as the backend sees it.
    pub peer: SocketAddr,
}

/// Arrivals at the captures sharing it, in the order they were seen.
pub type ArrivalLog = Arc<Mutex<Vec<Arrival>>>;

/// A capture thread in a namespace; stopped and joined on drop.
pub struct ArrivalCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ArrivalCapture {
    /// Logs, in `log`, the TCP SYNs to `tcp_port` and UDP datagrams to
    /// `udp_port` that arrive in `ns` (on any of its devices). Returns once
    /// the socket is open.
    pub fn start(
        ns: &Netns,
        backend: &str,
        tcp_port: u16,
        udp_port: u16,
        log: ArrivalLog,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let backend = backend.to_string();
        let thread = {
            let stop = stop.clone();
            ns.spawn(move || match open_ip_packet_socket() {
                Ok(fd) => {
                    let _ = ready_tx.send(Ok(()));
                    capture(&fd, &backend, tcp_port, udp_port, &log, &stop);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })?
        };
        ready_rx
            .recv()
            .expect("capture thread reports")
            .map_err(io_err("packet socket"))?;
        Ok(ArrivalCapture {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ArrivalCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An `AF_PACKET` datagram socket for incoming IPv4 (link header removed),
/// with a short receive timeout so that the thread notices `stop`.
fn open_ip_packet_socket() -> std::io::Result<OwnedFd> {
    let proto = (libc::ETH_P_IP as u16).to_be() as i32;
    // SAFETY: socket(2) without pointers; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            proto,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: a valid socket and a pointer/length pair describing `timeout`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn capture(
    fd: &OwnedFd,
    backend: &str,
    tcp_port: u16,
    udp_port: u16,
    log: &ArrivalLog,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: an all-zero sockaddr_ll is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        if n <= 0 {
            continue;
        }
        // Only what arrives: not our own replies going out.
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let at = SystemTime::now();
        if let Some((protocol, peer)) = new_flow(&buf[..n as usize], tcp_port, udp_port) {
            log.lock().unwrap().push(Arrival {
                at,
                backend: backend.to_string(),
                protocol,
                peer,
            });
        }
    }
}

/// A TCP SYN (without ACK) to `tcp_port` or a UDP datagram to `udp_port`,
/// from an IPv4 packet: the protocol and the source.
fn new_flow(ip: &[u8], tcp_port: u16, udp_port: u16) -> Option<(&'static str, SocketAddr)> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let l4 = ip.get(ihl..)?;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let sport = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
    let dport = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
    let peer = SocketAddr::V4(SocketAddrV4::new(src, sport));
    match ip[9] {
        6 if dport == tcp_port => {
            let flags = *l4.get(13)?;
            (flags & 0x02 != 0 && flags & 0x10 == 0).then_some(("tcp", peer))
        }
        17 if dport == udp_port => Some(("udp", peer)),
        _ => None,
    }
}
