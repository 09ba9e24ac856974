//! Schema visitor tests; expected texts observed from qemu-storage-daemon 10.0.2.

use super::*;
use serde_json::json;

fn err(cmd: &str, args: Value) -> String {
    let Value::Object(m) = args else { panic!() };
    Schema::qsd()
        .validate_command_args(cmd, &m)
        .unwrap_err()
        .desc
}

fn ok(cmd: &str, args: Value) {
    let Value::Object(m) = args else { panic!() };
    Schema::qsd().validate_command_args(cmd, &m).unwrap();
}

#[test]
fn json_mode_matches_qsd() {
    let cases: &[(&str, Value, &str)] = &[
        ("block-stream", json!({}), "Parameter 'device' is missing"),
        (
            "block-stream",
            json!({"job-id": "x"}),
            "Parameter 'device' is missing",
        ),
        (
            "job-pause",
            json!({"id": 1}),
            "Invalid parameter type for 'id', expected: string",
        ),
        (
            "job-pause",
            json!({"id": null}),
            "Invalid parameter type for 'id', expected: string",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "a", "name": "b", "granularity": -1}),
            "Parameter 'granularity' expects uint32_t",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "a", "name": "b", "granularity": 1.5}),
            "Parameter 'granularity' expects uint64",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "a", "name": "b", "granularity": "x"}),
            "Parameter 'granularity' expects uint64",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "a", "name": "b", "granularity": 18446744073709551615u64}),
            "Parameter 'granularity' expects uint32_t",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "a", "name": "b", "granularity": 18446744073709551616.0}),
            "Parameter 'granularity' expects uint64",
        ),
        (
            "blockdev-add",
            json!({"driver": "bogus", "node-name": "a"}),
            "Parameter 'driver' does not accept value 'bogus'",
        ),
        (
            "blockdev-add",
            json!({"node-name": "a"}),
            "Parameter 'driver' is missing",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "a"}),
            "Parameter 'filename' is missing",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "a", "filename": "x", "read-only": "on"}),
            "Invalid parameter type for 'read-only', expected: boolean",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": {"driver": "file", "filename": "x", "bogus": 1}}),
            "Parameter 'file.bogus' is unexpected",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": 5}),
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "f", "backing": 5}),
            "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": null}),
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "f", "overlap-check": 5}),
            "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "f", "discard": "bogus"}),
            "Parameter 'discard' does not accept value 'bogus'",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "f", "discard": 1}),
            "Invalid parameter type for 'discard', expected: string",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "f", "cache": {"direct": "x"}}),
            "Invalid parameter type for 'cache.direct', expected: boolean",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "f", "cache": 5}),
            "Invalid parameter type for 'cache', expected: object",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "a", "file": "f", "encrypt": {"bogus": 1}}),
            "Parameter 'encrypt.format' is missing",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "a", "size": 9223372036854775808u64}),
            "Invalid parameter type for 'size', expected: integer",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "a", "latency-ns": -1, "size": 1.0}),
            "Invalid parameter type for 'size', expected: integer",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "a", "file": "f", "size": true}),
            "Invalid parameter type for 'size', expected: integer",
        ),
        (
            "transaction",
            json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "a"}}]}),
            "Parameter 'actions[0].data.name' is missing",
        ),
        (
            "transaction",
            json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "b", "x": 1}}]}),
            "Parameter 'actions[0].data.x' is unexpected",
        ),
        (
            "transaction",
            json!({"actions": [{"data": {"node": "a"}}]}),
            "Parameter 'actions[0].type' is missing",
        ),
        (
            "transaction",
            json!({"actions": [{"type": "bogus"}]}),
            "Parameter 'type' does not accept value 'bogus'",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "a", "target": "b", "bitmaps": [1]}),
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "a", "target": "b", "bitmaps": [{"node": "x"}]}),
            "Parameter 'bitmaps[0].name' is missing",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "a", "target": "b", "bitmaps": [{"node": "x", "name": "y", "z": 1}]}),
            "Parameter 'bitmaps[0].z' is unexpected",
        ),
        (
            "query-version",
            json!({"x": 1}),
            "Parameter 'x' is unexpected",
        ),
        (
            "blockdev-create",
            json!({"job-id": "j", "options": {"driver": "qcow2", "file": "f", "size": 1.5}}),
            "Parameter 'options.size' expects uint64",
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "path": "/x"}, "max-connections": -1}),
            "Parameter 'max-connections' expects uint32_t",
        ),
        (
            "block-job-set-speed",
            json!({"device": "a", "speed": 1.5}),
            "Invalid parameter type for 'speed', expected: integer",
        ),
        (
            "block-job-set-speed",
            json!({"device": "a", "speed": 9223372036854775808u64}),
            "Invalid parameter type for 'speed', expected: integer",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "a", "latency-ns": 18446744073709551616.0}),
            "Parameter 'latency-ns' expects uint64",
        ),
        (
            "qmp_capabilities",
            json!({"enable": ["bogus"]}),
            "Parameter 'null' does not accept value 'bogus'",
        ),
        (
            "qmp_capabilities",
            json!({"enable": "oob"}),
            "Invalid parameter type for 'enable', expected: array",
        ),
        (
            "qmp_capabilities",
            json!({"enable": ["oob"], "x": 1}),
            "Parameter 'x' is unexpected",
        ),
    ];
    for (cmd, args, want) in cases {
        assert_eq!(err(cmd, args.clone()), *want, "{cmd} {args}");
    }
}

