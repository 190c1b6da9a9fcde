//! Dead-letter streams: where messages that kept failing are parked.
//!
//! A dead-letter stream (`$dlq-{group}`) holds two event types:
//! `Parked` (a [`ParkedMessage`]: which event, why, after how many
//! attempts) and `Resolved` (the parked message at that position was
//! replayed successfully or discarded). Folding the stream gives the
//! messages currently parked, so the list survives restarts with no other
//! state.

use std::{collections::BTreeMap, sync::Arc};

use annals_core::{EventData, ExpectedVersion, ReadStream, RecordedEvent, Store, StreamName, Timestamp};
use serde::{Deserialize, Serialize};

use super::{ConsumerError, ConsumerResult};

const PARKED: &str = "Parked";
const RESOLVED: &str = "Resolved";
const PAGE: usize = 1_024;

/// A message parked after it kept failing: a reference to the original
/// event and the reason. The original stays where it is; replaying reads it
/// back from its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedMessage {
    /// The original event's id.
    pub event_id: annals_core::Uuid,
    /// Its stream.
    pub stream: StreamName,
    /// Its version in that stream.
    pub version: u64,
    /// Its global position (identifies the parked message).
    pub position: u64,
    /// Its type.
    pub event_type: String,
    /// The last failure reason.
    pub reason: String,
    /// How many times it was delivered and failed.
    pub attempts: u32,
    /// When it was parked.
    pub parked_at: Timestamp,
}

impl ParkedMessage {
    /// A parked-message record for `event`.
    pub fn of(event: &RecordedEvent, reason: impl Into<String>, attempts: u32) -> Self {
        ParkedMessage {
            event_id: event.id,
            stream: event.stream.clone(),
            version: event.version,
            position: event.position,
            event_type: event.event_type.clone(),
            reason: reason.into(),
            attempts,
            parked_at: Timestamp::now(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Resolved {
    position: u64,
    how: String,
}

/// One dead-letter stream. Cheap to clone.
#[derive(Clone)]
pub struct DeadLetterQueue {
    store: Arc<dyn Store>,
    stream: StreamName,
}

impl DeadLetterQueue {
    /// The dead-letter stream `$dlq-{name}`.
    pub fn new(store: Arc<dyn Store>, name: &str) -> ConsumerResult<Self> {
        let stream = StreamName::system(format!("$dlq-{name}"))
            .map_err(|e| ConsumerError::InvalidName { reason: e.to_string() })?;
        Ok(DeadLetterQueue { store, stream })
    }

    /// The stream's name.
    pub fn stream(&self) -> &StreamName {
        &self.stream
    }

    /// The messages parked now (parked and not resolved since), by position.
    pub async fn list(&self) -> ConsumerResult<Vec<ParkedMessage>> {
        Ok(self.load().await?.into_values().collect())
    }

    /// The parked message for this original position, if it is parked.
    pub async fn inspect(&self, position: u64) -> ConsumerResult<Option<ParkedMessage>> {
        Ok(self.load().await?.remove(&position))
    }

    pub(crate) async fn load(&self) -> ConsumerResult<BTreeMap<u64, ParkedMessage>> {
        let mut parked = BTreeMap::new();
        let mut from = 0;
        loop {
            let page = match self
                .store
                .read_stream(&self.stream, ReadStream::forward().from_version(from).limit(PAGE))
                .await
            {
                Ok(page) => page,
                Err(annals_core::Error::StreamNotFound { .. }) => return Ok(parked),
                Err(e) => return Err(e.into()),
            };
            let len = page.len();
            for record in page {
                from = record.version + 1;
                match record.event_type.as_str() {
                    PARKED => {
                        let message: ParkedMessage = record.decode().map_err(decode_error)?;
                        parked.insert(message.position, message);
                    }
                    RESOLVED => {
                        let resolved: Resolved = record.decode().map_err(decode_error)?;
                        parked.remove(&resolved.position);
                    }
                    other => {
                        tracing::warn!(stream = %self.stream, event_type = other, "ignoring an unknown dead-letter record")
                    }
                }
            }
            if len < PAGE {
                return Ok(parked);
            }
        }
    }

    /// Parks a message (durably, before returning).
    pub async fn park(&self, message: &ParkedMessage) -> ConsumerResult<()> {
        let event = EventData::json(PARKED, message)?;
        self.store.append(&self.stream, ExpectedVersion::Any, vec![event]).await?;
        metrics::counter!("annals_dead_letters_total", "stream" => self.stream.to_string()).increment(1);
        Ok(())
    }

    /// Marks the parked message at `position` as dealt with (`how`:
    /// "replayed" or "discarded"); it no longer lists as parked.
    pub async fn resolve(&self, position: u64, how: &str) -> ConsumerResult<()> {
        let event = EventData::json(RESOLVED, &Resolved { position, how: how.to_owned() })?;
        self.store.append(&self.stream, ExpectedVersion::Any, vec![event]).await?;
        Ok(())
    }

    /// Reads the original event of a parked message back from its stream.
    pub async fn original(&self, message: &ParkedMessage) -> ConsumerResult<RecordedEvent> {
        let read = ReadStream::forward().from_version(message.version).limit(1);
        let gone = ConsumerError::OriginalGone { position: message.position };
        match self.store.read_stream(&message.stream, read).await {
            Ok(mut events) => match events.pop() {
                Some(event) if event.id == message.event_id => Ok(event),
                _ => Err(gone),
            },
            Err(annals_core::Error::StreamNotFound { .. } | annals_core::Error::StreamDeleted { .. }) => {
                Err(gone)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn decode_error(e: annals_core::Error) -> ConsumerError {
    ConsumerError::Decode { reason: e.to_string() }
}
