#!/usr/bin/env bash
# The main job on a built-in default: the live demo. stratad (our qemu-storage-daemon) serves
# a 3-image qcow2 chain over NBD while a writer keeps writing through the export; stream,
# active commit, mirror and backup run over QMP one after the other with progress bars; then
# every image passes `qemu-img check`, the disk the export ends on holds exactly what the
# writer wrote, and the backup holds exactly the disk as it was when the backup started.
# (The offline image-tool demo is scripts/demo_offline.sh.)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
for tool in qemu-img qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is needed (Debian: qemu-utils, python3)" >&2; exit 1; }
done
echo "== building stratad (release)"
cargo build --release -q -p stratad --manifest-path "$repo/Cargo.toml"
target=${CARGO_TARGET_DIR:-$repo/target}
work=$(mktemp -d "${TMPDIR:-/tmp}/strata-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 "$repo/scripts/demo_live.py" "$target/release/stratad" "$work"
