//! Schema evolution on read: upcasters turn old payloads into the shape the
//! code understands, step by step, without ever rewriting the log.

use std::{collections::HashMap, fmt, sync::Arc};

use serde_json::Value;

use crate::{Error, Result};

/// A payload transformation; returns the new payload or why it failed.
type Step = Arc<dyn Fn(Value) -> std::result::Result<Value, String> + Send + Sync>;

/// Upcasting gives up after this many steps: a longer chain is a cycle.
const MAX_STEPS: usize = 1_000;

/// A stored event after upcasting.
#[derive(Debug, Clone, PartialEq)]
pub struct Upcasted {
    /// The (possibly renamed) event type.
    pub event_type: String,
    /// The version the payload now has.
    pub schema_version: u32,
    /// The payload.
    pub payload: Value,
}

struct Registered {
    to_type: String,
    step: Step,
}

/// Upcasters keyed by `(event type, from version)`.
///
/// A step registered for `(T, n)` turns a `T` v`n` payload into v`n+1`
/// (optionally of a new type). Steps chain: a v1 event runs through v1→v2,
/// v2→v3, … until no step is registered for the current `(type, version)`.
/// A pure [`Upcasters::rename`] changes only the type and keeps the version;
/// it applies when no step matches. Cheap to clone (shared steps); usable on
/// its own (e.g. by a server that decodes events for clients).
///
/// ```
/// use annals::Upcasters;
/// use serde_json::json;
///
/// let upcasters = Upcasters::new()
///     // v1 stored the amount in whole euros; v2 stores cents.
///     .upcast("Deposited", 1, |mut p| {
///         let euros = p["amount"].as_u64().ok_or("amount is not a number")?;
///         p["amount"] = json!(euros * 100);
///         Ok(p)
///     })
///     // The type was called `MoneyIn` before it was `Deposited`.
///     .rename("MoneyIn", "Deposited");
///
/// let up = upcasters.apply("MoneyIn", 1, json!({ "amount": 5 }))?;
/// assert_eq!((up.event_type.as_str(), up.schema_version), ("Deposited", 2));
/// assert_eq!(up.payload, json!({ "amount": 500 }));
/// # Ok::<(), annals::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Arc<Registered>>,
    renames: HashMap<String, String>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut steps: Vec<_> = self.steps.keys().collect();
        steps.sort();
        f.debug_struct("Upcasters").field("steps", &steps).field("renames", &self.renames).finish()
    }
}

impl Upcasters {
    /// No upcasters: every event is read as stored.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `event_type` v`from_version` → v`from_version + 1`. A later
    /// registration for the same key replaces the earlier one.
    pub fn upcast<F>(self, event_type: impl Into<String>, from_version: u32, step: F) -> Self
    where
        F: Fn(Value) -> std::result::Result<Value, String> + Send + Sync + 'static,
    {
        let event_type = event_type.into();
        self.upcast_renamed(event_type.clone(), from_version, event_type, step)
    }

    /// Like [`Upcasters::upcast`], and the result has type `to_type`.
    pub fn upcast_renamed<F>(
        mut self,
        event_type: impl Into<String>,
        from_version: u32,
        to_type: impl Into<String>,
        step: F,
    ) -> Self
    where
        F: Fn(Value) -> std::result::Result<Value, String> + Send + Sync + 'static,
    {
        let registered = Registered { to_type: to_type.into(), step: Arc::new(step) };
        self.steps.insert((event_type.into(), from_version), Arc::new(registered));
        self
    }

    /// Renames `old_type` to `new_type` at any version, keeping the version
    /// and the payload.
    pub fn rename(mut self, old_type: impl Into<String>, new_type: impl Into<String>) -> Self {
        self.renames.insert(old_type.into(), new_type.into());
        self
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.renames.is_empty()
    }

    /// Runs the chain on one stored payload. Never touches the store.
    pub fn apply(&self, event_type: &str, schema_version: u32, payload: Value) -> Result<Upcasted> {
        let mut current = Upcasted { event_type: event_type.to_owned(), schema_version, payload };
        if self.is_empty() {
            return Ok(current);
        }
        for _ in 0..MAX_STEPS {
            let key = (current.event_type.clone(), current.schema_version);
            if let Some(registered) = self.steps.get(&key) {
                let next_version = current.schema_version.checked_add(1).ok_or_else(|| Error::Upcast {
                    event_type: current.event_type.clone(),
                    schema_version: current.schema_version,
                    reason: "schema version overflows".into(),
                })?;
                let payload = (registered.step)(current.payload).map_err(|reason| Error::Upcast {
                    event_type: key.0.clone(),
                    schema_version: key.1,
                    reason,
                })?;
                current = Upcasted {
                    event_type: registered.to_type.clone(),
                    schema_version: next_version,
                    payload,
                };
            } else if let Some(new_type) = self.renames.get(&current.event_type) {
                current.event_type = new_type.clone();
            } else {
                return Ok(current);
            }
        }
        Err(Error::Upcast {
            event_type: event_type.to_owned(),
            schema_version,
            reason: format!("the upcaster chain did not end within {MAX_STEPS} steps (a rename cycle?)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn chains_v1_to_v3_and_stops_when_nothing_matches() {
        let up = Upcasters::new()
            .upcast("Placed", 1, |mut p| {
                p["currency"] = json!("EUR");
                Ok(p)
            })
            .upcast("Placed", 2, |mut p| {
                let total = p["total"].take();
                p["amount"] = total;
                p.as_object_mut().map(|m| m.remove("total"));
                Ok(p)
            });
        let out = up.apply("Placed", 1, json!({ "total": 7 })).unwrap();
        assert_eq!(out.schema_version, 3);
        assert_eq!(out.payload, json!({ "amount": 7, "currency": "EUR" }));
        // A v2 event only runs the second step.
        let out = up.apply("Placed", 2, json!({ "total": 7, "currency": "USD" })).unwrap();
        assert_eq!(out.payload, json!({ "amount": 7, "currency": "USD" }));
        // Current events pass through untouched.
        let out = up.apply("Placed", 3, json!({ "amount": 1 })).unwrap();
        assert_eq!(out.payload, json!({ "amount": 1 }));
    }

    #[test]
    fn renames_keep_the_version_and_feed_the_chain() {
        let up = Upcasters::new().rename("Old", "New").upcast("New", 1, |_| Ok(json!({ "v": 2 })));
        let out = up.apply("Old", 1, json!({})).unwrap();
        assert_eq!((out.event_type.as_str(), out.schema_version), ("New", 2));
        assert_eq!(out.payload, json!({ "v": 2 }));
    }

    #[test]
    fn failures_and_cycles_are_errors_not_panics() {
        let up = Upcasters::new().upcast("A", 1, |_| Err("boom".into()));
        assert!(
            matches!(up.apply("A", 1, json!(null)), Err(Error::Upcast { reason, .. }) if reason == "boom")
        );
        let cyclic = Upcasters::new().rename("A", "B").rename("B", "A");
        assert!(matches!(cyclic.apply("A", 1, json!(null)), Err(Error::Upcast { .. })));
    }
}
