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

/// A TCP server in a namespace that echoes every connection until EOF.
pub struct TcpEchoServer {
    addr: SocketAddr,
    _thread: ServerThread,
}

impl TcpEchoServer {
    /// Binds `addr` inside `ns`; returns once the socket is listening.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let bind = move || TcpListener::bind(addr);
        let serve = |listener: TcpListener| {
            // accept() fails once the listener is shut down.
            while let Ok((mut conn, _)) = listener.accept() {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
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
        let bind = move || UdpSocket::bind(addr);
        let serve = |sock: UdpSocket| {
            let mut buf = [0u8; 65536];
            // Once shut down, recv_from returns an empty read from no one.
            while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                if n == 0 && peer.port() == 0 {
                    break;
                }
                let _ = sock.send_to(&buf[..n], peer);
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
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(io_err("bind udp client"))?;
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
