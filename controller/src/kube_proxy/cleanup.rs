//! `dp cleanup-kube-proxy`: removes what kube-proxy leaves on a node when
//! its DaemonSet is deleted (it does not clean up after itself): its
//! iptables chains and the rules that jump to them, for IPv4 and IPv6,
//! through iptables-nft and iptables-legacy, and its nftables tables. What
//! kube-proxy's own `--cleanup` removes, and nothing of other owners:
//! kubelet's chains (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`,
//! `KUBE-MARK-DROP`) and other programs' rules (a CNI's masquerade chain)
//! stay.
//!
//! Each table is changed with one `iptables-restore --noflush` transaction:
//! the jump rules deleted, kube-proxy's chains flushed and deleted, nothing
//! else touched (no table reload, counters of other rules kept).
//!
//! Not covered: kube-proxy's IPVS mode (its `kube-ipvs0` device, ipsets and
//! virtual servers); this kernel has no IPVS to test it on.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

/// kube-proxy's fixed chains, in every table they appear in.
const FIXED_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
];

/// Prefixes of kube-proxy's per-service and per-endpoint chains.
const SERVICE_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
];

/// Written by kube-proxy since kubelet stopped creating it, and used by
/// both in older versions: removed only when nothing that stays jumps to it.
const SHARED_CHAINS: &[&str] = &["KUBE-MARK-MASQ"];

/// kube-proxy's nftables mode: `table ip kube-proxy`, `table ip6 kube-proxy`.
const NFT_TABLE: &str = "kube-proxy";

const TABLES: &[&str] = &["filter", "nat", "mangle"];

/// The iptables front ends kube-proxy may have used.
const IPTABLES: &[&str] = &[
    "iptables-nft",
    "ip6tables-nft",
    "iptables-legacy",
    "ip6tables-legacy",
];

fn is_kube_proxy_chain(chain: &str) -> bool {
    FIXED_CHAINS.contains(&chain) || SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// What one table loses: an `iptables-restore --noflush` input (None if
/// kube-proxy left nothing there), with counts.
#[derive(Debug, Default, PartialEq)]
pub struct TablePlan {
    pub chains: usize,
    pub jump_rules: usize,
    pub restore_input: Option<String>,
}

/// Plans the removal from one table's `iptables-save -t TABLE` output.
pub fn plan_table(table: &str, save: &str) -> TablePlan {
    let chains: Vec<&str> = save
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut remove: BTreeSet<&str> = chains
        .iter()
        .copied()
        .filter(|c| is_kube_proxy_chain(c))
        .collect();
    // (chain, target, the rule as saved)
    let rules: Vec<(&str, Option<&str>, &str)> = save
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("-A ")?;
            let chain = rest.split_whitespace().next()?;
            Some((chain, jump_target(rest), rest))
        })
        .collect();
    for shared in SHARED_CHAINS {
        let used_by_others = rules
            .iter()
            .any(|(c, t, _)| *t == Some(*shared) && !remove.contains(c) && c != shared);
        if chains.contains(shared) && !used_by_others {
            remove.insert(shared);
        }
    }
    let jumps: Vec<&str> = rules
        .iter()
        .filter(|(c, t, _)| !remove.contains(c) && t.is_some_and(|t| remove.contains(t)))
        .map(|(_, _, rule)| *rule)
        .collect();
    if remove.is_empty() && jumps.is_empty() {
        return TablePlan::default();
    }
    let mut input = format!("*{table}\n");
    // Declaring a chain under --noflush flushes it: then nothing refers to
    // any of them, and each can be deleted.
    for c in &remove {
        let _ = writeln!(input, ":{c} - [0:0]");
    }
    for rule in &jumps {
        let _ = writeln!(input, "-D {rule}");
    }
    for c in &remove {
        let _ = writeln!(input, "-X {c}");
    }
    input.push_str("COMMIT\n");
    TablePlan {
        chains: remove.len(),
        jump_rules: jumps.len(),
        restore_input: Some(input),
    }
}

/// The `-j`/`-g` target of a saved rule.
fn jump_target(rule: &str) -> Option<&str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words
        .windows(2)
        .rev()
        .find(|w| matches!(w[0], "-j" | "--jump" | "-g" | "--goto"))
        .map(|w| w[1])
}

