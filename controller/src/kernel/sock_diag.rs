//! The kernel's socket table through `NETLINK_SOCK_DIAG` (what `ss` reads
//! and `ss -K` uses): list the connected TCP and UDP sockets of this
//! thread's network namespace, and destroy one (`SOCK_DESTROY`: a TCP
//! socket sends a reset and its owner sees ECONNABORTED; a UDP socket is
//! disconnected with ECONNABORTED pending, so its owner's next send fails
//! rather than going anywhere). Socket-level load balancing uses it for
//! sockets pointed at a backend that is gone.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;

/// `TCP_ESTABLISHED`, `TCP_SYN_SENT`, `TCP_CLOSE_WAIT` (a connected UDP
/// socket is `TCP_ESTABLISHED`).
const CONNECTED_STATES: u32 = (1 << 1) | (1 << 2) | (1 << 8);

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2` after its netlink header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Header {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

const HEADER_LEN: usize = std::mem::size_of::<Header>();
/// `struct inet_diag_msg`: family, state, timer, retrans, then the id.
const MSG_ID_OFFSET: usize = 4;

/// A connected socket of this namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    /// `libc::IPPROTO_TCP` or `libc::IPPROTO_UDP`.
    pub protocol: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The socket cookie (`SO_COOKIE`, what BPF programs key sockets by).
    pub cookie: u64,
    family: u8,
    id: SockId,
}

fn netlink() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, kind: u16, flags: u16, req: &Request) -> io::Result<()> {
    let len = HEADER_LEN + std::mem::size_of::<Request>();
    let header = Header {
        len: len as u32,
        kind,
        flags,
        seq: 1,
        pid: 0,
    };
    let mut buf = Vec::with_capacity(len);
    // SAFETY: both are plain `repr(C)` data without padding.
    unsafe {
        buf.extend_from_slice(std::slice::from_raw_parts(
            (&header as *const Header).cast::<u8>(),
            HEADER_LEN,
        ));
        buf.extend_from_slice(std::slice::from_raw_parts(
            (req as *const Request).cast::<u8>(),
            std::mem::size_of::<Request>(),
        ));
    }
    // SAFETY: a valid buffer of `len` bytes.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads netlink messages until `NLMSG_DONE` or an error/ack, handing each
/// payload of another type to `each`.
fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: a valid buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= HEADER_LEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < HEADER_LEN || len > rest.len() {
                return Err(io::Error::other("truncated netlink message"));
            }
            let payload = &rest[HEADER_LEN..len];
            match kind {
                // A dump that failed partway ends with its error here:
                // a partial list must not pass for the whole one.
                NLMSG_DONE => {
                    let errno = payload
                        .get(0..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                    return if errno < 0 {
                        Err(io::Error::from_raw_os_error(-errno))
                    } else {
                        Ok(())
                    };
                }
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(payload[0..4].try_into().unwrap());
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                _ => each(payload),
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

fn addr(family: u8, raw: &[u8; 16], port: [u8; 2]) -> SocketAddr {
    let ip = if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*raw))
    };
    // An IPv6 socket's IPv4 peer shows as its IPv4 address.
    SocketAddr::new(ip.to_canonical(), u16::from_be_bytes(port))
}

/// The connected TCP and UDP sockets of this thread's network namespace,
/// both families.
pub fn connected_sockets() -> io::Result<Vec<Socket>> {
    let fd = netlink()?;
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for protocol in [libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8] {
            let req = Request {
                family,
                protocol,
                states: CONNECTED_STATES,
                ..Default::default()
            };
            send(&fd, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
            receive(&fd, |payload| {
                let size = std::mem::size_of::<SockId>();
                if payload.len() < MSG_ID_OFFSET + size {
                    return;
                }
                // SAFETY: enough bytes for a plain `repr(C)` struct, read
                // unaligned.
                let id: SockId =
                    unsafe { std::ptr::read_unaligned(payload[MSG_ID_OFFSET..].as_ptr().cast()) };
                let family = payload[0];
                out.push(Socket {
                    protocol,
                    local: addr(family, &id.src, id.sport),
                    remote: addr(family, &id.dst, id.dport),
                    cookie: u64::from(id.cookie[0]) | (u64::from(id.cookie[1]) << 32),
                    family,
                    id,
                });
            })?;
        }
    }
    Ok(out)
}

/// Destroys a socket `connected_sockets` listed (needs CAP_NET_ADMIN and
/// a kernel with `CONFIG_INET_DIAG_DESTROY`). A socket closed meanwhile is
/// not an error.
pub fn destroy(s: &Socket) -> io::Result<()> {
    let fd = netlink()?;
    let req = Request {
        family: s.family,
        protocol: s.protocol,
        states: u32::MAX,
        id: s.id,
        ..Default::default()
    };
    send(&fd, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
    match receive(&fd, |_| {}) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected UDP socket of this process is listed with its cookie
    /// and, destroyed, is no longer connected: its next send fails
    /// (EDESTADDRREQ), its pending error is ECONNABORTED.
    #[test]
    fn lists_and_destroys_a_connected_udp_socket() {
        if !is_root() {
            panic!("needs root (CAP_NET_ADMIN): run the tests as root");
        }
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let mut cookie = 0u64;
        let mut len = 8u32;
        // SAFETY: getsockopt into a u64.
        let rc = unsafe {
            libc::getsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        let found = connected_sockets()
            .unwrap()
            .into_iter()
            .find(|s| s.cookie == cookie)
            .expect("the connected socket is listed");
        assert_eq!(found.protocol, libc::IPPROTO_UDP as u8);
        assert_eq!(found.local, client.local_addr().unwrap());
        assert_eq!(found.remote, server.local_addr().unwrap());
        client.send(b"before").unwrap();
        destroy(&found).unwrap();
        assert_eq!(
            client.take_error().unwrap().and_then(|e| e.raw_os_error()),
            Some(libc::ECONNABORTED)
        );
        assert!(client.peer_addr().is_err(), "disconnected");
        let err = client.send(b"after").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDESTADDRREQ), "{err}");
    }

    fn is_root() -> bool {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
