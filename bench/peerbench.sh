#!/usr/bin/env bash
# Runs ../shared/peerbench with egress-gateway as the candidate (release build), next to squid,
# tinyproxy, dante, microsocks and sslocal, on loopback. Extra env knobs pass through to run.sh.
# GATEWAY_CONFIG picks the gateway's config (default bench/peerbench-gateway.yaml: audit to a file);
# bench/peerbench-audit.sh compares audit settings.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p egress-gateway
mkdir -p /tmp/peerbench-work
rm -rf /tmp/peerbench-work/egress-gateway-audit.jsonl /tmp/peerbench-work/egress-gateway-spool
config=${GATEWAY_CONFIG:-$PWD/bench/peerbench-gateway.yaml}
export CANDIDATE_NAME=egress-gateway
export CANDIDATE_HTTP=127.0.0.1:28128
export CANDIDATE_SOCKS=127.0.0.1:28180
export CANDIDATE_CMD="$PWD/target/release/egress-gateway run --config $config"
export EGRESS_LOG=warn
exec ../shared/peerbench/run.sh
