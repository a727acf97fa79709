//! `dp lab demo`: the README's main command. Brings a lab up with dp,
//! sends traffic to every example Service with `curl` and `dig` from pods
//! and from the outside client, shows what `dp trace` said about it, does
//! the same with kube-proxy's iptables rules and the rules that matched
//! (`iptables-save -c` counters), compares what the clients saw, and takes
//! the lab down. It fails if a client saw something other than kube-proxy's
//! semantics promise, in either mode.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};

use super::{
    probe::{self, Observed, Outcome},
    Lab, Mode, State, UpOptions,
};

/// The demo's own lab: a leftover one (from a killed demo) is replaced.
pub const LAB_NAME: &str = "demo";

/// Where a flow's requests go.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Http(&'static str),
    Dns(Ipv4Addr),
}

/// What kube-proxy's semantics promise the client.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub outcome: Outcome,
    /// The endpoints allowed to answer.
    pub pods: &'static [&'static str],
    /// Every request answered by the same one (session affinity).
    pub one_pod: bool,
    /// The member whose address the pod sees.
    pub client: Option<&'static str>,
}

/// Requests of one kind from one lab member.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub title: &'static str,
    /// `namespace/name`, for `dp trace --service`.
    pub service: &'static str,
    pub from: &'static str,
    /// The node whose dataplane decides (where the packets enter).
    pub node: &'static str,
    pub target: Target,
    pub requests: usize,
    pub expect: Expect,
}

const fn answered(pods: &'static [&'static str], client: &'static str) -> Expect {
    Expect {
        outcome: Outcome::Answered,
        pods,
        one_pod: false,
        client: Some(client),
    }
}

const fn unanswered(outcome: Outcome) -> Expect {
    Expect {
        outcome,
        pods: &[],
        one_pod: false,
        client: None,
    }
}

/// The tour, over the example manifests.
pub const FLOWS: &[Flow] = &[
    Flow {
        title: "ClusterIP from a pod: spread over both nodes, pod address kept",
        service: "default/web",
        from: "pod-1-1",
        node: "node1",
        target: Target::Http("http://10.96.0.80/"),
        requests: 8,
        expect: answered(&["pod-1-0", "pod-2-0"], "pod-1-1"),
    },
    Flow {
        title: "ClusterIP from outside the cluster CIDR: masqueraded to the node",
        service: "default/web",
        from: "client",
        node: "node1",
        target: Target::Http("http://10.96.0.80/"),
        requests: 4,
        expect: answered(&["pod-1-0", "pod-2-0"], "node1"),
    },
    Flow {
        title: "UDP: DNS to a ClusterIP (kube-dns's address)",
        service: "default/dns",
        from: "pod-2-1",
        node: "node2",
        target: Target::Dns(Ipv4Addr::new(10, 96, 0, 10)),
        requests: 4,
        expect: answered(&["pod-1-0", "pod-2-0"], "pod-2-1"),
    },
    Flow {
        title: "NodePort, externalTrafficPolicy Cluster: any endpoint, SNAT to the node",
        service: "default/web-nodeport",
        from: "client",
        node: "node2",
        target: Target::Http("http://172.18.0.3:30080/"),
        requests: 8,
        expect: answered(&["pod-1-1", "pod-2-1"], "node2"),
    },
    Flow {
        title: "NodePort, externalTrafficPolicy Local, on the node with the endpoint: client address kept",
        service: "default/web-local",
        from: "client",
        node: "node2",
        target: Target::Http("http://172.18.0.3:30081/"),
        requests: 3,
        expect: answered(&["pod-2-1"], "client"),
    },
    Flow {
        title: "NodePort, externalTrafficPolicy Local, on a node without endpoints: dropped",
        service: "default/web-local",
        from: "client",
        node: "node1",
        target: Target::Http("http://172.18.0.2:30081/"),
        requests: 1,
        expect: unanswered(Outcome::TimedOut),
    },
    Flow {
        title: "A Service without endpoints: rejected at once",
        service: "default/empty",
        from: "pod-1-0",
        node: "node1",
        target: Target::Http("http://10.96.0.83/"),
        requests: 2,
        expect: unanswered(Outcome::Refused),
    },
    Flow {
        title: "Session affinity ClientIP: one endpoint of four for every connection",
        service: "default/sticky",
        from: "client",
        node: "node1",
        target: Target::Http("http://10.96.0.84/"),
        requests: 6,
        expect: Expect {
            outcome: Outcome::Answered,
            pods: &["pod-1-0", "pod-1-1", "pod-2-0", "pod-2-1"],
            one_pod: true,
            client: Some("node1"),
        },
    },
    Flow {
        title: "A terminating endpoint gets no new connections while another is ready",
        service: "default/draining",
        from: "pod-1-0",
        node: "node1",
        target: Target::Http("http://10.96.0.85/"),
        requests: 6,
        expect: answered(&["pod-1-1"], "pod-1-0"),
    },
    Flow {
        title: "A pod reaching itself through its Service (hairpin): masqueraded to the node",
        service: "default/draining",
        from: "pod-1-1",
        node: "node1",
        target: Target::Http("http://10.96.0.85/"),
        requests: 2,
        expect: answered(&["pod-1-1"], "node1"),
    },
];

