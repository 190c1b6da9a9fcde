//! A given/when/then harness for aggregates: business rules tested without
//! a store.

use std::fmt::Debug;

use crate::{Aggregate, DomainEvent, Upcasters, codec};

/// Tests an aggregate's rules: `given` past events, `when` a command,
/// `then` expect events or an error.
///
/// Past events are round-tripped through the stored encoding (JSON bytes,
/// and the upcasters, if any) and must end at the schema version the code
/// expects, as a repository requires, before being applied: a variant that
/// does not survive serialization or upcasting fails the test rather than
/// production.
///
/// ```
/// use annals::doc::{Counter, CounterCommand, CounterError, CounterEvent};
/// use annals::TestFramework;
///
/// TestFramework::<Counter>::given(vec![CounterEvent::Incremented { by: 2 }])
///     .when(CounterCommand::Increment { by: 3 })
///     .then_expect_events(vec![CounterEvent::Incremented { by: 3 }]);
///
/// TestFramework::<Counter>::given_no_previous_events()
///     .when(CounterCommand::Decrement { by: 1 })
///     .then_expect_error(CounterError::WouldGoNegative);
/// ```
pub struct TestFramework<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> TestFramework<A> {
    /// Starts from the state these events produce.
    pub fn given(events: Vec<A::Event>) -> Self {
        Self::given_with_upcasters(events, &Upcasters::new())
    }

    /// Starts from a new aggregate.
    pub fn given_no_previous_events() -> Self {
        Self::given(Vec::new())
    }

    /// Like [`TestFramework::given`], reading the events through these
    /// upcasters.
    ///
    /// # Panics
    /// When an event does not survive encoding and decoding (a test
    /// failure).
    pub fn given_with_upcasters(events: Vec<A::Event>, upcasters: &Upcasters) -> Self {
        let mut state = A::default();
        for event in &events {
            let roundtrip = roundtrip::<A>(event, upcasters);
            state.apply(&roundtrip);
        }
        TestFramework { state }
    }

    /// Runs the command against the given state.
    pub fn when(self, command: A::Command) -> TestOutcome<A> {
        let result = self.state.handle(&command);
        TestOutcome { state: self.state, result, applied: false }
    }
}

/// The result of [`TestFramework::when`], to assert on.
pub struct TestOutcome<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
    /// Whether `state` already includes the produced events.
    applied: bool,
}

impl<A: Aggregate> TestOutcome<A> {
    /// Asserts that the command produced exactly these events, in order.
    ///
    /// # Panics
    /// When it did not (a test failure).
    pub fn then_expect_events(self, expected: Vec<A::Event>) -> Self
    where
        A::Event: PartialEq,
    {
        match &self.result {
            Ok(events) => assert_eq!(events, &expected, "the command produced other events than expected"),
            Err(e) => panic!("expected events {expected:?}, but the command was rejected: {e} ({e:?})"),
        }
        self
    }

    /// Asserts that the command was rejected with exactly this error.
    ///
    /// # Panics
    /// When it was not (a test failure).
    pub fn then_expect_error(self, expected: A::Error) -> Self
    where
        A::Error: PartialEq,
    {
        match &self.result {
            Ok(events) => panic!("expected error {expected:?}, but the command produced {events:?}"),
            Err(e) => assert_eq!(e, &expected, "the command was rejected with another error"),
        }
        self
    }

    /// Asserts that the command was rejected with an error for which
    /// `check` returns true (for errors without `PartialEq`).
    ///
    /// # Panics
    /// When it was not (a test failure).
    pub fn then_expect_error_matching(self, check: impl FnOnce(&A::Error) -> bool) -> Self {
        match &self.result {
            Ok(events) => panic!("expected an error, but the command produced {events:?}"),
            Err(e) => assert!(check(e), "unexpected error: {e} ({e:?})"),
        }
        self
    }

