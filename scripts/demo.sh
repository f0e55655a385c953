#!/usr/bin/env bash
# The main job on embedded defaults: installs what is needed, builds ignite and the guest kernel (cached
# outside the checkout), and runs the demo fleet of examples/fleet the GitOps way:
#
#   1. a local registry on 127.0.0.1:5000 serves a busybox image built here with umoci and pushed
#      with skopeo (127.0.0.1:5000/demo/busybox:1);
#   2. a local git repository (/var/lib/ignite-demo/fleet) holds examples/fleet/*.yaml under vms/;
#   3. `ignite daemon --gitops` follows it, pulls the image, builds root disks and boots the microVMs;
#   4. the script shows `ignite ps` until the fleet converged, then the VMs' output.
#
# The daemon keeps running afterwards, so you can change the fleet by committing to the repository.
# `bash scripts/demo.sh down` removes the VMs (by deleting their manifests from git), then stops the
# daemon and the registry and removes what the demo created.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

DEMO=/var/lib/ignite-demo
REPO=$DEMO/fleet
REGISTRY=127.0.0.1:5000
IMAGE=$REGISTRY/demo/busybox:1
export IGNITE_SOCKET=/run/ignite/ignite.sock
# The demo starts its own daemon (with --gitops); the CLI must not autostart a plain one.
export IGNITE_AUTOSTART=0
git_demo() { git -C "$REPO" -c user.name="ignite demo" -c user.email=demo@localhost "$@"; }
say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }
registry_answers() { (exec 3<>/dev/tcp/127.0.0.1/5000) 2>/dev/null; }
daemon_answers() { ignite ps >/dev/null 2>&1; }

down() {
  if [ -d "$REPO/.git" ] && daemon_answers; then
    say "removing the fleet: deleting its manifests from git"
    # Only the manifests: a source whose path vanished is an error, and changes nothing.
    git_demo rm -q --ignore-unmatch 'vms/*.yaml'
    git_demo commit -q --allow-empty -m "demo down: remove the fleet"
    for _ in $(seq 120); do
      [ -z "$(ignite ps -a -q 2>/dev/null)" ] && break
      sleep 1
    done
    left=$(ignite ps -a -q 2>/dev/null || true)
    if [ -n "$left" ]; then
      say "still there after 2 minutes, removing by force:" $left
      # shellcheck disable=SC2086
      ignite rm --force $left
      for _ in $(seq 60); do
        [ -z "$(ignite ps -a -q 2>/dev/null)" ] && break
        sleep 1
      done
    fi
    ignite ps -a
  fi
  for pidfile in "$DEMO/daemon.pid" "$DEMO/registry.pid"; do
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  sleep 1
  ip link del ignite0 2>/dev/null || true
  # The daemon's base firewall chains (the VMs' own rules went with them).
  iptables -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j IGNITE-DNAT 2>/dev/null || true
  iptables -t nat -D OUTPUT -m addrtype --dst-type LOCAL -j IGNITE-DNAT 2>/dev/null || true
  iptables -t nat -D POSTROUTING -j IGNITE-POSTROUTING 2>/dev/null || true
  iptables -D FORWARD -j IGNITE-FORWARD 2>/dev/null || true
  iptables -D INPUT -i ignite0 -j IGNITE-INPUT 2>/dev/null || true
  for chain in nat:IGNITE-DNAT nat:IGNITE-POSTROUTING filter:IGNITE-FORWARD filter:IGNITE-INPUT; do
    iptables -t "${chain%%:*}" -F "${chain#*:}" 2>/dev/null && iptables -t "${chain%%:*}" -X "${chain#*:}" 2>/dev/null || true
  done
  rm -rf "$DEMO"
  say "the demo fleet, its daemon and its registry are gone (pulled images stay in /var/lib/ignite, the kernel in /var/cache/ignite)"
}

if [ "${1:-}" = down ]; then
  down
  exit 0
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/demo.sh [down]" >&2
  exit 2
fi

bash scripts/install-deps.sh
say "building ignite (release)"
cargo build --release -p ignite -p ignite-init
install -m 0755 target/release/ignite target/release/ignite-init /usr/local/bin/
say "the guest kernel (built once, ~8 minutes, cached in /var/cache/ignite)"
kernel=$(bash e2e/guest-kernel.sh)
mkdir -p "$DEMO"

