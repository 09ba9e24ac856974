//! `authz-simple` / `authz-list` objects (QEMU's QAuthZ), which `nbd-server-start`'s
//! `tls-authz` names to restrict which TLS clients may connect.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use serde_json::{Map, Value};
use strata_nbd::{Authorizer, AuthzList, AuthzRule, AuthzSimple, MatchFormat};

/// Every object id the daemon has, with its authoriser if it is an `authz-*` object;
/// shared with the NBD servers that name one.
pub type AuthzObjects = Arc<Mutex<HashMap<String, Option<Arc<dyn Authorizer>>>>>;

/// `tls-authz=<id>`: like QEMU, the object is looked up at each handshake, so it may be
/// added after the server starts; a missing one refuses every client.
pub struct AuthzById {
    pub id: String,
    pub objects: AuthzObjects,
}

impl Authorizer for AuthzById {
    fn is_allowed(&self, identity: &str) -> bool {
        self.check(identity).unwrap_or(false)
    }

    fn check(&self, identity: &str) -> Result<bool, String> {
        let authz = match self.objects.lock().get(&self.id) {
            Some(Some(a)) => a.clone(),
            Some(None) => {
                return Err(format!("Object '{}' is not a QAuthZ subclass", self.id));
            }
            None => return Err(format!("Cannot find QAuthZ object ID {}", self.id)),
        };
        Ok(authz.is_allowed(identity))
    }
}

fn policy(v: &Value, key: &str) -> Result<bool, String> {
    match v.as_str() {
        Some("allow") => Ok(true),
        Some("deny") => Ok(false),
        Some(s) => Err(format!("Parameter '{key}' does not accept value '{s}'")),
        None => Err(format!(
            "Invalid parameter type for '{key}', expected: string"
        )),
    }
}

fn format(v: Option<&Value>) -> Result<MatchFormat, String> {
    match v {
        None | Some(Value::Null) => Ok(MatchFormat::Exact),
        Some(Value::String(s)) if s == "exact" => Ok(MatchFormat::Exact),
        Some(Value::String(s)) if s == "glob" => Ok(MatchFormat::Glob),
        Some(Value::String(s)) => Err(format!("Parameter 'format' does not accept value '{s}'")),
        Some(_) => Err("Invalid parameter type for 'format', expected: string".into()),
    }
}

fn rule(i: usize, v: &Value) -> Result<AuthzRule, String> {
    let pattern = match v.get("match") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(format!(
                "Invalid parameter type for 'rules[{i}].match', expected: string"
            ));
        }
        None => return Err(format!("Parameter 'rules[{i}].match' is missing")),
    };
    let allow = match v.get("policy") {
        Some(p) => policy(p, "policy")?,
        None => return Err(format!("Parameter 'rules[{i}].policy' is missing")),
    };
    Ok(AuthzRule {
        pattern,
        allow,
        format: format(v.get("format"))?,
    })
}

/// The authoriser an `authz-*` object describes, or `None` for another type.
pub fn from_object(
    qom_type: &str,
    props: &Map<String, Value>,
) -> Option<Result<Arc<dyn Authorizer>, String>> {
    Some(match qom_type {
        "authz-simple" => match props.get("identity") {
            Some(Value::String(s)) => Ok(Arc::new(AuthzSimple {
                identity: s.clone(),
            }) as Arc<dyn Authorizer>),
            Some(_) => Err("Invalid parameter type for 'identity', expected: string".into()),
            None => Err("Parameter 'identity' is missing".into()),
        },
        "authz-list" => (|| {
            let allow_by_default = match props.get("policy") {
                None | Some(Value::Null) => false,
                Some(p) => policy(p, "policy")?,
            };
            let rules = match props.get("rules") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .enumerate()
                    .map(|(i, r)| rule(i, r))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err("Invalid parameter type for 'rules', expected: array".into()),
            };
            Ok(Arc::new(AuthzList {
                allow_by_default,
                rules,
            }) as Arc<dyn Authorizer>)
        })(),
        _ => return None,
    })
}
