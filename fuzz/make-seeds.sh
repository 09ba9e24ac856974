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

mk back cluster_size=4096 1M
qemu-io -c 'write -P 7 0 4k' "$t/back" >/dev/null

# An external data file named like /etc/passwd (same length, patched below).
(cd "$t" && qemu-img create -q -f qcow2 -o cluster_size=4096,data_file=etc_passwdX dfile 1M)

mk lazy cluster_size=1024,lazy_refcounts=on 256k
qemu-io -c 'write -P 1 0 3k' "$t/lazy" >/dev/null

python3 - "$t" <<'PY'
import os, random, struct, sys
t = sys.argv[1]
rnd = random.Random(7)
out = {"qcow2_check": {}, "qcow2_header": {}, "qcow2_decompress": {}, "qcow2_open": {}}
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

# Hostile images for `qcow2_open` (and the hostile-image CLI test): QEMU's CVE classes.
base = bytearray(open(os.path.join(t, "c512"), "rb").read())
def put(d, off, fmt, v):
    d[off:off + struct.calcsize(fmt)] = struct.pack(fmt, v)
def hostile(name, edit):
    d = bytearray(base)
    edit(d)
    out["qcow2_open"][name] = bytes(d)
out["qcow2_open"]["c512"] = bytes(base)
out["qcow2_open"]["ext"] = open(os.path.join(t, "ext"), "rb").read()
hostile("huge-l1-size", lambda d: put(d, 36, ">I", 0x7FFFFFFF))
hostile("huge-l1-size-max", lambda d: put(d, 36, ">I", 0xFFFFFFFF))
hostile("huge-size", lambda d: put(d, 24, ">Q", 1 << 62))
hostile("huge-refcount-clusters", lambda d: put(d, 56, ">I", 0xFFFFFFFF))
hostile("huge-refcount-offset", lambda d: put(d, 48, ">Q", 1 << 61))
hostile("unaligned-refcount-offset", lambda d: put(d, 48, ">Q", 0x10001))
hostile("huge-l1-offset", lambda d: put(d, 40, ">Q", 0x7FFFFFFFFFFFFE00))
hostile("l1-over-header", lambda d: put(d, 40, ">Q", 0))
hostile("refcount-over-l1", lambda d: put(d, 48, ">Q", struct.unpack(">Q", bytes(d[40:48]))[0]))
hostile("huge-snapshots", lambda d: put(d, 60, ">I", 0xFFFFFFFF))
hostile("huge-header-length", lambda d: put(d, 100, ">I", 0xFFFFFFF0))
def l2_over_header(d):
    l1 = struct.unpack(">Q", bytes(d[40:48]))[0]
    put(d, l1, ">Q", (1 << 63) | 0)
hostile("l2-over-header", l2_over_header)
def data_over_l1(d):
    l1 = struct.unpack(">Q", bytes(d[40:48]))[0]
    l2 = struct.unpack(">Q", bytes(d[l1:l1 + 8]))[0] & 0x00FFFFFFFFFFFE00
    put(d, l2, ">Q", (1 << 63) | l1)
hostile("data-over-l1", data_over_l1)
# Backing names: written where the header's backing_file_offset points (after the
# extensions, in the first cluster of a 512-byte-cluster image there is little room, so
# use a 4 KiB-cluster image made for it).
bb = bytearray(open(os.path.join(t, "back"), "rb").read())
def backing(name, text):
    d = bytearray(bb)
    raw = text.encode()
    off = 2048
    d[off:off + len(raw)] = raw
    put(d, 8, ">Q", off)
    put(d, 16, ">I", len(raw))
    out["qcow2_open"][name] = bytes(d)
