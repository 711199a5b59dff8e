#!/usr/bin/env bash
# Soak: ca-bench at concurrency 64 for SECONDS (default 1800), then at half the rate it
# reached for as long again, against the release server with retention pruning in the
# loop (--audit-retention 5m, pruning every 30 s; 5-minute certificates kept indexed
# 5 minutes past expiry, so that the store stops growing after about 10 minutes),
# printing the server's resident memory, open file descriptors and audit store size
# every minute. Build first: cargo build --release -p ca-server -p ca-bench
# Usage: scripts/soak.sh [SECONDS] [sqlite|postgres] [extra ca-bench flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-1800}
store=${2:-sqlite}
shift $(( $# > 2 ? 2 : $# ))
target/release/ca-bench --store "$store" --concurrency 64 --seconds "$seconds" \
  --max-requests 100000000 \
  --server-arg=--audit-retention=5m --server-arg=--audit-prune-interval=30s \
  --server-arg=--default-ttl=5m --server-arg=--expiry-grace=5m "$@" &
bench=$!
trap 'kill $bench 2>/dev/null || true' EXIT
echo "| minute | server RSS MiB | open fds | store MiB |"
echo "|---:|---:|---:|---:|"
# ca-bench runs SECONDS at full load, then SECONDS at half that load: sample until it
# exits, however long that is.
for ((m = 0; ; m++)); do
  pid=$(pgrep -n -f 'target/release/ca-server.*serve' || true)
  if [ -n "$pid" ]; then
    rss=$(awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status" 2>/dev/null || echo -)
    fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
    state=$(tr '\0' '\n' < "/proc/$pid/cmdline" | sed -n '/^--state-dir$/{n;p}')
    if [ "$store" = sqlite ] && [ -n "$state" ]; then
      size=$(du -sm "$state" 2>/dev/null | cut -f1)
    else
      size=$(du -sm /tmp/ca-pg-* 2>/dev/null | awk '{s += $1} END {print s}')
    fi
    echo "| $m | $rss | $fds | $size |"
  fi
  kill -0 $bench 2>/dev/null || break
  sleep 60
done
wait $bench
