#!/usr/bin/env bash
# Assembles the PTX of the CUDA build (target/cuda) for an H100 (sm_90) with the toolkit's ptxas,
# as the driver does when it loads the module: fails on an error (too much shared memory, an
# unsupported instruction), prints each kernel's registers, shared memory and spills.
# Run after the CUDA build (.ci/run does), with scripts/cuda-toolkit.sh sourced or CUDA_ROOT set.
set -euo pipefail
cd "$(dirname "$0")/.."
ptx=$(ls -t target/cuda/release/build/distill-models-*/out/kernels.ptx | head -1)
ptxas="${CUDA_ROOT:?source scripts/cuda-toolkit.sh first}/bin/ptxas"
out=$("$ptxas" -arch="sm_${CUDA_COMPUTE_CAP:-90}" -v "$ptx" -o /dev/null 2>&1)
echo "$out" | sed -n "s/.*Compiling entry function '\([a-z0-9_]*\)'.*/\1/p; s/^ptxas info *: *\(Used .*\)/  \1/p; s/^ *\([0-9]* bytes stack frame.*\)/  \1/p"
echo "kernels.ptx assembles for sm_${CUDA_COMPUTE_CAP:-90}: $(grep -c '\.entry' "$ptx") kernels"
