#!/usr/bin/env bash
# The toolchains the images build with are ones the locked dependencies accept: fails when a
# dependency update raises the highest `rust-version` of Cargo.lock's packages (all features, the
# cuda feature's too) above the workspace's `rust-version`, when the images' Rust (docker/Dockerfile's
# `FROM rust:X.Y`, Dockerfile.cuda's rustup toolchain) is older than that, or when the CUDA image's
# version differs (major.minor) from the CUDA the build recipe uses (scripts/cuda-toolkit.sh's nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
meta="$(mktemp)"
trap 'rm -f "$meta"' EXIT
cargo metadata --quiet --locked --format-version 1 --all-features > "$meta"
python3 - "$meta" <<'PY'
import json, re, sys, tomllib

def ver(s):
    return tuple(int(x) for x in s.split(".")[:2])

meta = json.load(open(sys.argv[1]))
floor = max((ver(p["rust_version"]), p["name"], p["version"]) for p in meta["packages"] if p.get("rust_version"))
declared = tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]["rust-version"]
image = re.search(r"^FROM rust:(\d+\.\d+)", open("docker/Dockerfile").read(), re.M).group(1)
cuda_rust = re.search(r"--default-toolchain (\d+\.\d+)", open("docker/Dockerfile.cuda").read()).group(1)
cuda_image = re.search(r"^ARG CUDA_VERSION=(\d+\.\d+)", open("docker/Dockerfile.cuda").read(), re.M).group(1)
nvcc = re.search(r"nvidia-cuda-nvcc==(\d+\.\d+)", open("scripts/cuda-toolkit.sh").read()).group(1)
dep = f"{floor[1]} {floor[2]} needs rustc >= {floor[0][0]}.{floor[0][1]}"
problems = []
if ver(declared) < floor[0]:
    problems.append(f"Cargo.toml's rust-version {declared} is below what the locked dependencies need ({dep})")
for where, v in [("docker/Dockerfile (FROM rust:)", image), ("docker/Dockerfile.cuda (rustup toolchain)", cuda_rust)]:
    if ver(v) < ver(declared):
        problems.append(f"{where} builds with Rust {v}, below the workspace's rust-version {declared} ({dep})")
if cuda_image != nvcc:
    problems.append(f"docker/Dockerfile.cuda uses CUDA {cuda_image}, scripts/cuda-toolkit.sh builds with CUDA {nvcc}")
if problems:
    sys.exit("check-toolchain: " + "; ".join(problems))
print(f"toolchains: workspace rust-version {declared}, images Rust {image} and {cuda_rust}, "
      f"highest dependency floor {floor[0][0]}.{floor[0][1]} ({floor[1]} {floor[2]}); CUDA {cuda_image} in image and recipe")
PY
