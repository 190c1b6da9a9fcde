//! A registry of JSON Schemas per (event type, schema version), validating
//! payloads before they are appended.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, RwLock},
};

use jsonschema::{Validator, error::ValidationErrorKind};
use serde_json::Value;

use crate::{Error, Result};

/// JSON Schemas per `(event type, schema version)`.
///
/// Thread-safe and cheap to clone (clones share the registrations), so one
/// registry can serve a repository and, later, the HTTP server. Payloads of
/// a type and version without a schema pass, unless the registry is
/// [`strict`](SchemaRegistry::strict).
///
/// Schemas are compiled without network access (`$ref`s to remote
/// documents are not fetched).
///
/// ```
/// use annals::{Error, SchemaRegistry};
/// use serde_json::json;
///
/// let registry = SchemaRegistry::new();
/// registry.register("Deposited", 1, json!({
///     "type": "object",
///     "required": ["amount"],
///     "properties": { "amount": { "type": "integer", "minimum": 1 } }
/// }))?;
/// assert!(registry.validate("Deposited", 1, &json!({ "amount": 5 })).is_ok());
/// let err = registry.validate("Deposited", 1, &json!({ "amount": "5" })).unwrap_err();
/// assert!(matches!(err, Error::SchemaViolation { ref pointer, .. } if pointer == "/amount"));
/// # Ok::<(), annals::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct SchemaRegistry {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    schemas: RwLock<HashMap<(String, u32), Arc<Validator>>>,
    strict: bool,
}

impl fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<(String, u32)> = match self.inner.schemas.read() {
            Ok(map) => map.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        keys.sort();
        f.debug_struct("SchemaRegistry").field("schemas", &keys).field("strict", &self.inner.strict).finish()
    }
}

impl SchemaRegistry {
    /// An empty, lenient registry (unregistered types pass).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry that rejects payloads of any `(type, version)`
    /// without a registered schema.
    pub fn strict() -> Self {
        SchemaRegistry { inner: Arc::new(Inner { schemas: RwLock::default(), strict: true }) }
    }

    /// Registers (or replaces) the schema for `(event_type, schema_version)`.
    /// Fails with [`Error::InvalidSchema`] when it does not compile.
    pub fn register(&self, event_type: impl Into<String>, schema_version: u32, schema: Value) -> Result<()> {
        let event_type = event_type.into();
        let validator = jsonschema::validator_for(&schema).map_err(|e| Error::InvalidSchema {
            event_type: event_type.clone(),
            schema_version,
            message: e.to_string(),
        })?;
        let mut map = self.inner.schemas.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        map.insert((event_type, schema_version), Arc::new(validator));
        Ok(())
    }

    /// Whether a schema is registered for `(event_type, schema_version)`.
    pub fn contains(&self, event_type: &str, schema_version: u32) -> bool {
        self.lookup(event_type, schema_version).is_some()
    }

    /// Validates one payload. On failure returns
    /// [`Error::SchemaViolation`] for the first error found, whose `pointer`
    /// names the failing field (for a missing required property, the
    /// property itself).
    pub fn validate(&self, event_type: &str, schema_version: u32, payload: &Value) -> Result<()> {
        let Some(validator) = self.lookup(event_type, schema_version) else {
            if self.inner.strict {
                return Err(Error::SchemaViolation {
                    event_type: event_type.to_owned(),
                    schema_version,
                    pointer: String::new(),
                    message: "no schema is registered for this type and version".into(),
                });
            }
            return Ok(());
        };
        let Some(error) = validator.iter_errors(payload).next() else { return Ok(()) };
        let mut pointer = error.instance_path().as_str().to_owned();
        if let ValidationErrorKind::Required { property } = error.kind() {
            // The instance path of a `required` failure is the parent
            // object; callers want to know which field is missing.
            let name = property.as_str().map_or_else(|| property.to_string(), str::to_owned);
            pointer.push('/');
            pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
        }
        Err(Error::SchemaViolation {
            event_type: event_type.to_owned(),
            schema_version,
            pointer,
            message: error.to_string(),
        })
    }

    fn lookup(&self, event_type: &str, schema_version: u32) -> Option<Arc<Validator>> {
        // A poisoned lock only means a registration panicked midway; the map
        // itself is still consistent, so keep serving it.
        let map = self.inner.schemas.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(&(event_type.to_owned(), schema_version)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn registry() -> SchemaRegistry {
        let r = SchemaRegistry::new();
        r.register(
            "Placed",
            2,
            json!({
                "type": "object",
                "required": ["amount", "lines"],
                "properties": {
                    "amount": { "type": "integer", "minimum": 0 },
                    "lines": { "type": "array", "items": { "type": "object", "required": ["sku"] } }
                }
            }),
        )
        .unwrap();
        r
    }

    fn pointer_of(err: Error) -> String {
        match err {
            Error::SchemaViolation { pointer, .. } => pointer,
            other => panic!("expected a schema violation, got {other:?}"),
        }
    }

    #[test]
    fn names_the_failing_field() {
        let r = registry();
        assert!(r.validate("Placed", 2, &json!({ "amount": 1, "lines": [] })).is_ok());
        assert_eq!(
            pointer_of(r.validate("Placed", 2, &json!({ "amount": -1, "lines": [] })).unwrap_err()),
            "/amount"
        );
        assert_eq!(pointer_of(r.validate("Placed", 2, &json!({ "lines": [] })).unwrap_err()), "/amount");
        assert_eq!(
            pointer_of(
                r.validate("Placed", 2, &json!({ "amount": 1, "lines": [{ "sku": "a" }, {}] })).unwrap_err()
            ),
            "/lines/1/sku"
        );
    }

    #[test]
    fn unregistered_versions_pass_unless_strict() {
        let r = registry();
        assert!(r.validate("Placed", 1, &json!("anything")).is_ok());
        let strict = SchemaRegistry::strict();
        assert!(matches!(strict.validate("Placed", 1, &json!({})), Err(Error::SchemaViolation { .. })));
    }

    #[test]
    fn invalid_schemas_are_rejected_at_registration() {
        let r = SchemaRegistry::new();
        let err = r.register("X", 1, json!({ "type": "no-such-type" })).unwrap_err();
        assert!(
            matches!(err, Error::InvalidSchema { ref event_type, schema_version: 1, .. } if event_type == "X")
        );
        assert!(!r.contains("X", 1));
    }

    #[test]
    fn clones_share_registrations() {
        let r = SchemaRegistry::new();
        let clone = r.clone();
        r.register("X", 1, json!({ "type": "integer" })).unwrap();
        assert!(clone.contains("X", 1));
        assert!(clone.validate("X", 1, &json!("no")).is_err());
    }
}
