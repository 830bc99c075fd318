#!/usr/bin/env bash
# A longer run of the parsers' property tests than the test command's bounded budget: every
# hostile-input property test (SOCKS5 handshake, transparent first flight and SNI peek, host and
# authority parsing, policy documents, configuration files, PROXY v2 header) with
# EGRESS_FUZZ_SCALE times its cases (default 500: about 12 million cases, two to three minutes of
# testing on 2 cores after the release build). Stable Rust only.
#
#   ./scripts/fuzz.sh            # 500x
#   EGRESS_FUZZ_SCALE=5000 ./scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export EGRESS_FUZZ_SCALE="${EGRESS_FUZZ_SCALE:-500}"
# netio's PROXY v2 property tests use proptest's default configuration, which reads this.
export PROPTEST_CASES=$((256 * EGRESS_FUZZ_SCALE))
cargo test --release --locked -p egress-gateway -p egress-crds -p egress-netio --lib -- \
  never_panics round_trips finds_the_sni every_spelling proxy::
