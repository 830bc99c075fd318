#!/usr/bin/env bash
# Instructions per request, counted by callgrind: stable on a noisy shared machine, so this is
# the number a speed change is judged by (then confirmed with peerbench's ratios).
#
# Runs the release gateway under `valgrind --tool=callgrind` with the peerbench policy and a file
# audit sink, against a local upstream, three times: with no request (start, ready, drain), with
# N keep-alive HTTP requests on one connection (one curl, N URLs), and with N new CONNECT tunnels
# (one curl each). Only the gateway runs under callgrind, so the clients cost nothing here.
# Prints the total instructions (Ir) of each run and (run - idle) / N.
#
# Two things callgrind counts differently from the CPU: valgrind's virtual CPU has no SHA
# extensions, so ring hashes the audit chain with its AVX code (about 10x the instructions of
# SHA-NI, which production x86 CPUs and this machine have); and `rep movsb` (glibc's memcpy for
# large copies, e.g. a future moved into its task) counts one instruction per byte. Both are
# visible by name in `callgrind_annotate`; keep the counts comparable run to run, not absolute.
# CALLGRIND_KEEP=DIR keeps the three profiles for `callgrind_annotate`. EGRESS_GATEWAY_BIN=PATH
# counts that binary instead of building and counting this tree's (to compare two builds).
#
#   bench/callgrind.sh [N]        (default 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
bin=${EGRESS_GATEWAY_BIN:-}
if [[ -z $bin ]]; then
  cargo build --release --locked -p egress-gateway >/dev/null
  bin=target/release/egress-gateway
fi
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${CALLGRIND_KEEP:-}" ] && cp "$work"/callgrind.* "$CALLGRIND_KEEP"/ 2>/dev/null; rm -rf "$work"' EXIT

# The upstream: python's http.server on 127.0.0.1:27080 (what the policy allows), speaking
# HTTP/1.1 so that the gateway keeps its upstream connection across keep-alive requests.
mkdir -p "$work/www" && printf 'ok\n' >"$work/www/x"
(cd "$work/www" && exec python3 -c 'import http.server as h; h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=27080, bind="127.0.0.1", protocol="HTTP/1.1")') >/dev/null 2>&1 &
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:27080/x && break; sleep 0.1; done

# The config in a directory of its own: the gateway watches its config's directory, and audit
# writes next to it would wake the watcher on every write (not what a deployment looks like).
mkdir -p "$work/etc" && sed "s#/tmp/peerbench-work/egress-gateway-audit.jsonl#$work/audit.jsonl#" bench/peerbench-gateway.yaml >"$work/etc/gateway.yaml"

# Runs the gateway under callgrind while "$@" runs as the client; prints the run's total Ir.
measure() {
  local out="$work/callgrind.$RANDOM"
  EGRESS_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin" run --config "$work/etc/gateway.yaml" 2>"$work/valgrind.log" &
  local pid=$!
  for _ in $(seq 600); do
    curl -s -o /dev/null http://127.0.0.1:28190/readyz && break
    sleep 0.1
  done
  "$@"
  kill -TERM "$pid"
  wait "$pid" || true
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'
}

urls=()
for _ in $(seq "$n"); do urls+=("http://127.0.0.1:27080/x"); done
keepalive() { curl -s -x http://127.0.0.1:28128 "${urls[@]}" >/dev/null; }
connects() { for _ in $(seq "$n"); do curl -s -p -x http://127.0.0.1:28128 http://127.0.0.1:27080/x >/dev/null; done; }

idle=$(measure true)
ka=$(measure keepalive)
ct=$(measure connects)
echo "requests: $n"
echo "idle run:                 $idle Ir"
echo "keep-alive HTTP run:      $ka Ir  -> $(( (ka - idle) / n )) Ir per request"
echo "new CONNECT tunnels run:  $ct Ir  -> $(( (ct - idle) / n )) Ir per tunnel (decision, dial, relay, close)"
