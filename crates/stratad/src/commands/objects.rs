//! `object-add` / `object-del`: throttle groups (used by throttle nodes), TLS credentials and
//! secrets (used by NBD), iothreads (accepted; the runtime schedules I/O itself).

use std::sync::Arc;

use serde_json::Value;
use strata_graph::drivers::throttle::{ThrottleGroup, ThrottleLimits};

use super::{Args, Reply, arg_str, generic, ok};
use crate::daemon::{Daemon, Object};

/// Create the object `a` describes (`qom-type`, `id`, properties).
pub fn add(d: &Daemon, a: &Args) -> Result<(), strata_qmp::QmpError> {
    let kind = arg_str(a, "qom-type");
    let id = arg_str(a, "id");
    let mut objs = d.objects.lock();
    if objs.0.contains_key(id) {
        return Err(generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    let mut props = a.clone();
    props.remove("qom-type");
    props.remove("id");
    let obj = match kind {
        "throttle-group" => {
            // Limits come as `limits: {...}` or as the unstable top-level `x-*` aliases.
            let mut limits = props
                .get("limits")
                .cloned()
                .unwrap_or(Value::Object(Default::default()));
            for (k, v) in &props {
                if let Some(name) = k.strip_prefix("x-") {
                    limits[name] = v.clone();
                }
            }
            let l = ThrottleLimits::from_json(&limits).map_err(generic)?;
            objs.1
                .throttle_groups
                .insert(id.to_string(), ThrottleGroup::new(id, l));
            Object::ThrottleGroup
        }
        "iothread" => Object::Iothread,
        "secret" => {
            match (props.get("data"), props.get("file")) {
                (Some(Value::String(_)), _) => {}
                (None, Some(Value::String(f))) => {
                    std::fs::metadata(f)
                        .map_err(|e| generic(format!("Unable to read {f}: {e}")))?;
                }
                _ => return Err(generic("Either 'data' or 'file' must be provided")),
            }
            Object::Secret
        }
        "tls-creds-x509" | "tls-creds-psk" | "tls-creds-anon" => {
            // Loaded now, as QEMU does, so bad credentials fail `object-add` itself.
            if kind != "tls-creds-anon" {
                let creds = strata_nbd::TlsCreds::from_object(kind, &props).map_err(generic)?;
                objs.1.tls_creds.insert(id.to_string(), Arc::new(creds));
            }
            Object::TlsCreds
        }
        _ => Object::Other,
    };
    // Every id, so `tls-authz` can tell a missing object from one of another type.
    let authz = crate::authz::from_object(kind, &props)
        .transpose()
        .map_err(generic)?;
    d.authz.lock().insert(id.to_string(), authz);
    objs.0.insert(id.to_string(), obj);
    d.qom.lock().added(id, kind, &props);
    Ok(())
}

pub async fn object_add(d: Arc<Daemon>, a: Args) -> Reply {
    add(&d, &a)?;
    Ok(ok())
}

pub async fn object_del(d: Arc<Daemon>, a: Args) -> Reply {
    let id = arg_str(&a, "id");
    let in_use = {
        let g = d.env.graph.lock().await;
        g.node_names().iter().any(|n| {
            g.node(n).is_some_and(|r| {
                r.options.get("throttle-group").and_then(Value::as_str) == Some(id)
            })
        })
    };
    let mut objs = d.objects.lock();
    if !objs.0.contains_key(id) {
        return Err(generic(format!("object '{id}' not found")));
    }
    if in_use {
        return Err(generic(format!(
            "object '{id}' is in use, can not be deleted"
        )));
    }
    objs.0.remove(id);
    d.qom.lock().removed(id);
    objs.1.throttle_groups.remove(id);
    objs.1.tls_creds.remove(id);
    d.authz.lock().remove(id);
    Ok(ok())
}
