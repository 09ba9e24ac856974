//! QOM over QMP: `qom-list`, `qom-get`, `qom-set`, `qom-list-types`,
//! `qom-list-properties`, over qsd's tree: `/objects/ID` (user-created objects),
//! `/chardevs/ID` and the empty `/backend` container. A throttle group's `limits` can be
//! read and changed at runtime, as in QEMU.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use strata_qmp::{ErrorClass, QmpError};

use super::{Args, Reply, arg_str, generic, ok, opt_bool, opt_str};
use crate::daemon::Daemon;

/// QOM bookkeeping of user-created objects.
#[derive(Debug, Default)]
pub struct QomState {
    /// Properties given at creation (and set since), by object id.
    props: BTreeMap<String, (String, Map<String, Value>)>,
    /// Insertions into / removals from `/objects`, for its iteration order.
    history: Vec<(String, bool)>,
}

impl QomState {
    /// Object `id` of type `kind` was created with `props`.
    pub fn added(&mut self, id: &str, kind: &str, props: &Map<String, Value>) {
        self.props
            .insert(id.to_string(), (kind.to_string(), props.clone()));
        self.history.push((id.to_string(), true));
    }

    /// Object `id` was deleted.
    pub fn removed(&mut self, id: &str) {
        if self.props.remove(id).is_some() {
            self.history.push((id.to_string(), false));
        }
    }

    fn ids(&self) -> Vec<String> {
        let ops: Vec<(&str, bool)> = self.history.iter().map(|(k, i)| (k.as_str(), *i)).collect();
        strata_qmp::ghash_iteration_order(&ops)
    }
}

/// Every QOM type qsd 10.0.2 has: (name, parent, abstract), in its `qom-list-types` order.
const TYPES: &[(&str, Option<&str>, bool)] = &[
    ("qio-channel-null", Some("qio-channel"), false),
    ("authz-simple", Some("authz"), false),
    ("qio-channel-socket", Some("qio-channel"), false),
    ("secret_common", Some("object"), true),
    ("container", Some("object"), false),
    ("interface", None, true),
    ("chardev-hub", Some("chardev"), false),
    ("tls-creds-anon", Some("tls-creds"), false),
    ("pr-manager-helper", Some("pr-manager"), false),
    ("iothread", Some("event-loop-base"), false),
    ("secret", Some("secret_common"), false),
    ("authz", Some("object"), true),
    ("chardev-serial", Some("chardev-fd"), false),
    ("qio-channel", Some("object"), true),
    ("chardev-mux", Some("chardev"), false),
    ("tls-creds-psk", Some("tls-creds"), false),
    ("tls-creds", Some("object"), true),
    ("qio-channel-file", Some("qio-channel"), false),
    ("qio-channel-command", Some("qio-channel"), false),
    ("qio-channel-websock", Some("qio-channel"), false),
    ("chardev-pipe", Some("chardev-fd"), false),
    ("main-loop", Some("event-loop-base"), false),
    ("chardev-parallel", Some("chardev"), false),
    ("qio-channel-tls", Some("qio-channel"), false),
    ("authz-list-file", Some("authz"), false),
    ("qio-net-listener", Some("object"), false),
    ("pr-manager", Some("object"), true),
    ("chardev-null", Some("chardev"), false),
    ("chardev-ringbuf", Some("chardev"), false),
    ("authz-list", Some("authz"), false),
    ("qio-dns-resolver", Some("object"), false),
    ("event-loop-base", Some("object"), true),
    ("chardev-fd", Some("chardev"), true),
    ("chardev", Some("object"), true),
    ("user-creatable", Some("interface"), true),
    ("chardev-socket", Some("chardev"), false),
    ("chardev-stdio", Some("chardev-fd"), false),
    ("chardev-memory", Some("chardev-ringbuf"), false),
    ("qio-channel-buffer", Some("qio-channel"), false),
    ("object", None, true),
    ("chardev-udp", Some("chardev"), false),
    ("tls-creds-x509", Some("tls-creds"), false),
    ("chardev-file", Some("chardev-fd"), false),
    ("chardev-pty", Some("chardev"), false),
    ("thread-context", Some("object"), false),
    ("secret_keyring", Some("secret_common"), false),
    ("throttle-group", Some("object"), false),
];

