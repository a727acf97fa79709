//! Load generator: request/response and echo servers in pod namespaces, and
//! blocking clients that measure latency and rates from a client namespace.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, RwLock,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of one TCP request.
pub const REQUEST_BYTES: usize = 64;
/// Bytes the server answers to each full request.
pub const RESPONSE_BYTES: usize = 64;
/// Bytes of one UDP datagram.
pub const DATAGRAM_BYTES: usize = 64;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a UDP window waits for echoes before counting them lost.
const UDP_LOSS_TIMEOUT: Duration = Duration::from_millis(50);
/// Round trips on a fresh connection before `established_rr` samples.
const WARMUP_ROUND_TRIPS: usize = 100;
/// Thousands of connections per second may queue behind one busy server.
const LISTEN_BACKLOG: libc::c_int = 4096;

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// TCP request/response and UDP echo servers for every pod, served by one
/// single-threaded tokio runtime on a dedicated thread. Dropping it stops them.
pub struct Servers {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Servers {
    /// Binds (pod ip, `tcp_port`) and (pod ip, `udp_port`) inside each pod's
    /// namespace and starts serving them. With `cpu`, the serving thread is
    /// pinned to that CPU.
    pub fn start(
        pods: &[(&e2e::Netns, std::net::IpAddr)],
        tcp_port: u16,
        udp_port: u16,
        cpu: Option<usize>,
    ) -> anyhow::Result<Servers> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("build the server runtime")?;
        let handle = runtime.handle().clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (pinned_tx, pinned_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("dp-bench-servers".into())
            .spawn(move || {
                let pinned = cpu.map_or(Ok(()), pin_current_thread);
                let ok = pinned.is_ok();
                let _ = pinned_tx.send(pinned);
                if ok {
                    // Ends when the sender is dropped too.
                    let _ = runtime.block_on(stop_rx);
                }
                // Dropping the runtime drops every task and closes its sockets.
            })
            .context("spawn the server thread")?;
        // Created early: an error below drops it, which stops the thread.
        let servers = Servers {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        pinned_rx
            .recv()
            .context("server thread exited early")?
            .with_context(|| format!("pin the server thread to CPU {cpu:?}"))?;

        for (ns, ip) in pods {
            let tcp_addr = SocketAddr::new(*ip, tcp_port);
            let udp_addr = SocketAddr::new(*ip, udp_port);
            let (tcp, udp) = ns
                .run(move || -> io::Result<_> {
                    let tcp = std::net::TcpListener::bind(tcp_addr)?;
                    // std listens with a backlog of 128; listen(2) again on a
                    // listening socket only raises the backlog.
                    // SAFETY: a valid listening socket fd owned by `tcp`.
                    if unsafe { libc::listen(tcp.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    tcp.set_nonblocking(true)?;
                    let udp = std::net::UdpSocket::bind(udp_addr)?;
                    udp.set_nonblocking(true)?;
                    Ok((tcp, udp))
                })
                .with_context(|| format!("enter namespace {}", ns.name()))?
                .with_context(|| {
                    format!("bind {tcp_addr}/tcp and {udp_addr}/udp in {}", ns.name())
                })?;
            // Registering with the reactor needs the runtime's context; the
            // sockets keep the namespace they were created in.
            let _guard = handle.enter();
            let tcp = tokio::net::TcpListener::from_std(tcp).context("register TCP listener")?;
            let udp = tokio::net::UdpSocket::from_std(udp).context("register UDP socket")?;
            handle.spawn(serve_tcp(tcp));
            handle.spawn(serve_udp(udp));
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream));
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning on the error.
                eprintln!("dp-bench: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_connection(mut stream: tokio::net::TcpStream) {
    let mut request = [0u8; REQUEST_BYTES];
    let response = [0u8; RESPONSE_BYTES];
    loop {
        let result = match stream.read_exact(&mut request).await {
            Ok(_) => stream.write_all(&response).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            if !is_normal_close(&e) {
                eprintln!("dp-bench: tcp server: {e}");
            }
            return;
        }
    }
}

/// Clients end connections with EOF or, usually, RST.
fn is_normal_close(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

async fn serve_udp(socket: tokio::net::UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf).await {
            // A lost echo is the client's loss to count; nothing to do here.
            Ok((n, peer)) => {
                let _ = socket.send_to(&buf[..n], peer).await;
            }
            Err(e) => {
                eprintln!("dp-bench: udp server: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// Latency samples of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Latencies {
    /// Microseconds, in the order measured.
    pub samples_us: Vec<f64>,
    /// Attempts that failed and were not sampled.
    pub errors: u64,
}

impl Latencies {
    /// Nearest-rank percentile, `p` in 0..=100 (clamped); None without
    /// samples.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.samples_us.is_empty() || p.is_nan() {
            return None;
        }
        let mut sorted = self.samples_us.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let rank = (p.clamp(0.0, 100.0) / 100.0 * n as f64).ceil() as usize;
        Some(sorted[rank.clamp(1, n) - 1])
    }
}

/// Completed operations per second of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rate {
    pub per_second: f64,
    pub total: u64,
    pub errors: u64,
    pub seconds: f64,
}

impl Rate {
    fn new(total: u64, errors: u64, elapsed: Duration) -> Rate {
        let seconds = elapsed.as_secs_f64();
        let per_second = if seconds > 0.0 {
            total as f64 / seconds
        } else {
            0.0
        };
        Rate {
            per_second,
            total,
            errors,
            seconds,
        }
    }
}

/// The median of several runs and their spread.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

/// Median (mean of the middle two for an even count), min and max; NaNs and
/// `runs: 0` for no values.
pub fn summary(values: &[f64]) -> Summary {
    if values.is_empty() {
        return Summary {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            runs: 0,
        };
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Summary {
        median,
        min: sorted[0],
        max: sorted[n - 1],
        runs: n,
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond cpu_set_t"),
        ));
    }
    // SAFETY: `cpu` was checked to fit in the set.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the
    // size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pin(cpu: Option<usize>) -> anyhow::Result<()> {
    match cpu {
        Some(c) => pin_current_thread(c).with_context(|| format!("pin to CPU {c}")),
        None => Ok(()),
    }
}

/// A new connection with timeouts that closes with RST, so the client keeps
/// no TIME_WAIT sockets and never runs out of ephemeral ports.
fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    e2e::rst_on_close(&stream)?;
    Ok(stream)
}

fn round_trip(stream: &mut TcpStream) -> io::Result<()> {
    let request = [0u8; REQUEST_BYTES];
    let mut response = [0u8; RESPONSE_BYTES];
    stream.write_all(&request)?;
    stream.read_exact(&mut response)
}

/// Connect + one request/response; the stream is returned so that closing
/// it (RST) happens outside the caller's timing.
fn connect_round_trip(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut stream = connect(addr)?;
    round_trip(&mut stream)?;
    Ok(stream)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `count` sequential new connections from `ns`, connection i to
/// `targets[i % targets.len()]`; each sample is connect + one request/response.
pub fn first_packet(
    ns: &e2e::Netns,
    targets: &[SocketAddr],
    count: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Latencies> {
    if targets.is_empty() {
        bail!("first_packet: no targets");
    }
    ns.run(|| -> anyhow::Result<Latencies> {
        pin(cpu)?;
        let mut latencies = Latencies {
            samples_us: Vec::with_capacity(count),
            errors: 0,
        };
        for i in 0..count {
            let start = Instant::now();
            match connect_round_trip(targets[i % targets.len()]) {
                Ok(stream) => {
                    latencies.samples_us.push(micros(start.elapsed()));
                    drop(stream);
                }
                Err(_) => latencies.errors += 1,
            }
        }
        Ok(latencies)
    })
    .with_context(|| format!("enter namespace {}", ns.name()))?
}

/// `threads` threads in `ns`, each opening connections (connect + one
/// request/response + RST) back to back for `duration`, to targets taken
/// round-robin from a per-thread offset. Thread i is pinned to
/// `cpus[i % cpus.len()]` when given.
pub fn connection_rate(
    ns: &e2e::Netns,
    targets: &[SocketAddr],
    threads: usize,
    duration: Duration,
    cpus: Option<Vec<usize>>,
) -> anyhow::Result<Rate> {
    if targets.is_empty() {
        bail!("connection_rate: no targets");
    }
    if threads == 0 {
        bail!("connection_rate: no threads");
    }
    let targets: Arc<Vec<SocketAddr>> = Arc::new(targets.to_vec());
    let cpus = cpus.filter(|c| !c.is_empty());
    // Threads wait on the gate until all exist; `true` inside means abort.
    let gate = Arc::new(RwLock::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut held = gate.write().unwrap_or_else(|e| e.into_inner());

    let mut handles = Vec::with_capacity(threads);
    let mut spawn_error = None;
    for t in 0..threads {
        let (targets, gate, stop) = (targets.clone(), gate.clone(), stop.clone());
        let cpu = cpus.as_ref().map(|c| c[t % c.len()]);
        let offset = t * targets.len() / threads;
        let spawned = ns.spawn(move || -> anyhow::Result<(u64, u64)> {
            let pinned = pin(cpu);
            let abort = *gate.read().unwrap_or_else(|e| e.into_inner());
            pinned?;
            if abort {
                return Ok((0, 0));
            }
            let (mut done, mut errors) = (0u64, 0u64);
            let mut i = offset;
            while !stop.load(Ordering::Relaxed) {
                match connect_round_trip(targets[i % targets.len()]) {
                    Ok(_) => done += 1,
                    Err(_) => errors += 1,
                }
                i = i.wrapping_add(1);
            }
            Ok((done, errors))
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                spawn_error = Some(e);
                break;
            }
        }
    }
    if spawn_error.is_some() {
        *held = true;
    }
    let start = Instant::now();
    drop(held);
    if spawn_error.is_none() {
        thread::sleep(duration);
    }
    stop.store(true, Ordering::Relaxed);

    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(
            h.join()
                .map_err(|_| anyhow!("connection_rate thread panicked"))?,
        );
    }
    // Includes the connections still in flight at the stop signal.
    let elapsed = start.elapsed();
    if let Some(e) = spawn_error {
        return Err(e).context("spawn connection_rate threads");
    }
    let (mut total, mut errors) = (0, 0);
    for r in results {
        let (d, e) = r?;
        total += d;
        errors += e;
    }
    Ok(Rate::new(total, errors, elapsed))
}

/// `count` request/response round trips on one established connection, after
/// a warm-up. A failed round trip counts as an error and reconnects; a
/// failed reconnect ends the run with an error.
pub fn established_rr(
    ns: &e2e::Netns,
    target: SocketAddr,
    count: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Latencies> {
    ns.run(|| -> anyhow::Result<Latencies> {
        pin(cpu)?;
        let mut stream = connect(target).with_context(|| format!("connect {target}"))?;
        for _ in 0..WARMUP_ROUND_TRIPS {
            round_trip(&mut stream).with_context(|| format!("warm-up with {target}"))?;
        }
        let mut latencies = Latencies {
            samples_us: Vec::with_capacity(count),
            errors: 0,
        };
        for _ in 0..count {
            let start = Instant::now();
            match round_trip(&mut stream) {
                Ok(()) => latencies.samples_us.push(micros(start.elapsed())),
                Err(_) => {
                    latencies.errors += 1;
                    stream = connect(target).with_context(|| format!("reconnect {target}"))?;
                }
            }
        }
        Ok(latencies)
    })
    .with_context(|| format!("enter namespace {}", ns.name()))?
}

/// Echoed UDP datagrams per second through one connected socket, keeping up
/// to `window` datagrams in flight. When no echo arrives for 50 ms the
/// outstanding ones count as lost (errors).
pub fn udp_rate(
    ns: &e2e::Netns,
    target: SocketAddr,
    duration: Duration,
    window: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Rate> {
    let window = window.max(1);
    ns.run(|| -> anyhow::Result<Rate> {
        pin(cpu)?;
        let local: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).context("bind UDP client")?;
        socket
            .connect(target)
            .with_context(|| format!("connect UDP to {target}"))?;
        socket.set_read_timeout(Some(UDP_LOSS_TIMEOUT))?;
        socket.set_write_timeout(Some(IO_TIMEOUT))?;

        let datagram = [0u8; DATAGRAM_BYTES];
        let mut buf = [0u8; 2048];
        let (mut received, mut errors, mut outstanding) = (0u64, 0u64, 0usize);
        let start = Instant::now();
        let deadline = start + duration;
        while Instant::now() < deadline {
            while outstanding < window {
                match socket.send(&datagram) {
                    Ok(_) => outstanding += 1,
                    // E.g. ECONNREFUSED from an earlier ICMP error; the
                    // receive below waits instead of spinning here.
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            match socket.recv(&mut buf) {
                Ok(_) => {
                    received += 1;
                    outstanding = outstanding.saturating_sub(1);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    errors += outstanding as u64;
                    outstanding = 0;
                }
                Err(_) => {
                    errors += 1;
                    outstanding = outstanding.saturating_sub(1);
                }
            }
        }
        Ok(Rate::new(received, errors, start.elapsed()))
    })
    .with_context(|| format!("enter namespace {}", ns.name()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(samples: &[f64]) -> Latencies {
        Latencies {
            samples_us: samples.to_vec(),
            errors: 0,
        }
    }

    #[test]
    fn percentile_nearest_rank() {
        let l = lat(&[5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0]);
        assert_eq!(l.percentile(0.0), Some(1.0));
        assert_eq!(l.percentile(10.0), Some(1.0));
        assert_eq!(l.percentile(11.0), Some(2.0));
        assert_eq!(l.percentile(50.0), Some(5.0));
        assert_eq!(l.percentile(90.0), Some(9.0));
        assert_eq!(l.percentile(99.0), Some(10.0));
        assert_eq!(l.percentile(100.0), Some(10.0));
        // The samples stay in measurement order.
        assert_eq!(l.samples_us[0], 5.0);
    }

    #[test]
    fn percentile_edge_cases() {
        assert_eq!(lat(&[]).percentile(50.0), None);
        assert_eq!(lat(&[3.0]).percentile(0.0), Some(3.0));
        assert_eq!(lat(&[3.0]).percentile(99.9), Some(3.0));
        assert_eq!(lat(&[1.0, 2.0]).percentile(150.0), Some(2.0));
        assert_eq!(lat(&[1.0, 2.0]).percentile(-5.0), Some(1.0));
        assert_eq!(lat(&[1.0]).percentile(f64::NAN), None);
    }

    #[test]
    fn summary_odd_and_even() {
        let s = summary(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        let s = summary(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (2.5, 1.0, 4.0, 4));
        let s = summary(&[7.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (7.0, 7.0, 7.0, 1));
    }

    #[test]
    fn summary_empty() {
        let s = summary(&[]);
        assert!(s.median.is_nan() && s.min.is_nan() && s.max.is_nan());
        assert_eq!(s.runs, 0);
    }
}