impl Flow {
    pub fn target_text(&self) -> String {
        match self.target {
            Target::Http(url) => format!("curl {url}"),
            Target::Dns(ip) => format!("dig @{ip} TXT"),
        }
    }

    /// Sends the requests from the flow's member, one after another.
    pub fn observe(&self, lab: &Lab) -> anyhow::Result<Observed> {
        let mut seen = Observed::default();
        for _ in 0..self.requests {
            let reply = match self.target {
                Target::Http(url) => probe::http(lab, self.from, url)?,
                Target::Dns(ip) => probe::dns(lab, self.from, ip)?,
            };
            seen.add(&reply);
        }
        Ok(seen)
    }

    /// What is wrong with `seen` by the flow's promise; empty if nothing.
    pub fn check(&self, seen: &Observed, state: &State) -> Vec<String> {
        let mut wrong = Vec::new();
        let e = &self.expect;
        if seen.outcomes.keys().any(|o| *o != e.outcome) {
            wrong.push(format!("expected every request {}", e.outcome.describe()));
        }
        let stray: Vec<&String> = seen
            .pods
            .keys()
            .filter(|p| !e.pods.contains(&p.as_str()))
            .collect();
        if !stray.is_empty() {
            wrong.push(format!("answered by {stray:?}, not one of {:?}", e.pods));
        }
        if e.one_pod && seen.pods.len() > 1 {
            wrong.push("expected one endpoint for every connection".into());
        }
        if let Some(member) = e.client {
            if seen
                .clients
                .keys()
                .any(|c| client_member(state, *c) != member)
            {
                wrong.push(format!("expected the pod to see {member}'s address"));
            }
        }
        wrong
    }
}

/// Removes the demo's lab when dropped, also on error.
struct Teardown<'a>(&'a Lab);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

