#!/bin/sh
# The toolchain dp's eBPF programs build with, on Debian 12: Debian's
# rustc-web (with a prebuilt `core` for bpfel-unknown-none), LLVM 22 and
# bpf-linker 0.13 built against it. Installs only what is missing.
#
# The one recipe: `cargo xtask setup` runs it, and so does the Dockerfile's
# builder stage, before the sources are copied in (its layer is cached until
# this file changes, so a code change reinstalls nothing).
set -eu

PACKAGES="rustc-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev"
BPF_LINKER_VERSION=0.13.0
LLVM_PREFIX=/usr/lib/llvm-22

missing=""
for p in $PACKAGES; do
    case "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)" in
        ii*) ;;
        *) missing="$missing $p" ;;
    esac
done
if [ -z "$missing" ]; then
    echo "==> toolchain packages: all installed"
else
    echo "==> installing toolchain packages:$missing"
    apt-get update -q
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

if [ "$(bpf-linker --version 2>/dev/null | cut -d' ' -f2)" = "$BPF_LINKER_VERSION" ]; then
    echo "==> bpf-linker $BPF_LINKER_VERSION: installed"
else
    echo "==> installing bpf-linker $BPF_LINKER_VERSION (LLVM 22)"
    LLVM_PREFIX=$LLVM_PREFIX "${CARGO:-cargo}" install bpf-linker --locked --force \
        --version "$BPF_LINKER_VERSION" --no-default-features --features llvm-22
fi
