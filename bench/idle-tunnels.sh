#!/usr/bin/env bash
# Memory per idle tunnel: holds N CONNECT tunnels open through the release gateway (policy and
# file audit on, like peerbench) to a local echo upstream, and reports the gateway's RSS growth
# per tunnel (VmRSS, so the kernel's socket buffers are not in it), that every tunnel still
# relays, and how long a fresh tunnel takes to open and answer while they are all open.
#
#   bench/idle-tunnels.sh [N]        (default 10000)
#
# Loopback only; needs python3. The gateway needs two file descriptors per tunnel, the client
# and the echo upstream one each (separate processes): N is capped to what the hard limit on open
# files allows (ulimit -Hn; raising it needs CAP_SYS_RESOURCE).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
hard=$(ulimit -Hn)
if [[ $hard != unlimited ]] && ((2 * n + 200 > hard)); then
  echo "note: the hard limit on open files is $hard: holding $(((hard - 200) / 2)) tunnels instead of $n" >&2
  n=$(((hard - 200) / 2))
fi
ulimit -n "$hard"
cargo build --release --locked -p egress-gateway >/dev/null
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

mkdir -p "$work/etc"
cat >"$work/etc/gateway.yaml" <<EOF
listen:
  http: 127.0.0.1:28128
  admin: 127.0.0.1:28190
guard:
  allowCidrs: [127.0.0.1/32]
clients:
  - {cidr: 127.0.0.0/8, namespace: bench, name: idle, labels: {app: idle}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {name: upstream, namespace: bench}
    spec:
      podSelector: {}
      rules:
        - name: echo
          to: [{cidr: 127.0.0.1/32}]
          ports: [{port: 27091}]
audit:
  sinks:
    - {type: file, path: $work/audit.jsonl}
limits:
  maxConnections: $((n + 1000))
  maxConnectionsPerClient: $((n + 1000))
  maxTunnelsPerClient: $((n + 1000))
  idleTimeout: 1h
EOF

# The upstream: echoes what it reads, holds every connection until the client closes it.
python3 - <<'EOF' &
import asyncio

async def echo(reader, writer):
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()

async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 27091, backlog=4096)
    await server.serve_forever()

asyncio.run(main())
EOF

EGRESS_LOG=warn ${GATEWAY_PREFIX:-} target/release/egress-gateway run --config "$work/etc/gateway.yaml" 2>"$work/gateway.log" &
gw=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:28190/readyz && break; sleep 0.1; done

GATEWAY_PID=$gw N=$n python3 - <<'EOF'
import asyncio, os, time

N = int(os.environ["N"])
PID = os.environ["GATEWAY_PID"]
PROXY = ("127.0.0.1", 28128)
UPSTREAM = ("127.0.0.1", 27091)

def rss_kib():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("gateway gone")

async def tunnel():
    r, w = await asyncio.open_connection(*PROXY)
    w.write(b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (UPSTREAM[0].encode(), UPSTREAM[1], UPSTREAM[0].encode(), UPSTREAM[1]))
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"tunnel refused: {head[:80]!r}")
    return r, w

async def roundtrip(r, w, payload=b"ping"):
    w.write(payload)
    await w.drain()
    got = await r.readexactly(len(payload))
    if got != payload:
        raise RuntimeError("echo mismatch")

async def open_many(count, batch=250):
    out = []
    for i in range(0, count, batch):
        out += await asyncio.gather(*(tunnel() for _ in range(min(batch, count - i))))
    return out

async def main():
    # Warm-up: the runtime, the allocator's arenas and the audit writer reach their working size.
    warm = await open_many(500)
    for r, w in warm:
        await roundtrip(r, w)
        w.close()
    await asyncio.sleep(1.0)
    before = rss_kib()
    t0 = time.monotonic()
    held = await open_many(N)
    opened = time.monotonic() - t0
    await asyncio.sleep(2.0)
    after = rss_kib()
    t1 = time.monotonic()
    r, w = await tunnel()
    await roundtrip(r, w)
    fresh_ms = (time.monotonic() - t1) * 1000
    w.close()
    # Every held tunnel still relays (in batches, so the check itself does not flood).
    for i in range(0, N, 500):
        await asyncio.gather(*(roundtrip(r, w, b"x") for r, w in held[i:i + 500]))
    after_use = rss_kib()
    print(f"tunnels held:               {N} (opened in {opened:.1f} s)")
    print(f"gateway RSS before / after: {before} KiB / {after} KiB")
    print(f"RSS growth per idle tunnel: {(after - before) * 1024 / N:.0f} bytes")
    print(f"after one echo on each:     {after_use} KiB ({(after_use - before) * 1024 / N:.0f} bytes per tunnel)")
    print(f"a fresh tunnel meanwhile:   open + echo in {fresh_ms:.1f} ms")
    for r, w in held:
        w.close()

asyncio.run(main())
EOF