#[test]
fn json_mode_accepts() {
    ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "a", "file": "f", "backing": null, "l2-cache-size": -1}),
    );
    ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "a", "file": "f", "encrypt": {"format": "luks"}}),
    );
    ok(
        "blockdev-create",
        json!({"job-id": "j", "options": {"driver": "qcow2", "file": "f", "size": -1}}),
    );
    ok("query-version", json!({}));
    ok(
        "block-dirty-bitmap-add",
        json!({"node": "a", "name": "b", "granularity": 65536}),
    );
    let e = Schema::qsd()
        .validate_command_args("nonexist", &Map::new())
        .unwrap_err();
    assert_eq!(e.class, crate::ErrorClass::CommandNotFound);
    assert_eq!(e.desc, "The command nonexist has not been found");
}

fn kv(cmd: &str, s: &str, implied: Option<&str>) -> Result<Value, String> {
    let tree = crate::keyval::parse(s, implied)?;
    Schema::qsd()
        .convert_keyval_command_args(cmd, &tree)
        .map_err(|e| e.desc)
}

#[test]
fn keyval_mode() {
    assert_eq!(
        kv(
            "blockdev-add",
            "driver=qcow2,node-name=n,file.driver=file,file.filename=x,read-only=on",
            None
        )
        .unwrap(),
        json!({"driver": "qcow2", "node-name": "n", "read-only": true, "file": {"driver": "file", "filename": "x"}})
    );
    assert_eq!(
        kv(
            "blockdev-add",
            "null-co,node-name=a,size=0x1000,latency-ns=-1",
            Some("driver")
        )
        .unwrap(),
        json!({"driver": "null-co", "node-name": "a", "size": 4096, "latency-ns": 18446744073709551615u64})
    );
    assert_eq!(
        kv("blockdev-create", "job-id=j,options.driver=qcow2,options.file=f,options.size=1.5G,options.cluster-size=64k", None).unwrap()["options"],
        json!({"driver": "qcow2", "file": "f", "size": 1610612736u64, "cluster-size": 65536})
    );
    assert_eq!(
        kv("blockdev-add", "driver=quorum,node-name=q,children.0=a,children.1.driver=file,children.1.filename=x,vote-threshold=1", None).unwrap()["children"],
        json!(["a", {"driver": "file", "filename": "x"}])
    );
    // Texts observed from qemu-storage-daemon's command line.
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        (
            "blockdev-add",
            "driver=file,node-name=a,filename=x,read-only=maybe",
            None,
            "Parameter 'read-only' expects 'on' or 'off'",
        ),
        (
            "blockdev-add",
            "driver=file,,node-name=a",
            Some("driver"),
            "Parameter 'driver' does not accept value 'file,node-name=a'",
        ),
        (
            "blockdev-add",
            "driver=file,node-name=a,node-name=b",
            None,
            "Parameter 'filename' is missing",
        ),
        (
            "blockdev-add",
            "driver=file,node-name=a,filename=x,bogus=1",
            None,
            "Parameter 'bogus' is unexpected",
        ),
        (
            "blockdev-add",
            "driver=file,node-name=a,filename=x,cache.bogus=1",
            None,
            "Parameter 'cache.bogus' is unexpected",
        ),
        (
            "blockdev-add",
            "driver=file,node-name=a,filename=x,cache=1",
            None,
            "Invalid parameter type for 'cache', expected: object",
        ),
        (
            "blockdev-add",
            "driver=null-co,node-name=a,size=1k",
            None,
            "Parameter 'size' expects integer",
        ),
        (
            "blockdev-add",
            "driver=null-co,node-name=a,latency-ns=x",
            None,
            "Parameter 'latency-ns' expects integer",
        ),
        (
            "blockdev-add",
            "driver=bogus,node-name=a",
            None,
            "Parameter 'driver' does not accept value 'bogus'",
        ),
        (
            "blockdev-add",
            "node-name=a",
            Some("driver"),
            "Parameter 'driver' is missing",
        ),
        (
            "blockdev-add",
            "driver=file,node-name=a,filename=x,discard=bogus",
            None,
            "Parameter 'discard' does not accept value 'bogus'",
        ),
        (
            "blockdev-add",
            "driver=quorum,node-name=a,children.0=x,children.1.bogus=y",
            None,
            "Parameter 'children.1.driver' is missing",
        ),
        (
            "blockdev-add",
            "driver=raw,node-name=a,file.driver=file,file.filename=/n,offset=1G",
            None,
            "Parameter 'offset' expects integer",
        ),
        (
            "nbd-server-start",
            "addr.type=unix,addr.path=/n.sock,max-connections=x",
            None,
            "Parameter 'max-connections' expects integer",
        ),
        (
            "nbd-server-start",
            "addr.type=unix,addr.path=/n.sock,max-connections=-1",
            None,
            "Parameter 'max-connections' expects uint32_t",
        ),
        (
            "nbd-server-start",
            "addr.type=unix,addr.path=/n.sock,max-connections=99999999999",
            None,
            "Parameter 'max-connections' expects uint32_t",
        ),
        (
            "block-export-add",
            "bogus,id=e,node-name=x",
            Some("type"),
            "Parameter 'type' does not accept value 'bogus'",
        ),
        (
            "object-add",
            "iothread,id=i,poll-max-ns=x",
            Some("qom-type"),
            "Parameter 'poll-max-ns' expects integer",
        ),
        (
            "object-add",
            "bogus,id=i",
            Some("qom-type"),
            "Parameter 'qom-type' does not accept value 'bogus'",
        ),
    ];
    for (cmd, s, implied, want) in cases {
        assert_eq!(kv(cmd, s, *implied).unwrap_err(), *want, "{s}");
    }
    let tree = crate::keyval::parse("chardev=c,pretty=x", Some("chardev")).unwrap();
    assert_eq!(
        Schema::qsd()
            .convert_keyval("MonitorOptions", &tree)
            .unwrap_err()
            .desc,
        "Parameter 'pretty' expects 'on' or 'off'"
    );
    let tree = crate::keyval::parse("c,pretty=on", Some("chardev")).unwrap();
    assert_eq!(
        Schema::qsd()
            .convert_keyval("MonitorOptions", &tree)
            .unwrap(),
        json!({"chardev": "c", "pretty": true})
    );
}

