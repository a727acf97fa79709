//! `cargo xtask kind up|test|down` and `cargo xtask image` on a machine
//! without what they need fail at once, non-zero, saying what is missing.
//! The machine's own PATH is replaced by one the test controls: a Docker
//! engine cannot run here, so the one stand-in is a `docker` client that
//! cannot reach an engine, as on this machine.

use std::{fs, os::unix::fs::PermissionsExt, path::PathBuf, process::Command};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn bin_dir(name: &str, programs: &[(&str, &str)]) -> Dir {
    let dir = std::env::temp_dir().join(format!("dp-xtask-{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    for (program, script) in programs {
        let path = dir.join(program);
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    Dir(dir)
}

fn xtask(path: &Dir, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("PATH", &path.0)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn kind_says_docker_kind_and_kubectl_are_missing() {
    let empty = bin_dir("empty", &[]);
    for command in ["up", "test", "down"] {
        let (ok, text) = xtask(&empty, &["kind", command]);
        assert!(!ok, "kind {command} succeeded: {text}");
        for expected in [
            "cargo xtask kind cannot run here",
            "no Docker engine: the `docker` command is not installed",
            "`kind` is not installed",
            "`kubectl` is not installed",
            "docs/kind.md",
        ] {
            assert!(
                text.contains(expected),
                "kind {command}: no {expected:?} in {text}"
            );
        }
    }
}

#[test]
fn kind_up_on_a_host_with_an_old_kernel_says_what_dp_needs_before_creating_anything() {
    // kind, docker and kubectl that record any call: none may happen.
    let calls = std::env::temp_dir().join(format!("dp-xtask-calls-{}", std::process::id()));
    let record = format!("echo \"$0 $*\" >> {}; exit 0", calls.display());
    let tools = bin_dir(
        "old-kernel",
        &[("docker", &record), ("kind", &record), ("kubectl", &record)],
    );
    for release in ["5.4.0-150-generic", "4.18.0-553.el8_10.x86_64"] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["kind", "up"])
            .env("PATH", &tools.0)
            .env("DP_KERNEL_RELEASE", release)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains(&format!("Linux {release} is too old for dp")),
            "{text}"
        );
        assert!(
            text.contains("5.10 or newer for bpf_redirect_neigh"),
            "{text}"
        );
    }
    assert!(
        !calls.exists(),
        "called before the kernel check: {}",
        fs::read_to_string(&calls).unwrap_or_default()
    );
}

/// `kind load docker-image` fails with some Docker versions' containerd
/// image store; `kind up` then saves the image and loads the archive.
#[test]
fn kind_up_falls_back_to_an_image_archive_when_kind_load_docker_image_fails() {
    let calls = std::env::temp_dir().join(format!("dp-xtask-load-calls-{}", std::process::id()));
    let _ = fs::remove_file(&calls);
    let record = format!("echo \"${{0##*/}} $*\" >> {}", calls.display());
    let kind = format!(
        "{record}\ncase \"$1 $2\" in\n  \"load docker-image\") echo 'ERROR: failed to load image: \
         ctr: content digest sha256:0: not found' >&2; exit 1 ;;\nesac\nexit 0"
    );
    let docker = format!("{record}\nif [ \"$1\" = save ]; then echo image > \"$3\"; fi\nexit 0");
    let tools = bin_dir(
        "load",
        &[
            ("docker", &docker),
            ("kind", &kind),
            ("kubectl", &format!("{record}\nexit 0")),
        ],
    );
    let (ok, text) = xtask(&tools, &["kind", "up"]);
    let log = fs::read_to_string(&calls).unwrap_or_default();
    let _ = fs::remove_file(&calls);
    assert!(ok, "{text}\n{log}");
    assert!(
        text.contains("kind load docker-image failed") && text.contains("image archive"),
        "{text}"
    );
    let lines: Vec<&str> = log.lines().collect();
    let at = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {log}"))
    };
    let direct = at("kind load docker-image dp:");
    let save = at("docker save -o ");
    let archive = at("kind load image-archive ");
    let apply = at("kubectl --context kind-dp apply -k ");
    assert!(direct < save && save < archive && archive < apply, "{log}");
    assert!(lines[archive].contains("dp-image.tar --name dp"), "{log}");
}

