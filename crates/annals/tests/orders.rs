//! Every rule of the orders example through the harness, and schema
//! evolution (upcaster chains, renames, schema rejection) through a real
//! repository.

#[path = "../examples/orders/domain.rs"]
#[allow(dead_code)]
mod domain;

use std::sync::Arc;

use annals::{CommandMetadata, Error, Repository, TestFramework, Upcasters};
use annals_core::{Appender, ExpectedVersion, MemoryStore, ReadStream, StreamReader};
use domain::{
    Order, OrderCommand as OC, OrderError, OrderEvent as OE, OrderStatus, Payment, PaymentCommand as PC,
    PaymentError, PaymentEvent as PE, PaymentStatus,
};

fn place() -> OC {
    OC::Place { customer: "ada".into(), total_cents: 500, currency: "EUR".into() }
}

fn placed() -> OE {
    OE::Placed { customer: "ada".into(), total_cents: 500, currency: "EUR".into() }
}

fn paid() -> OE {
    OE::Paid { payment_id: "p".into() }
}

#[test]
fn placing() {
    TestFramework::<Order>::given_no_previous_events().when(place()).then_expect_events(vec![placed()]);
    TestFramework::<Order>::given_no_previous_events()
        .when(OC::Place { customer: "ada".into(), total_cents: 0, currency: "EUR".into() })
        .then_expect_error(OrderError::ZeroTotal);
    TestFramework::<Order>::given(vec![placed()])
        .when(place())
        .then_expect_error(OrderError::WrongStatus { action: "place", status: OrderStatus::Placed });
}

#[test]
fn paying_then_shipping_in_that_order() {
    TestFramework::<Order>::given_no_previous_events()
        .when(OC::MarkPaid { payment_id: "p".into() })
        .then_expect_error(OrderError::WrongStatus { action: "pay", status: OrderStatus::New });
    TestFramework::<Order>::given(vec![placed()])
        .when(OC::MarkPaid { payment_id: "p".into() })
        .then_expect_events(vec![paid()])
        .then_expect_state(|o| assert_eq!(o.payment_id.as_deref(), Some("p")));
    TestFramework::<Order>::given(vec![placed()])
        .when(OC::Ship { tracking: "t".into() })
        .then_expect_error(OrderError::WrongStatus { action: "ship", status: OrderStatus::Placed });
    TestFramework::<Order>::given(vec![placed(), paid()])
        .when(OC::Ship { tracking: "t".into() })
        .then_expect_events(vec![OE::Shipped { tracking: "t".into() }]);
    TestFramework::<Order>::given(vec![placed(), paid()])
        .when(OC::MarkPaid { payment_id: "q".into() })
        .then_expect_error(OrderError::WrongStatus { action: "pay", status: OrderStatus::Paid });
}

#[test]
fn cancelling() {
    TestFramework::<Order>::given(vec![placed()])
        .when(OC::Cancel { reason: "r".into() })
        .then_expect_events(vec![OE::Cancelled { reason: "r".into(), refund_due: false }]);
    TestFramework::<Order>::given(vec![placed(), paid()])
        .when(OC::Cancel { reason: "r".into() })
        .then_expect_events(vec![OE::Cancelled { reason: "r".into(), refund_due: true }]);
    let shipped = vec![placed(), paid(), OE::Shipped { tracking: "t".into() }];
    TestFramework::<Order>::given(shipped)
        .when(OC::Cancel { reason: "r".into() })
        .then_expect_error(OrderError::WrongStatus { action: "cancel", status: OrderStatus::Shipped });
    let cancelled = vec![placed(), OE::Cancelled { reason: "r".into(), refund_due: false }];
    for cmd in [
        place(),
        OC::MarkPaid { payment_id: "p".into() },
        OC::Ship { tracking: "t".into() },
        OC::Cancel { reason: "again".into() },
    ] {
        TestFramework::<Order>::given(cancelled.clone()).when(cmd).then_expect_error_matching(|e| {
            matches!(e, OrderError::WrongStatus { status: OrderStatus::Cancelled, .. })
        });
    }
}

