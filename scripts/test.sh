#!/usr/bin/env bash
# Runs the whole test suite: unit tests, real-KVM integration tests, and the real guest-kernel boot.
# Installs what is missing first. Tests that need root, /dev/kvm or a network namespace check for it and
# say so when they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/install-deps.sh

# The guest kernel is cached outside the checkout (keyed by its config hash): ~8 minutes the first time.
IGNITE_GUEST_KERNEL=$(bash e2e/guest-kernel.sh)
IGNITE_WORKLOADS_KERNEL=$(bash e2e/guest-kernel-workloads.sh)
export IGNITE_GUEST_KERNEL IGNITE_WORKLOADS_KERNEL
# The Python gRPC client test's interpreter (grpcio from PyPI), cached the same way.
IGNITE_GRPC_PYTHON=$(bash scripts/python-grpc.sh)
export IGNITE_GRPC_PYTHON

cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --nocapture 2>&1 | tee "${TMPDIR:-/tmp}/ignite-test.log"
