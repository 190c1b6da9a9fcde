//! Event metadata: a JSON object with a few well-known keys.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Well-known metadata keys (see the product brief).
pub mod keys {
    /// Ties together everything caused by one user request.
    pub const CORRELATION_ID: &str = "correlation_id";
    /// The id of the command or event that caused this one.
    pub const CAUSATION_ID: &str = "causation_id";
    /// The id of the command that produced this event (idempotency).
    pub const COMMAND_ID: &str = "command_id";
    /// Who did it.
    pub const ACTOR: &str = "actor";
    /// Which service or component wrote it.
    pub const SOURCE: &str = "source";
    /// Tenant, for multi-tenant deployments.
    pub const TENANT: &str = "tenant";
    /// Schema version of the payload, for upcasting.
    pub const SCHEMA_VERSION: &str = "schema_version";
}

/// Event metadata: always a JSON object.
///
/// Kept as its serialized JSON text so that storing, reading and fanning out
/// events never re-parses it; accessors parse on demand.
#[derive(Clone, PartialEq, Eq)]
pub struct Metadata(Bytes);

const EMPTY: &[u8] = b"{}";

impl Default for Metadata {
    fn default() -> Self {
        Metadata(Bytes::from_static(EMPTY))
    }
}

impl Metadata {
    /// Empty metadata (`{}`).
    pub fn new() -> Self {
        Self::default()
    }

    /// From a JSON object.
    pub fn from_map(map: Map<String, Value>) -> Self {
        if map.is_empty() {
            return Self::default();
        }
        // Serializing a Map of Values cannot fail.
        let text = serde_json::to_vec(&map).unwrap_or_else(|_| EMPTY.to_vec());
        Metadata(Bytes::from(text))
    }

    /// From a JSON value; fails unless it is an object.
    pub fn from_value(value: Value) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Self::from_map(map)),
            other => {
                Err(Error::invalid(format!("metadata must be a JSON object, got {}", json_kind(&other))))
            }
        }
    }

    /// From serialized JSON; fails unless it is one JSON object.
    pub fn from_json(bytes: impl Into<Bytes>) -> Result<Self> {
        let bytes = bytes.into();
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid(format!("metadata is not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(Error::invalid(format!("metadata must be a JSON object, got {}", json_kind(&value))));
        }
        Ok(Metadata(bytes))
    }

    /// Wraps bytes the store itself wrote and verified earlier, without
    /// re-validating them.
    pub fn from_trusted_json(bytes: Bytes) -> Self {
        Metadata(bytes)
    }

    /// The serialized JSON object.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length of the serialized JSON.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether this is the empty object.
    pub fn is_empty(&self) -> bool {
        self.0.as_ref() == EMPTY || self.to_map().is_empty()
    }

    /// Parses into a JSON object. Returns an empty map if the stored text is
    /// not an object (which [`Metadata::from_json`] prevents).
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::from_slice::<Value>(&self.0) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }

    /// One key's value.
    pub fn get(&self, key: &str) -> Option<Value> {
        if self.0.as_ref() == EMPTY {
            return None;
        }
        self.to_map().remove(key)
    }

    /// One key's value when it is a string.
    pub fn get_str(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Returns a copy with `key` set to `value`.
    pub fn with(&self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        let mut map = self.to_map();
        map.insert(key.into(), value.into());
        Self::from_map(map)
    }

    /// `correlation_id`, if set and a string. Read without building a map
    /// in the common cases (it runs for every event an append validates
    /// and indexes).
    pub fn correlation_id(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct Only<'a> {
            #[serde(borrow, default)]
            correlation_id: Option<std::borrow::Cow<'a, str>>,
        }
        // The key can only be there if its name is, literally or with a
        // `\u` escape (the short escapes stand for characters it lacks):
        // most metadata without one is never parsed.
        let b = self.0.as_ref();
        if b == EMPTY || !(contains(b, b"correlation_id") || contains(b, b"\\u")) {
            return None;
        }
        match serde_json::from_slice::<Only<'_>>(&self.0) {
            Ok(only) => only.correlation_id.map(std::borrow::Cow::into_owned),
            // Duplicate keys, a value that is not a string: the exact rule.
            Err(_) => self.get_str(keys::CORRELATION_ID),
        }
    }

    /// `causation_id`, if set and a string.
    pub fn causation_id(&self) -> Option<String> {
        self.get_str(keys::CAUSATION_ID)
    }

    /// `schema_version`, if set and a non-negative integer.
    pub fn schema_version(&self) -> Option<u32> {
        self.get(keys::SCHEMA_VERSION).and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Metadata({})", String::from_utf8_lossy(&self.0))
    }
}

impl From<Map<String, Value>> for Metadata {
    fn from(map: Map<String, Value>) -> Self {
        Self::from_map(map)
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_map().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        Metadata::from_value(value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_objects_are_metadata() {
        assert!(Metadata::from_json(&b"{\"a\":1}"[..]).is_ok());
        for bad in [&b"[1]"[..], b"1", b"\"x\"", b"null", b"{", b""] {
            assert!(matches!(Metadata::from_json(bad), Err(Error::InvalidInput { .. })));
        }
        assert!(Metadata::from_value(json!([1])).is_err());
    }

    #[test]
    fn well_known_keys() {
        let m = Metadata::new().with(keys::CORRELATION_ID, "c-1").with(keys::SCHEMA_VERSION, 3);
        assert_eq!(m.correlation_id().as_deref(), Some("c-1"));
        assert_eq!(m.schema_version(), Some(3));
        assert_eq!(m.causation_id(), None);
        assert!(Metadata::new().is_empty());
        assert!(!m.is_empty());
    }

    #[test]
    fn correlation_id_reads_as_the_map_does() {
        let cases: [&[u8]; 11] = [
            b"{}",
            br#"{"correlation_id":"c-1","actor":"ada"}"#,
            br#"{"correlation_id":42}"#,
            br#"{"correlation_id":null}"#,
            br#"{"correlation_id":"a","correlation_id":"b"}"#,
            br#"{"correlation\u005fid":"escaped key"}"#,
            br#"{"correlation_id":"quote \" and \u00e9"}"#,
            br#"{"nested":{"correlation_id":"no"}}"#,
            br#"{ "correlation_id" : "" }"#,
            br#"{"actor":"ada","note":"\u00e9"}"#,
            br#"{"actor":"ada"}"#,
        ];
        for bytes in cases {
            let m = Metadata::from_json(bytes.to_vec()).unwrap();
            assert_eq!(
                m.correlation_id(),
                m.get_str(keys::CORRELATION_ID),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        let dup = Metadata::from_json(br#"{"correlation_id":"a","correlation_id":"b"}"#.to_vec()).unwrap();
        assert_eq!(dup.correlation_id().as_deref(), Some("b"));
    }
}
