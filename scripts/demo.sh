#!/usr/bin/env bash
# The main job on embedded defaults: installs what is needed, builds ignite and the guest kernel (cached
# outside the checkout), and boots the demo microVM from examples/demo on the embedded KVM engine with
# its serial console on this terminal.
#
# Today this drives the engine directly (`ignite vmm run`); the GitOps fleet from examples/ arrives with
# the controller and daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/install-deps.sh
cargo build --release -p ignite
kernel=$(bash e2e/guest-kernel.sh)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin" "$work/root/dev" "$work/root/proc" "$work/root/sys"
cp "$(command -v busybox)" "$work/root/bin/busybox"
install -m 0755 examples/demo/init "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) > "$work/initramfs.cpio"
printf 'demo disk, served by virtio-blk' > "$work/disk.img"
truncate -s 1M "$work/disk.img"

if ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
  echo "demo: this host has no hardware virtualization; KVM emulates the guest kernel (~1.5 M instructions/s)," >&2
  echo "demo: so the kernel needs about two minutes to reach /init (user mode then runs natively)." >&2
fi
echo "demo: booting $kernel" >&2
target/release/ignite vmm run --kernel "$kernel" --initrd "$work/initramfs.cpio" \
  --disk "$work/disk.img,ro" --cpus 1 --memory 128 --timings
