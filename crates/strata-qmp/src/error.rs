//! QMP error classes and the error value every command and validation step returns.

use serde_json::{Map, Value};

/// QEMU's `QapiErrorClass` (`qapi/error.json`): the `class` member of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The default class for almost every error.
    GenericError,
    /// Unknown or disabled command, or a command sent in the wrong negotiation mode.
    CommandNotFound,
    /// A block-job command naming something that is not a block job.
    DeviceNotActive,
    /// A device lookup that failed (e.g. `block-commit` on an unknown device).
    DeviceNotFound,
    /// KVM lacks a capability (kept for completeness; never used by a storage daemon).
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"class": <class>, "desc": <desc>}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable text (QEMU's exact wording where clients match on it).
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError` with the given text.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// `CommandNotFound`: "The command %s has not been found".
    pub fn command_not_found(command: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }

    /// `DeviceNotFound`: "Device '%s' not found".
    pub fn device_not_found(device: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{device}' not found"),
        )
    }

    /// `DeviceNotActive`: "Block job '%s' not found".
    pub fn block_job_not_found(job: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotActive,
            format!("Block job '{job}' not found"),
        )
    }

    /// "Cannot find device='%s' nor node-name='%s'" (a failed node lookup).
    pub fn cannot_find_node(device: &str, node_name: &str) -> Self {
        Self::generic(format!(
            "Cannot find device='{device}' nor node-name='{node_name}'"
        ))
    }

    /// "Parameter '%s' is missing".
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// "Parameter '%s' is unexpected".
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// "Invalid parameter type for '%s', expected: %s".
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// "Parameter '%s' expects %s" (QEMU's `QERR_INVALID_PARAMETER_VALUE`).
    pub fn invalid_parameter_value(name: &str, expects: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expects}"))
    }

    /// "Parameter '%s' does not accept value '%s'".
    pub fn bad_enum_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }

    /// "Invalid parameter '%s'".
    pub fn invalid_parameter(name: &str) -> Self {
        Self::generic(format!("Invalid parameter '{name}'"))
    }

    /// The `{"class": ..., "desc": ...}` object of an error reply.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("class".into(), Value::String(self.class.as_str().into()));
        m.insert("desc".into(), Value::String(self.desc.clone()));
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts() {
        assert_eq!(
            QmpError::command_not_found("nonexist").desc,
            "The command nonexist has not been found"
        );
        assert_eq!(
            QmpError::command_not_found("x").class,
            ErrorClass::CommandNotFound
        );
        assert_eq!(
            QmpError::invalid_parameter_type("id", "string").desc,
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            QmpError::invalid_parameter_value("granularity", "uint32_t").desc,
            "Parameter 'granularity' expects uint32_t"
        );
        assert_eq!(
            QmpError::cannot_find_node("f", "f").desc,
            "Cannot find device='f' nor node-name='f'"
        );
        assert_eq!(
            QmpError::device_not_found("d").class,
            ErrorClass::DeviceNotFound
        );
        assert_eq!(
            QmpError::block_job_not_found("j").desc,
            "Block job 'j' not found"
        );
        assert_eq!(
            QmpError::generic("x").to_json().to_string(),
            r#"{"class":"GenericError","desc":"x"}"#
        );
        assert_eq!(ErrorClass::KVMMissingCap.to_string(), "KVMMissingCap");
    }
}
