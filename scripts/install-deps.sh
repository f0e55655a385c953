#!/usr/bin/env bash
# Installs everything ignite's build, demo and tests need on Debian 12 (run as root). Idempotent: packages
# already present are not fetched again.
set -euo pipefail

packages=(
  # building ignite and the tiny test guests
  build-essential pkg-config
  # the guest kernel (e2e/guest-kernel.sh)
  linux-source-6.1 bc flex bison libelf-dev libssl-dev patch
  # guest root filesystems and initramfs
  busybox-static cpio e2fsprogs
  # image store: a real registry, reference tools, reflink-capable filesystems for tests
  docker-registry umoci skopeo xfsprogs btrfs-progs apache2-utils
  # the compatibility suite's real images (scripts/compat-images.sh: Debian minbase roots packed by umoci)
  debootstrap
  # the peer VMM for benchmarks
  qemu-system-x86
  # host networking (bridge, taps, port forwards) and its tests in a test network namespace
  iproute2 iptables python3
  # the dashboard test drives `ignite dashboard` in tmux
  tmux
  # certificates for the test of the API over TCP with mutual TLS
  openssl
  # GitOps sources: real repositories and `git daemon` remotes in tests
  git
  # ignite-init links statically against glibc
  libc6-dev
  # the gRPC API's code generation (manifests/proto)
  protobuf-compiler
  # the devicemapper crate's bindings (devicemapper-sys: bindgen over libdevmapper.h and dm-ioctl.h)
  libdevmapper-dev libclang-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "install-deps: cargo is in ~/.cargo/bin; add it to PATH" >&2
  else
    echo "install-deps: installing the Rust toolchain with rustup" >&2
    apt-get install -y -qq curl >/dev/null
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
  fi
fi