    /// Asserts on the state after applying the produced events (the
    /// command must have succeeded).
    ///
    /// # Panics
    /// When the command was rejected or `check` panics.
    pub fn then_expect_state(mut self, check: impl FnOnce(&A)) -> Self {
        match &self.result {
            Ok(events) if !self.applied => events.iter().for_each(|e| self.state.apply(e)),
            Ok(_) => {}
            Err(e) => panic!("expected a new state, but the command was rejected: {e} ({e:?})"),
        }
        self.applied = true;
        check(&self.state);
        self
    }

    /// The raw result, for custom assertions.
    pub fn into_result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}

fn roundtrip<A: Aggregate>(event: &A::Event, upcasters: &Upcasters) -> A::Event
where
    A::Event: Debug,
{
    let encoded = match codec::encode(event) {
        Ok(encoded) => encoded,
        Err(e) => panic!("given event {event:?} does not encode: {e}"),
    };
    // Through the stored bytes, as a repository reads them.
    let payload = match serde_json::to_vec(&encoded.payload).map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(payload)) => payload,
        Ok(Err(e)) | Err(e) => panic!("given event {event:?} does not survive its stored JSON: {e}"),
    };
    let up = match upcasters.apply(&encoded.event_type, encoded.schema_version, payload) {
        Ok(up) => up,
        Err(e) => panic!("given event {event:?} fails upcasting: {e}"),
    };
    let decoded: A::Event = match codec::decode_parts(&up.event_type, up.payload) {
        Ok(decoded) => decoded,
        Err(e) => panic!("given event {event:?} does not decode after encoding: {e}"),
    };
    // The check a repository makes: loading such an event fails there.
    let expected = decoded.schema_version();
    assert_eq!(
        up.schema_version, expected,
        "given event {event:?}: upcasting took {} v{} to v{}, but the code expects v{expected}",
        encoded.event_type, encoded.schema_version, up.schema_version
    );
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::{Counter, CounterCommand, CounterError, CounterEvent};

    #[test]
    fn passes_when_the_expectation_holds() {
        TestFramework::<Counter>::given(vec![CounterEvent::Incremented { by: 5 }])
            .when(CounterCommand::Decrement { by: 5 })
            .then_expect_events(vec![CounterEvent::Decremented { by: 5 }])
            .then_expect_state(|c| assert_eq!(c.value, 0))
            // A second state check does not apply the events twice.
            .then_expect_state(|c| assert_eq!(c.value, 0));
    }

    #[test]
    #[should_panic(expected = "but the code expects v1")]
    fn given_events_fail_where_a_repository_would_not_load_them() {
        // An upcaster registered at the version the code writes: a
        // repository refuses to load such events, so the harness must too
        // (it used to apply the doubled amount and pass).
        let up = Upcasters::new().upcast("Incremented", 1, |mut p| {
            p["by"] = serde_json::json!(p["by"].as_u64().unwrap_or(0) * 2);
            Ok(p)
        });
        TestFramework::<Counter>::given_with_upcasters(vec![CounterEvent::Incremented { by: 5 }], &up)
            .when(CounterCommand::Decrement { by: 10 })
            .then_expect_events(vec![CounterEvent::Decremented { by: 10 }]);
    }

    #[test]
    #[should_panic(expected = "other events than expected")]
    fn fails_on_other_events() {
        TestFramework::<Counter>::given_no_previous_events()
            .when(CounterCommand::Increment { by: 1 })
            .then_expect_events(vec![CounterEvent::Incremented { by: 2 }]);
    }

    #[test]
    #[should_panic(expected = "but the command produced")]
    fn fails_when_an_expected_error_does_not_happen() {
        TestFramework::<Counter>::given_no_previous_events()
            .when(CounterCommand::Increment { by: 1 })
            .then_expect_error(CounterError::WouldGoNegative);
    }

    #[test]
    #[should_panic(expected = "but the command was rejected")]
    fn fails_when_events_were_expected_but_the_command_was_rejected() {
        TestFramework::<Counter>::given_no_previous_events()
            .when(CounterCommand::Decrement { by: 1 })
            .then_expect_events(vec![]);
    }
}
