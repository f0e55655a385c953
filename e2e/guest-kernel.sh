#!/usr/bin/env bash
# Build (first time) or reuse a cached minimal microVM guest kernel and print the path of its vmlinux.
#
# The kernel comes from Debian's linux-source-6.1 package, with the patches in guest-kernel-patches/
# applied: `make tinyconfig`, then the fragment in guest-kernel.config is merged over it, then
# `make vmlinux bzImage`. The result is cached outside the checkout, under $IGNITE_CACHE (default
# /var/cache/ignite), keyed by the hash of the fragment, the patches, this script and the source
# package version, so CI builds it once per content change (~8 minutes on 2 cores).
#
# Usage: e2e/guest-kernel.sh            prints /var/cache/ignite/kernel/<hash>/vmlinux
#        IGNITE_CACHE=DIR e2e/guest-kernel.sh
# A bzImage of the same kernel is cached beside the vmlinux (for the bzImage loader tests).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/guest-kernel.config"
patches=("$here"/guest-kernel-patches/*.patch)
tarball=/usr/src/linux-source-6.1.tar.xz
cache="${IGNITE_CACHE:-/var/cache/ignite}"

log() { echo "guest-kernel: $*" >&2; }

if [ ! -f "$tarball" ]; then
  log "installing linux-source-6.1 and the kernel build tools (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq linux-source-6.1 bc flex bison libelf-dev libssl-dev make gcc patch >&2
fi

# The key covers everything that changes the output: the fragment, this script, and the source version.
key=$( { cat "$fragment" "${patches[@]}" "${BASH_SOURCE[0]}"; dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %s "$tarball"; } \
  | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  log "reusing cached kernel $out/vmlinux"
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$cache/kernel"
# Build in a private directory and publish it with one rename, so an interrupted build never leaves a
# half-written cache entry that a later run would trust.
work=$(mktemp -d "$cache/kernel/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building guest kernel $key in $work (several minutes)"
tar -C "$work" -xf "$tarball"
src="$work/linux-source-6.1"
for p in "${patches[@]}"; do
  log "applying $(basename "$p")"
  patch -s -d "$src" -p1 < "$p" >&2
done
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >&2
make -C "$src" -s olddefconfig >&2

missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=y) ;; *) continue ;; esac
  if ! grep -qx "$line" "$src/.config"; then log "option lost after olddefconfig: $line"; missing=1; fi
done < "$fragment"
[ "$missing" = 0 ] || { log "the config fragment does not hold; fix e2e/guest-kernel.config"; exit 1; }

make -C "$src" -s -j"$(nproc)" vmlinux bzImage >&2
mkdir -p "$work/out"
cp "$src/vmlinux" "$src/.config" "$src/arch/x86/boot/bzImage" "$work/out/"
strip --strip-debug "$work/out/vmlinux" 2>/dev/null || true
rm -rf "$out"
mv "$work/out" "$out"
log "built $out/vmlinux"
echo "$out/vmlinux"
