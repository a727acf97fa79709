# syntax=docker/dockerfile:1
# dp's image: the `dp` binary (agent and CLI) and the tools it calls.
# Built by `cargo xtask image` (docker build -t dp:0.1.0 .). Without a
# Docker engine, `cargo xtask image --rootfs DIR` assembles the runtime
# stage below into DIR from the same packages and runs `dp` from it.

# Builder: Debian 12 and the project's own toolchain recipe
# (xtask/toolchain.sh, which `cargo xtask setup` runs too: Debian's
# rustc-web with its prebuilt BPF core, LLVM 22, bpf-linker 0.13), Rust 1.95
# for userspace. The toolchain is installed from the recipe alone, before
# the sources are copied in: its layers stay cached until the recipe
# changes, so a code change reinstalls no package and rebuilds no
# bpf-linker. The build keeps crates.io downloads and compiled
# dependencies in BuildKit cache mounts between builds.
FROM rust:1.95-bookworm AS builder
COPY xtask/toolchain.sh /usr/local/share/dp/toolchain.sh
RUN sh /usr/local/share/dp/toolchain.sh
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dp --bin dp \
    && install -m 0755 target/release/dp /usr/local/bin/dp

# Runtime: Debian 12 slim with what `dp` runs: iptables (nft and legacy)
# and nftables for `dp cleanup-kube-proxy`, iproute2 for debugging from a
# `kubectl exec` (and `nstat`, which `cargo xtask kind test` reads on a
# failure), mount (and the base's grep) for the bpffs init container.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables iproute2 mount \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /usr/local/bin/dp /usr/local/bin/dp
ENTRYPOINT ["/usr/local/bin/dp"]