#[test]
fn payment_rules() {
    let authorized = PE::Authorized { order_id: "o".into(), amount_cents: 70 };
    TestFramework::<Payment>::given_no_previous_events()
        .when(PC::Authorize { order_id: "o".into(), amount_cents: 70 })
        .then_expect_events(vec![authorized.clone()]);
    TestFramework::<Payment>::given_no_previous_events()
        .when(PC::Authorize { order_id: "o".into(), amount_cents: 0 })
        .then_expect_error(PaymentError::ZeroAmount);
    TestFramework::<Payment>::given_no_previous_events()
        .when(PC::Capture)
        .then_expect_error(PaymentError::WrongStatus { action: "capture", status: PaymentStatus::New });
    TestFramework::<Payment>::given(vec![authorized.clone()])
        .when(PC::Refund)
        .then_expect_error(PaymentError::WrongStatus { action: "refund", status: PaymentStatus::Authorized });
    TestFramework::<Payment>::given(vec![authorized.clone(), PE::Captured])
        .when(PC::Refund)
        .then_expect_events(vec![PE::Refunded { amount_cents: 70 }])
        .then_expect_state(|p| assert_eq!(p.status, PaymentStatus::Refunded));
    TestFramework::<Payment>::given(vec![
        authorized.clone(),
        PE::Captured,
        PE::Refunded { amount_cents: 70 },
    ])
    .when(PC::Refund)
    .then_expect_error(PaymentError::WrongStatus { action: "refund", status: PaymentStatus::Refunded });
    TestFramework::<Payment>::given(vec![authorized])
        .when(PC::Authorize { order_id: "o".into(), amount_cents: 1 })
        .then_expect_error(PaymentError::WrongStatus {
            action: "authorize",
            status: PaymentStatus::Authorized,
        });
}

#[test]
fn upcaster_chain_v1_to_v3_with_a_rename() {
    let up = domain::upcasters();
    let (t, v, p) = &domain::legacy_history()[0];
    let out = up.apply(t, *v, p.clone()).unwrap();
    assert_eq!((out.event_type.as_str(), out.schema_version), ("OrderPlaced", 3));
    assert_eq!(
        out.payload,
        serde_json::json!({ "customer": "grace", "total_cents": 1999, "currency": "EUR" })
    );
    let (t, v, p) = domain::v2_placed();
    let out = up.apply(t, v, p).unwrap();
    assert_eq!(out.payload["currency"], "EUR");
    assert_eq!(out.payload["total_cents"], 4200);
    // Bad legacy data is an error, not a panic.
    assert!(up.apply("OrderCreated", 1, serde_json::json!({ "customer": "x", "total": "lots" })).is_err());
}

#[tokio::test]
async fn old_versions_are_upcast_on_read_and_the_log_is_never_rewritten() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Order>::builder(store.clone()).upcasters(domain::upcasters()).build();
    let stream = repo.stream("old").unwrap();
    let raw: Vec<_> =
        domain::legacy_history().iter().map(|(t, v, p)| domain::legacy_event(t, *v, p)).collect();
    store.append(&stream, ExpectedVersion::NoStream, raw).await.unwrap();
    let before = store.read_stream(&stream, ReadStream::forward()).await.unwrap();

    let loaded = repo.load("old").await.unwrap();
    assert_eq!(loaded.state.status, OrderStatus::Paid);
    assert_eq!((loaded.state.total_cents, loaded.state.currency.as_str()), (1999, "EUR"));
    // New events go on top in the current version; old ones stay as written.
    repo.execute("old", &OC::Ship { tracking: "t".into() }, &CommandMetadata::new("s")).await.unwrap();
    let after = store.read_stream(&stream, ReadStream::forward()).await.unwrap();
    assert_eq!(&after[..2], &before[..]);
    assert_eq!(after[0].event_type, "OrderCreated");
    assert_eq!(after[0].metadata.schema_version(), Some(1));

    // Newly placed orders are written at v3.
    repo.execute("new", &place(), &CommandMetadata::new("p")).await.unwrap();
    let new = store.read_stream(&repo.stream("new").unwrap(), ReadStream::forward()).await.unwrap();
    assert_eq!(new[0].metadata.schema_version(), Some(3));
    assert_eq!(repo.load("new").await.unwrap().state.total_cents, 500);
}

#[tokio::test]
async fn a_missing_upcaster_is_reported_not_misread() {
    let store = Arc::new(MemoryStore::new());
    // Only the v2→v3 step: a v1 event cannot reach v3.
    let partial = Upcasters::new().upcast("OrderPlaced", 2, |mut p| {
        p["currency"] = serde_json::json!("EUR");
        Ok(p)
    });
    let repo = Repository::<Order>::builder(store.clone()).upcasters(partial).build();
    let stream = repo.stream("x").unwrap();
    let (t, v, p) = domain::v2_placed();
    store.append(&stream, ExpectedVersion::NoStream, vec![domain::legacy_event(t, v, &p)]).await.unwrap();
    assert_eq!(repo.load("x").await.unwrap().state.currency, "EUR");

    // Without the v2→v3 step the stored v2 payload lacks `currency`: a
    // typed decode error, never a default silently filled in.
    let repo_without = Repository::<Order>::new(store.clone());
    let err = repo_without.load("x").await.unwrap_err();
    assert!(
        matches!(err, Error::Decode { ref event_type, schema_version: 2, .. } if event_type == "OrderPlaced"),
        "{err}"
    );
    assert!(err.to_string().contains("currency"), "{err}");

    // A payload that decodes but is of an older version is caught by the version check.
    let stream = repo.stream("y").unwrap();
    let sneaky = domain::legacy_event(
        "OrderPlaced",
        1,
        &serde_json::json!({ "customer": "c", "total_cents": 1, "currency": "EUR" }),
    );
    store.append(&stream, ExpectedVersion::NoStream, vec![sneaky]).await.unwrap();
    let err = repo.load("y").await.unwrap_err();
    assert!(err.to_string().contains("register an upcaster from (OrderPlaced, 1)"), "{err}");

    // An event written by newer code cannot be fixed by an upcaster here;
    // the error must not send the reader looking for one.
    let stream = repo.stream("z").unwrap();
    let newer = domain::legacy_event(
        "OrderPlaced",
        4,
        &serde_json::json!({ "customer": "c", "total_cents": 1, "currency": "EUR" }),
    );
    store.append(&stream, ExpectedVersion::NoStream, vec![newer]).await.unwrap();
    let err = repo.load("z").await.unwrap_err();
    assert!(matches!(err, Error::Decode { schema_version: 4, .. }), "{err}");
    assert!(err.to_string().contains("newer version of the code"), "{err}");
    assert!(!err.to_string().contains("register an upcaster"), "{err}");
}

