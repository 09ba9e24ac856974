"""blockdev-create (§4.7) and throttle-group objects (§6.2)."""

from e2elib import add_qcow2, jobs_view, names, scenario


@scenario
def test_blockdev_create_file_then_qcow2(run):
    path = run.path("new.qcow2")
    run.start()
    run.ok("blockdev-create", {"job-id": "c1", "options": {"driver": "file", "filename": path,
                                                           "size": 0}})
    ev = run.job_events("file create", "c1", "concluded")
    run.check(names(ev) == ["c1:created", "c1:running", "c1:waiting", "c1:pending", "c1:concluded"],
              str(names(ev)))
    run.ok("query-jobs", keep=jobs_view)
    run.ok("job-dismiss", {"id": "c1"})
    run.job_events("dismiss", "c1", "null")
    run.ok("blockdev-add", {"driver": "file", "node-name": "new-file", "filename": path})
    run.ok("blockdev-create", {"job-id": "c2", "options": {"driver": "qcow2", "file": "new-file",
                                                           "size": 8 << 20, "cluster-size": 65536}})
    run.job_events("qcow2 create", "c2", "concluded")
    run.ok("job-dismiss", {"id": "c2"})
    run.job_events("dismiss", "c2", "null")
    run.ok("blockdev-add", {"driver": "qcow2", "node-name": "new", "file": "new-file"})
    # a failing create: the job concludes with an error
    run.ok("blockdev-create", {"job-id": "c3", "options": {"driver": "qcow2", "file": "new-file",
                                                           "size": 8 << 20, "cluster-size": 1000}},
           label="create with bad cluster size")
    run.job_events("failing create", "c3", "concluded")
    run.ok("query-jobs", keep=jobs_view, label="failed job in query-jobs")
    run.ok("job-dismiss", {"id": "c3"})
    run.job_events("dismiss", "c3", "null")
    run.err("blockdev-create", {"options": {"driver": "file", "filename": path, "size": 0}},
            desc="Parameter 'job-id' is missing")
    run.err("blockdev-create", {"job-id": "c4", "options": {"driver": "raw", "file": "new-file",
                                                            "size": 0}},
            label="create with raw driver")
    run.stop()
    run.rec("qemu-img info", {k: v for k, v in run.img_info(path).items()
                              if k in ("virtual-size", "format", "cluster-size")})
    run.record_image("new", path)


@scenario
def test_throttle_group_objects(run):
    img = run.img("disk.qcow2", "4M")
    run.start()
    add_qcow2(run, "disk", img)
    run.ok("object-add", {"qom-type": "throttle-group", "id": "tg0",
                          "limits": {"bps-total": 10 << 20, "iops-total": 1000}})
    run.err("object-add", {"qom-type": "throttle-group", "id": "tg0", "limits": {}},
            desc="attempt to add duplicate property 'tg0' to object (type 'container')")
    run.err("object-add", {"qom-type": "no-such-type", "id": "x"})
    run.ok("blockdev-add", {"driver": "throttle", "node-name": "thr", "throttle-group": "tg0",
                            "file": "disk"})
    run.err("blockdev-add", {"driver": "throttle", "node-name": "thr2", "throttle-group": "nope",
                             "file": "disk"}, label="unknown throttle group")
    run.ok("qom-get", {"path": "/objects/tg0", "property": "limits"},
           keep=lambda r: {k: v for k, v in r.items() if k in ("bps-total", "iops-total")})
    run.err("object-del", {"id": "tg0"}, label="object-del in use")
    run.err("object-del", {"id": "nope"})
    run.ok("query-named-block-nodes", {"flat": True},
           keep=lambda r: sorted((n["node-name"], n["drv"]) for n in r))
    run.ok("blockdev-del", {"node-name": "thr"})
    run.ok("object-del", {"id": "tg0"})
    run.stop()
