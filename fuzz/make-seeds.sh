#!/bin/sh
# Rebuild the seed corpus from images made by qemu-img/qemu-io (QEMU 10). Files carry no
# .qcow2 extension (the repository ignores those). Keep the corpus small (< 2 MB).
set -eu
cd "$(dirname "$0")"
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
mk() { qemu-img create -q -f qcow2 -o "$2" "$t/$1" "$3"; }

mk c512 cluster_size=512 1M
qemu-io -c 'write -P 1 0 2k' -c 'write -c -P 2 8k 512' -c 'write -z 16k 1k' "$t/c512" >/dev/null
qemu-img snapshot -c s1 "$t/c512"
qemu-io -c 'write -P 3 0 512' "$t/c512" >/dev/null

mk c4k cluster_size=4096,refcount_bits=8,compression_type=zstd 4M
qemu-io -c 'write -P 1 0 8k' -c 'write -c -P 2 1M 4k' "$t/c4k" >/dev/null
qemu-img bitmap --add "$t/c4k" b0
qemu-io -c 'write -P 4 2M 4k' "$t/c4k" >/dev/null

mk ext cluster_size=16384,extended_l2=on 1M
qemu-io -c 'write -P 1 0 2k' -c 'write -P 2 20k 4k' "$t/ext" >/dev/null

mk lazy cluster_size=1024,lazy_refcounts=on 256k
qemu-io -c 'write -P 1 0 3k' "$t/lazy" >/dev/null

python3 - "$t" <<'PY'
import os, random, struct, sys
t = sys.argv[1]
rnd = random.Random(7)
out = {"qcow2_check": {}, "qcow2_header": {}, "qcow2_decompress": {}}
for name in ["c512", "c4k", "ext", "lazy"]:
    d = open(os.path.join(t, name), "rb").read()
    cs = 1 << struct.unpack(">I", d[20:24])[0]
    out["qcow2_check"][name] = d
    out["qcow2_check"][name + "-half"] = d[: len(d) // 2]
    for k in range(3):
        m = bytearray(d)
        for _ in range(4):
            i = rnd.randrange(len(m))
            m[i] ^= 1 << rnd.randrange(8)
        out["qcow2_check"][f"{name}-flip{k}"] = bytes(m)
    out["qcow2_header"][name] = d[:cs]
    # Compressed clusters, framed for the decompress target: kind, cluster bits - 9, data.
    l1 = struct.unpack(">Q", d[40:48])[0]
    l2 = struct.unpack(">Q", d[l1:l1 + 8])[0] & 0x00FFFFFFFFFFFE00
    kind = d[104] if struct.unpack(">I", d[100:104])[0] > 104 else 0
    bits = struct.unpack(">I", d[20:24])[0]
    esz = 16 if struct.unpack(">Q", d[72:80])[0] & 16 else 8
    for j in range(cs // esz):
        e = struct.unpack(">Q", d[l2 + j * esz:l2 + j * esz + 8])[0]
        if e & (1 << 62):
            shift = 62 - (bits - 8)
            off = e & ((1 << shift) - 1)
            n = ((e >> shift) & ((1 << (bits - 8)) - 1)) + 1
            data = d[off: off + n * 512 - (off & 511)]
            out["qcow2_decompress"][name] = bytes([kind, bits - 9]) + data
            out["qcow2_decompress"][name + "-cut"] = bytes([kind, bits - 9]) + data[: len(data) // 2]
for target, files in out.items():
    for name, data in files.items():
        open(os.path.join("corpus", target, name), "wb").write(data)
PY
