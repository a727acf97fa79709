//! `dp lab serve`: the servers in every lab pod. Each reply names the pod
//! (and its node) and the client address the pod saw, so a client learns
//! which endpoint answered and whether its address was kept or
//! masqueraded:
//!
//! - HTTP on 8080: any request gets `pod=pod-1-0 node=node1 client=IP:PORT`.
//! - UDP echo on 9090: the same line, then the datagram it got.
//! - DNS on 53/udp: A queries get the pod's address, TXT queries the same
//!   line as HTTP; every name exists (a stand-in for CoreDNS).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::Context as _;

use super::{DNS_PORT, HTTP_PORT, UDP_ECHO_PORT};

/// Who answers.
#[derive(Clone, Debug)]
pub struct Identity {
    pub pod: String,
    pub node: String,
}

impl Identity {
    /// The line every reply starts with; an IPv4 client as IPv4, also
    /// when a dual-stack socket saw it as `::ffff:a.b.c.d`.
    pub fn line(&self, client: SocketAddr) -> String {
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        format!("pod={} node={} client={client}", self.pod, self.node)
    }
}

/// Binds all three servers, prints `ready` on stdout (and nothing after),
/// then serves until killed.
pub fn run(identity: Identity) -> anyhow::Result<()> {
    // `[::]` takes both families (IPv4 as mapped addresses, shown as IPv4
    // again); `0.0.0.0` where the namespace has no IPv6.
    let any = |port| -> [SocketAddr; 2] {
        [
            (Ipv6Addr::UNSPECIFIED, port).into(),
            (Ipv4Addr::UNSPECIFIED, port).into(),
        ]
    };
    let http = TcpListener::bind(&any(HTTP_PORT)[..]).context("binding HTTP")?;
    let echo = UdpSocket::bind(&any(UDP_ECHO_PORT)[..]).context("binding UDP echo")?;
    let dns = UdpSocket::bind(&any(DNS_PORT)[..]).context("binding DNS")?;
    let own_ip = local_ip().unwrap_or(Ipv4Addr::UNSPECIFIED);
    eprintln!(
        "{} serving http :{HTTP_PORT}, udp echo :{UDP_ECHO_PORT}, dns :{DNS_PORT} as {own_ip}",
        identity.pod
    );
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "ready")?;
        stdout.flush()?;
    }

    let id = identity.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, from)) = echo.recv_from(&mut buf) else {
                continue;
            };
            let mut reply = format!("{}\n", id.line(from)).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&reply, from);
        }
    });
    let id = identity.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = dns.recv_from(&mut buf) else {
                continue;
            };
            if let Some(reply) = dns_answer(&buf[..n], own_ip, &id.line(from)) {
                let _ = dns.send_to(&reply, from);
            }
        }
    });
    for conn in http.incoming() {
        let Ok(conn) = conn else { continue };
        let id = identity.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve_http(conn, &id) {
                eprintln!("http: {e}");
            }
        });
    }
    Ok(())
}

/// Reads a request head and answers it with the identity line.
fn serve_http(mut conn: TcpStream, id: &Identity) -> std::io::Result<()> {
    let peer = conn.peer_addr()?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = format!("{}\n", id.line(peer));
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes())
}

/// This namespace's address on eth0 (the pod's), from a connected UDP
/// socket's choice of source: no packet is sent.
fn local_ip() -> Option<Ipv4Addr> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((Ipv4Addr::new(10, 96, 0, 1), 9)).ok()?;
    match s.local_addr().ok()? {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(_) => None,
    }
}

const TYPE_A: u16 = 1;
const TYPE_TXT: u16 = 16;

/// The reply to a DNS query: one A record (`addr`) or one TXT record
/// (`text`) for the question's name, TTL 0; other types get no answer.
/// `None` for what is not a one-question query.
pub fn dns_answer(query: &[u8], addr: Ipv4Addr, text: &str) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    if qdcount != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut end = 12;
    loop {
        let len = *query.get(end)? as usize;
        end += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        end += len;
    }
    let qtype = u16::from_be_bytes([*query.get(end)?, *query.get(end + 1)?]);
    let question_end = end + 4;
    if query.len() < question_end {
        return None;
    }
    let rdata: Option<Vec<u8>> = match qtype {
        TYPE_A => Some(addr.octets().to_vec()),
        TYPE_TXT => {
            let t = &text.as_bytes()[..text.len().min(255)];
            let mut d = vec![t.len() as u8];
            d.extend_from_slice(t);
            Some(d)
        }
        _ => None,
    };
    let mut reply = Vec::with_capacity(question_end + 64);
    reply.extend_from_slice(&query[0..2]);
    // QR, the query's opcode and RD; authoritative; no error.
    reply.push(0x80 | (query[2] & 0x79) | 0x04);
    reply.push(0x00);
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&(rdata.is_some() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(&query[12..question_end]);
    if let Some(rdata) = rdata {
        // The name: a pointer to the question's (offset 12).
        reply.extend_from_slice(&[0xc0, 12]);
        reply.extend_from_slice(&qtype.to_be_bytes());
        reply.extend_from_slice(&1u16.to_be_bytes());
        reply.extend_from_slice(&0u32.to_be_bytes());
        reply.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        reply.extend_from_slice(&rdata);
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `web.default` of `qtype`, id 0x1234, recursion desired.
    fn query(qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["web", "default"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn an_a_query_gets_the_pods_address() {
        let q = query(TYPE_A);
        let r = dns_answer(&q, Ipv4Addr::new(10, 244, 1, 10), "x").unwrap();
        assert_eq!(&r[0..2], &[0x12, 0x34], "same id");
        assert_eq!(r[2], 0x85, "response, authoritative, recursion desired");
        assert_eq!(r[3], 0, "no error");
        assert_eq!(&r[4..8], &[0, 1, 0, 1], "one question, one answer");
        assert_eq!(&r[12..q.len()], &q[12..], "the question echoed");
        let answer = &r[q.len()..];
        assert_eq!(&answer[0..2], &[0xc0, 12]);
        assert_eq!(&answer[2..4], &TYPE_A.to_be_bytes());
        assert_eq!(&answer[10..12], &[0, 4]);
        assert_eq!(&answer[12..], &[10, 244, 1, 10]);
    }

    #[test]
    fn a_txt_query_gets_the_identity_line() {
        let q = query(TYPE_TXT);
        let line = "pod=pod-1-0 node=node1 client=10.244.1.11:5353";
        let r = dns_answer(&q, Ipv4Addr::LOCALHOST, line).unwrap();
        let answer = &r[q.len()..];
        assert_eq!(&answer[2..4], &TYPE_TXT.to_be_bytes());
        assert_eq!(answer[12] as usize, line.len());
        assert_eq!(&answer[13..], line.as_bytes());
    }

    #[test]
    fn other_types_get_no_answer_and_garbage_no_reply() {
        let q = query(28);
        let r = dns_answer(&q, Ipv4Addr::LOCALHOST, "x").unwrap();
        assert_eq!(&r[6..8], &[0, 0]);
        assert_eq!(r.len(), q.len());
        assert!(dns_answer(&q[..q.len() - 2], Ipv4Addr::LOCALHOST, "x").is_none());
        assert!(dns_answer(&[0; 5], Ipv4Addr::LOCALHOST, "x").is_none());
        let mut reply = q.clone();
        reply[2] |= 0x80;
        assert!(dns_answer(&reply, Ipv4Addr::LOCALHOST, "x").is_none());
    }
}