# 1. The registry and the image.
if ! registry_answers; then
  say "starting a registry on $REGISTRY (storage in $DEMO/registry)"
  cat >"$DEMO/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $DEMO/registry
http:
  addr: $REGISTRY
EOF
  setsid nohup docker-registry serve "$DEMO/registry.yml" >"$DEMO/registry.log" 2>&1 &
  echo $! >"$DEMO/registry.pid"
  for _ in $(seq 50); do registry_answers && break; sleep 0.2; done
  registry_answers || { cat "$DEMO/registry.log" >&2; exit 1; }
fi
say "building $IMAGE (busybox, a web page) with umoci and pushing it with skopeo"
oci=$(mktemp -d)
trap 'rm -rf "$oci"' EXIT
umoci init --layout "$oci/layout"
umoci new --image "$oci/layout:1"
umoci unpack --image "$oci/layout:1" "$oci/bundle" >/dev/null
rootfs=$oci/bundle/rootfs
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/www" "$rootfs/tmp"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $(busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" >"$rootfs/etc/passwd"
echo "root:x:0:" >"$rootfs/etc/group"
echo "hello from an ignite microVM" >"$rootfs/www/index.html"
umoci repack --image "$oci/layout:1" "$oci/bundle"
umoci config --image "$oci/layout:1" --config.cmd /bin/sh
skopeo copy -q --dest-tls-verify=false "oci:$oci/layout:1" "docker://$IMAGE"

# 2. The fleet in git.
if [ ! -d "$REPO/.git" ]; then
  git init -q -b main "$REPO"
fi
mkdir -p "$REPO/vms"
cp examples/fleet/*.yaml "$REPO/vms/"
echo "The demo fleet: one VM manifest per file; ignite daemon --gitops follows this directory." >"$REPO/vms/README"
git_demo add vms
git_demo commit -q -m "demo fleet from examples/fleet" || true
say "fleet repository: $REPO ($(git_demo log --oneline -1))"

# 3. The daemon.
if daemon_answers; then
  say "an ignite daemon already answers on $IGNITE_SOCKET; using it"
else
  say "starting ignite daemon --gitops $REPO --path vms (log: $DEMO/daemon.log)"
  setsid nohup ignite --log info daemon --gitops "$REPO" --branch main --path vms --interval 5s \
    --kernel "$kernel" >"$DEMO/daemon.log" 2>&1 &
  echo $! >"$DEMO/daemon.pid"
  for _ in $(seq 100); do daemon_answers && break; sleep 0.2; done
  daemon_answers || { cat "$DEMO/daemon.log" >&2; exit 1; }
fi

# 4. Converging.
if ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
  say "this host has no hardware virtualization: KVM emulates the guest kernel (~1.5 M instructions/s),"
  say "so each microVM needs about two minutes to boot."
fi
start=$SECONDS
converged() {
  local out
  out=$(ignite ps -a)
  grep -qE '^hello +(Stopped|Succeeded|Completed)' <<<"$out" && grep -qE '^web +Running' <<<"$out" &&
    ignite logs web 2>/dev/null | grep -q 'ignite-init: starting'
}
until converged; do
  if [ $((SECONDS - start)) -gt 900 ]; then
    ignite ps -a
    say "the fleet did not converge in 15 minutes; see $DEMO/daemon.log and ignite events"
    exit 1
  fi
  printf '\033[2m--- %ss ---\033[0m\n' $((SECONDS - start))
  ignite ps -a
  sleep 10
done
say "converged in $((SECONDS - start))s"
ignite ps -a
say "hello's console (ignite logs hello):"
ignite logs hello | grep -E 'IGNITE-DEMO-HELLO|inet |bye|exit status' || true
say "web through the host's port 8080:"
for _ in $(seq 30); do
  page=$(busybox wget -q -O- http://127.0.0.1:8080/ 2>/dev/null) && break
  sleep 2
done
echo "${page:-web did not answer on 127.0.0.1:8080 yet; try: busybox wget -O- http://127.0.0.1:8080/}"
cat >&2 <<EOF

The fleet keeps running. Try:
  ignite ps -a                      # the VMs, their phase, address, revision
  ignite dashboard                  # the live view (q quits)
  ignite events                     # what happened
  cd $REPO && \$EDITOR vms/web.yaml && git commit -am change   # the daemon follows within 5 s
  bash scripts/demo.sh down         # remove the fleet, the daemon and the registry
EOF
