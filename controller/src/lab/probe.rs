//! What a client in the lab sees, with the tools a person would use:
//! `curl` for HTTP, `dig` for DNS, run inside a lab member. A reply names
//! the pod that answered and the client address it saw (see [`super::serve`]).

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Context as _;

use super::Lab;

/// How a request ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Answered,
    /// Connection refused / port unreachable: kube-proxy's REJECT.
    Refused,
    /// No answer at all: a DROP.
    TimedOut,
}

impl Outcome {
    pub fn describe(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::TimedOut => "timed out",
        }
    }
}

/// One request's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub outcome: Outcome,
    /// The pod that answered.
    pub pod: Option<String>,
    /// The source address the pod saw.
    pub client: Option<Ipv4Addr>,
}

/// The pod and client address in a reply line `pod=P node=N client=IP:PORT`.
pub fn parse_identity(text: &str) -> Option<(String, Ipv4Addr)> {
    let line = text.lines().find(|l| l.starts_with("pod="))?;
    let mut pod = None;
    let mut client = None;
    for field in line.split_whitespace() {
        if let Some(p) = field.strip_prefix("pod=") {
            pod = Some(p.to_string());
        } else if let Some(c) = field.strip_prefix("client=") {
            client = c.split(':').next()?.parse().ok();
        }
    }
    Some((pod?, client?))
}

/// `curl` from `from` to `url`, giving up on a connection after a second.
pub fn http(lab: &Lab, from: &str, url: &str) -> anyhow::Result<Reply> {
    let out = lab
        .command(from, "curl")?
        // -v: the connect error (refused or not) is only in the verbose log.
        .args(["-sSv", "--connect-timeout", "1", "--max-time", "3", url])
        .output()
        .context("running curl (apt install curl)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => answered(&String::from_utf8_lossy(&out.stdout)),
        Some(7) if stderr.contains("Connection refused") => Ok(Reply::without(Outcome::Refused)),
        Some(28) => Ok(Reply::without(Outcome::TimedOut)),
        _ => anyhow::bail!("curl {url} from {from}: {} {}", out.status, stderr.trim()),
    }
}

/// `dig TXT` from `from` to the DNS server `server`, one try of a second.
pub fn dns(lab: &Lab, from: &str, server: Ipv4Addr) -> anyhow::Result<Reply> {
    let out = lab
        .command(from, "dig")?
        .arg(format!("@{server}"))
        .args([
            "+short",
            "+time=1",
            "+tries=1",
            "TXT",
            "web.default.svc.cluster.local",
        ])
        .output()
        .context("running dig (apt install bind9-dnsutils)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("pod=") {
        return answered(&stdout.replace('"', ""));
    }
    if stdout.contains("refused") {
        Ok(Reply::without(Outcome::Refused))
    } else if stdout.contains("timed out") || stdout.contains("no servers could be reached") {
        Ok(Reply::without(Outcome::TimedOut))
    } else {
        anyhow::bail!("dig @{server} from {from}: {} {stdout}", out.status)
    }
}

fn answered(text: &str) -> anyhow::Result<Reply> {
    let (pod, client) =
        parse_identity(text).with_context(|| format!("an answer without identity: {text:?}"))?;
    Ok(Reply {
        outcome: Outcome::Answered,
        pod: Some(pod),
        client: Some(client),
    })
}

impl Reply {
    fn without(outcome: Outcome) -> Reply {
        Reply {
            outcome,
            pod: None,
            client: None,
        }
    }
}

/// Several replies to the same request, summed up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub outcomes: BTreeMap<Outcome, usize>,
    pub pods: BTreeMap<String, usize>,
    pub clients: BTreeMap<Ipv4Addr, usize>,
}

impl Observed {
    pub fn add(&mut self, r: &Reply) {
        *self.outcomes.entry(r.outcome).or_default() += 1;
        if let Some(p) = &r.pod {
            *self.pods.entry(p.clone()).or_default() += 1;
        }
        if let Some(c) = r.client {
            *self.clients.entry(c).or_default() += 1;
        }
    }

    /// `answered by pod-1-0 ×3, pod-2-0 ×3; the pod saw 10.244.1.11`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (o, n) in &self.outcomes {
            if *o != Outcome::Answered {
                parts.push(format!("{} ×{n}", o.describe()));
            }
        }
        if !self.pods.is_empty() {
            let pods: Vec<String> = self.pods.iter().map(|(p, n)| format!("{p} ×{n}")).collect();
            let clients: Vec<String> = self.clients.keys().map(|c| c.to_string()).collect();
            parts.push(format!(
                "answered by {}; the pod saw {}",
                pods.join(", "),
                clients.join(", ")
            ));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_lines_parse() {
        assert_eq!(
            parse_identity("pod=pod-1-0 node=node1 client=10.244.1.11:40000\n"),
            Some(("pod-1-0".into(), Ipv4Addr::new(10, 244, 1, 11)))
        );
        assert_eq!(parse_identity("HTTP/1.1 200 OK\n"), None);
        assert_eq!(parse_identity("pod=x node=y client=nonsense"), None);
    }

    #[test]
    fn observations_sum_up() {
        let mut o = Observed::default();
        for pod in ["pod-2-0", "pod-1-0", "pod-2-0"] {
            o.add(&Reply {
                outcome: Outcome::Answered,
                pod: Some(pod.into()),
                client: Some(Ipv4Addr::new(172, 18, 0, 2)),
            });
        }
        assert_eq!(
            o.describe(),
            "answered by pod-1-0 ×1, pod-2-0 ×2; the pod saw 172.18.0.2"
        );
        o.add(&Reply::without(Outcome::TimedOut));
        assert!(o.describe().starts_with("timed out ×1; answered by"));
    }
}
