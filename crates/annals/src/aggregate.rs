//! The [`Aggregate`] and [`DomainEvent`] traits.

use std::fmt::Debug;

use serde::{Serialize, de::DeserializeOwned};

/// A consistency boundary: decides commands into events and folds events
/// into state.
///
/// Business rules live in [`Aggregate::handle`] and nowhere else;
/// [`Aggregate::apply`] only records what an event says happened, because
/// events are facts that were already accepted (replaying history must never
/// fail or decide differently after the rules change).
///
/// The state before the first event is `Default::default()`; an aggregate
/// that needs to tell "not created yet" apart models it in its state (an
/// enum with a `New` variant, or an `opened: bool`). We chose `Default`
/// over `apply(Option<Self>, ..)` so that `handle(&self, ..)` always has a
/// state to look at, including for the creating command.
///
/// Its stream is `{TYPE}-{id}`. The state must be serde-serializable so
/// that it can be snapshotted.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable type name, which is also the stream category (e.g.
    /// `account`). Must not contain `-`; changing it orphans existing streams.
    const TYPE: &'static str;

    /// Version of this type's snapshot encoding. Bump it whenever the
    /// serialized shape of the state changes: older snapshots are then
    /// ignored (the state is rebuilt from events), never misread.
    const SNAPSHOT_VERSION: u32 = 1;

    /// What callers ask the aggregate to do.
    type Command: Send + Sync;

    /// What happened. See [`DomainEvent`].
    type Event: DomainEvent;

    /// Why a command was refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides a command against the current state: the events to record,
    /// or why not. Must not change state (it gets `&self`) and should be
    /// deterministic, so a retried command decides the same way.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one event into the state. Must not fail and must not check
    /// rules: the event already happened.
    fn apply(&mut self, event: &Self::Event);
}

/// An aggregate's event type.
///
/// It must be a serde enum in serde's default (externally tagged)
/// representation: the variant name is the stored event type and the
/// variant's content is the stored JSON payload. Use
/// `#[serde(rename = "...")]` to pin stable type names independent of the
/// Rust identifiers. Unit variants are stored with a `null` payload.
///
/// ```
/// #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
/// enum AccountEvent {
///     Opened { owner: String },
///     Deposited { amount: u64 },
///     Closed,
/// }
/// impl annals::DomainEvent for AccountEvent {}
/// ```
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static {
    /// The schema version this code writes for this event (default 1).
    /// Bump it when a variant's payload changes incompatibly and register an
    /// upcaster from the old version (see [`crate::Upcasters`]).
    fn schema_version(&self) -> u32 {
        1
    }
}
