//! `cargo xtask image`: dp's container image (the Dockerfile at the
//! workspace root), with `docker build` where a Docker engine exists; and
//! `--rootfs DIR`, which assembles the Dockerfile's runtime stage into a
//! directory without one: the same Debian release and packages
//! (mmdebstrap), the same files copied from the builder, and its entry
//! point run from there.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The image's name; the tag is the workspace version (deploy/ names it).
pub const IMAGE: &str = "dp";

pub fn tag() -> String {
    format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION"))
}

/// Where the builder stage installs the `dp` it built (its one artifact).
const BUILDER_DP: &str = "/usr/local/bin/dp";

/// The runtime stage of the Dockerfile, as far as assembling it needs.
#[derive(Debug, PartialEq)]
pub struct RuntimeStage {
    /// `debian:bookworm-slim`
    pub base: String,
    /// The Debian release of the base (`bookworm`).
    pub suite: String,
    /// Packages its `apt-get install` adds.
    pub packages: Vec<String>,
    /// (builder path, image path) of `COPY --from=builder`.
    pub copies: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
}

/// Reads the stage named `runtime` (`FROM … AS runtime`).
pub fn parse_runtime_stage(dockerfile: &str) -> Result<RuntimeStage> {
    // Logical lines: continuations joined, comments dropped.
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in dockerfile.lines() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    lines.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    let start = lines
        .iter()
        .position(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() == 4
                && w[0].eq_ignore_ascii_case("FROM")
                && w[2].eq_ignore_ascii_case("AS")
                && w[3] == "runtime"
        })
        .context("the Dockerfile has no `FROM … AS runtime` stage")?;
    let base = lines[start].split_whitespace().nth(1).unwrap().to_string();
    let suite = base
        .strip_prefix("debian:")
        .map(|t| t.split('-').next().unwrap_or(t).to_string())
        .with_context(|| {
            format!("runtime stage base {base}: only debian:<release>[-slim] is assembled")
        })?;
    let mut stage = RuntimeStage {
        base,
        suite,
        packages: Vec::new(),
        copies: Vec::new(),
        entrypoint: Vec::new(),
    };
    for line in &lines[start + 1..] {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instruction.to_ascii_uppercase().as_str() {
            "FROM" => break,
            "RUN" => {
                for command in rest.split("&&") {
                    let words: Vec<&str> = command.split_whitespace().collect();
                    if let Some(i) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
                        stage.packages.extend(
                            words[i + 2..]
                                .iter()
                                .filter(|w| !w.starts_with('-'))
                                .map(|w| w.to_string()),
                        );
                    }
                }
            }
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                match words.as_slice() {
                    ["--from=builder", src, dst] => {
                        stage.copies.push((src.to_string(), dst.to_string()))
                    }
                    _ => bail!("runtime stage: cannot assemble `{line}`"),
                }
            }
            "ENTRYPOINT" => {
                stage.entrypoint = serde_json::from_str(rest)
                    .with_context(|| format!("ENTRYPOINT is not a JSON array: {rest}"))?;
            }
            _ => {}
        }
    }
    if stage.entrypoint.is_empty() {
        bail!("the runtime stage has no ENTRYPOINT");
    }
    Ok(stage)
}

/// `docker build` (needs a Docker engine).
pub fn build(ws: &Path) -> Result<()> {
    crate::kind::require_docker_engine()?;
    crate::step(&format!("docker build -t {} .", tag()));
    crate::run(
        Command::new("docker")
            .current_dir(ws)
            .args(["build", "-t", &tag(), "."]),
    )
}