/// Types implementing the `user-creatable` interface.
const USER_CREATABLE: &[&str] = &[
    "authz-simple",
    "secret_common",
    "tls-creds-anon",
    "pr-manager-helper",
    "iothread",
    "secret",
    "tls-creds-psk",
    "main-loop",
    "authz-list-file",
    "pr-manager",
    "authz-list",
    "event-loop-base",
    "tls-creds-x509",
    "thread-context",
    "secret_keyring",
    "throttle-group",
];

/// Properties by type (qsd's `qom-list-properties` order): (name, type).
const PROPS: &[(&str, &[(&str, &str)])] = &[
    (
        "throttle-group",
        &[
            ("type", "string"),
            ("x-bps-write-max-length", "int"),
            ("x-iops-total-max-length", "int"),
            ("x-iops-size", "int"),
            ("limits", "ThrottleLimits"),
            ("x-bps-total", "int"),
            ("x-iops-read-max-length", "int"),
            ("x-bps-write", "int"),
            ("x-iops-write-max-length", "int"),
            ("x-bps-read-max", "int"),
            ("x-iops-read-max", "int"),
            ("x-bps-total-max", "int"),
            ("x-bps-read-max-length", "int"),
            ("x-iops-read", "int"),
            ("x-bps-read", "int"),
            ("x-bps-write-max", "int"),
            ("x-iops-total-max", "int"),
            ("x-iops-total", "int"),
            ("x-iops-write", "int"),
            ("x-bps-total-max-length", "int"),
            ("x-iops-write-max", "int"),
        ],
    ),
    (
        "iothread",
        &[
            ("type", "string"),
            ("thread-pool-min", "int"),
            ("aio-max-batch", "int"),
            ("thread-pool-max", "int"),
            ("poll-max-ns", "int"),
            ("poll-grow", "int"),
            ("poll-shrink", "int"),
        ],
    ),
    (
        "secret",
        &[
            ("type", "string"),
            ("iv", "string"),
            ("keyid", "string"),
            ("format", "QCryptoSecretFormat"),
            ("file", "string"),
            ("data", "string"),
        ],
    ),
    (
        "secret_keyring",
        &[
            ("type", "string"),
            ("iv", "string"),
            ("keyid", "string"),
            ("format", "QCryptoSecretFormat"),
            ("serial", "int32_t"),
        ],
    ),
    (
        "tls-creds-x509",
        &[
            ("type", "string"),
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("dir", "string"),
            ("verify-peer", "bool"),
            ("priority", "string"),
            ("sanity-check", "bool"),
            ("passwordid", "string"),
        ],
    ),
    (
        "tls-creds-psk",
        &[
            ("type", "string"),
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("dir", "string"),
            ("verify-peer", "bool"),
            ("priority", "string"),
            ("username", "string"),
        ],
    ),
    (
        "tls-creds-anon",
        &[
            ("type", "string"),
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("dir", "string"),
            ("verify-peer", "bool"),
            ("priority", "string"),
        ],
    ),
    (
        "authz-simple",
        &[("type", "string"), ("identity", "string")],
    ),
    (
        "authz-list",
        &[
            ("type", "string"),
            ("policy", "QAuthZListPolicy"),
            ("rules", "QAuthZListRule"),
        ],
    ),
    (
        "authz-list-file",
        &[
            ("type", "string"),
            ("filename", "string"),
            ("refresh", "bool"),
        ],
    ),
    (
        "pr-manager-helper",
        &[("type", "string"), ("path", "string")],
    ),
    (
        "main-loop",
        &[
            ("type", "string"),
            ("thread-pool-min", "int"),
            ("aio-max-batch", "int"),
            ("thread-pool-max", "int"),
        ],
    ),
    (
        "thread-context",
        &[
            ("type", "string"),
            ("thread-id", "int"),
            ("node-affinity", "int"),
            ("cpu-affinity", "int"),
        ],
    ),
    (
        "chardev-socket",
        &[
            ("type", "string"),
            ("connected", "bool"),
            ("addr", "SocketAddress"),
        ],
    ),
    ("chardev-ringbuf", &[("type", "string")]),
    ("chardev-memory", &[("type", "string")]),
    ("chardev-null", &[("type", "string")]),
    ("chardev-file", &[("type", "string")]),
    ("chardev-stdio", &[("type", "string")]),
    ("container", &[("type", "string")]),
];

