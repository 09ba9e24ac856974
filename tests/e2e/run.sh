#!/usr/bin/env bash
# Build stratad (and the strata image tool, for the locking interop scenarios), then run the stratad-vs-qemu-storage-daemon compatibility suite.
#   tests/e2e/run.sh [pytest args...]      e.g. -k mirror, --daemons=qsd
# Environment: STRATAD=/path/to/stratad skips the build and uses that binary;
#              CARGO_TARGET_DIR as usual; QSD=/path/to/qemu-storage-daemon.
# Prints "N scenarios match qsd / M total"; exits non-zero on any mismatch, on a failed
# qsd baseline, or when stratad could not be built.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build_rc=0
if [ -z "${STRATAD:-}" ]; then
    target="${CARGO_TARGET_DIR:-$repo/target}"
    echo "== cargo build -p stratad -p strata (target dir $target)"
    (cd "$repo" && cargo build -p stratad -p strata) || build_rc=$?
    if [ "$build_rc" -ne 0 ]; then
        echo "== stratad did not build (rc=$build_rc): its half of every scenario is skipped" >&2
    else
        export STRATAD="$target/debug/stratad"
    fi
fi
cd "$here"
python3 -m pytest -p no:cacheprovider -q -rfEs "$@"
rc=$?
if [ "$build_rc" -ne 0 ] && [ "$rc" -eq 0 ]; then
    rc=1
fi
exit $rc
