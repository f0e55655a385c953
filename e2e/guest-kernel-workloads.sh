#!/usr/bin/env bash
# The "workloads" guest kernel: guest-kernel.sh with guest-kernel-workloads.config as its fragment
# (IPv6, SysV IPC, mqueue, ptys, namespaces, cgroup v2, overlayfs, netfilter: what ordinary images and
# container runtimes need). Built and cached exactly as guest-kernel.sh builds the base kernel (the
# cache key is the same content hash), and prints the path of its vmlinux.
#
# Why two profiles: on hosts whose KVM is software (kvm_pvm), processes started in a guest running
# this kernel are often served pages of the address space they replaced (issue 13, the host's
# hypervisor); the base kernel does not show it there. Real images need this one.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/guest-kernel.sh" "$work/guest-kernel.sh"
cp -r "$here/guest-kernel-patches" "$work/guest-kernel-patches"
cp "$here/guest-kernel-workloads.config" "$work/guest-kernel.config"
bash "$work/guest-kernel.sh"