#[tokio::test]
async fn a_schema_version_that_is_not_a_whole_number_is_a_decode_error_not_v1() {
    // A client writing through the server can store `schema_version` as a
    // string (or 3.0, or beyond u32). Reading that as "no version" = v1
    // would run v1 upcasters over a current payload and misread it.
    let store = Arc::new(MemoryStore::new());
    let upcasters = domain::upcasters().upcast("OrderPlaced", 1, |mut p| {
        // An old release stored whole euros in `total_cents`.
        let euros = p["total_cents"].as_u64().ok_or("no total")?;
        p["total_cents"] = serde_json::json!(euros * 100);
        Ok(p)
    });
    let repo = Repository::<Order>::builder(store.clone()).upcasters(upcasters).build();
    let payload = serde_json::json!({ "customer": "c", "total_cents": 500, "currency": "EUR" });
    for (id, bad) in [
        ("s", serde_json::json!("3")),
        ("f", serde_json::json!(3.0)),
        ("big", serde_json::json!(u64::from(u32::MAX) + 4)),
        ("neg", serde_json::json!(-3)),
    ] {
        let mut event = domain::legacy_event("OrderPlaced", 3, &payload);
        event.metadata = event.metadata.with(annals_core::metadata::keys::SCHEMA_VERSION, bad.clone());
        store.append(&repo.stream(id).unwrap(), ExpectedVersion::NoStream, vec![event]).await.unwrap();
        let err = repo.load(id).await.map(|o| o.state.total_cents).unwrap_err();
        assert!(
            matches!(err, Error::Decode { ref reason, .. } if reason.contains("schema_version")),
            "{bad}: {err}"
        );
        let err = repo.events(id).await.map(|e| e.len()).unwrap_err();
        assert!(
            matches!(err, Error::Decode { ref reason, .. } if reason.contains("schema_version")),
            "{bad}: {err}"
        );
    }
    // Missing metadata still means v1.
    let v1 = annals_core::EventData::json(
        "OrderPlaced",
        &serde_json::json!({ "customer": "c", "total_cents": 5 }),
    )
    .unwrap();
    store.append(&repo.stream("old").unwrap(), ExpectedVersion::NoStream, vec![v1]).await.unwrap();
    assert_eq!(repo.load("old").await.unwrap().state.total_cents, 500);
}

#[tokio::test]
async fn invalid_payloads_are_rejected_naming_the_field_and_nothing_is_written() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Order>::builder(store.clone()).schemas(domain::schemas()).build();
    let bad = OC::Place { customer: "ada".into(), total_cents: 5, currency: "euro".into() };
    let err = repo.execute("1", &bad, &CommandMetadata::new("a")).await.unwrap_err();
    match &err {
        Error::SchemaViolation { event_type, schema_version, pointer, .. } => {
            assert_eq!(
                (event_type.as_str(), *schema_version, pointer.as_str()),
                ("OrderPlaced", 3, "/currency")
            );
        }
        other => panic!("expected a schema violation, got {other}"),
    }
    assert!(err.to_string().contains("/currency"));
    let bad = OC::Place { customer: String::new(), total_cents: 5, currency: "EUR".into() };
    let err = repo.execute("1", &bad, &CommandMetadata::new("b")).await.unwrap_err();
    assert!(matches!(err, Error::SchemaViolation { ref pointer, .. } if pointer == "/customer"));
    assert!(matches!(
        store.read_stream(&repo.stream("1").unwrap(), ReadStream::forward()).await,
        Err(annals_core::Error::StreamNotFound { .. })
    ));
    // Valid payloads pass.
    repo.execute("1", &place(), &CommandMetadata::new("c")).await.unwrap();
}
