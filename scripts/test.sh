#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh Debian machine, then runs
# formatting, lint, every unit test, the end-to-end tests (real gateway binary, curl, dnsmasq,
# upstream servers on loopback, real nftables in network namespaces), the shared policy conformance
# vectors, and the Helm chart / Dockerfile checks (helm, kubernetes-validate, hadolint: pinned,
# installed by scripts/tools.sh into target/tools/).
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests create network namespaces and nftables tables: root, and a kernel with
# nf_tables. Say so plainly rather than fail test by test.
if [[ $(id -u) -ne 0 ]]; then
  echo "the tests need root (network namespaces, nftables): run as root, as CI does" >&2
  exit 1
fi

need=()
command -v curl >/dev/null || need+=(curl)
# kill(1) and sysctl(8), which the tests run (bash's kill builtin is not what they call).
{ [[ -x /usr/bin/kill || -x /bin/kill ]] && command -v sysctl >/dev/null; } || need+=(procps)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v python3 >/dev/null || need+=(python3)
command -v ip >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)
command -v nft >/dev/null || need+=(nftables)
command -v npm >/dev/null || need+=(npm)
# The HTML audit report is opened in a real (headless) browser.
command -v chromium >/dev/null || need+=(chromium)
# promtool lints both binaries' live metrics.
command -v promtool >/dev/null || need+=(prometheus)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

probe="egress-test-probe-$$"
for family in inet bridge; do
  if ! nft add table "$family" "$probe" 2>/dev/null; then
    echo "nftables does not work here (no nf_tables with the $family family in the kernel, or no CAP_NET_ADMIN): the redirector tests need it" >&2
    exit 1
  fi
  nft delete table "$family" "$probe"
done

# rustfmt and clippy come with the toolchain's default profile; a minimal toolchain lacks them.
for component in rustfmt clippy; do
  sub=$([[ $component == rustfmt ]] && echo fmt || echo clippy)
  if ! cargo "$sub" --version >/dev/null 2>&1; then
    echo "installing the toolchain component $component"
    rustup component add "$component" || { echo "cargo $sub is missing and rustup cannot add it" >&2; exit 1; }
  fi
done

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
# The crash tests' fail points (the `failpoints` feature, turned on by the test crate) must never
# reach the release build.
if grep -q "pipeline::before_commit" target/release/egress-gateway; then
  echo "error: the release build of egress-gateway contains fail points" >&2
  exit 1
fi
./scripts/tools.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
