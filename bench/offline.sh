#!/usr/bin/env bash
# Side-by-side offline benchmark: qemu-img and strata on the same images, in one run.
#
#   bench/offline.sh            # REPS=3, images in $S (default /tmp/strata-bench)
#
# Images come from the peers' own recipe (../shared/bench/20_build_images.sh): a 4 GiB qcow2
# with ~60% of its clusters filled and a 3-layer overlay chain on it. Every run drops the page
# cache first (root) and is timed including a trailing `sync`, because both tools leave dirty
# pages behind with their default cache modes. The two tools alternate run by run so drift
# hits both alike. Output: $RES/offline_side_by_side.csv and a Markdown table on stdout
# (medians, and the time ratio strata/qemu-img).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
export S=${S:-/tmp/strata-bench}
export RES=${RES:-$S/results}
REPS=${REPS:-3}
I=$S/img
O=$S/out-sbs
mkdir -p "$RES" "$O"

cargo build --release -q -p strata --manifest-path "$repo/Cargo.toml"
STRATA=$repo/target/release/strata

if [ ! -f "$I/ov3.qcow2" ] || [ ! -f "$I/pristine/ov3.qcow2" ]; then
  bash "$shared/20_build_images.sh" > "$RES/build_images.log"
fi

CSV=$RES/offline_side_by_side.csv
echo "op,tool,rep,seconds" > "$CSV"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
reset_chain() { for f in "$@"; do cp --sparse=always "$I/pristine/$f" "$I/$f"; done; }

# time_one OP TOOL REP cmd...: wall time of the command plus a sync.
time_one() {
  local op=$1 tool=$2 rep=$3; shift 3
  drop
  local t0 t1
  t0=$(date +%s.%N)
  if ! "$@" > "$O/last.out" 2>&1; then
    # compare exits 1 on difference; anything else is a failure worth seeing
    case "$op" in compare*) ;; *) echo "FAILED ($tool): $*" >&2; cat "$O/last.out" >&2 ;; esac
  fi
  sync
  t1=$(date +%s.%N)
  python3 -c "print('$op,$tool,$rep,%.3f' % ($t1 - $t0))" >> "$CSV"
}

for rep in $(seq 1 "$REPS"); do
  for tool in qemu-img strata; do
    T=$([ "$tool" = strata ] && echo "$STRATA" || echo qemu-img)
    rm -f "$O/flat.qcow2" "$O/flat.raw"
    time_one convert_chain_to_qcow2 $tool $rep $T convert -f qcow2 -O qcow2 "$I/ov3.qcow2" "$O/flat.qcow2"
    rm -f "$O/flat.qcow2"
    time_one convert_chain_to_qcow2_direct_W $tool $rep $T convert -t none -T none -W -f qcow2 -O qcow2 "$I/ov3.qcow2" "$O/flat.qcow2"
    rm -f "$O/flat.qcow2"
    time_one convert_chain_to_raw $tool $rep $T convert -f qcow2 -O raw "$I/ov3.qcow2" "$O/flat.raw"
    rm -f "$O/flat.raw"
    time_one convert_base_to_qcow2 $tool $rep $T convert -f qcow2 -O qcow2 "$I/base.qcow2" "$O/flat.qcow2"
    rm -f "$O/flat.qcow2"
    reset_chain ov2.qcow2 ov3.qcow2
    time_one commit_top $tool $rep $T commit -f qcow2 "$I/ov3.qcow2"
    reset_chain ov2.qcow2 ov3.qcow2
    time_one rebase_safe_onto_base $tool $rep $T rebase -f qcow2 -b base.qcow2 -F qcow2 "$I/ov3.qcow2"
    reset_chain ov3.qcow2
    time_one map_base_json $tool $rep sh -c "$T map --output=json $I/base.qcow2 > $O/map-$tool.json"
    time_one check_base $tool $rep $T check "$I/base.qcow2"
    time_one compare_chains $tool $rep $T compare -f qcow2 -F qcow2 "$I/ov3.qcow2" "$I/chainB/ov3.qcow2"
    time_one bench_read_4k_qd32 $tool $rep $T bench -c 200000 -d 32 -s 4k -S 65536 -t none -i io_uring -f qcow2 "$I/base.qcow2"
    cp --sparse=always "$I/pristine/base.qcow2" "$O/bench-w.qcow2"
    time_one bench_write_4k_qd32 $tool $rep $T bench -w -c 200000 -d 32 -s 4k -S 65536 -t none -i io_uring -f qcow2 "$O/bench-w.qcow2"
    rm -f "$O/bench-w.qcow2"
  done
done
cmp -s "$O/map-qemu-img.json" "$O/map-strata.json" && echo "map output: identical" || echo "map output: DIFFERS"
python3 "$here/summarize.py" "$CSV"
