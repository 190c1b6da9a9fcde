//! What travels with a command, and what its events inherit.

use annals_core::{Metadata, StreamName, metadata::keys};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Namespace of the UUIDv5 event ids derived from command ids.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1c_0f5e_8b4d_4c11_9d0e_5a7f_3e2b_1c90);

/// Metadata key recording the `causation_id` the command itself carried
/// (the events' own `causation_id` is the command id).
pub const COMMAND_CAUSATION_ID: &str = "command_causation_id";

/// The context of one command: who sent it, why, and its idempotency key.
///
/// Events produced by the command get metadata:
/// - `command_id` = [`CommandMetadata::command_id`],
/// - `correlation_id` = [`CommandMetadata::correlation_id`], or the command
///   id when the command starts a new conversation,
/// - `causation_id` = the command id (the command caused them),
/// - `command_causation_id` = the command's own causation id, if any,
/// - `actor`, `source`, `tenant` when set, plus every key of `extra`,
/// - `schema_version` of the event's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandMetadata {
    /// Idempotency key: executing the same command id twice on one
    /// aggregate writes its events once (see
    /// [`Repository::execute`](crate::Repository::execute)).
    pub command_id: String,
    /// Ties together everything caused by one user request.
    pub correlation_id: Option<String>,
    /// What caused this command (an event id or an upstream command id).
    pub causation_id: Option<String>,
    /// Who sent it.
    pub actor: Option<String>,
    /// Which service or component sent it.
    pub source: Option<String>,
    /// Tenant, for multi-tenant deployments.
    pub tenant: Option<String>,
    /// Further keys copied verbatim into every event's metadata (the keys
    /// above win on a clash).
    pub extra: Map<String, Value>,
}

impl CommandMetadata {
    /// A command with this id and nothing else.
    pub fn new(command_id: impl Into<String>) -> Self {
        CommandMetadata {
            command_id: command_id.into(),
            correlation_id: None,
            causation_id: None,
            actor: None,
            source: None,
            tenant: None,
            extra: Map::new(),
        }
    }

    /// A command with a fresh random (UUIDv7) id: not idempotent across
    /// retries by the caller, so prefer a client-chosen id.
    pub fn generated() -> Self {
        Self::new(Uuid::now_v7().to_string())
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Sets the actor.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the source.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets the tenant.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Adds a custom metadata key.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// The metadata every event of this command carries (without
    /// `schema_version`, which is per event).
    pub fn event_metadata(&self) -> Metadata {
        let mut map = self.extra.clone();
        let correlation = self.correlation_id.clone().unwrap_or_else(|| self.command_id.clone());
        map.insert(keys::CORRELATION_ID.into(), correlation.into());
        map.insert(keys::CAUSATION_ID.into(), self.command_id.clone().into());
        map.insert(keys::COMMAND_ID.into(), self.command_id.clone().into());
        let optional = [
            (COMMAND_CAUSATION_ID, &self.causation_id),
            (keys::ACTOR, &self.actor),
            (keys::SOURCE, &self.source),
            (keys::TENANT, &self.tenant),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                map.insert(key.into(), value.clone().into());
            }
        }
        Metadata::from_map(map)
    }

    /// The id of the `index`-th event this command writes to `stream`:
    /// a UUIDv5 of (stream, command id, index). Deterministic, so a re-sent
    /// append of the same decision carries the same ids and the store's
    /// idempotent-append rule recognises it.
    pub fn event_id(&self, stream: &StreamName, index: usize) -> Uuid {
        let name = format!("{}\n{}\n{index}", stream.as_str(), self.command_id);
        Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_inherit_correlation_and_are_caused_by_the_command() {
        let cmd = CommandMetadata::new("c-1").correlation_id("req-9").causation_id("e-7").actor("ada");
        let meta = cmd.event_metadata();
        assert_eq!(meta.correlation_id().as_deref(), Some("req-9"));
        assert_eq!(meta.causation_id().as_deref(), Some("c-1"));
        assert_eq!(meta.get_str(keys::COMMAND_ID).as_deref(), Some("c-1"));
        assert_eq!(meta.get_str(COMMAND_CAUSATION_ID).as_deref(), Some("e-7"));
        assert_eq!(meta.get_str(keys::ACTOR).as_deref(), Some("ada"));
        // Without a correlation id the command starts the conversation.
        let meta = CommandMetadata::new("c-2").event_metadata();
        assert_eq!(meta.correlation_id().as_deref(), Some("c-2"));
    }

    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        let s = StreamName::new("account-1").unwrap();
        let t = StreamName::new("account-2").unwrap();
        let cmd = CommandMetadata::new("c-1");
        assert_eq!(cmd.event_id(&s, 0), cmd.event_id(&s, 0));
        assert_ne!(cmd.event_id(&s, 0), cmd.event_id(&s, 1));
        assert_ne!(cmd.event_id(&s, 0), cmd.event_id(&t, 0));
        assert_ne!(cmd.event_id(&s, 0), CommandMetadata::new("c-2").event_id(&s, 0));
    }
}
