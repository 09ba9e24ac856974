"""QMP wire protocol (reference §1)."""

from e2elib import RawQMP, scenario, schema_commands


def shape(v):
    """Type skeleton of a JSON value (values differ between daemons, shapes must not)."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [shape(x) for x in v]
    return type(v).__name__


def version_shape(v):
    return {"keys": sorted(v), "qemu": shape(v.get("qemu")), "package": type(v.get("package")).__name__}


@scenario
def test_greeting_and_negotiation(run):
    """Greeting shape, commands before negotiation, capability errors, renegotiation."""
    d = run.start(connect=False)
    c = RawQMP(d.sock)
    g = c.recv()
    run.rec("greeting keys", sorted(g))
    run.rec("greeting QMP keys", sorted(g["QMP"]))
    run.rec("greeting version", version_shape(g["QMP"]["version"]))
    run.rec("greeting capabilities", g["QMP"]["capabilities"])
    run.check(g["QMP"]["capabilities"] == ["oob"], "socket monitor must offer oob")
    # anything before qmp_capabilities
    r = run.rec("before negotiation", c.exchange({"execute": "query-version", "id": "a"}))
    run.check(r == {"id": "a", "error": {"class": "CommandNotFound",
                                         "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}, str(r))
    run.rec("before negotiation unknown", c.exchange({"execute": "no-such-cmd", "id": 1}))
    run.rec("caps bad arg type", c.exchange({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 2}))
    r = run.rec("caps unknown capability", c.exchange({"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": 3}))
    run.check(r["error"]["class"] == "GenericError", str(r))
    run.rec("caps unexpected arg", c.exchange({"execute": "qmp_capabilities", "arguments": {"foo": 1}, "id": 4}))
    r = run.rec("negotiate", c.exchange({"execute": "qmp_capabilities", "id": 5}))
    run.check(r == {"return": {}, "id": 5}, str(r))
    r = run.rec("negotiate again", c.exchange({"execute": "qmp_capabilities", "id": 6}))
    run.check(r == {"id": 6, "error": {"class": "CommandNotFound",
                                       "desc": "Capabilities negotiation is already complete, command ignored"}}, str(r))
    c.close()
    # a new connection starts in negotiation mode again
    c = RawQMP(d.sock)
    c.recv()
    run.rec("reconnect before negotiation", c.exchange({"execute": "query-version"}))
    run.rec("reconnect negotiate with oob", c.exchange({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}))
    run.rec("exec-oob query-version", c.exchange({"exec-oob": "query-version", "id": "o1"}))
    r = run.rec("execute and exec-oob with oob", c.exchange({"execute": "query-version",
                                                            "exec-oob": "query-version", "id": "o2"}))
    run.check(r["error"]["desc"] == "QMP input member 'execute' clashes with 'exec-oob'", str(r))
    run.rec("execute with oob enabled", c.exchange({"execute": "query-jobs", "id": "o3"}))
    c.close()
    run.stop("term")


@scenario
def test_request_validation(run):
    """Malformed JSON, non-object input, request-object rules, id echo."""
    d = run.start(connect=False)
    c = RawQMP(d.sock)
    c.recv()
    c.exchange({"execute": "qmp_capabilities"})
    cases = [
        ("non-object array", b'[1, 2]\n'),
        ("non-object string", b'"query-version"\n'),
        ("non-object number", b'42\n'),
        ("execute not string", {"execute": 1, "id": "x1"}),
        ("arguments not object", {"execute": "query-version", "arguments": [], "id": "x2"}),
        ("unexpected member", {"execute": "query-version", "foo": 1, "id": "x3"}),
        ("exec-oob without oob", {"exec-oob": "query-version", "id": "x4"}),
        ("both execute and exec-oob", {"execute": "query-version", "exec-oob": "query-version", "id": "x5"}),
        ("lacks execute", {"arguments": {}, "id": "x6"}),
        ("id string", {"execute": "no-such-command", "id": "abc"}),
        ("id int", {"execute": "no-such-command", "id": 17}),
        ("id object", {"execute": "no-such-command", "id": {"a": [1, "b"], "n": None}}),
        ("id on success", {"execute": "query-jobs", "id": [1, 2]}),
        ("single quotes", b"{'execute': 'query-jobs', 'id': 'sq'}"),
        ("no newline between requests 1", b'{"execute":"query-jobs","id":"n1"}{"execute":"query-jobs","id":"n2"}'),
    ]
    for label, data in cases:
        r = run.rec(label, c.exchange(data))
        if label == "no newline between requests 1":
            run.rec("no newline between requests 2", c.recv_response())
    # literal texts from qapi/qmp-dispatch.c
    t = dict((e[0], e[1]) for e in run.transcript)
    run.check(t["non-object array"] == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}},
              str(t["non-object array"]))
    run.check(t["lacks execute"]["error"]["desc"] == "QMP input lacks member 'execute'", str(t["lacks execute"]))
    run.check(t["id int"] == {"id": 17, "error": {"class": "CommandNotFound",
                                                  "desc": "The command no-such-command has not been found"}},
              str(t["id int"]))
    run.check(t["id object"]["id"] == {"a": [1, "b"], "n": None}, str(t["id object"]))
    # malformed JSON (parse errors carry no id); the stream must recover afterwards
    for label, data in [
        ("bad json closing brace", b'}\n'),
        ("bad json bare word", b'{"execute": foo}\n'),
        ("bad json trailing comma", b'{"execute": "query-jobs",}\n'),
    ]:
        r = run.rec(label, c.exchange(data))
        run.check("error" in r and r["error"]["desc"].startswith("JSON parse error"), f"{label}: {r}")
        run.rec(label + " recovery", c.exchange({"execute": "query-jobs", "id": "rec"}))
    c.close()
    run.stop("term")


@scenario
def test_argument_validation(run):
    """QAPI input-visitor errors: missing, unexpected, mistyped, bad enum, null."""
    run.start()
    run.err("block-dirty-bitmap-add", {"node": "x"}, desc="Parameter 'name' is missing")
    run.err("query-version", {"foo": 1}, desc="Parameter 'foo' is unexpected")
    run.err("query-named-block-nodes", {"flat": "yes"},
            desc="Invalid parameter type for 'flat', expected: boolean")
    run.err("block-job-set-speed", {"device": "j", "speed": "fast"},
            desc="Invalid parameter type for 'speed', expected: integer")
    run.err("block-job-set-speed", {"device": 5, "speed": 1},
            desc="Invalid parameter type for 'device', expected: string")
    run.err("blockdev-add", {"driver": "bogus", "node-name": "n"})
    run.err("blockdev-add", {"driver": "file", "node-name": "n", "filename": "/x", "bogus": 1},
            desc="Parameter 'bogus' is unexpected")
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "n",
                             "file": {"driver": "file", "filename": "/x", "bogus": 1}},
            desc="Parameter 'file.bogus' is unexpected")
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "n", "file": 7},
            desc="Invalid parameter type for 'file', expected: BlockdevRef")
    run.err("blockdev-backup", {"job-id": "j", "device": "a", "target": "b", "sync": "sideways"},
            desc="Parameter 'sync' does not accept value 'sideways'")
    run.err("query-named-block-nodes", {"flat": None},
            desc="Invalid parameter type for 'flat', expected: boolean")
    run.err("block-dirty-bitmap-add", {"node": "x", "name": "b", "granularity": -1})
    run.err("transaction", {"actions": [{"type": "abort", "data": {}, "x": 1}]})
    run.err("transaction", {"actions": [{"type": "nope", "data": {}}]})
    run.err("query-qmp-schema", [], label="arguments as list")
    run.stop()


@scenario
def test_query_commands_and_version(run):
    run.start()
    cmds = sorted(c["name"] for c in run.ok("query-commands", record=False))
    expected = schema_commands()
    missing = sorted(set(expected) - set(cmds))
    run.rec("missing from query-commands", missing)
    run.rec("query-commands", cmds)
    run.check(not missing, f"query-commands lacks {missing}")
    v = run.ok("query-version", record=False)
    run.rec("query-version shape", version_shape(v))
    g = run.d.greeting
    run.check(g["QMP"]["version"] == v, f"greeting version {g['QMP']['version']} != query-version {v}")
    schema = run.ok("query-qmp-schema", record=False)
    run.rec("schema command names", sorted(x["name"] for x in schema if x["meta-type"] == "command"))
    run.rec("schema event names", sorted(x["name"] for x in schema if x["meta-type"] == "event"))
    run.stop()
