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
