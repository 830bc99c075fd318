#!/usr/bin/env bash
# Real CPU per unit of work of two gateway binaries, measured alternately in the same run: the
# quick check of a speed change between callgrind (instructions) and a full peerbench (ratios to
# direct and to the peers).
#
# Starts nginx (1 KiB file) on 127.0.0.1:27080, then for each of ROUNDS rounds and each binary
# (order alternating): starts the gateway pinned to core 1 with the peerbench config (file audit
# sink), drives one workload from core 0 for DURATION seconds and prints the gateway's CPU
# (utime + stime of the process, from /proc) per request. Workloads: http_ka (wrk, 64
# keep-alive connections, absolute-form GET) and connect_rate (peerbench's pbload, a new CONNECT
# tunnel per request, 64 concurrent; needs /tmp/peerbench-work/pbload-target from a peerbench
# run). The medians per binary and their ratio close the output. PERF=1 also records a
# cpu-clock call-graph profile of each binary's last run (perf.data.A / perf.data.B in $OUT).
#
# Either binary may be netio's floor proxy (`cargo build --release --example floor_proxy -p
# egress-netio`: target/release/examples/floor_proxy), the least a forward proxy can spend on the
# same work on this machine: the gateway's cost is then read as a multiple of that floor.
#
#   bench/cpu-ab.sh A_BINARY B_BINARY [http_ka|connect_rate]
#   ROUNDS=5 DURATION=5 OUT=/tmp/cpu-ab
set -euo pipefail
cd "$(dirname "$0")/.."
a=$(realpath "$1") b=$(realpath "$2") workload=${3:-http_ka}
rounds=${ROUNDS:-5} duration=${DURATION:-5} out=${OUT:-/tmp/cpu-ab}
pbload=/tmp/peerbench-work/pbload-target/release/pbload
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "needs wrk and nginx" >&2; exit 2; }
[[ $workload != connect_rate || -x $pbload ]] || { echo "needs $pbload (run bench/peerbench.sh once)" >&2; exit 2; }
for port in 27080 28128 28190; do
  ! (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || { echo "port $port is in use" >&2; exit 2; }
done
mkdir -p "$out" && rm -f "$out"/result.*
work=$(mktemp -d) && chmod 755 "$work"  # nginx workers run as nobody
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

mkdir -p "$work/www" "$work/tmp" "$work/etc"
head -c 1024 /dev/urandom >"$work/www/1k" && chmod -R a+rX "$work/www"
cat >"$work/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx-error.log warn;
events { worker_connections 16384; }
http {
  access_log off; client_body_temp_path $work/tmp; proxy_temp_path $work/tmp;
  fastcgi_temp_path $work/tmp; uwsgi_temp_path $work/tmp; scgi_temp_path $work/tmp;
  sendfile on; tcp_nodelay on; keepalive_requests 10000000; keepalive_timeout 120s;
  server { listen 127.0.0.1:27080 backlog=4096; root $work/www; }
}
EOF
taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" >/dev/null 2>&1 &
sed "s#/tmp/peerbench-work/egress-gateway-audit.jsonl#$work/audit.jsonl#" bench/peerbench-gateway.yaml >"$work/etc/gateway.yaml"
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:27080/1k && break; sleep 0.1; done

# cpu_ticks PID: utime + stime in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run LABEL BINARY: one measurement; appends "us_per_request" to $out/result.LABEL.
run() {
  local label=$1 bin=$2
  rm -f "$work/audit.jsonl"
  local floor=""
  [[ $(basename "$bin") == floor_proxy ]] && floor=1
  if [[ -n $floor ]]; then
    taskset -c 1 "$bin" 127.0.0.1:28128 >/dev/null 2>&1 &
  else
    EGRESS_LOG=warn taskset -c 1 "$bin" run --config "$work/etc/gateway.yaml" >/dev/null 2>&1 &
  fi
  local pid=$!
  # Ready: the gateway's /readyz answers; the floor proxy (no admin port) accepts.
  for _ in $(seq 100); do
    if [[ -n $floor ]]; then
      (exec 3<>/dev/tcp/127.0.0.1/28128) 2>/dev/null && break
    else
      curl -s -o /dev/null http://127.0.0.1:28190/readyz && break
    fi
    sleep 0.05
  done
  local perf_pid=""
  if [[ -n ${PERF:-} ]]; then
    perf record -q -e cpu-clock -g -p "$pid" -o "$out/perf.data.$label" >/dev/null 2>&1 &
    perf_pid=$!
    sleep 0.5
  fi
  local before after n
  before=$(cpu_ticks "$pid")
  if [[ $workload == http_ka ]]; then
    n=$(PB_ABS_URL=http://127.0.0.1:27080/1k taskset -c 0 wrk -t1 -c64 -d"${duration}s" --timeout 5s \
      -s ../shared/peerbench/wrk_abs.lua http://127.0.0.1:28128 | grep '^{' | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')
  else
    n=$(taskset -c 0 "$pbload" --via connect --proxy 127.0.0.1:28128 --target 127.0.0.1:27080 --path /1k \
      -c 64 -d "$duration" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')
  fi
  after=$(cpu_ticks "$pid")
  [[ -n $perf_pid ]] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
  kill -TERM "$pid"
  wait "$pid" || true
  local us
  us=$(python3 -c "print(round(($after - $before) / $(getconf CLK_TCK) * 1e6 / max($n, 1), 1))")
  echo "$label $workload: $n requests, $us us of the proxy's CPU per request"
  echo "$us" >>"$out/result.$label"
}

for r in $(seq "$rounds"); do
  if ((r % 2)); then run A "$a"; run B "$b"; else run B "$b"; run A "$a"; fi
done
python3 - "$out" <<'EOF'
import statistics, sys
m = {l: statistics.median(float(x) for x in open(f"{sys.argv[1]}/result.{l}")) for l in "AB"}
print(f"median us/request: A {m['A']:.1f}, B {m['B']:.1f}; B/A = {m['B'] / m['A']:.3f}")
EOF
