#!/usr/bin/env bash
# The test command: builds the service binaries the end-to-end tests spawn, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace
