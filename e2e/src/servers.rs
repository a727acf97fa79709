//! Small real servers and clients that run inside namespaces.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::mpsc,
    thread::JoinHandle,
    time::Duration,
};

use crate::{io_err, Netns, Result};

/// A server thread inside a namespace, stopped and joined on drop.
struct ServerThread {
    /// The listening/bound socket, owned by the thread; shut down to stop it.
    fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Binds with `bind` inside `ns`, then runs `serve` there. Returns once
    /// the socket is bound, so clients can connect right away.
    fn start<S, B, F>(ns: &Netns, what: String, bind: B, serve: F) -> Result<Self>
    where
        S: AsRawFd,
        B: FnOnce() -> std::io::Result<S> + Send + 'static,
        F: FnOnce(S) + Send + 'static,
    {
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = ns.spawn(move || match bind() {
            Ok(socket) => {
                let _ = ready_tx.send(Ok(socket.as_raw_fd()));
                serve(socket);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })?;
        let fd = ready_rx
            .recv()
            .expect("server thread reports")
            .map_err(io_err(what))?;
        Ok(ServerThread {
            fd,
            thread: Some(thread),
        })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        // shutdown(2) wakes the thread blocked in accept() or recv_from().
        // SAFETY: the fd stays open until the thread, which owns it, exits.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a named server puts before each echo: `"<name> <peer ip:port>\n"`,
/// so a client learns which backend answered and whom that backend saw.
pub fn identity_line(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}\n")
}

/// Splits a named server's reply into (name, peer as seen, echoed bytes).
pub fn parse_identity(reply: &[u8]) -> Option<(String, SocketAddr, Vec<u8>)> {
    let nl = reply.iter().position(|b| *b == b'\n')?;
    let line = std::str::from_utf8(&reply[..nl]).ok()?;
    let (name, peer) = line.split_once(' ')?;
    Some((
        name.to_string(),
        peer.parse().ok()?,
        reply[nl + 1..].to_vec(),
    ))
}

/// A TCP server in a namespace that echoes every connection until EOF,
/// each connection on its own thread (so long-lived ones do not block).
pub struct TcpEchoServer {
    addr: SocketAddr,
    _thread: ServerThread,
}

impl TcpEchoServer {
    /// Binds `addr` inside `ns`; returns once the socket is listening.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::start_named(ns, addr, None)
    }

    /// Like `start`; with a name, every reply starts with `identity_line`.
    pub fn start_named(ns: &Netns, addr: SocketAddr, name: Option<String>) -> Result<Self> {
        let bind = move || TcpListener::bind(addr);
        let serve = move |listener: TcpListener| {
            // accept() fails once the listener is shut down.
            while let Ok((mut conn, peer)) = listener.accept() {
                let name = name.clone();
                std::thread::spawn(move || {
                    if let Some(name) = name {
                        if conn
                            .write_all(identity_line(&name, peer).as_bytes())
                            .is_err()
                        {
                            return;
                        }
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        };
        let thread = ServerThread::start(ns, format!("bind tcp {addr}"), bind, serve)?;
        Ok(TcpEchoServer {
            addr,
            _thread: thread,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A UDP server in a namespace that echoes every datagram to its sender.
pub struct UdpEchoServer {
    addr: SocketAddr,
    _thread: ServerThread,
}

impl UdpEchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::start_named(ns, addr, None)
    }

    /// Like `start`; with a name, every reply starts with `identity_line`.
    pub fn start_named(ns: &Netns, addr: SocketAddr, name: Option<String>) -> Result<Self> {
        let bind = move || UdpSocket::bind(addr);
        let serve = move |sock: UdpSocket| {
            let mut buf = [0u8; 65536];
            // Once shut down, recv_from returns an empty read from no one.
            while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                if n == 0 && peer.port() == 0 {
                    break;
                }
                let mut reply = name
                    .as_deref()
                    .map(|name| identity_line(name, peer).into_bytes())
                    .unwrap_or_default();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer);
            }
        };
        let thread = ServerThread::start(ns, format!("bind udp {addr}"), bind, serve)?;
        Ok(UdpEchoServer {
            addr,
            _thread: thread,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Connects from the namespace `ns`, sends `payload`, reads it back and
/// closes. Returns what came back and the local address used.
pub fn tcp_echo_once(
    ns: &Netns,
    server: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, SocketAddr)> {
    ns.run(|| {
        let mut conn = TcpStream::connect_timeout(&server, timeout)
            .map_err(io_err(format!("connect {server}")))?;
        conn.set_read_timeout(Some(timeout))
            .map_err(io_err("set timeout"))?;
        let local = conn.local_addr().map_err(io_err("local addr"))?;
        conn.write_all(payload).map_err(io_err("send"))?;
        conn.shutdown(Shutdown::Write).map_err(io_err("shutdown"))?;
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply)
            .map_err(io_err(format!("read from {server}")))?;
        Ok((reply, local))
    })?
}

/// Sends one datagram from `ns` and waits for one reply.
pub fn udp_echo_once(
    ns: &Netns,
    server: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, SocketAddr)> {
    ns.run(|| {
        let any = if server.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let sock = UdpSocket::bind(any).map_err(io_err("bind udp client"))?;
        sock.connect(server).map_err(io_err("connect udp"))?;
        sock.set_read_timeout(Some(timeout))
            .map_err(io_err("set timeout"))?;
        let local = sock.local_addr().map_err(io_err("local addr"))?;
        sock.send(payload).map_err(io_err("send"))?;
        let mut buf = [0u8; 65536];
        let n = sock
            .recv(&mut buf)
            .map_err(io_err(format!("recv from {server}")))?;
        Ok((buf[..n].to_vec(), local))
    })?
}

/// Makes closing `stream` send a RST (SO_LINGER 0), as short-connection
/// clients and the benchmark's load do: no FIN handshake, no TIME_WAIT.
pub fn rst_on_close(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd, and a pointer/length pair describing `linger`.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
