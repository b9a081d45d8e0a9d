#!/usr/bin/env bash
# A CUDA 13.0 toolkit for building the `cuda` feature on a machine without a GPU or a system CUDA:
# nvcc, headers and libraries from NVIDIA's PyPI wheels (13.0.x, to match the H100 machines' driver),
# arranged as a CUDA_ROOT folder of symlinks, plus a link-time stub libcuda.so (soname libcuda.so.1)
# whose symbols are the driver API names cudarc binds; at run time the driver's own libcuda.so.1 is used.
#
#   source scripts/cuda-toolkit.sh          # installs once into target/cuda-toolkit, exports the env
#   cargo build --release --features cuda -p distill-models --bin distill-bench
#
# DISTILL_CUDA_TOOLKIT puts the toolkit elsewhere (.ci/run keeps it under ~/.cache/distill-ci).
# Nothing here relies on what an earlier build left behind: cudarc's sources (for the stub's symbol
# list) are located through `cargo metadata`, which downloads them into a fresh CARGO_HOME.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tk="${DISTILL_CUDA_TOOLKIT:-$repo/target/cuda-toolkit}"
root="$tk/root"
cuda_wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14)

# The directory of the cudarc crate the cuda feature links (version from Cargo.lock).
cudarc_dir() {
  cargo metadata --quiet --locked --format-version 1 --all-features --manifest-path "$repo/Cargo.toml" \
    | python3 -c 'import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
print(os.path.dirname(pkgs[0]["manifest_path"]) if pkgs else "")'
}

if [ ! -x "$root/bin/nvcc" ] || [ ! -e "$root/lib64/libcuda.so" ]; then
  echo "cuda-toolkit: installing CUDA 13.0 wheels into $tk" >&2
  if ! python3 -m pip install -q --disable-pip-version-check --target "$tk/wheels" "${cuda_wheels[@]}"; then
    echo "cuda-toolkit: PyPI did not give the CUDA 13.0 wheels (${cuda_wheels[*]})" >&2
    return 1 2>/dev/null || exit 1
  fi
  cu="$tk/wheels/nvidia/cu13"
  rm -rf "$root" && mkdir -p "$root/bin" "$root/lib64"
  ln -s "$cu/include" "$root/include"
  ln -s "$cu/nvvm" "$root/nvvm"
  for f in "$cu"/bin/*; do ln -s "$f" "$root/bin/"; done
  # Versioned libraries, and the unversioned names the linker looks for.
  for f in "$cu"/lib/*.so* "$cu"/lib/*.a; do
    [ -e "$f" ] || continue
    name="$(basename "$f")"
    ln -s "$f" "$root/lib64/$name"
    base="${name%%.so*}"
    case "$name" in *.so.*) [ -e "$root/lib64/$base.so" ] || ln -s "$f" "$root/lib64/$base.so" ;; esac
  done
  # The stub driver: one empty function per driver entry point cudarc declares.
  cudarc="$(cudarc_dir)" || cudarc=""
  if [ -z "$cudarc" ] || ! ls "$cudarc"/src/driver/sys/*.rs >/dev/null 2>&1; then
    echo "cuda-toolkit: cargo metadata did not give cudarc's sources (Cargo.lock's version, from crates.io)" >&2
    return 1 2>/dev/null || exit 1
  fi
  grep -ohE 'fn cu[A-Z][A-Za-z0-9_]*\(' "$cudarc"/src/driver/sys/*.rs | sed -E 's/fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$tk/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib64/libcuda.so" "$tk/libcuda_stub.c"
  echo "cuda-toolkit: $(wc -l < "$tk/libcuda_stub.c") stub driver symbols" >&2
fi

export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_TOOLKIT_ROOT_DIR="$root"
export PATH="$root/bin:$PATH"
export LIBRARY_PATH="$root/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
