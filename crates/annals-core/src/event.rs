//! Events as appended and as recorded.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Error, Metadata, Result, StreamName};

/// Maximum length of an event type, in bytes of UTF-8.
pub const MAX_EVENT_TYPE_LEN: usize = 256;

/// Maximum length of an event's correlation id (metadata key
/// `correlation_id`), in bytes of UTF-8. Backends index it, and an index
/// entry has to fit in a fraction of a page (about 2.7 KB in PostgreSQL).
pub const MAX_CORRELATION_ID_LEN: usize = 1024;

/// How an event's `data` is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentType {
    /// UTF-8 JSON; validated on append.
    #[default]
    Json,
    /// Opaque bytes.
    Binary,
}

impl ContentType {
    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Binary => "application/octet-stream",
        }
    }

    /// A one-byte code, stable across versions (used by storage formats).
    pub fn code(self) -> u8 {
        match self {
            ContentType::Json => 0,
            ContentType::Binary => 1,
        }
    }

    /// Inverse of [`ContentType::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ContentType::Json),
            1 => Some(ContentType::Binary),
            _ => None,
        }
    }
}

/// An event as the caller appends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventData {
    /// Unique id; the idempotency key. Client-chosen, or a fresh UUIDv7.
    pub id: Uuid,
    /// The event's type, e.g. `AccountOpened` (1–256 bytes).
    pub event_type: String,
    /// The payload.
    pub data: Bytes,
    /// How `data` is encoded.
    pub content_type: ContentType,
    /// A JSON object; see [`crate::metadata::keys`].
    pub metadata: Metadata,
}

impl EventData {
    /// A JSON event from any serializable payload, with a fresh UUIDv7 id.
    pub fn json<T: Serialize + ?Sized>(event_type: impl Into<String>, payload: &T) -> Result<Self> {
        let data = serde_json::to_vec(payload)
            .map_err(|e| Error::invalid(format!("payload does not serialize to JSON: {e}")))?;
        Ok(EventData {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            data: Bytes::from(data),
            content_type: ContentType::Json,
            metadata: Metadata::new(),
        })
    }

    /// An event from raw bytes with the given content type and a fresh
    /// UUIDv7 id.
    pub fn raw(event_type: impl Into<String>, data: impl Into<Bytes>, content_type: ContentType) -> Self {
        EventData {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            data: data.into(),
            content_type,
            metadata: Metadata::new(),
        }
    }

    /// Replaces the id (to make retries idempotent).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Replaces the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A point in time: microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Now, from the system clock.
    pub fn now() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(micros)
    }

    /// Microseconds since the epoch.
    pub fn as_micros(self) -> i64 {
        self.0
    }

    /// From microseconds since the epoch.
    pub fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }
}

/// An event as stored: the appended event plus where and when it landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The stream it belongs to.
    pub stream: StreamName,
    /// 0-based version within the stream.
    pub version: u64,
    /// 0-based position in the global log (`$all`); gapless, in commit order.
    pub position: u64,
    /// The event's id.
    pub id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// The payload.
    pub data: Bytes,
    /// How `data` is encoded.
    pub content_type: ContentType,
    /// Metadata object.
    pub metadata: Metadata,
    /// When the store committed it.
    pub recorded_at: Timestamp,
}

impl RecordedEvent {
    /// Deserializes a JSON payload.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.data).map_err(|e| {
            Error::invalid(format!(
                "event {} ({}) at {}@{} does not decode: {e}",
                self.id, self.event_type, self.stream, self.version
            ))
        })
    }

    /// The stream's category.
    pub fn category(&self) -> &str {
        self.stream.category()
    }
}
