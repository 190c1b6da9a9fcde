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
/// Namespace of the ids of `Parked` records (see [`DeadLetterQueue::park`]).
const PARKED_ID_NAMESPACE: annals_core::Uuid =
    annals_core::Uuid::from_u128(0x45cc_7539_274f_4e3f_a5b3_ec81_81f1_9bc9);

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

/// Longest failure reason a parked-message record keeps, in bytes; a
/// longer one is cut (at a character boundary) and marked.
pub const MAX_PARK_REASON_LEN: usize = 8 * 1024;

/// `reason`, cut to [`MAX_PARK_REASON_LEN`] bytes.
fn bounded_reason(mut reason: String) -> String {
    const MARK: &str = "… (truncated)";
    if reason.len() > MAX_PARK_REASON_LEN {
        let mut end = MAX_PARK_REASON_LEN - MARK.len();
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str(MARK);
    }
    reason
}

impl ParkedMessage {
    /// A parked-message record for `event`. The reason is kept to
    /// [`MAX_PARK_REASON_LEN`] bytes, so that the record always fits the
    /// store's event size limit: a dead letter that cannot be written is
    /// never settled, and a reason too long to store would have had its
    /// message redelivered for good instead of parked.
    pub fn of(event: &RecordedEvent, reason: impl Into<String>, attempts: u32) -> Self {
        ParkedMessage {
            event_id: event.id,
            stream: event.stream.clone(),
            version: event.version,
            position: event.position,
            event_type: event.event_type.clone(),
            reason: bounded_reason(reason.into()),
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
    ///
    /// The record's event id is derived from the dead-letter stream and the
    /// message (position, original id, reason, attempts; not the time), so
    /// parking the same message again right after, as a consumer does when
    /// it replays a batch after a crash between parking and saving its
    /// checkpoint, is an idempotent re-send that writes nothing. A message
    /// parked again after other records (say, a failed replay after
    /// another message was parked) gets a record again.
    pub async fn park(&self, message: &ParkedMessage) -> ConsumerResult<()> {
        let id = annals_core::Uuid::new_v5(
            &PARKED_ID_NAMESPACE,
            format!(
                "{}\n{}\n{}\n{}\n{}",
                self.stream, message.position, message.event_id, message.attempts, message.reason
            )
            .as_bytes(),
        );
        let event = EventData::json(PARKED, message)?.with_id(id);
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

#[cfg(test)]
mod tests {
    use annals_core::{Appender, ContentType, MemoryStore, StreamReader};

    use super::*;

    async fn recorded(store: &MemoryStore, i: u64) -> RecordedEvent {
        let stream = StreamName::new(format!("order-{i}")).unwrap();
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![EventData::raw("Placed", b"{}".to_vec(), ContentType::Json)],
            )
            .await
            .unwrap();
        store.read_stream(&stream, ReadStream::forward()).await.unwrap().remove(0)
    }

    #[tokio::test]
    async fn parking_the_same_message_twice_in_a_row_writes_one_record() {
        let store = MemoryStore::new();
        let dlq = DeadLetterQueue::new(Arc::new(store.clone()), "billing").unwrap();
        let (first, second) = (recorded(&store, 1).await, recorded(&store, 2).await);
        let mut message = ParkedMessage::of(&first, "bad order", 3);
        dlq.park(&message).await.unwrap();
        // A replay after a crash parks it again, a moment later.
        message.parked_at = Timestamp::now();
        dlq.park(&message).await.unwrap();
        let records = || store.read_stream(dlq.stream(), ReadStream::forward());
        assert_eq!(records().await.unwrap().len(), 1);

        // Another failure of the same message is a new record.
        dlq.park(&ParkedMessage::of(&first, "bad order, again", 4)).await.unwrap();
        assert_eq!(records().await.unwrap().len(), 2);
        // So is the same message parked again after other records.
        dlq.park(&ParkedMessage::of(&second, "bad order", 3)).await.unwrap();
        dlq.park(&message).await.unwrap();
        assert_eq!(records().await.unwrap().len(), 4);
        let parked = dlq.list().await.unwrap();
        assert_eq!(parked.iter().map(|p| (p.position, p.attempts)).collect::<Vec<_>>(), [(0, 3), (1, 3)]);

        // Another queue parking the same message writes its own record.
        let other = DeadLetterQueue::new(Arc::new(store.clone()), "shipping").unwrap();
        other.park(&message).await.unwrap();
        assert_eq!(store.read_stream(other.stream(), ReadStream::forward()).await.unwrap().len(), 1);
    }
}
