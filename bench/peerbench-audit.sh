#!/usr/bin/env bash
# Issue 5's speed check: peerbench http_ka and connect_rate for the gateway with audit to stdout
# only (no spool) and with a json file sink fed from the spool, alternating, RUNS rounds each,
# squid alongside as a fixed reference. Prints both tables; compare the candidate rows.
#   SKIP_INSTALL=1 ./bench/peerbench-audit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PEERS="${PEERS:-squid}" WORKLOADS="${WORKLOADS:-http_ka connect_rate}" RUNS="${RUNS:-3}"
for round in 1 2; do
  for cfg in stdout spool; do
    echo "=== round $round: audit $cfg ==="
    GATEWAY_CONFIG="$PWD/bench/peerbench-gateway-$cfg.yaml" ./bench/peerbench.sh 2>&1 | grep -E '^\|' || true
  done
done