/// Assembles the runtime stage into `rootfs` (replaced), with `dp` as the
/// builder's artifact, and runs the entry point's `--version` there.
pub fn assemble_rootfs(ws: &Path, rootfs: &Path, dp: &Path) -> Result<()> {
    let dockerfile = fs::read_to_string(ws.join("Dockerfile")).context("reading Dockerfile")?;
    let stage = parse_runtime_stage(&dockerfile)?;
    if !dp.is_file() {
        bail!(
            "{}: no dp binary (cargo build -p dp --bin dp)",
            dp.display()
        );
    }
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    if let Some(parent) = rootfs.parent() {
        fs::create_dir_all(parent)?;
    }
    crate::step(&format!(
        "assembling {} ({} with {}) in {}",
        stage.base,
        stage.suite,
        stage.packages.join(" "),
        rootfs.display()
    ));
    // minbase: Essential and required packages and apt, as Debian's slim
    // images. The package sources are this machine's.
    let mut mmdebstrap = Command::new("mmdebstrap")
        .args(["--quiet", "--variant=minbase"])
        .arg(format!("--include={}", stage.packages.join(",")))
        .arg(&stage.suite)
        .arg(rootfs)
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot run mmdebstrap (cargo xtask setup installs it)")?;
    std::io::Write::write_all(
        &mut mmdebstrap.stdin.take().unwrap(),
        apt_sources()?.as_bytes(),
    )?;
    if !mmdebstrap.wait()?.success() {
        bail!("mmdebstrap failed");
    }
    for (src, dst) in &stage.copies {
        if src != BUILDER_DP {
            bail!("COPY --from=builder {src}: not an artifact this assembly knows");
        }
        let target = rootfs.join(dst.trim_start_matches('/'));
        fs::create_dir_all(target.parent().unwrap())?;
        fs::copy(dp, &target).with_context(|| format!("copying dp to {}", target.display()))?;
    }
    crate::step(&format!(
        "chroot {} {} --version",
        rootfs.display(),
        stage.entrypoint.join(" ")
    ));
    crate::run(
        Command::new("chroot")
            .arg(rootfs)
            .args(&stage.entrypoint)
            .arg("--version"),
    )
}

/// This machine's apt sources, for mmdebstrap's standard input: the
/// deb822 `.sources` files if there are any, else the one-line lists.
fn apt_sources() -> Result<String> {
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let deb822: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
        .collect();
    let mut text = String::new();
    if deb822.is_empty() {
        let mut lists = vec![PathBuf::from("/etc/apt/sources.list")];
        lists.extend(
            files
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "list"))
                .cloned(),
        );
        for f in lists {
            text.push_str(&fs::read_to_string(&f).unwrap_or_default());
            text.push('\n');
        }
    } else {
        for f in deb822 {
            text.push_str(&fs::read_to_string(f)?);
            text.push_str("\n\n");
        }
    }
    if text.trim().is_empty() {
        bail!("no apt sources in /etc/apt to assemble the image from");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projects_dockerfile_has_an_assemblable_runtime_stage() {
        let text =
            fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Dockerfile")).unwrap();
        let stage = parse_runtime_stage(&text).unwrap();
        assert_eq!(stage.base, "debian:bookworm-slim");
        assert_eq!(stage.suite, "bookworm");
        for p in ["iptables", "nftables", "mount"] {
            assert!(
                stage.packages.iter().any(|q| q == p),
                "{p}: {:?}",
                stage.packages
            );
        }
        assert_eq!(
            stage.copies,
            [(BUILDER_DP.to_string(), "/usr/local/bin/dp".to_string())]
        );
        assert_eq!(stage.entrypoint, ["/usr/local/bin/dp"]);
    }

    #[test]
    fn continuations_and_options_are_understood() {
        let text = "FROM x AS builder\nRUN apt-get install foo\n\
                    FROM debian:trixie AS runtime\n# a comment\n\
                    RUN apt-get update \\\n  && apt-get install -y --no-install-recommends a b \\\n  && rm -rf /x\n\
                    COPY --from=builder /usr/local/bin/dp /bin/dp\nENTRYPOINT [\"/bin/dp\"]\n";
        let stage = parse_runtime_stage(text).unwrap();
        assert_eq!(stage.suite, "trixie");
        assert_eq!(stage.packages, ["a", "b"]);
        assert_eq!(stage.entrypoint, ["/bin/dp"]);
        assert!(parse_runtime_stage("FROM alpine AS runtime\nENTRYPOINT [\"x\"]\n").is_err());
    }
}
