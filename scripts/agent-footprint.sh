#!/usr/bin/env bash
# Measures node-identity's idle memory after several renewals: the CA (release) and the
# agent as packaged (profile "agent") on 127.0.0.1, 20-second certificates, RSS read from /proc after the
# agent has renewed a few times and gone idle again. Usage: scripts/agent-footprint.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-65}
cargo build --release -q -p ca-server
cargo build --profile agent -q -p node-identity
work=$(mktemp -d)
cleanup() { kill "${agent:-}" "${ca:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
target/release/ca-server --state-dir "$work/ca" serve --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 2>"$work/ca.log" &
ca=$!
for _ in $(seq 100); do [ -f "$work/ca/endpoints.json" ] && break; sleep 0.1; done
grpc=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['grpc'])" "$work/ca/endpoints.json")
target/release/ca-server --state-dir "$work/ca" export-bundle --namespace vm --service-account footprint --out "$work/bootstrap" >/dev/null
target/agent/node-identity run --ca-address "$grpc" --bootstrap-dir "$work/bootstrap" \
  --certs-dir "$work/certs" --status-file "$work/status.json" --ttl 20s 2>"$work/agent.log" &
agent=$!
sleep "$secs"
# Read between renewals: right after one, the agent is idle for ~9 s.
renewals=$(grep -c "published a new certificate" "$work/agent.log")
last=$(grep "published a new certificate" "$work/agent.log" | tail -n 1 | cut -c1-40)
echo "renewals: $renewals (last: $last)"
grep -E "^(VmRSS|VmHWM|RssAnon|RssFile|Threads)" "/proc/$agent/status"