#[test]
fn numbers() {
    assert_eq!(parse_size("1k"), Some(1024));
    assert_eq!(parse_size("1.5G"), Some(1610612736));
    assert_eq!(parse_size("0x10"), Some(16));
    assert_eq!(parse_size("-1"), None);
    assert_eq!(parse_size("1.5"), None);
    assert_eq!(parse_size("16E"), None);
    assert_eq!(parse_i64("-0x10"), Some(-16));
    assert_eq!(parse_i64("010"), Some(8));
    assert_eq!(parse_i64("1k"), None);
    assert_eq!(parse_u64("-1"), Some(u64::MAX));
}

#[test]
fn introspection_and_names() {
    let s = Schema::qsd();
    assert_eq!(s.command_names().len(), 76);
    let v = s.introspect(&["query-version", "qmp_capabilities"]);
    let a = v.as_array().unwrap();
    let names: Vec<&str> = a.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"query-version"));
    assert!(!names.contains(&"blockdev-add"));
    assert!(names.contains(&"JOB_STATUS_CHANGE"));
    assert!(names.contains(&"79"));
    // Every referenced type is present.
    let full = s.introspect(&s.command_names());
    assert_eq!(
        full.as_array().unwrap().len(),
        serde_json::from_str::<Vec<Value>>(QSD_SCHEMA_JSON)
            .unwrap()
            .len()
    );
    let order = s.query_commands_order(&["job-pause", "query-version", "object-del", "mine"]);
    assert_eq!(order, ["mine", "object-del", "query-version", "job-pause"]);
}