backing("backing-json", 'json:{"driver":"file","filename":"/etc/passwd"}')
backing("backing-json-nbd", 'json:{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":"1"},"export":"x"}')
backing("backing-etc-passwd", "/etc/passwd")
backing("backing-proc", "/proc/self/mem")
backing("backing-dotdot", "../../../../../../etc/shadow")
backing("backing-nbd-uri", "nbd://127.0.0.1:1/x")
backing("backing-self", "backing-self")
backing("backing-loop-a", "backing-loop-b")
backing("backing-loop-b", "backing-loop-a")
# The external-data-file bit without a data-file name.
d = bytearray(out["qcow2_open"]["backing-etc-passwd"])
put(d, 72, ">Q", struct.unpack(">Q", bytes(d[72:80]))[0] | 4)
out["qcow2_open"]["datafile-bit-no-name"] = bytes(d)
d = open(os.path.join(t, "dfile"), "rb").read()
out["qcow2_open"]["datafile-etc-passwd"] = d.replace(b"etc_passwdX", b"/etc/passwd")
out["qcow2_open"]["datafile-proc"] = d.replace(b"etc_passwdX", b"/proc/1/mem")
out["qcow2_open"]["datafile-self"] = d.replace(b"etc_passwdX", b"datafile-se")
# QMP streams for `qmp_json`: byte 0 is where the input is split in two feeds.
q = out["qmp_json"] = {}
q["negotiate"] = b"\x05" + b'{"execute":"qmp_capabilities"}\n{"execute":"query-jobs"}'
q["blockdev-add"] = b"\x20" + b'{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n","file":{"driver":"file","filename":"/x"}}}'
q["mirror"] = b"\x10" + b'{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"a","target":"b","sync":"full","speed":-1}}'
q["deep-nesting"] = b"\x00" + b"[" * 20000
q["deep-objects"] = b"\x00" + b'{"a":' * 5000
q["big-number"] = b"\x00" + b'{"execute":"block-job-set-speed","arguments":{"device":"j","speed":1' + b"9" * 400 + b"}}"
q["bad-utf8"] = b"\x03" + b'{"execute":"\xff\xfe\xc0\x80"}'
q["escapes"] = b"\x07" + b'{"execute":"\\u0000\\ud800\\uDFFF\\u00e9"}'
q["huge-token"] = b"\x00" + b'"' + b"a" * 70000
q["lone-closers"] = b"\x00" + b"}]}]{\x00\x1b[[}"
q["sq-strings"] = b"\x02" + b"{'execute':'query-block','arguments':{'x':1.5e308}}"
# Option strings for `keyval`: byte 0 picks the option (see strata_qmp::fuzzing).
k = out["keyval"] = {}
k["blockdev"] = b"\x00driver=qcow2,node-name=n,file.driver=file,file.filename=/x,read-only=on"
k["blockdev-json"] = b'\x00{"driver":"null-co","node-name":"z","size":1024}'
k["export"] = b"\x01type=nbd,id=e,node-name=n,writable=on,name=x"
k["nbd-server"] = b"\x02addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=4"
k["object"] = b"\x03throttle-group,id=t,x-iops-total=100"
k["implied-driver"] = b"\x04file,filename=/x,,y,aio=threads"
k["arrays"] = b"\x00driver=quorum,children.0=a,children.1=b,children.10=c,vote-threshold=1"
k["deep-keys"] = b"\x00" + b".".join([b"a"] * 3000) + b"=1"
k["deep-file-chain"] = b"\x00" + b"file." * 1023 + b"driver=null-co"
k["big-index"] = b"\x00children.99999999999999999999=a"
k["commas"] = b"\x00,,,,=,,,=" + b"," * 1000
k["chardev"] = b"\x00socket,id=c,path=/tmp/s,server=on,wait=off"
k["help"] = b"\x00help"
k["sizes"] = b"\x00driver=null-co,size=16E,node-name=x"
for target, files in out.items():
    os.makedirs(os.path.join("corpus", target), exist_ok=True)
    for name, data in files.items():
        open(os.path.join("corpus", target, name), "wb").write(data)
PY
