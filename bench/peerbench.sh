#!/usr/bin/env bash
# Runs ../shared/peerbench with egress-gateway as the candidate (release build), next to squid,
# tinyproxy, dante, microsocks and sslocal, on loopback. Extra env knobs pass through to run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p egress-gateway
mkdir -p /tmp/peerbench-work
rm -f /tmp/peerbench-work/egress-gateway-audit.jsonl
export CANDIDATE_NAME=egress-gateway
export CANDIDATE_HTTP=127.0.0.1:28128
export CANDIDATE_SOCKS=127.0.0.1:28180
export CANDIDATE_CMD="$PWD/target/release/egress-gateway run --config $PWD/bench/peerbench-gateway.yaml"
export EGRESS_LOG=warn
exec ../shared/peerbench/run.sh