/// Defaults of readable properties that were not given at creation.
const DEFAULTS: &[(&str, &str, i64)] = &[
    ("iothread", "poll-max-ns", 32768),
    ("iothread", "poll-grow", 0),
    ("iothread", "poll-shrink", 0),
    ("iothread", "aio-max-batch", 0),
    ("iothread", "thread-pool-min", 0),
    ("iothread", "thread-pool-max", 64),
];

/// Properties that can change on a live object.
const RUNTIME_SETTABLE: &[(&str, &str)] = &[
    ("iothread", "poll-max-ns"),
    ("iothread", "poll-grow"),
    ("iothread", "poll-shrink"),
    ("iothread", "aio-max-batch"),
    ("iothread", "thread-pool-min"),
    ("iothread", "thread-pool-max"),
];

fn props_of(kind: &str) -> &'static [(&'static str, &'static str)] {
    PROPS
        .iter()
        .find(|(t, _)| *t == kind)
        .map_or(&[("type", "string")][..], |(_, p)| p)
}

/// A resolved QOM path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Root,
    Container(&'static str),
    Object(String, String),
    Chardev(String, String),
}

impl Target {
    fn type_name(&self) -> String {
        match self {
            Target::Root | Target::Container(_) => "container".into(),
            Target::Object(_, t) | Target::Chardev(_, t) => t.clone(),
        }
    }
}

const CONTAINERS: [&str; 3] = ["backend", "objects", "chardevs"];

fn not_found(path: &str) -> QmpError {
    QmpError::new(
        ErrorClass::DeviceNotFound,
        format!("Device '{path}' not found"),
    )
}

