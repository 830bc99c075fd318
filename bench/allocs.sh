#!/usr/bin/env bash
# Heap allocations per request, counted exactly: uprobes on mimalloc's entry points in the release
# gateway (`perf probe`), read with `perf stat` while N keep-alive HTTP requests (one curl, one
# connection, N URLs) and then N new CONNECT tunnels (one curl each) go through it. The counts do
# not depend on the machine's speed or noise, so they show what a change to the request path did
# to its allocations; callgrind (bench/callgrind.sh) shows what it did to its instructions.
#
# Prints, per request and per thread kind (the runtime's workers, the audit writer), the calls of
# mi_malloc_aligned (Rust's allocations), mi_realloc_aligned and mi_free, each run minus the
# warm-up request. Needs root (uprobes) and perf. EGRESS_GATEWAY_BIN=PATH counts that binary
# instead of building this tree's.
#
#   bench/allocs.sh [N]        (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-perf)" >&2; exit 2; }
bin=${EGRESS_GATEWAY_BIN:-}
if [[ -z $bin ]]; then
  cargo build --release --locked -p egress-gateway >/dev/null
  bin=target/release/egress-gateway
fi
bin=$(realpath "$bin")
work=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  perf probe -q -d 'egress_allocs:*' 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The upstream, as in bench/callgrind.sh: python's http.server on 127.0.0.1:27080, HTTP/1.1.
mkdir -p "$work/www" && printf 'ok\n' >"$work/www/x"
(cd "$work/www" && exec python3 -c 'import http.server as h; h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=27080, bind="127.0.0.1", protocol="HTTP/1.1")') >/dev/null 2>&1 &
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:27080/x && break; sleep 0.1; done
mkdir -p "$work/etc" && sed "s#/tmp/peerbench-work/egress-gateway-audit.jsonl#$work/audit.jsonl#" bench/peerbench-gateway.yaml >"$work/etc/gateway.yaml"

perf probe -q -d 'egress_allocs:*' 2>/dev/null || true
perf probe -q -x "$bin" -a egress_allocs:egress_malloc=mi_malloc_aligned -a egress_allocs:egress_realloc=mi_realloc_aligned -a egress_allocs:egress_free=mi_free

EGRESS_LOG=warn "$bin" run --config "$work/etc/gateway.yaml" >"$work/gateway.log" 2>&1 &
gw=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:28190/readyz && break; sleep 0.1; done
curl -s -o /dev/null -x http://127.0.0.1:28128 http://127.0.0.1:27080/x # warm-up: pools, caches

urls=()
for _ in $(seq "$n"); do urls+=("http://127.0.0.1:27080/x"); done
keepalive() { curl -s -x http://127.0.0.1:28128 "${urls[@]}" >/dev/null; }
connects() { for _ in $(seq "$n"); do curl -s -p -x http://127.0.0.1:28128 http://127.0.0.1:27080/x >/dev/null; done; }

# Counts the probes of the gateway's threads while "$@" runs; prints them per request.
count() {
  local out="$work/stat.$RANDOM"
  perf stat -x, --per-thread -e 'egress_allocs:*' -p "$gw" -o "$out" &
  local stat=$!
  sleep 0.5
  "$@"
  sleep 0.5 # the audit writer's last tick
  kill -INT "$stat"
  wait "$stat" || true
  # thread name-tid,count,,event,...: sum per (thread kind, event).
  grep -v '^#' "$out" | awk -F, -v n="$n" '
    $2 ~ /^[0-9]+$/ {
      split($1, t, "-"); kind = (t[1] ~ /audit/) ? "audit writer" : "workers";
      ev = $4; sub(/^egress_allocs:egress_/, "", ev); c[kind " " ev] += $2
    }
    END { for (k in c) printf "  %-22s %8.2f per request\n", k, c[k] / n }' | sort
}

echo "requests: $n"
echo "keep-alive HTTP requests:"
count keepalive
echo "new CONNECT tunnels (decision, dial, relay, close):"
count connects
kill -TERM "$gw"
wait "$gw" || true