pub fn run(out: &mut impl Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let lab = Lab::new(LAB_NAME)?;
    writeln!(
        out,
        "dp lab demo: Kubernetes Services in a lab of network namespaces on this machine,\n\
         served by dp, then by kube-proxy's iptables rules, from the same manifests (examples/)."
    )?;
    if lab.exists() {
        let r = lab.down()?;
        writeln!(
            out,
            "(removed a leftover demo lab: {} namespaces, {} processes)",
            r.namespaces, r.processes
        )?;
    }
    let mut results = Vec::new();
    for (step, mode) in [(1, Mode::Dp), (3, Mode::Iptables)] {
        writeln!(
            out,
            "\n[{step}/5] dp lab up --name {LAB_NAME} --mode {}",
            mode.name()
        )?;
        let _teardown = Teardown(&lab);
        let state = lab.up(
            &UpOptions {
                nodes: 2,
                mode,
                ip_family: super::IpFamilies::Ipv4,
                socket_lb: crate::agent::SocketLb::Off,
                manifests: None,
            },
            out,
        )?;
        writeln!(
            out,
            "\n[{}/5] traffic to each example Service, {}",
            step + 1,
            if mode == Mode::Dp {
                "with the `dp trace` lines of the node that decided"
            } else {
                "with the iptables rules it matched (`iptables-save -c` counters that moved)"
            }
        )?;
        let mut observed = Vec::new();
        for flow in FLOWS {
            observed.push(show_flow(&lab, flow, mode, out)?);
        }
        let removed = lab.down()?;
        writeln!(
            out,
            "  dp lab down: {} processes stopped, {} namespaces removed",
            removed.processes, removed.namespaces
        )?;
        results.push((mode, state, observed));
    }

    writeln!(
        out,
        "\n[5/5] what the clients saw: dp against kube-proxy's iptables mode"
    )?;
    let (_, dp_state, dp_seen) = &results[0];
    let (_, ipt_state, ipt_seen) = &results[1];
    let mut failures = Vec::new();
    for (i, flow) in FLOWS.iter().enumerate() {
        let dp_wrong = flow.check(&dp_seen[i], dp_state);
        let ipt_wrong = flow.check(&ipt_seen[i], ipt_state);
        let same = same_result(flow, (&dp_seen[i], dp_state), (&ipt_seen[i], ipt_state));
        let ok = dp_wrong.is_empty() && ipt_wrong.is_empty() && same;
        writeln!(
            out,
            "  {} {} ({}, {} → {})",
            if ok { "✓" } else { "✗" },
            flow.title,
            flow.service,
            flow.from,
            flow.target_text()
        )?;
        writeln!(out, "      dp:       {}", dp_seen[i].describe())?;
        writeln!(out, "      iptables: {}", ipt_seen[i].describe())?;
        for w in dp_wrong
            .iter()
            .map(|w| format!("dp: {w}"))
            .chain(ipt_wrong.iter().map(|w| format!("iptables: {w}")))
        {
            writeln!(out, "      ! {w}")?;
            failures.push(format!("{}: {w}", flow.title));
        }
        if !same {
            failures.push(format!("{}: the two modes differ", flow.title));
        }
    }
    ensure!(!lab.exists(), "the demo lab is still there");
    writeln!(
        out,
        "\n{} of {} flows: the same outcome, endpoints and client with dp and with \
         kube-proxy's iptables rules (any address of a node is that node: kube-proxy's \
         MASQUERADE takes the address of the device a packet leaves by, the pod gateway for a \
         pod on the same node; dp takes the node's). The lab is gone. ({:.0} s)",
        FLOWS.len() - failures.len().min(FLOWS.len()),
        FLOWS.len(),
        started.elapsed().as_secs_f64()
    )?;
    writeln!(
        out,
        "Next: `dp lab up`, then the exercises in docs/lab.md (`dp lab exec client -- curl http://10.96.0.80/`)."
    )?;
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The same client-visible result: outcomes, and client addresses; the
/// endpoints' spread is random, so only that they were allowed (checked
/// by the flow) and, with affinity, that there was one.
/// The lab member a pod saw as its client: any of a node's addresses is
/// the node (kube-proxy's MASQUERADE picks the address of the device the
/// packet leaves by, dp the node's address; both are the node's).
fn client_member(state: &State, ip: Ipv4Addr) -> String {
    state
        .member_at(ip)
        .map_or_else(|| ip.to_string(), |m| m.name.clone())
}

fn same_result(flow: &Flow, a: (&Observed, &State), b: (&Observed, &State)) -> bool {
    let clients = |(seen, state): (&Observed, &State)| -> BTreeSet<String> {
        seen.clients
            .keys()
            .map(|c| client_member(state, *c))
            .collect()
    };
    a.0.outcomes.keys().eq(b.0.outcomes.keys())
        && clients(a) == clients(b)
        && (!flow.expect.one_pod || (a.0.pods.len() == 1 && b.0.pods.len() == 1))
}

/// Runs one flow and prints what explains it.
fn show_flow(lab: &Lab, flow: &Flow, mode: Mode, out: &mut impl Write) -> anyhow::Result<Observed> {
    writeln!(out, "  ▸ {}", flow.title)?;
    writeln!(
        out,
        "    dp lab exec {} -- {}   ({} ×{})",
        flow.from,
        flow.target_text(),
        flow.service,
        flow.requests
    )?;
    let seen = match mode {
        Mode::Dp => {
            let trace = Trace::start(lab, flow)?;
            let seen = flow.observe(lab)?;
            let lines = trace.stop()?;
            writeln!(out, "    → {}", seen.describe())?;
            writeln!(
                out,
                "    dp trace --service {} on {} ({} {}; one of each kind):",
                flow.service,
                flow.node,
                lines.len(),
                if lines.len() == 1 { "line" } else { "lines" }
            )?;
            for line in one_of_each(&lines, 4) {
                writeln!(out, "      {line}")?;
            }
            seen
        }
        _ => {
            let before = rule_counters(lab, flow.node)?;
            let seen = flow.observe(lab)?;
            let after = rule_counters(lab, flow.node)?;
            writeln!(out, "    → {}", seen.describe())?;
            let matched = moved_rules(&before, &after, flow.service);
            writeln!(
                out,
                "    iptables-nft-save -c on {}: the {} {} of {} that counted these packets:",
                flow.node,
                matched.len(),
                if matched.len() == 1 { "rule" } else { "rules" },
                flow.service
            )?;
            for line in matched.iter().take(8) {
                writeln!(out, "      {line}")?;
            }
            if matched.len() > 8 {
                writeln!(out, "      ({} more)", matched.len() - 8)?;
            }
            seen
        }
    };
    Ok(seen)
}

/// A `dp trace --service` session on a node, started before the traffic.
struct Trace {
    child: Child,
}

impl Trace {
    fn start(lab: &Lab, flow: &Flow) -> anyhow::Result<Trace> {
        let mut child = lab
            .command(flow.node, "dp")?
            .args(["trace", "--service", flow.service])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting dp trace")?;
        // It says on stderr once its kernel filter is in place.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains("session") && line.contains("open") => break,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    anyhow::bail!("dp trace on {} did not start", flow.node);
                }
            }
        }
        Ok(Trace { child })
    }

    /// Ctrl-C: it prints what it got and exits.
    fn stop(self) -> anyhow::Result<Vec<String>> {
        // SAFETY: signalling our own child (nsenter exec'd dp in place).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out = self.child.wait_with_output()?;
        ensure!(out.status.success(), "dp trace: {}", out.status);
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}

