//! A tiny aggregate used by the documentation examples. Not part of the
//! API; hidden from the docs.

use serde::{Deserialize, Serialize};

use crate::{Aggregate, DomainEvent};

/// A counter that must never go negative.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    /// Current value.
    pub value: u64,
}

/// Commands of [`Counter`].
#[derive(Debug, Clone)]
pub enum CounterCommand {
    /// Add.
    Increment {
        /// How much.
        by: u64,
    },
    /// Subtract.
    Decrement {
        /// How much.
        by: u64,
    },
}

/// Events of [`Counter`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    /// Added.
    Incremented {
        /// How much.
        by: u64,
    },
    /// Subtracted.
    Decremented {
        /// How much.
        by: u64,
    },
}

impl DomainEvent for CounterEvent {}

/// Why a counter command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CounterError {
    /// The counter would drop below zero.
    #[error("the counter would go negative")]
    WouldGoNegative,
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;

    fn handle(&self, command: &CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
        match *command {
            CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
            CounterCommand::Decrement { by } if by > self.value => Err(CounterError::WouldGoNegative),
            CounterCommand::Decrement { by } => Ok(vec![CounterEvent::Decremented { by }]),
        }
    }

    fn apply(&mut self, event: &CounterEvent) {
        match *event {
            CounterEvent::Incremented { by } => self.value = self.value.saturating_add(by),
            CounterEvent::Decremented { by } => self.value = self.value.saturating_sub(by),
        }
    }
}
