#!/usr/bin/env bash
# Fuzzing with cargo-fuzz (libFuzzer), issue 15: the parsers a guest, an image or a manifest reaches.
#
#   bash scripts/fuzz.sh                     # every target for $FUZZ_SECONDS (default 15) each: what CI runs
#   bash scripts/fuzz.sh TARGET [SECONDS]    # one target (see fuzz/Cargo.toml for the list), 60 s by default
#   bash scripts/fuzz.sh TARGET --repro FILE # runs one input (a crash in fuzz/artifacts/TARGET/) again
#   bash scripts/fuzz.sh --list
#
# Each target starts from its committed seeds (fuzz/corpus/TARGET, written by fuzz/seeds.py); what it
# finds new goes to a scratch directory (kept with FUZZ_KEEP_CORPUS=1), so runs never dirty the tree.
# A crash, a panic, a leak, an input slower than 10 s or a process above 2 GiB fails the run; its input
# is left in fuzz/artifacts/TARGET/; `bash scripts/fuzz.sh TARGET --repro FILE` runs that one input again.
# Every crash found becomes a unit test in the crate it was in (and its input a seed).
#
# Stable toolchain only. cargo-fuzz passes rustc flags that stable refuses (`-Zsanitizer=address`,
# `-Zunstable-options`...); RUSTC_BOOTSTRAP=1 lets the stable compiler accept them, and stable Rust ships
# the AddressSanitizer runtime for x86_64-unknown-linux-gnu, so the default `--sanitizer address` works.
# (`FUZZ_SANITIZER=none` builds without it: faster, but memory errors in unsafe code go unseen.)
#
# The instrumented build has its own target directory, cached outside the checkout like the guest
# kernel ($FUZZ_TARGET_DIR, default $IGNITE_CACHE/fuzz-target, IGNITE_CACHE=/var/cache/ignite) so that
# CI on a machine that fuzzed before rebuilds only the workspace crates; a machine's first build also
# compiles every dependency of the controller (several minutes on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

targets=(virtio_blk virtio_net_tx vsock virtio_mmio manifest config_drive tar_unpack)
if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${targets[@]}"
  exit 0
fi

if [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

export RUSTC_BOOTSTRAP=1
# libgit2 (the controller's git2) and another bundled C library both define a global `lookup_table`
# (llhttp's); ASan reports that as an ODR violation at start-up, before any input runs.
export ASAN_OPTIONS="detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# The workspace's own CARGO_TARGET_DIR, if set, must not receive instrumented artifacts.
unset CARGO_TARGET_DIR
target_dir="${FUZZ_TARGET_DIR:-${IGNITE_CACHE:-/var/cache/ignite}/fuzz-target}"
sanitizer="${FUZZ_SANITIZER:-address}"
# `manifest` (the controller) is a feature so that the other targets can be built alone while hacking on them.
fuzz_args=(--fuzz-dir fuzz --target-dir "$target_dir" --sanitizer "$sanitizer" --features manifest)

if [ "${2:-}" = "--repro" ]; then
  exec cargo fuzz run "${fuzz_args[@]}" "$1" "$3" -- -rss_limit_mb=2048 -timeout=10
fi

if [ $# -ge 1 ]; then
  run=("$1")
  seconds="${2:-60}"
else
  run=("${targets[@]}")
  seconds="${FUZZ_SECONDS:-15}"
fi

start=$(date +%s)
echo "== fuzz: building ${run[*]} (sanitizer $sanitizer, target dir $target_dir)"
if [ ${#run[@]} -eq 1 ]; then
  cargo fuzz build "${fuzz_args[@]}" "${run[0]}"
else
  cargo fuzz build "${fuzz_args[@]}"
fi
echo "== fuzz: build took $(($(date +%s) - start)) s"

scratch=$(mktemp -d)
if [ -z "${FUZZ_KEEP_CORPUS:-}" ]; then
  trap 'rm -rf "$scratch"' EXIT
else
  echo "fuzz: new corpus entries are kept in $scratch"
fi

passed=0
failed=()
for t in "${run[@]}"; do
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  log="$scratch/$t.log"
  status=0
  # -rss_limit_mb: a guest or a layer must not make the host allocate without bound.
  # -timeout: one input may take at most 10 s (a hang is a finding like a crash).
  cargo fuzz run "${fuzz_args[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  # The last status line: "#RUNS DONE cov: N ft: N corp: N/Nb ..." (or "pulse"/"NEW" if it stopped early).
  summary=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
  if [ $status -eq 0 ]; then
    passed=$((passed + 1))
    printf 'fuzz %-14s ok    %s runs in %s s: %s\n' "$t" "${execs:-?}" "$seconds" "$summary"
  else
    failed+=("$t")
    printf 'fuzz %-14s FAIL  (exit %s) %s\n' "$t" "$status" "$summary"
    # The panic or sanitizer report and the input's path.
    grep -E -A40 'panicked at|ERROR: (AddressSanitizer|libFuzzer)|SUMMARY|Test unit written|deadly signal' "$log" |
      head -80 || tail -40 "$log"
  fi
done
echo "== fuzz: took $(($(date +%s) - start)) s"
echo "fuzz: $passed passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failing targets: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
