"""Image locking across processes (QEMU's file-posix OFD locks on bytes 100+perm and
200+unshared perm): what a daemon holds is refused to qemu-img, qemu-io, the strata image
tool and a second daemon exactly as qsd's locks refuse them, and the locked bytes are the
same."""

import os
import re
import shutil
import subprocess
import time

from e2elib import QEMU_IMG, QEMU_IO, REPO, ScenarioFailure, add_qcow2, scenario


def strata_binary():
    """The strata image tool: $STRATA, else next to stratad, else the default target dir."""
    cands = [os.environ.get("STRATA")]
    if os.environ.get("STRATAD"):
        cands.append(os.path.join(os.path.dirname(os.environ["STRATAD"]), "strata"))
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    cands += [os.path.join(tgt, "debug", "strata"), shutil.which("strata")]
    for c in cands:
        if c and os.access(c, os.X_OK) and os.path.basename(c) == "strata":
            return c
    raise ScenarioFailure("strata binary not found (build it: cargo build -p strata, or set STRATA)")


def locked_bytes(path):
    """The byte ranges locked on *path*'s inode, as /proc/locks lists them (sorted)."""
    st = os.stat(path)
    out = []
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            # "N: OFDLCK ADVISORY READ -1 MAJ:MIN:INODE START END"
            if len(parts) >= 8 and parts[5].split(":")[-1] == str(st.st_ino):
                out.append(f"{parts[1]} {parts[3]} {parts[6]}-{parts[7]}")
    return sorted(out)


def tool(run, argv, label):
    """Run an image tool; record its exit status and its stderr with the program name and
    the temp dir normalised (qemu-img and strata must print the same)."""
    p = subprocess.run(argv, cwd=run.dir, capture_output=True, text=True, timeout=30)
    err = re.sub(r"^(qemu-img|qemu-io|strata):", "$PROG:", p.stderr.strip(), flags=re.M)
    run.rec(label, {"rc": p.returncode, "stderr": err})
    return p


def prog_stderr(run, d):
    name = os.path.basename(run.binary)
    return re.sub(rf"^{re.escape(name)}:", "$PROG:", d.stderr().strip(), flags=re.M)


