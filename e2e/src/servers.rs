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

/// A TCP server in a namespace that echoes every connection until EOF.
pub struct TcpEchoServer {
    addr: SocketAddr,
    fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl TcpEchoServer {
    /// Binds `addr` inside `ns`; returns once the socket is listening.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = match TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(listener.as_raw_fd()));
            // accept() fails once `stop` shuts the listener down.
            while let Ok((mut conn, _)) = listener.accept() {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        })?;
        let fd = ready_rx
            .recv()
            .expect("server thread reports")
            .map_err(io_err(format!("bind tcp {addr}")))?;
        Ok(TcpEchoServer {
            addr,
            fd,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket wakes the blocked accept().
        // SAFETY: the fd stays open until the thread, which owns it, exits.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server in a namespace that echoes every datagram to its sender.
pub struct UdpEchoServer {
    addr: SocketAddr,
    fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = ns.spawn(move || {
            let sock = match UdpSocket::bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(sock.as_raw_fd()));
            let mut buf = [0u8; 65536];
            // After shutdown(2) recv_from returns 0 bytes from no one.
            while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                if n == 0 && peer.port() == 0 {
                    break;
                }
                let _ = sock.send_to(&buf[..n], peer);
            }
        })?;
        let fd = ready_rx
            .recv()
            .expect("server thread reports")
            .map_err(io_err(format!("bind udp {addr}")))?;
        Ok(UdpEchoServer {
            addr,
            fd,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        // SAFETY: as for TcpEchoServer.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
