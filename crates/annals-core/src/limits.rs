//! Size and count limits, and the validation every backend runs before
//! writing.

use std::collections::HashSet;

use crate::{
    ContentType, Error, EventData, LimitKind, Result, StreamAppend,
    event::{MAX_CORRELATION_ID_LEN, MAX_EVENT_TYPE_LEN},
};

/// Limits enforced on appends. Backends take one in their configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum bytes of one event's `data` (default 1 MiB).
    pub max_event_size: usize,
    /// Maximum bytes of one event's serialized metadata (default 64 KiB).
    pub max_metadata_size: usize,
    /// Maximum events in one append, summed over a multi-stream append
    /// (default 10,000).
    pub max_events_per_append: usize,
    /// Maximum streams in one multi-stream append (default 1,000).
    pub max_streams_per_transaction: usize,
    /// Maximum bytes of data plus metadata of all events in one append,
    /// summed over a multi-stream append (default 64 MiB). An append is
    /// one transaction held in memory whole; a backend may cap it lower
    /// (`annals_postgres::MAX_APPEND_SIZE`).
    pub max_append_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_size: 1024 * 1024,
            max_metadata_size: 64 * 1024,
            max_events_per_append: 10_000,
            max_streams_per_transaction: 1_000,
            max_append_size: 64 * 1024 * 1024,
        }
    }
}

fn exceeded(what: LimitKind, max: usize, actual: usize) -> Error {
    Error::LimitExceeded { what, max: max as u64, actual: actual as u64 }
}