/// QEMU's `object_resolve_path`: absolute paths component by component, partial paths by a
/// unique match of their trailing components anywhere in the tree.
fn resolve(d: &Daemon, path: &str) -> Result<Target, QmpError> {
    let objects: Vec<(String, String)> = d
        .qom
        .lock()
        .props
        .iter()
        .map(|(id, (t, _))| (id.clone(), t.clone()))
        .collect();
    let chardevs: Vec<(String, String)> = {
        let reg = d.chardevs.lock();
        reg.ids()
            .into_iter()
            .filter_map(|id| reg.qom_type(&id).map(|t| (id, t)))
            .collect()
    };
    let mut all: Vec<(String, Target)> = vec![("".into(), Target::Root)];
    for c in CONTAINERS {
        all.push((format!("/{c}"), Target::Container(c)));
    }
    for (id, t) in objects {
        all.push((format!("/objects/{id}"), Target::Object(id, t)));
    }
    for (id, t) in chardevs {
        all.push((format!("/chardevs/{id}"), Target::Chardev(id, t)));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if path.starts_with('/') {
        let want = parts.iter().map(|p| format!("/{p}")).collect::<String>();
        return all
            .into_iter()
            .find(|(p, _)| *p == want)
            .map(|(_, t)| t)
            .ok_or_else(|| not_found(path));
    }
    let suffix = parts.iter().map(|p| format!("/{p}")).collect::<String>();
    let found: Vec<Target> = all
        .into_iter()
        .filter(|(p, _)| !suffix.is_empty() && p.ends_with(&suffix))
        .map(|(_, t)| t)
        .collect();
    match found.len() {
        1 => Ok(found.into_iter().next().expect("one")),
        0 => Err(not_found(path)),
        _ => Err(generic(format!("Path '{path}' is ambiguous"))),
    }
}

/// `ObjectPropertyInfo`s of a node of the tree, in QEMU's order.
fn list(d: &Daemon, t: &Target) -> Vec<Value> {
    let info = |n: &str, ty: &str| json!({"name": n, "type": ty});
    let mut out = vec![info("type", "string")];
    match t {
        Target::Root => {
            for c in CONTAINERS {
                out.push(info(c, "child<container>"));
            }
        }
        Target::Container("objects") => {
            let st = d.qom.lock();
            let mut ids = st.ids();
            ids.reverse();
            for id in ids {
                if let Some((kind, _)) = st.props.get(&id) {
                    out.push(info(&id, &format!("child<{kind}>")));
                }
            }
        }
        Target::Container("chardevs") => {
            let reg = d.chardevs.lock();
            let mut ids = reg.ids();
            ids.reverse();
            for id in ids {
                if let Some(kind) = reg.qom_type(&id) {
                    out.push(info(&id, &format!("child<{kind}>")));
                }
            }
        }
        Target::Container(_) => {}
        Target::Object(_, kind) | Target::Chardev(_, kind) => {
            out = props_of(kind).iter().map(|(n, ty)| info(n, ty)).collect();
        }
    }
    out
}

fn no_property(t: &Target, name: &str) -> QmpError {
    generic(format!("Property '{}.{name}' not found", t.type_name()))
}

pub async fn qom_list(d: Arc<Daemon>, a: Args) -> Reply {
    let t = resolve(&d, arg_str(&a, "path"))?;
    Ok(Value::Array(list(&d, &t)))
}

pub async fn qom_get(d: Arc<Daemon>, a: Args) -> Reply {
    let t = resolve(&d, arg_str(&a, "path"))?;
    let name = arg_str(&a, "property");
    if name == "type" {
        return Ok(json!(t.type_name()));
    }
    match &t {
        Target::Root => {
            if CONTAINERS.contains(&name) {
                return Ok(json!(format!("/{name}")));
            }
        }
        Target::Container(c) => {
            let has = match *c {
                "objects" => d.qom.lock().props.contains_key(name),
                "chardevs" => d.chardevs.lock().qom_type(name).is_some(),
                _ => false,
            };
            if has {
                return Ok(json!(format!("/{c}/{name}")));
            }
        }
        Target::Object(id, kind) => {
            if !props_of(kind).iter().any(|(n, _)| *n == name) {
                return Err(no_property(&t, name));
            }
            if kind == "throttle-group" {
                let Some(g) = d.objects.lock().1.throttle_groups.get(id).cloned() else {
                    return Err(not_found(arg_str(&a, "path")));
                };
                let limits = g.limits().to_json();
                return Ok(match name.strip_prefix("x-") {
                    Some(field) => limits.get(field).cloned().unwrap_or(json!(0)),
                    None => match limits {
                        Value::Object(m) => Value::Object(strata_job::qdict::qemu_order(m)),
                        v => v,
                    },
                });
            }
            let st = d.qom.lock();
            if let Some(v) = st.props.get(id).and_then(|(_, p)| p.get(name)) {
                return Ok(v.clone());
            }
            if let Some((_, _, v)) = DEFAULTS
                .iter()
                .find(|(t, n, _)| *t == kind.as_str() && *n == name)
            {
                return Ok(json!(v));
            }
            return Err(generic(format!("Property '{kind}.{name}' is not readable")));
        }
        Target::Chardev(id, kind) => {
            if kind == "chardev-socket" && name == "connected" {
                return Ok(json!(d.chardevs.lock().connected(id)));
            }
            if !props_of(kind).iter().any(|(n, _)| *n == name) {
                return Err(no_property(&t, name));
            }
            return Err(generic(format!("Property '{kind}.{name}' is not readable")));
        }
    }
    Err(no_property(&t, name))
}

pub async fn qom_set(d: Arc<Daemon>, a: Args) -> Reply {
    let t = resolve(&d, arg_str(&a, "path"))?;
    let name = arg_str(&a, "property");
    let value = a.get("value").cloned().unwrap_or(Value::Null);
    let not_writable = || {
        generic(format!(
            "Property '{}.{name}' is not writable",
            t.type_name()
        ))
    };
    if name == "type" {
        return Err(not_writable());
    }
    match &t {
        Target::Object(id, kind) => {
            if !props_of(kind).iter().any(|(n, _)| *n == name) {
                return Err(no_property(&t, name));
            }
            if kind == "throttle-group" && name == "limits" {
                let Some(g) = d.objects.lock().1.throttle_groups.get(id).cloned() else {
                    return Err(not_found(arg_str(&a, "path")));
                };
                // Visitor errors name the member inside the property.
                let l = g.limits().merged_with_json(&value).map_err(|e| {
                    let mut e = e;
                    for p in ["Parameter '", "Invalid parameter type for '"] {
                        if let Some(rest) = e.strip_prefix(p)
                            && !rest.starts_with("limits'")
                        {
                            e = format!("{p}limits.{rest}");
                        }
                    }
                    generic(e)
                })?;
                g.set_limits(l).map_err(generic)?;
                return Ok(ok());
            }
            if RUNTIME_SETTABLE
                .iter()
                .any(|(t, n)| *t == kind.as_str() && *n == name)
            {
                if !value.is_i64() && !value.is_u64() {
                    return Err(generic(format!(
                        "Invalid parameter type for '{name}', expected: integer"
                    )));
                }
                if let Some((_, p)) = d.qom.lock().props.get_mut(id) {
                    p.insert(name.to_string(), value);
                }
                return Ok(ok());
            }
            Err(generic("Property cannot be set after initialization"))
        }
        Target::Root | Target::Container(_) => {
            let t2 = t.clone();
            match qom_get(d.clone(), a.clone()).await {
                Ok(_) => Err(not_writable()),
                Err(_) => Err(no_property(&t2, name)),
            }
        }
        Target::Chardev(..) => {
            if t.type_name() == "chardev-socket" && matches!(name, "connected" | "addr") {
                return Err(not_writable());
            }
            Err(no_property(&t, name))
        }
    }
}

/// Whether type `t` is `of` or derives from it (or implements the interface).
fn implements(t: &str, of: &str) -> bool {
    if of == "user-creatable" && (t == of || USER_CREATABLE.contains(&t)) {
        return true;
    }
    if of == "interface" && (t == of || t == "user-creatable" || USER_CREATABLE.contains(&t)) {
        return true;
    }
    let mut cur = Some(t);
    while let Some(c) = cur {
        if c == of {
            return true;
        }
        cur = TYPES
            .iter()
            .find(|(n, _, _)| *n == c)
            .and_then(|(_, p, _)| *p);
    }
    false
}

pub async fn qom_list_types(_d: Arc<Daemon>, a: Args) -> Reply {
    let want_abstract = opt_bool(&a, "abstract").unwrap_or(false);
    let imp = opt_str(&a, "implements");
    if let Some(i) = imp
        && !TYPES.iter().any(|(n, _, _)| *n == i)
    {
        // QEMU lists nothing for an unknown type.
        return Ok(json!([]));
    }
    let list: Vec<Value> = TYPES
        .iter()
        .filter(|(n, _, abs)| (want_abstract || !abs) && imp.is_none_or(|i| implements(n, i)))
        .map(|(n, p, abs)| {
            let mut m = Map::new();
            m.insert("name".into(), json!(n));
            if *abs {
                m.insert("abstract".into(), json!(true));
            }
            if let Some(p) = p {
                m.insert("parent".into(), json!(p));
            }
            Value::Object(strata_job::qdict::qemu_order(m))
        })
        .collect();
    Ok(Value::Array(list))
}

pub async fn qom_list_properties(_d: Arc<Daemon>, a: Args) -> Reply {
    let name = arg_str(&a, "typename");
    if !TYPES.iter().any(|(n, _, _)| *n == name) {
        return Err(QmpError::new(
            ErrorClass::DeviceNotFound,
            format!("Class '{name}' not found"),
        ));
    }
    if matches!(name, "interface" | "user-creatable") {
        return Err(generic("Parameter 'typename' expects a QOM type"));
    }
    Ok(Value::Array(
        props_of(name)
            .iter()
            .map(|(n, t)| json!({"name": n, "type": t}))
            .collect(),
    ))
}
