#!/usr/bin/env bash
# Packs the CUDA build (target/cuda/release, built with scripts/cuda-toolkit.sh, see .ci/run) for
# the device tool: distill-bench and the three service binaries stripped and xz-compressed into the
# git-ignored .device-bench/ with ../shared/bench/pytorch_baseline.py and COMMIT (the commit built).
# Refuses a tree with uncommitted changes to the sources or a PTX that lacks a kernel kernels.cu
# defines (a stale build: cargo decides at the start of a build whether build.rs reruns).
# Then carry [".device-bench/distill-bench.xz", ".device-bench/bin", ".device-bench/pytorch_baseline.py",
# ".device-bench/sanitizer.tar.xz"] and run scripts/bench/gpu-bench.sh (gpu-sanitize.sh,
# gpu-services.sh) on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
rel=target/cuda/release
if ! git diff --quiet HEAD -- shared services Cargo.toml Cargo.lock vendor; then
  echo "bundle: the sources differ from HEAD; commit, rebuild, then bundle" >&2
  exit 1
fi
ptx=$(ls -t $rel/build/distill-models-*/out/kernels.ptx | head -1)
want=$(grep -c '^extern "C" __global__' shared/models/src/kernels/kernels.cu)
have=$(grep -c '\.entry' "$ptx")
if [ "$want" != "$have" ]; then
  echo "bundle: $ptx has $have kernels, kernels.cu defines $want: rebuild" >&2
  exit 1
fi
for b in distill-bench distill-teacher distill-trainer distill; do
  [ "$rel/$b" -nt shared/models/src/kernels/kernels.cu ] || { echo "bundle: $rel/$b is older than kernels.cu: rebuild" >&2; exit 1; }
done
rm -rf .device-bench && mkdir -p .device-bench/bin
tmp=$(mktemp -d)
for b in distill-bench distill-teacher distill-trainer distill; do
  strip -o "$tmp/$b" "$rel/$b"
done
xz -T2 -6 -c "$tmp/distill-bench" > .device-bench/distill-bench.xz
for b in distill-teacher distill-trainer distill; do xz -T2 -6 -c "$tmp/$b" > ".device-bench/bin/$b.xz"; done
rm -rf "$tmp"
cp ../shared/bench/pytorch_baseline.py .device-bench/
# NVIDIA's compute-sanitizer for scripts/bench/gpu-sanitize.sh, from its PyPI wheel (CUDA 13.0, as
# the card's driver), its bin/ and lib/ as sanitizer.tar.xz (~8 MB); skipped where PyPI is not
# reachable.
san=target/sanitizer
if [ ! -x "$san/bin/compute-sanitizer" ]; then
  rm -rf "$san.tmp" && mkdir -p "$san.tmp"
  if python3 -m pip download --quiet --no-deps -d "$san.tmp" "nvidia-cuda-sanitizer-api==13.0.*"; then
    python3 -c "import glob,zipfile,sys; zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]).extractall(sys.argv[1])" "$san.tmp"
    rm -rf "$san" && mkdir -p "$san" && mv "$san.tmp"/nvidia/cu13/bin "$san.tmp"/nvidia/cu13/lib "$san"/ && chmod +x "$san/bin/compute-sanitizer"
  fi
  rm -rf "$san.tmp"
fi
[ -x "$san/bin/compute-sanitizer" ] && tar -C "$san" -cJf .device-bench/sanitizer.tar.xz bin lib
git rev-parse HEAD > .device-bench/COMMIT
echo "bundle: $(cat .device-bench/COMMIT), $have kernels, $(du -sh .device-bench | cut -f1)"
