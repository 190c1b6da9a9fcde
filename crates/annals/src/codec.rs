//! Turning domain events into stored events and back.

use annals_core::{ContentType, EventData, Metadata, RecordedEvent, metadata::keys};
use serde_json::{Map, Value};

use crate::{DomainEvent, Error, Result, Upcasters};

/// An event's stored parts: type, schema version and JSON payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The event type (the serde variant name).
    pub event_type: String,
    /// The schema version the code writes.
    pub schema_version: u32,
    /// The payload.
    pub payload: Value,
}

/// Splits a domain event into its stored parts.
pub fn encode<E: DomainEvent>(event: &E) -> Result<Encoded> {
    let value = serde_json::to_value(event).map_err(|e| Error::Encode { reason: e.to_string() })?;
    let (event_type, payload) = match value {
        // Unit variants serialize as their bare name.
        Value::String(name) => (name, Value::Null),
        Value::Object(map) if map.len() == 1 => match map.into_iter().next() {
            Some((name, payload)) => (name, payload),
            None => return Err(not_an_enum()),
        },
        _ => return Err(not_an_enum()),
    };
    Ok(Encoded { event_type, schema_version: event.schema_version(), payload })
}

fn not_an_enum() -> Error {
    Error::Encode {
        reason: "events must be serde enums in the default externally tagged representation \
                 (`{\"Variant\": payload}`)"
            .into(),
    }
}

/// Rebuilds a domain event from its (already upcast) type and payload.
pub fn decode_parts<E: DomainEvent>(event_type: &str, payload: Value) -> std::result::Result<E, String> {
    let mut map = Map::with_capacity(1);
    map.insert(event_type.to_owned(), payload);
    serde_json::from_value(Value::Object(map)).map_err(|e| e.to_string())
}

/// Decodes a recorded event: parses its payload, applies the upcaster chain
/// and deserializes. Checks that the chain ended at the version the code
/// writes, so a missing upcaster is reported instead of silently misreading
/// an old payload.
///
/// An event without `schema_version` metadata is v1; one whose
/// `schema_version` is not a whole number that fits a `u32` (a string, a
/// float, a negative number) is a [`Error::Decode`] rather than v1, so v1
/// upcasters never run over a payload of another version.
pub fn decode<E: DomainEvent>(recorded: &RecordedEvent, upcasters: &Upcasters) -> Result<E> {
    let version = stored_version(recorded, recorded.metadata.get(keys::SCHEMA_VERSION).as_ref())?;
    decode_at(recorded, version, upcasters)
}

/// The schema version an event was stored with, from its `schema_version`
/// metadata value: 1 when absent (or null), a [`Error::Decode`] when it is
/// not a whole number in `u32` range.
pub(crate) fn stored_version(recorded: &RecordedEvent, value: Option<&Value>) -> Result<u32> {
    match value {
        None | Some(Value::Null) => Ok(1),
        Some(value) => value.as_u64().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| Error::Decode {
            stream: recorded.stream.clone(),
            version: recorded.version,
            event_type: recorded.event_type.clone(),
            schema_version: 0,
            reason: format!(
                "its {} metadata is {value}, not a whole number from 0 to {}",
                keys::SCHEMA_VERSION,
                u32::MAX
            ),
        }),
    }
}

/// [`decode`] with the stored schema version already read from the
/// metadata (loading parses each event's metadata once for everything it
/// needs).
pub(crate) fn decode_at<E: DomainEvent>(
    recorded: &RecordedEvent,
    stored_version: u32,
    upcasters: &Upcasters,
) -> Result<E> {
    let fail = |reason: String| Error::Decode {
        stream: recorded.stream.clone(),
        version: recorded.version,
        event_type: recorded.event_type.clone(),
        schema_version: stored_version,
        reason,
    };
    if recorded.content_type != ContentType::Json {
        return Err(fail("payload is not JSON".into()));
    }
    let payload: Value = serde_json::from_slice(&recorded.data)
        .map_err(|e| fail(format!("payload is not valid JSON: {e}")))?;
    let up =
        upcasters.apply(&recorded.event_type, stored_version, payload).map_err(|e| fail(e.to_string()))?;
    let event: E = decode_parts(&up.event_type, up.payload)
        .map_err(|e| fail(format!("after upcasting to {} v{}: {e}", up.event_type, up.schema_version)))?;
    let expected = event.schema_version();
    if up.schema_version > expected {
        // No upcaster can help: the event was written by newer code.
        return Err(fail(format!(
            "the event is {} v{} but this code reads it only up to v{expected}: it was written by a \
             newer version of the code, which must read it",
            up.event_type, up.schema_version
        )));
    }
    if expected != up.schema_version {
        return Err(fail(format!(
            "the code expects {} v{expected} but upcasting stopped at v{}: register an upcaster \
             from ({}, {})",
            up.event_type, up.schema_version, up.event_type, up.schema_version
        )));
    }
    Ok(event)
}

/// Builds the [`EventData`] for an encoded event.
pub fn to_event_data(encoded: &Encoded, id: uuid::Uuid, metadata: &Metadata) -> Result<EventData> {
    let data = serde_json::to_vec(&encoded.payload).map_err(|e| Error::Encode { reason: e.to_string() })?;
    Ok(EventData {
        id,
        event_type: encoded.event_type.clone(),
        data: data.into(),
        content_type: ContentType::Json,
        metadata: metadata.with(keys::SCHEMA_VERSION, encoded.schema_version),
    })
}