/// Removes kube-proxy's leftovers here (this network namespace). With
/// `dry_run`, prints what it would run instead. Returns a report, one line
/// per thing changed (empty: nothing of kube-proxy's was found).
pub fn cleanup(dry_run: bool) -> anyhow::Result<Vec<String>> {
    let mut report = Vec::new();
    let mut found_a_tool = false;
    for tool in IPTABLES {
        let save = format!("{tool}-save");
        if !on_path(&save) {
            continue;
        }
        found_a_tool = true;
        for table in TABLES {
            let listing = match run(&save, &["-t", table], None) {
                Ok(listing) => listing,
                // A kernel without that table (legacy x_tables not built,
                // no IPv6): nothing of kube-proxy's can be there.
                Err(e) if is_missing_table(&e.to_string()) => continue,
                // Anything else (no permission, a lock) must not look like
                // a clean node.
                Err(e) => return Err(e.context(format!("{tool}: listing table {table}"))),
            };
            let plan = plan_table(table, &listing);
            let Some(input) = plan.restore_input else {
                continue;
            };
            if dry_run {
                println!("# {tool}-restore --noflush\n{input}");
            } else {
                run(
                    &format!("{tool}-restore"),
                    &["-w", "5", "--noflush"],
                    Some(&input),
                )
                .with_context(|| format!("{tool} table {table}"))?;
            }
            report.push(format!(
                "{tool} {table}: {} chains, {} jump rules",
                plan.chains, plan.jump_rules
            ));
        }
    }
    if on_path("nft") {
        found_a_tool = true;
        let tables = run("nft", &["list", "tables"], None).context("nft list tables")?;
        for line in tables.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["table", family @ ("ip" | "ip6" | "inet"), NFT_TABLE] = words.as_slice() {
                if dry_run {
                    println!("nft delete table {family} {NFT_TABLE}");
                } else {
                    run("nft", &["delete", "table", family, NFT_TABLE], None)?;
                }
                report.push(format!("nftables: table {family} {NFT_TABLE}"));
            }
        }
    }
    if !found_a_tool {
        bail!("none of iptables-nft, iptables-legacy or nft is installed: nothing can be checked");
    }
    Ok(report)
}

/// iptables' words for a table the kernel does not have.
fn is_missing_table(error: &str) -> bool {
    error.contains("Table does not exist") || error.contains("do you need to insmod")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAT: &str = "\
# Generated by iptables-nft-save
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KIND-MASQ-AGENT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-ABC - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XYZ - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -m addrtype ! --dst-type LOCAL -j KIND-MASQ-AGENT
-A KIND-MASQ-AGENT -d 10.244.0.0/16 -j RETURN
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SEP-ABC -s 10.244.1.2/32 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-XYZ
-A KUBE-SVC-XYZ -j KUBE-SEP-ABC
COMMIT
";

    #[test]
    fn kube_proxy_chains_and_their_jumps_go_and_the_rest_stays() {
        let plan = plan_table("nat", NAT);
        let input = plan.restore_input.unwrap();
        assert_eq!((plan.chains, plan.jump_rules), (5, 2));
        for gone in [
            "KUBE-SERVICES",
            "KUBE-POSTROUTING",
            "KUBE-SVC-XYZ",
            "KUBE-SEP-ABC",
            "KUBE-MARK-MASQ",
        ] {
            assert!(input.contains(&format!(":{gone} - [0:0]\n")), "{gone}");
            assert!(input.contains(&format!("-X {gone}\n")), "{gone}");
        }
        assert!(input.contains(
            "-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
        for kept in [
            "KIND-MASQ-AGENT",
            "KUBE-KUBELET-CANARY",
            "POSTROUTING -m addrtype",
        ] {
            assert!(!input.contains(kept), "{kept}");
        }
        // Declarations (flushes) before deletions.
        assert!(input.find(":KUBE-SERVICES").unwrap() < input.find("-D PREROUTING").unwrap());
        assert!(input.find("-D PREROUTING").unwrap() < input.find("-X KUBE-SERVICES").unwrap());
    }

    #[test]
    fn a_mark_chain_others_still_use_stays() {
        let save = "*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
                    -A OUTPUT -d 10.0.0.1/32 -j KUBE-MARK-MASQ\nCOMMIT\n";
        assert_eq!(plan_table("nat", save), TablePlan::default());
    }

    #[test]
    fn a_clean_table_needs_nothing() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n\
                    -A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert_eq!(plan_table("filter", save), TablePlan::default());
    }
}
