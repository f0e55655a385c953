#!/usr/bin/env bash
# Prints the path of a Python interpreter that has the gRPC packages of examples/python/requirements.txt,
# creating its virtual environment the first time. The environment is cached outside the checkout,
# under $IGNITE_CACHE (default /var/cache/ignite), keyed by the hash of the requirements, so CI installs
# it once per change of the pinned versions. Needs python3 with venv and PyPI (or a mirror pip knows).
#
# Usage: scripts/python-grpc.sh           prints /var/cache/ignite/python/<hash>/bin/python
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
requirements="$here/examples/python/requirements.txt"
cache="${IGNITE_CACHE:-/var/cache/ignite}"
log() { echo "python-grpc: $*" >&2; }

key=$( { cat "$requirements" "${BASH_SOURCE[0]}"; python3 --version 2>&1; } | sha256sum | cut -c1-16)
out="$cache/python/$key"
if [ -x "$out/bin/python" ] && [ -f "$out/.complete" ]; then
  echo "$out/bin/python"
  exit 0
fi

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  log "installing python3-venv (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq python3-venv >&2
fi
mkdir -p "$cache/python"
# Built in a private directory and published with one rename, so an interrupted install never leaves
# an environment that a later run would trust.
work=$(mktemp -d "$cache/python/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "creating a virtual environment with $(tr '\n' ' ' < <(grep -v '^#' "$requirements"))"
python3 -m venv "$work"
"$work/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" >&2
touch "$work/.complete"
rm -rf "$out"
mv "$work" "$out"
# The environment's scripts name the directory they were made in; the interpreter is all we use.
log "ready: $out/bin/python"
echo "$out/bin/python"