def second_daemon(run, *blockdevs, settle=1.0):
    """Start another daemon of the same kind with *blockdevs*; record whether it came up
    and what it printed, then stop it."""
    argv = [run.binary]
    for b in blockdevs:
        argv += ["--blockdev", b]
    p = subprocess.Popen(argv, cwd=run.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        rc = p.wait(timeout=settle)
    except subprocess.TimeoutExpired:
        rc = None
    if rc is None:
        p.terminate()
        p.wait(timeout=10)
        err = p.stderr.read()
        result = {"running": True, "stderr": err.strip()}
    else:
        err = p.stderr.read()
        name = os.path.basename(run.binary)
        result = {"running": False, "rc": rc,
                  "stderr": re.sub(rf"^{re.escape(name)}:", "$PROG:", err.strip(), flags=re.M)}
    p.stdout.close()
    p.stderr.close()
    return result


@scenario
def test_locking_image_tools(run):
    """A daemon holding top (read-write) and its backing file base (read-only): the image
    tools of both projects refuse top without -U and read it with -U; base stays readable;
    recreating top is refused; after blockdev-del everything works again."""
    strata = strata_binary()
    base = run.img("base.qcow2")
    top = run.img("top.qcow2", backing="base.qcow2")
    run.start()
    add_qcow2(run, "top", top)
    run.rec("locks on top", locked_bytes(top))
    run.rec("locks on base", locked_bytes(base))
    for prog in (QEMU_IMG, strata):
        who = os.path.basename(prog)
        p = tool(run, [prog, "info", top], f"{who} info top")
        run.check(p.returncode == 1 and 'Failed to get shared "write" lock' in p.stderr,
                  f"{who} info should fail on a locked image: {p.stderr}")
        run.check(f"Is another process using the image [{top}]?" in p.stderr, p.stderr)
        p = tool(run, [prog, "info", "-U", "--output=json", top], f"{who} info -U top rc")
        run.check(p.returncode == 0, f"{who} info -U: {p.stderr}")
        tool(run, [prog, "info", "--output=json", base], f"{who} info base")
        tool(run, [prog, "check", top], f"{who} check top")
        tool(run, [prog, "check", "-U", top], f"{who} check -U top")
        tool(run, [prog, "map", "--output=json", top], f"{who} map top")
        tool(run, [prog, "compare", top, base], f"{who} compare top base")
        tool(run, [prog, "create", "-q", "-f", "qcow2", top, "4M"], f"{who} create over top")
        tool(run, [prog, "commit", top], f"{who} commit top")
    tool(run, [QEMU_IO, "-c", "read 0 4k", top], "qemu-io read top")
    tool(run, [QEMU_IO, "-r", "-U", "-c", "read 0 4k", top], "qemu-io -r -U read top")
    run.ok("blockdev-del", {"node-name": "top"})
    run.rec("locks on top after del", locked_bytes(top))
    for prog in (QEMU_IMG, strata):
        tool(run, [prog, "check", top], f"{os.path.basename(prog)} check top after del")
    run.stop()


@scenario
def test_locking_second_daemon(run):
    """A second daemon (same program) on an image the first holds: read-write and read-only
    opens are refused while the first writes; force-share=on read-only opens; two
    read-only holders coexist, a writer among them does not."""
    img = run.img("a.qcow2")
    ro = run.img("ro.qcow2")
    run.start("--blockdev", f"qcow2,node-name=a,file.driver=file,file.filename={img}",
              "--blockdev", f"qcow2,node-name=r,read-only=on,file.driver=file,"
                            f"file.filename={ro}")
    run.rec("locks a", locked_bytes(img))
    run.rec("locks ro", locked_bytes(ro))
    rw = f"qcow2,node-name=x,file.driver=file,file.filename={img}"
    run.rec("second rw open", second_daemon(run, rw))
    run.rec("second ro open", second_daemon(run, rw + ",read-only=on"))
    run.rec("second force-share open", second_daemon(run, rw + ",read-only=on,force-share=on"))
    run.rec("force-share needs read-only", second_daemon(run, rw + ",force-share=on"))
    run.rec("second locking=off open",
            second_daemon(run, f"file,node-name=f,filename={img},locking=off",
                          "qcow2,node-name=x,file=f"))
    ro_spec = f"qcow2,node-name=x,file.driver=file,file.filename={ro}"
    run.rec("ro image: second ro open", second_daemon(run, ro_spec + ",read-only=on"))
    run.rec("ro image: second rw open", second_daemon(run, ro_spec))
    run.stop()
    run.rec("locks a after stop", locked_bytes(img))


@scenario
def test_locking_in_process_and_reopen(run):
    """Within one daemon: a second node on an image's file conflicts like another process
    would, unless locking=off or force-share; `locking` values are checked; a read-only
    reopen drops the write locks and a read-write reopen takes them back."""
    img = run.img("a.qcow2")
    other = run.img("b.qcow2")
    run.start()
    add_qcow2(run, "a", img)
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "a2",
                             "file": {"driver": "file", "filename": img}},
            desc='Failed to get "write" lock', label="second rw node")
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "a3", "read-only": True,
                             "file": {"driver": "file", "filename": img}},
            desc='Failed to get shared "write" lock', label="second ro node")
    run.ok("blockdev-add", {"driver": "qcow2", "node-name": "a4", "read-only": True,
                            "force-share": True,
                            "file": {"driver": "file", "filename": img}},
           label="force-share node")
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "a5", "force-share": True,
                             "file": {"driver": "file", "filename": img}},
            desc="force-share=on can only be used with read-only images",
            label="force-share rw node")
    run.err("blockdev-add", {"driver": "file", "node-name": "f6", "filename": img,
                             "locking": "sometimes"}, label="bad locking value")
    run.ok("blockdev-add", {"driver": "qcow2", "node-name": "a6",
                            "file": {"driver": "file", "filename": img, "locking": "off"}},
           label="locking=off node")
    run.ok("blockdev-del", {"node-name": "a6"})
    run.ok("blockdev-del", {"node-name": "a4"})
    run.rec("locks before reopen", locked_bytes(img))
    # blockdev-reopen to read-only and back (file and format together).
    add_qcow2(run, "b", other)
    run.rec("locks b", locked_bytes(other))
    reopen = lambda ro: run.qmp("blockdev-reopen", {"options": [
        {"driver": "qcow2", "node-name": "b", "read-only": ro,
         "file": {"driver": "file", "node-name": "b-file", "filename": other,
                  "read-only": ro}}]}, label=f"reopen read-only={ro}")
    reopen(True)
    run.rec("locks b read-only", locked_bytes(other))
    tool(run, [QEMU_IMG, "info", "--output=json", other], "qemu-img info b while read-only")
    reopen(False)
    run.rec("locks b read-write", locked_bytes(other))
    tool(run, [QEMU_IMG, "info", other], "qemu-img info b while read-write")
    run.stop()