proptest::proptest! {
    #[test]
    fn keyval_convert_never_panics(s in "[a-z0-9=,.\\-]{0,80}") {
        if let Ok(tree) = crate::keyval::parse(&s, Some("driver")) {
            let _ = Schema::qsd().convert_keyval_command_args("blockdev-add", &tree);
        }
    }
}

#[test]
fn extensions_add_optional_members_and_enum_values_without_changing_introspection() {
    let mut s = Schema::from_json(QSD_SCHEMA_JSON).unwrap();
    let before = s.introspect(&["block-commit", "blockdev-mirror"]);
    s.apply_extensions(
        r#"{"members": [{"command": "block-commit", "name": "x-demo", "type": "bool"}],
            "enum-values": [{"command": "blockdev-mirror", "member": "copy-mode",
                             "values": ["demo"]}]}"#,
    )
    .unwrap();
    let args = |v: Value| v.as_object().unwrap().clone();
    s.validate_command_args(
        "block-commit",
        &args(json!({"device": "d", "x-demo": true})),
    )
    .unwrap();
    let e = s
        .validate_command_args("block-commit", &args(json!({"device": "d", "x-demo": 1})))
        .unwrap_err();
    assert_eq!(
        e.desc,
        "Invalid parameter type for 'x-demo', expected: boolean"
    );
    let mirror = json!({"device": "d", "target": "t", "sync": "full", "copy-mode": "demo"});
    s.validate_command_args("blockdev-mirror", &args(mirror))
        .unwrap();
    assert_eq!(s.introspect(&["block-commit", "blockdev-mirror"]), before);
    // qsd's own requests keep their meaning.
    s.validate_command_args("block-commit", &args(json!({"device": "d"})))
        .unwrap();
    assert!(
        s.apply_extensions(r#"{"members": [{"command": "no-such", "name": "a", "type": "bool"}]}"#)
            .is_err()
    );
}

#[test]
fn embedded_extensions_load() {
    assert!(Schema::qsd().has_command("block-commit"));
}

#[test]
fn extension_members_reach_one_command_and_union_variants() {
    let mut s = Schema::from_json(QSD_SCHEMA_JSON).unwrap();
    s.apply_extensions(
        r#"{"members": [{"command": "nbd-server-stop", "name": "x-id", "type": "str"},
                        {"command": "block-export-add", "variant": "nbd",
                         "name": "x-server", "type": "str"}]}"#,
    )
    .unwrap();
    let args = |v: Value| v.as_object().unwrap().clone();
    s.validate_command_args("nbd-server-stop", &args(json!({"x-id": "a"})))
        .unwrap();
    // Other commands without arguments share the empty argument type: they stay strict.
    let e = s
        .validate_command_args("query-jobs", &args(json!({"x-id": "a"})))
        .unwrap_err();
    assert_eq!(e.desc, "Parameter 'x-id' is unexpected");
    let nbd = json!({"type": "nbd", "id": "e", "node-name": "n", "x-server": "s"});
    s.validate_command_args("block-export-add", &args(nbd))
        .unwrap();
    let fuse = json!({"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/m",
                      "x-server": "s"});
    assert!(
        s.validate_command_args("block-export-add", &args(fuse))
            .is_err()
    );
    assert!(
        s.apply_extensions(
            r#"{"members": [{"command": "block-export-add", "variant": "nope", "name": "a",
                             "type": "bool"}]}"#
        )
        .is_err()
    );
}
