#!/usr/bin/env bash
# Runs .ci/run as on a machine that never built the project, to catch what a developer's machine
# hides (a cargo registry filled by earlier builds, an installed s3s-fs, a .venv, target/, caches):
# a clean clone of REF (default HEAD) with an empty HOME and CARGO_HOME, the Rust toolchain still
# reached through rustup's proxies, Python and gcc as the machine has them, and nothing else from
# the caller's environment. Prints .ci/run's phase times; the log is $dir/ci.log.
#
#   bash scripts/ci-cold.sh [REF]          # DISTILL_COLD_DIR=/path keeps the run's files there
#
# Afterwards, `mv $dir/home/.cache/distill-ci ~/.cache/` hands its CUDA cache to later runs.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
ref="${1:-HEAD}"
dir="${DISTILL_COLD_DIR:-$(mktemp -d /tmp/distill-cold.XXXXXX)}"
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
proxies="$(dirname "$(command -v rustup)")"

mkdir -p "$dir/home/.cargo/bin"
# rustup's proxies only (rustup dispatches on the name it is called by); not what `cargo install` put there.
for tool in cargo rustc rustdoc rustup rustfmt cargo-fmt cargo-clippy clippy-driver; do
  [ -e "$proxies/$tool" ] && ln -sf "$proxies/rustup" "$dir/home/.cargo/bin/$tool"
done
git clone --quiet --no-local "$repo" "$dir/repo"
git -C "$dir/repo" checkout --quiet "$(git -C "$repo" rev-parse "$ref")"
echo "ci-cold: $(git -C "$dir/repo" log --oneline -1) in $dir" >&2

# PATH without the caller's ~/.cargo/bin; Python through pyenv where the machine has it.
path="$dir/home/.cargo/bin"
for p in ${PYENV_ROOT:+$PYENV_ROOT/shims $PYENV_ROOT/bin} /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
  path="$path:$p"
done
start=$SECONDS
set +e
env -i HOME="$dir/home" CARGO_HOME="$dir/home/.cargo" RUSTUP_HOME="$rustup_home" \
  ${PYENV_ROOT:+PYENV_ROOT="$PYENV_ROOT"} PATH="$path" CI=true LANG=C.UTF-8 TERM=dumb \
  bash "$dir/repo/.ci/run" > "$dir/ci.log" 2>&1
rc=$?
set -e
grep '^ci: \[' "$dir/ci.log" >&2 || true
echo "ci-cold: .ci/run exited $rc after $((SECONDS - start)) s (log: $dir/ci.log)" >&2
exit $rc