/// `kind up --ip-family dual`: kind's dual-stack config, and the agents
/// told both families' cluster and service CIDRs after deploy/ is applied.
#[test]
fn kind_up_dual_creates_a_dual_stack_cluster_and_gives_the_agents_both_cidrs() {
    let calls = std::env::temp_dir().join(format!("dp-xtask-dual-calls-{}", std::process::id()));
    let _ = fs::remove_file(&calls);
    let record = format!("echo \"${{0##*/}} $*\" >> {}", calls.display());
    let tools = bin_dir(
        "dual",
        &[
            ("docker", &format!("{record}\nexit 0")),
            ("kind", &format!("{record}\nexit 0")),
            ("kubectl", &format!("{record}\nexit 0")),
        ],
    );
    let (ok, text) = xtask(&tools, &["kind", "up", "--ip-family", "dual"]);
    let log = fs::read_to_string(&calls).unwrap_or_default();
    let _ = fs::remove_file(&calls);
    assert!(ok, "{text}\n{log}");
    let lines: Vec<&str> = log.lines().collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {log}"))
    };
    at("kind create cluster --config ");
    assert!(
        lines[at("kind create cluster")].ends_with("e2e/kind/cluster-dual.yaml"),
        "{log}"
    );
    let apply = at("apply -k ");
    let env = at("set env daemonset/dp-agent");
    assert!(apply < env, "{log}");
    assert!(
        lines[env].contains("DP_CLUSTER_CIDR=10.244.0.0/16,fd00:10:244::/56")
            && lines[env].contains("DP_SERVICE_CIDR=10.96.0.0/16,fd00:10:96::/112"),
        "{log}"
    );
}

#[test]
fn a_docker_client_without_an_engine_is_named_as_such() {
    let client_only = bin_dir(
        "client-only",
        &[
            (
                "docker",
                "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. \
                 Is the docker daemon running?' >&2; exit 1",
            ),
            ("kind", "exit 0"),
            ("kubectl", "exit 0"),
        ],
    );
    let (ok, text) = xtask(&client_only, &["kind", "up"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "no Docker engine: `docker info` failed (Cannot connect to the Docker daemon"
        ),
        "{text}"
    );
    assert!(!text.contains("`kind` is not installed"), "{text}");
    let (ok, text) = xtask(&client_only, &["image"]);
    assert!(!ok, "{text}");
    assert!(text.contains("no Docker engine"), "{text}");
}

/// `kind test` against stand-in kubectl and docker: it waits until the
/// agent's `dp service list` shows the workloads, tries a failing connection
/// three times, and on failure prints what explains it from each agent
/// (recent drops, counters, status) and the node's drop counters.
#[test]
fn kind_test_waits_for_the_agents_retries_and_prints_diagnostics_on_failure() {
    let (text, _) = kind_test_with("10.96.1.1", "10.96.1.2", "172.18.0.3");
    for expected in [
        "FAIL  ClusterIP reaches both web pods",
        "FAIL  NodePort from another node",
    ] {
        assert!(text.contains(expected), "no {expected:?} in {text}");
    }
}