impl Limits {
    /// Validates one event.
    pub fn check_event(&self, event: &EventData) -> Result<()> {
        validate_event_type(&event.event_type)?;
        if event.id.is_nil() {
            return Err(Error::invalid("event id must not be the nil UUID"));
        }
        if event.data.len() > self.max_event_size {
            return Err(exceeded(LimitKind::EventSize, self.max_event_size, event.data.len()));
        }
        if event.metadata.len() > self.max_metadata_size {
            return Err(exceeded(LimitKind::MetadataSize, self.max_metadata_size, event.metadata.len()));
        }
        if may_hold_a_bad_correlation_id(event.metadata.as_bytes())
            && let Some(problem) = event.metadata.correlation_id().as_deref().and_then(correlation_id_problem)
        {
            return Err(Error::invalid(format!("event {} ({}): {problem}", event.id, event.event_type)));
        }
        if event.content_type == ContentType::Json {
            // JSON is UTF-8 (RFC 8259), and parsing from bytes into
            // `IgnoredAny` skips strings without checking their bytes.
            let text = std::str::from_utf8(&event.data).map_err(|e| {
                Error::invalid(format!(
                    "event {} ({}) is declared JSON but its data is not UTF-8: {e}",
                    event.id, event.event_type
                ))
            })?;
            serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| {
                Error::invalid(format!(
                    "event {} ({}) is declared JSON but its data is not valid JSON: {e}",
                    event.id, event.event_type
                ))
            })?;
        }
        Ok(())
    }

    /// Validates a whole (possibly multi-stream) append: non-empty parts,
    /// limits, distinct streams, distinct event ids.
    pub fn check_parts(&self, parts: &[StreamAppend]) -> Result<()> {
        if parts.is_empty() {
            return Err(Error::invalid("a transaction needs at least one stream"));
        }
        if parts.len() > self.max_streams_per_transaction {
            return Err(exceeded(
                LimitKind::StreamsPerTransaction,
                self.max_streams_per_transaction,
                parts.len(),
            ));
        }
        let total: usize = parts.iter().map(|p| p.events.len()).sum();
        if total > self.max_events_per_append {
            return Err(exceeded(LimitKind::EventsPerAppend, self.max_events_per_append, total));
        }
        let size = parts.iter().flat_map(|p| &p.events).map(|e| e.data.len() + e.metadata.len()).sum();
        if size > self.max_append_size {
            return Err(exceeded(LimitKind::AppendSize, self.max_append_size, size));
        }
        let mut streams = HashSet::with_capacity(parts.len());
        let mut ids = HashSet::with_capacity(total);
        for part in parts {
            if !streams.insert(part.stream.as_str()) {
                return Err(Error::invalid(format!(
                    "stream '{}' appears more than once in one transaction",
                    part.stream
                )));
            }
            if part.events.is_empty() {
                return Err(Error::invalid(format!(
                    "the append to '{}' has no events; send at least one",
                    part.stream
                )));
            }
            for event in &part.events {
                self.check_event(event)?;
                if !ids.insert(event.id) {
                    return Err(Error::invalid(format!(
                        "event id {} appears more than once in one append",
                        event.id
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Validates a correlation id (metadata key `correlation_id`, when it is a
/// string): at most [`MAX_CORRELATION_ID_LEN`] bytes, no control
/// characters. Backends index it; PostgreSQL text cannot hold NUL.
pub fn validate_correlation_id(id: &str) -> Result<()> {
    correlation_id_problem(id).map_or(Ok(()), |problem| Err(Error::invalid(problem)))
}

/// `false` when no correlation id in `metadata` (serialized JSON) can break
/// the rules, decided without parsing: the id is no longer than the whole
/// text, and a control character in it is either escaped (a backslash) or
/// one of DEL (0x7F) and U+0080–U+009F (UTF-8 lead byte 0xC2); JSON allows
/// no other raw control character. Most metadata is short and plain and
/// so is never parsed here (a parse costs ~0.25 µs an event).
fn may_hold_a_bad_correlation_id(metadata: &[u8]) -> bool {
    metadata.len() > MAX_CORRELATION_ID_LEN || metadata.iter().any(|&b| matches!(b, b'\\' | 0x7f | 0xc2))
}

fn correlation_id_problem(id: &str) -> Option<String> {
    if id.len() > MAX_CORRELATION_ID_LEN {
        return Some(format!(
            "metadata correlation_id is {} bytes, the maximum is {MAX_CORRELATION_ID_LEN}",
            id.len()
        ));
    }
    let c = id.chars().find(|c| c.is_control())?;
    Some(format!("metadata correlation_id contains control character U+{:04X}", c as u32))
}

/// Validates an event type: 1–256 bytes, no control characters.
pub fn validate_event_type(event_type: &str) -> Result<()> {
    if event_type.is_empty() {
        return Err(Error::invalid("event type must not be empty"));
    }
    if event_type.len() > MAX_EVENT_TYPE_LEN {
        return Err(Error::invalid(format!(
            "event type is {} bytes, the maximum is {MAX_EVENT_TYPE_LEN}",
            event_type.len()
        )));
    }
    if event_type.chars().any(char::is_control) {
        return Err(Error::invalid("event type contains a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metadata;

    fn with_correlation(json: &str) -> Result<()> {
        let event = EventData::raw("E", b"{}".to_vec(), ContentType::Json)
            .with_metadata(Metadata::from_json(json.as_bytes().to_vec())?);
        Limits::default().check_event(&event)
    }

    #[test]
    fn correlation_ids_breaking_the_rules_are_found_however_written() {
        // Escaped controls, and the raw ones JSON allows (DEL, C1).
        for bad in [
            r#"{"correlation_id":"a\u0000b"}"#,
            r#"{"correlation_id":"a\tb"}"#,
            "{\"correlation_id\":\"a\u{7f}b\"}",
            "{\"correlation_id\":\"a\u{85}b\"}",
            r#"{"correlation\u005fid":"a\nb"}"#,
        ] {
            assert!(matches!(with_correlation(bad), Err(Error::InvalidInput { .. })), "{bad}");
        }
        let long = format!(r#"{{"correlation_id":"{}"}}"#, "x".repeat(MAX_CORRELATION_ID_LEN + 1));
        assert!(matches!(with_correlation(&long), Err(Error::InvalidInput { .. })));
        for good in [
            r#"{"correlation_id":"req-1","actor":"ada"}"#,
            "{\"correlation_id\":\"caf\u{e9} \u{a9}\"}",
            r#"{"note":"a\u0000b"}"#,
        ] {
            assert!(with_correlation(good).is_ok(), "{good}");
        }
        assert!(!may_hold_a_bad_correlation_id(br#"{"correlation_id":"req-1","actor":"ada"}"#));
    }
}
