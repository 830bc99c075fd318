#!/usr/bin/env bash
# Start to ready: how long the release gateway takes from exec to its first `200` on /readyz,
# standalone with the example config (examples/gateway.yaml: its policies, stdout audit), K
# times; prints the median, min and max. The probe is a connect + GET every millisecond, so
# the figure is good to about a millisecond.
#
#   bench/start-to-ready.sh [K] [CONFIG]      (default 20, examples/gateway.yaml)
#
# Loopback only: the example listens on 127.0.0.1:3128, :1080 and :9090 (admin); those ports
# must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
k=${1:-20}
config=${2:-examples/gateway.yaml}
cargo build --release --locked -p egress-gateway >/dev/null
admin=$(sed -n 's/^ *admin: *//p' "$config" | head -1)
BIN=target/release/egress-gateway CONFIG=$config ADMIN=$admin K=$k python3 - <<'EOF'
import os, socket, statistics, subprocess, time

host, port = os.environ["ADMIN"].rsplit(":", 1)
k = int(os.environ["K"])

def ready():
    try:
        with socket.create_connection((host, int(port)), timeout=0.2) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False

times = []
for _ in range(k):
    env = dict(os.environ, EGRESS_LOG="warn")
    t0 = time.monotonic()
    p = subprocess.Popen([os.environ["BIN"], "run", "--config", os.environ["CONFIG"]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not ready():
        if p.poll() is not None:
            raise SystemExit(f"the gateway exited with {p.returncode} before it was ready")
        if time.monotonic() - t0 > 30:
            p.kill()
            raise SystemExit("not ready within 30 s")
        time.sleep(0.001)
    times.append((time.monotonic() - t0) * 1000)
    p.terminate()
    p.wait()
times.sort()
print(f"start to ready over {k} starts ({os.environ['CONFIG']}): median {statistics.median(times):.1f} ms, "
      f"min {times[0]:.1f} ms, max {times[-1]:.1f} ms")
EOF
