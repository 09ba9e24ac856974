#!/usr/bin/env bash
# Runs every check a change must pass: formatting, clippy, and all tests (unit, interop with
# the installed qemu-img/qemu-io, property tests, fuzz-corpus replay), then the end-to-end
# suite that runs every scenario against qemu-storage-daemon and stratad and compares them.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== tests"
# Some tests run the binaries themselves (strata-crashtest's kill -9 sweep runs `strata`).
cargo build --workspace --bins --quiet
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --no-fail-fast --cargo-quiet
  # nextest does not run doctests
  cargo test --workspace --doc --quiet
else
  cargo test --workspace --no-fail-fast
fi
echo "== stratad vs qemu-storage-daemon (tests/e2e)"
./tests/e2e/run.sh
