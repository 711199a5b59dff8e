#!/usr/bin/env bash
# Instructions the CA executes per CreateCertificate, counted by callgrind.
#
# Throughput on the shared 2-core machines drifts by ±15% between runs; instruction
# counts do not (two runs of one binary agree within 0.5%). Use this to compare two
# builds of the server's own code; it does not see the kernel, cache misses or
# scheduling, so confirm a gain end to end with alternating ca-bench runs
# (docs/BENCHMARKS.md).
#
#   cargo build --release -p ca-server -p ca-bench
#   scripts/bench-instructions.sh [path/to/ca-server] [seconds]
#
# With KEEP_PROFILE=FILE the callgrind profile is kept there, for
# `callgrind_annotate --inclusive=yes FILE` (build with `--profile profiling` and pass
# target/profiling/ca-server to see inlined frames by source line).
#
# It runs ca-bench at concurrency 8 against the server under valgrind, zeroes the
# counters once requests flow, counts for the given seconds (default 15), and divides
# the instructions by the requests the server counted in that window.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
server="$(realpath "${1:-$root/target/release/ca-server}")"
seconds="${2:-15}"
bench="$root/target/release/ca-bench"
for tool in valgrind callgrind_control curl; do
  command -v "$tool" >/dev/null || { echo "bench-instructions: needs $tool" >&2; exit 1; }
done
[ -x "$server" ] && [ -x "$bench" ] || {
  echo "bench-instructions: build first: cargo build --release -p ca-server -p ca-bench" >&2
  exit 1
}

work="$(mktemp -d)"
bench_pid=""
cleanup() {
  [ -n "$bench_pid" ] && kill "$bench_pid" 2>/dev/null || true
  pkill -f "callgrind-out-file=$work/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/ca-server" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --callgrind-out-file=$work/cg.%p "$server" "\$@" 2>>"$work/valgrind.log"
EOF
chmod +x "$work/ca-server"

# A CA under valgrind takes a minute or more to start.
E2E_START_TIMEOUT_SECS=600 "$bench" --ca-bin "$work/ca-server" --concurrency 8 \
  --seconds 100000 --max-requests 100000000 >"$work/bench.log" 2>&1 &
bench_pid=$!

# The serving process is the one whose command line says `serve`.
vg=""
endpoints=""
for _ in $(seq 600); do
  vg="$(pgrep -f "callgrind-out-file=$work/.* serve " | head -1 || true)"
  if [ -n "$vg" ]; then
    state="$(tr '\0' '\n' <"/proc/$vg/cmdline" | grep -A1 -- '^--state-dir$' | tail -1)"
    [ -f "$state/endpoints.json" ] && endpoints="$state/endpoints.json" && break
  fi
  kill -0 "$bench_pid" 2>/dev/null || { cat "$work/bench.log" >&2; exit 1; }
  sleep 1
done
[ -n "$endpoints" ] || { echo "bench-instructions: the CA did not start" >&2; exit 1; }
http="$(sed -E 's/.*"http":"([^"]+)".*/\1/' "$endpoints")"
requests() {
  curl -s "http://$http/metrics" | awk '/^ca_requests_total/ { s += $2 } END { print s + 0 }'
}

for _ in $(seq 600); do
  [ "$(requests)" -gt 50 ] && break
  sleep 1
done
sleep 3
before="$(requests)"
callgrind_control -z "$vg" >/dev/null 2>&1
sleep "$seconds"
after="$(requests)"
callgrind_control -d "$vg" >/dev/null 2>&1
sleep 2
dump="$(ls "$work"/cg."$vg".* 2>/dev/null | grep -v "cg.$vg$" | head -1)"
instructions="$(awk '/^summary:/ { print $2; exit }' "$dump")"
served=$((after - before))
[ "$served" -gt 0 ] || { echo "bench-instructions: no requests were served" >&2; exit 1; }
if [ -n "${KEEP_PROFILE:-}" ]; then
  cp "$dump" "$KEEP_PROFILE"
  echo "profile: $KEEP_PROFILE"
fi
echo "server: $server"
echo "requests counted: $served"
echo "instructions: $instructions"
echo "instructions per request: $((instructions / served))"
