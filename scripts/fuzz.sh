#!/usr/bin/env bash
# Fuzzes the parsers that read untrusted input (fuzzing/src/lib.rs says what each
# target checks) with libFuzzer through cargo-fuzz.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 600 seconds, every target
#   FUZZ_JOBS=2 scripts/fuzz.sh 60            two targets at a time
#
# New inputs that reach new code are added to fuzz/corpus/<target>/ (commit the ones
# worth keeping: `cargo test -p ca-fuzz-targets` replays them). A crash stops its target,
# leaves the input in fuzz/artifacts/<target>/, and makes the script exit 1; copy it
# to fuzz/regressions/<target>/ once fixed. Needs the nightly toolchain; installs
# cargo-fuzz if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^istio-ca-fuzz$')
fi
jobs=${FUZZ_JOBS:-1}

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

# Build every target once, so that parallel runs do not each build.
(cd fuzz && cargo +nightly fuzz build --release)

logs=$(mktemp -d)
run() {
  local t=$1
  mkdir -p "fuzz/corpus/$t"
  local before
  before=$(find "fuzz/corpus/$t" -type f | wc -l)
  if (cd fuzz && cargo +nightly fuzz run --release "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1) \
        >"$logs/$t.log" 2>&1; then
    status=ok
  else
    status=CRASH
  fi
  local runs after
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -n 1)
  after=$(find "fuzz/corpus/$t" -type f | wc -l)
  printf '%-14s %-5s %12s runs in %ss  corpus %d -> %d\n' "$t" "$status" "${runs:-?}" "$seconds" "$before" "$after"
  if [ "$status" != ok ]; then
    tail -n 40 "$logs/$t.log" >&2
    return 1
  fi
}

failed=0
running=0
for t in "${targets[@]}"; do
  run "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
rm -rf "$logs"
exit "$failed"
