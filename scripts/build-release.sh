#!/usr/bin/env bash
# The release build of both binaries: the Dockerfile runs this, and so does the test command, so
# CI builds exactly what the images ship (target/release/egress-gateway, node-redirector).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo build --release --locked -p egress-gateway -p node-redirector