const VERDICTS: &[&str] = &[
    "FORWARDED",
    "REVERSE-NATED",
    "REJECTED",
    "DROPPED",
    "PASSED",
];

/// The first line of each kind (verdict and the words after it), up to
/// `max`, in their order.
pub fn one_of_each(lines: &[String], max: usize) -> Vec<String> {
    let mut kinds = BTreeSet::new();
    let mut picked = Vec::new();
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| VERDICTS.contains(w)) else {
            continue;
        };
        let kind: Vec<&str> = words[at..].iter().take(4).copied().collect();
        if kinds.insert(kind.join(" ")) {
            // The time of day says nothing here.
            let line = line.split_once(' ').map_or(line.as_str(), |(_, rest)| rest);
            picked.push(line.to_string());
            if picked.len() == max {
                break;
            }
        }
    }
    picked
}

/// `iptables-nft-save -c` of a node: (rule line, packets) per rule, in order,
/// each prefixed with its table.
fn rule_counters(lab: &Lab, node: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let out = lab
        .command(node, "iptables-nft-save")?
        .arg("-c")
        .output()
        .context("running iptables-nft-save")?;
    ensure!(out.status.success(), "iptables-nft-save failed");
    let mut table = String::new();
    let mut rules = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        }
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((counters, rule)) = rest.split_once("] ") else {
            continue;
        };
        if !rule.starts_with("-A ") {
            continue;
        }
        let packets = counters
            .split(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        rules.push((format!("-t {table} {rule}"), packets));
    }
    Ok(rules)
}

/// The rules of `service` whose packet counters moved (by their comment,
/// kube-proxy's `namespace/name:port`), and the masquerade rule.
pub fn moved_rules(
    before: &[(String, u64)],
    after: &[(String, u64)],
    service: &str,
) -> Vec<String> {
    let tag = format!("\"{service}");
    after
        .iter()
        .filter_map(|(rule, packets)| {
            let was = before
                .iter()
                .find(|(r, _)| r == rule)
                .map_or(0, |(_, p)| *p);
            let relevant = rule.contains(&tag)
                || (rule.contains("KUBE-POSTROUTING") && rule.contains("MASQUERADE"));
            (relevant && *packets > was).then(|| format!("[+{}] {rule}", packets - was))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_of_each_kind() {
        let lines: Vec<String> = [
            "12:00:00.1 tc/ingress lxc1 a -> b TCP SYN FORWARDED new flow to a backend => x",
            "12:00:00.2 tc/ingress lxc1 a -> b TCP SYN FORWARDED new flow to a backend => y",
            "12:00:00.3 tc/ingress lxc1 a -> b TCP ACK FORWARDED established flow => x",
            "12:00:00.4 tc/egress lxc1 b -> a TCP SYN,ACK REVERSE-NATED reply of a flow",
            "no verdict here",
        ]
        .map(String::from)
        .to_vec();
        let picked = one_of_each(&lines, 4);
        assert_eq!(picked.len(), 3);
        assert!(picked[0].starts_with("tc/ingress"));
        assert!(picked[1].contains("established"));
        assert!(picked[2].contains("REVERSE-NATED"));
        assert_eq!(one_of_each(&lines, 1).len(), 1);
    }

    #[test]
    fn moved_rules_are_the_services_and_masquerade() {
        let before = vec![
            ("-t nat -A KUBE-SERVICES -m comment --comment \"default/web:http cluster IP\" -j KUBE-SVC-A".to_string(), 2),
            ("-t nat -A KUBE-SERVICES -m comment --comment \"default/other:http cluster IP\" -j KUBE-SVC-B".to_string(), 0),
            ("-t nat -A KUBE-POSTROUTING -j MASQUERADE --random-fully".to_string(), 0),
            ("-t nat -A KUBE-SEP-C -m comment --comment \"default/web:http\" -j DNAT".to_string(), 1),
        ];
        let mut after = before.clone();
        after[0].1 = 5;
        after[1].1 = 7;
        after[2].1 = 1;
        let moved = moved_rules(&before, &after, "default/web");
        assert_eq!(moved.len(), 2);
        assert!(moved[0].starts_with("[+3] -t nat -A KUBE-SERVICES"));
        assert!(moved[1].contains("MASQUERADE"));
    }
}
