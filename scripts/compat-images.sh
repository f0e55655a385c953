#!/usr/bin/env bash
# Builds the real images of the compatibility suite (e2e/tests/compat.rs) from Debian packages:
# `debootstrap --variant=minbase --include=PKGS bookworm`, a little set-up per case, then packed as an OCI
# image layout by umoci (one layer, amd64, with the case's Cmd). Run as root.
#
#   bash scripts/compat-images.sh CASE...    # prints "CASE DIR" per case: DIR is an OCI layout, tag "latest"
#   bash scripts/compat-images.sh --list     # the cases
#
# Each image is cached under $IGNITE_COMPAT_CACHE (default /var/cache/ignite/compat) in <case>-<key>, the key a
# hash of the case's packages and of the shell functions that build it: an image is built once per content change
# (into a temporary directory, published with one rename), and a cached image needs no network. Downloaded .debs
# are shared between cases in <cache>/debs.
set -euo pipefail

CACHE=${IGNITE_COMPAT_CACHE:-/var/cache/ignite/compat}
SUITE=bookworm
MIRROR=${IGNITE_COMPAT_MIRROR:-http://deb.debian.org/debian}
BASE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# The packages of each case (debootstrap --include).
declare -A PACKAGES=(
  [nginx]=nginx-light
  [python]=python3
  [redis]=redis-server
  [postgres]=postgresql-15
  [ssh]=openssh-server
  [runc]=runc,busybox-static
  [containerd]=containerd,runc,busybox-static
)
CASES=(nginx python redis postgres ssh runc containerd)

log() { echo "compat-images: $*" >&2; }

# Writes an executable script (stdin) at $1.
script_at() {
  mkdir -p "$(dirname "$1")"
  cat >"$1"
  chmod 755 "$1"
}

# --- set-up of each case, run against the debootstrapped root $1; writes the image config's Cmd to fd 3 (one
# argument per line) and may set WORKDIR.

setup_nginx() {
  # Debian's default configuration, unchanged (it listens on 0.0.0.0:80 and [::]:80).
  printf '%s\n' >&3 nginx -g 'daemon off;'
}

setup_python() {
  mkdir -p "$1/srv/www"
  echo "COMPAT-PYTHON-OK served by python3 -m http.server" >"$1/srv/www/index.html"
  WORKDIR=/srv/www
  printf '%s\n' >&3 python3 -m http.server 8000
}

setup_redis() {
  # Debian's binary without its config file: listens on every address; protected mode would refuse
  # clients coming through the port forward (not loopback) since there is no password.
  WORKDIR=/var/lib/redis
  printf '%s\n' >&3 redis-server --protected-mode no
}

setup_postgres() {
  # No cluster from the package: the entrypoint runs initdb in the guest (COMPAT_PG_DATA), or uses the one
  # made here at build time (on the host, in the chroot) when the command says `prebuilt`.
  rm -rf "$1/etc/postgresql/15/main" "$1/var/lib/postgresql/15/main"
  chroot "$1" su postgres -c '/usr/lib/postgresql/15/bin/initdb -D /var/lib/postgresql/prebuilt --auth=trust -E UTF8 --locale=C.UTF-8' >/dev/null
  script_at "$1/usr/local/bin/compat-postgres" <<'EOF'
#!/bin/sh
# compat-postgres [prebuilt]: initdb (unless prebuilt), then postgres in the foreground.
set -e
bin=/usr/lib/postgresql/15/bin
mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql
if [ "$1" = prebuilt ]; then
  data=/var/lib/postgresql/prebuilt
else
  data=/var/lib/postgresql/data
  if [ ! -s "$data/PG_VERSION" ]; then
    echo "COMPAT-PG initdb started at $(cat /proc/uptime)"
    su postgres -c "$bin/initdb -D $data --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync"
    echo "COMPAT-PG initdb ended at $(cat /proc/uptime)"
  fi
fi
echo "COMPAT-PG starting postgres on $data"
exec su postgres -c "exec $bin/postgres -D $data -c listen_addresses='*' -c unix_socket_directories=/run/postgresql"
EOF
  printf '%s\n' >&3 /usr/local/bin/compat-postgres
}

setup_ssh() {
  # Host keys made now (key generation is slow in an emulated guest); root logs in with the key
  # ignite-init writes from `--ssh` (PermitRootLogin's default allows keys).
  chroot "$1" ssh-keygen -A >/dev/null
  printf '%s\n' >&3 /bin/sh -c 'mkdir -p /run/sshd && chmod 755 /run/sshd && exec /usr/sbin/sshd -D -e'
}

# A busybox bundle for runc at $1/bundle: busybox's static binary and its applets, runc's default spec with
# a command printing $2 (the marker).
busybox_bundle() {
  local root=$1 marker=$2
  local rootfs=$root/bundle/rootfs
  mkdir -p "$rootfs/bin" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/tmp" "$rootfs/etc"
  cp "$root/bin/busybox" "$rootfs/bin/busybox"
  for applet in sh echo cat ls id hostname uname; do ln -sf busybox "$rootfs/bin/$applet"; done
  echo 'root:x:0:0:root:/:/bin/sh' >"$rootfs/etc/passwd"
  # runc's default spec (what `runc spec` writes on a cgroup v2 host), with the marker as its command.
  python3 - "$root/bundle/config.json" "$marker" <<'EOF'
import json, sys
path, marker = sys.argv[1], sys.argv[2]
masked = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"]
readonly = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
spec = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "terminal": False, "user": {"uid": 0, "gid": 0},
        "args": ["/bin/sh", "-c", f"echo {marker} uid=$(id -u) hostname=$(hostname)"],
        "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
        "capabilities": {k: caps for k in ["bounding", "effective", "permitted", "ambient"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "in-runc",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ],
    "linux": {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [{"type": t} for t in ["pid", "network", "ipc", "uts", "mount", "cgroup"]],
        "maskedPaths": masked, "readonlyPaths": readonly,
    },
}
json.dump(spec, open(path, "w"), indent=2)
EOF
}

setup_runc() {
  busybox_bundle "$1" COMPAT-RUNC-OK
  script_at "$1/usr/local/bin/compat-runc" <<'EOF'
#!/bin/sh
# runc runs the busybox bundle once; cgroup2 is mounted first if PID 1 did not.
set -e
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
mountpoint -q /run || mount -t tmpfs tmpfs /run
echo "COMPAT-RUNC starting runc $(runc --version | head -1)"
runc run --bundle /bundle compat
echo "COMPAT-RUNC runc exited $?"
EOF
  printf '%s\n' >&3 /usr/local/bin/compat-runc
}

setup_containerd() {
  # ctr imports a busybox OCI archive made from the same bundle root.
  busybox_bundle "$1" unused
  local oci
  oci=$(mktemp -d)
  umoci init --layout "$oci/layout"
  umoci new --image "$oci/layout:latest"
  umoci unpack --image "$oci/layout:latest" "$oci/bundle" >/dev/null
  cp -a "$1/bundle/rootfs/." "$oci/bundle/rootfs/"
  umoci repack --image "$oci/layout:latest" "$oci/bundle"
  umoci config --image "$oci/layout:latest" --config.cmd /bin/sh
  mkdir -p "$1/opt"
  tar -C "$oci/layout" -cf "$1/opt/busybox-oci.tar" .
  rm -rf "$oci" "$1/bundle"
  script_at "$1/usr/local/bin/compat-containerd" <<'EOF'
#!/bin/sh
# containerd in the background, then ctr imports busybox and runs it once.
set -e
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
mountpoint -q /run || mount -t tmpfs tmpfs /run
echo "COMPAT-CTR starting containerd at $(cat /proc/uptime)"
containerd >/var/log/containerd.log 2>&1 &
until ctr version >/dev/null 2>&1; do sleep 1; done
echo "COMPAT-CTR containerd answers at $(cat /proc/uptime)"
ctr images import --base-name compat/busybox /opt/busybox-oci.tar
image=$(ctr images ls -q | head -1)
echo "COMPAT-CTR imported $image at $(cat /proc/uptime)"
ctr run --rm "$image" compat sh -c 'echo COMPAT-CTR-OK uid=$(id -u)'
echo "COMPAT-CTR ctr run exited $? at $(cat /proc/uptime)"
EOF
  printf '%s\n' >&3 /usr/local/bin/compat-containerd
}

# --- common steps

# What makes an image: its packages and every function that builds it.
key_of() {
  { echo "$SUITE ${PACKAGES[$1]}"; declare -f script_at "setup_$1" busybox_bundle build_root pack; } \
    | sha256sum | cut -c1-16
}

# debootstrap, the case's set-up, then what an image does not need.
build_root() {
  local case=$1 root=$2
  mkdir -p "$CACHE/debs"
  debootstrap --variant=minbase --include="${PACKAGES[$case]}" --cache-dir="$CACHE/debs" \
    "$SUITE" "$root" "$MIRROR" >"$root.debootstrap.log" 2>&1 \
    || { tail -30 "$root.debootstrap.log" >&2; return 1; }
  WORKDIR=/
  setup_"$case" "$root" 3>"$root.cmd" >&2
  echo "$WORKDIR" >"$root.workdir"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/etc/resolv.conf "$root"/etc/hostname \
    "$root"/dev/* "$root"/proc/* "$root"/sys/* "$root"/tmp/* "$root"/run/*
}

# umoci packs $1 (a root) as the OCI layout $2, tag latest, with Cmd from $1.cmd.
pack() {
  local root=$1 layout=$2 work
  work=$(dirname "$layout")/bundle
  umoci init --layout "$layout"
  umoci new --image "$layout:latest"
  umoci unpack --image "$layout:latest" "$work" >/dev/null
  rmdir "$work/rootfs"
  mv "$root" "$work/rootfs"
  umoci repack --image "$layout:latest" "$work"
  local args=(--config.env "PATH=$BASE_PATH" --config.workingdir "$(cat "$root.workdir")" --clear=config.cmd)
  while IFS= read -r arg; do args+=(--config.cmd "$arg"); done <"$root.cmd"
  umoci config --image "$layout:latest" "${args[@]}"
  umoci gc --layout "$layout"
  rm -rf "$work"
}

build() {
  local case=$1 dir started
  dir="$CACHE/$case-$(key_of "$case")"
  if [ -f "$dir/index.json" ]; then
    echo "$case $dir"
    return
  fi
  mkdir -p "$CACHE"
  # One build at a time (they share the .deb cache); another process may have built it meanwhile.
  exec 9>"$CACHE/.lock"
  flock 9
  if [ -f "$dir/index.json" ]; then
    flock -u 9
    echo "$case $dir"
    return
  fi
  started=$(date +%s)
  tmp=$(mktemp -d "$CACHE/.build-$case.XXXXXX")
  trap 'rm -rf "${tmp:-}"' EXIT
  log "building $case (${PACKAGES[$case]}) into $dir"
  build_root "$case" "$tmp/root"
  pack "$tmp/root" "$tmp/image/oci"
  rm -f "$tmp/root".*
  mv "$tmp/image/oci" "$tmp/oci" && rmdir "$tmp/image"
  echo "$case ${PACKAGES[$case]} built in $(($(date +%s) - started)) s" >"$tmp/oci/compat-build.txt"
  # Published with one rename: a concurrent or interrupted build never leaves a half image under $dir.
  mv -T "$tmp/oci" "$dir" 2>/dev/null || log "$case: $dir appeared meanwhile; keeping it"
  rm -rf "$tmp"
  trap - EXIT
  # Older builds of this case (other keys) go: the cache holds one image per case.
  find "$CACHE" -mindepth 1 -maxdepth 1 -name "$case-*" ! -path "$dir" -exec rm -rf {} +
  flock -u 9
  log "$case: $(du -sh "$dir" | cut -f1) in $(($(date +%s) - started)) s"
  echo "$case $dir"
}

if [ "${1:-}" = --list ]; then
  printf '%s\n' "${CASES[@]}"
  exit 0
fi
[ $# -gt 0 ] || { echo "usage: $0 CASE... | --list   (cases: ${CASES[*]})" >&2; exit 2; }
for case in "$@"; do
  [ -n "${PACKAGES[$case]:-}" ] || { echo "compat-images: unknown case $case (cases: ${CASES[*]})" >&2; exit 2; }
done
for case in "$@"; do
  build "$case"
done