/// On a dual-stack cluster every Service check runs in each family, IPv6
/// addresses bracketed in URLs.
#[test]
fn kind_test_checks_both_families_of_a_dual_stack_cluster() {
    let (text, called) = kind_test_with(
        "10.96.1.1 fd00:10:96::1",
        "10.96.1.2 fd00:10:96::2",
        "172.18.0.3 fc00:f853:ccd:e793::3",
    );
    for expected in [
        "FAIL  IPv4: ClusterIP reaches both web pods",
        "FAIL  IPv6: ClusterIP reaches both web pods",
        "FAIL  IPv6: NodePort from another node",
        "FAIL  IPv6: a Service without endpoints is refused at once",
        "FAIL  IPv6: externalTrafficPolicy: Local",
        "curl -sS --max-time 5 http://[fc00:f853:ccd:e793::3]:30080/hostname",
    ] {
        assert!(text.contains(expected), "no {expected:?} in {text}");
    }
    assert!(
        called.contains("curl -sS --max-time 5 http://[fd00:10:96::1]/hostname"),
        "{called}"
    );
    assert!(called.contains("connect [fd00:10:96::2]:80"), "{called}");
}

/// `cargo xtask kind test` against a fake kubectl and docker whose
/// Services have the ClusterIPs `web` and `empty` and whose nodes the
/// InternalIPs `node` (space-separated): (output, kubectl's calls).
fn kind_test_with(web: &str, empty: &str, node: &str) -> (String, String) {
    let calls = std::env::temp_dir().join(format!(
        "dp-xtask-test-calls-{}-{}",
        std::process::id(),
        web.len()
    ));
    let _ = fs::remove_file(&calls);
    let log = calls.display().to_string();
    let kubectl = format!(
        r#"echo "$*" >> {log}
case "$*" in
  *"dp service list"*)
    n=0; [ -f {log}.n ] && read -r n < {log}.n; n=$((n + 1)); echo $n > {log}.n
    if [ $n -ge 2 ]; then
      printf 'dp-e2e/web\ndp-e2e/web-nodeport\ndp-e2e/empty\ndp-e2e/local\n'
    fi ;;
  *"dp trace --since"*) echo "TRACE: dropped no_route_to_backend" ;;
  *"-- dp stats"*) echo "STATS: new_flow 0" ;;
  *"-- dp status"*) echo "STATUS: kernel 6.18" ;;
  *"-- nstat"*) echo "TcpExtIPReversePathFilter 7" ;;
  *"dp trace --service"*) exit 1 ;;
  *"field-selector"*) printf 'dp-a' ;;
  *"range .items"*) printf 'dp-a dp-worker\n' ;;
  *"get service web "*) printf '{web}' ;;
  *"get service empty "*) printf '{empty}' ;;
  *"get pods -l app=web"*) printf 'web-a web-b' ;;
  *"get node "*) printf '{node}' ;;
  *" exec client "*) echo "curl: (7) Failed to connect" >&2; exit 7 ;;
esac
exit 0"#
    );
    let docker = r#"case "$1" in exec) echo "curl: (7) Failed" >&2; exit 7 ;; esac; exit 0"#;
    let tools = bin_dir(
        &format!("test{}", web.len()),
        &[
            ("docker", docker),
            ("kind", "exit 0"),
            ("kubectl", &kubectl),
        ],
    );
    let (ok, text) = xtask(&tools, &["kind", "test"]);
    let called = fs::read_to_string(&calls).unwrap_or_default();
    let _ = fs::remove_file(&calls);
    let _ = fs::remove_file(format!("{log}.n"));
    assert!(!ok, "{text}");
    assert!(
        called.matches("dp service list").count() >= 2,
        "waited for the agent: {called}"
    );
    for expected in [
        "waiting until every agent's `dp service list` shows the workloads",
        "dp-a (dp-worker): programmed",
        "attempt 1/3",
        "attempt 3/3",
        "==> dp-worker (dp-a)",
        "--- dp trace --since 5m --verdict dropped,rejected --explain",
        "TRACE: dropped no_route_to_backend",
        "STATS: new_flow 0",
        "STATUS: kernel 6.18",
        "TcpExtIPReversePathFilter 7",
        "checks failed",
    ] {
        assert!(text.contains(expected), "no {expected:?} in {text}");
    }
    assert!(
        called.contains("-c agent -- nstat -asz TcpExtIPReversePathFilter IpInAddrErrors"),
        "{called}"
    );
    (text, called)
}
