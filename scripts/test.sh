#!/usr/bin/env bash
# The test command: builds the service binaries the end-to-end tests spawn, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# Lint first: rustfmt's layout and clippy with warnings as errors (each `allow` in the code says why).
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins
cargo test --workspace
# Every line of kernels.cu with code runs in the emulated kernel tests (gcov over the emulator).
bash scripts/kernel-coverage.sh --all
# The emulated CUDA kernels again, built with AddressSanitizer: a read or write past a buffer or a
# shared array fails here (its runtime preloaded for the test binaries only).
asan_runner="env LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0"
DISTILL_EMU_ASAN=1 CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$asan_runner" cargo test -p distill-cuda-emu
DISTILL_EMU_ASAN=1 CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$asan_runner" cargo test -p distill-models --lib kernels::emulated
# The emulated CUDA kernels again, built with ThreadSanitizer (shared/cuda-emu): a race between a
# block's threads, or between blocks, fails here (exit status 66) where the emulator's own run
# would pass it by chance. Last: it rebuilds the emulator and relinks distill-models' tests.
export TSAN_OPTIONS="suppressions=$PWD/shared/cuda-emu/tsan.supp ${TSAN_OPTIONS:-}"
DISTILL_EMU_TSAN=1 cargo test -p distill-cuda-emu
DISTILL_EMU_TSAN=1 cargo test -p distill-models --lib kernels::emulated
