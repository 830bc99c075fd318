#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh Debian machine, then runs
# formatting, lint, every unit test, the end-to-end tests (real gateway binary, curl, dnsmasq,
# upstream servers on loopback, real nftables in network namespaces), the shared policy conformance
# vectors, and the Helm chart / Dockerfile checks (helm, kubernetes-validate, hadolint: pinned,
# installed by scripts/tools.sh into target/tools/).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null || need+=(curl)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v python3 >/dev/null || need+=(python3)
command -v ip >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)
command -v nft >/dev/null || need+=(nftables)
command -v npm >/dev/null || need+=(npm)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing packages: ${need[*]} (run as root, or install them first)" >&2
    exit 1
  fi
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [[ ! -f ../shared/vectors/run.sh ]]; then
  echo "warning: ../shared/vectors/run.sh not found; the conformance-vector test will fail" >&2
fi

# A from-scratch build gains nothing from incremental compilation and its cache is the largest
# thing in target/ (nearly 2 GB); keep it off unless the caller asks for it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
df -h . | awk 'NR == 2 { print "disk: " $4 " free where target/ is built" }'

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests drive the real binaries; the chart tests feed the rendered configs to the
# release build, which is exactly what the Dockerfile builds.
cargo build --locked --workspace --bins
./scripts/build-release.sh
./scripts/tools.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
