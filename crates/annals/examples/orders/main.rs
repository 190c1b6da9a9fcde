//! The orders example: an order and its payment, linked by correlation and
//! causation ids, and old event versions upcast on read.
//!
//! Run with `cargo run -p annals --example orders`.

mod domain;

use std::sync::Arc;

use annals::{CommandMetadata, Error, Repository};
use annals_core::{ExpectedVersion, MemoryStore, ReadStream, Store};
use domain::{Order, OrderCommand, Payment, PaymentCommand};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let orders = Repository::<Order>::builder(store.clone())
        .upcasters(domain::upcasters())
        .schemas(domain::schemas())
        .build();
    let payments = Repository::<Payment>::new(store.clone());

    println!("== Happy path: place, pay, ship");
    let place = CommandMetadata::new("place-o1").actor("web-shop");
    let placed = orders
        .execute(
            "o1",
            &OrderCommand::Place { customer: "ada".into(), total_cents: 2500, currency: "EUR".into() },
            &place,
        )
        .await?;
    println!("order o1: {:?}", placed.events);
    // Everything that follows belongs to the same conversation: same
    // correlation id, each step caused by the previous command.
    let step = |id: &str, caused_by: &str| {
        CommandMetadata::new(id).correlation_id("place-o1").causation_id(caused_by).actor("payments")
    };
    payments
        .execute(
            "p1",
            &PaymentCommand::Authorize { order_id: "o1".into(), amount_cents: 2500 },
            &step("auth-p1", "place-o1"),
        )
        .await?;
    payments.execute("p1", &PaymentCommand::Capture, &step("capture-p1", "auth-p1")).await?;
    orders
        .execute("o1", &OrderCommand::MarkPaid { payment_id: "p1".into() }, &step("pay-o1", "capture-p1"))
        .await?;
    orders
        .execute("o1", &OrderCommand::Ship { tracking: "TRACK-1".into() }, &step("ship-o1", "pay-o1"))
        .await?;
    println!("order o1 is {:?}", orders.load("o1").await?.state.status);
    let late = orders
        .execute("o1", &OrderCommand::Cancel { reason: "changed mind".into() }, &step("cancel-o1", "x"))
        .await;
    report("cancel a shipped order", late.map(|_| ()));

    println!("\n== Cancelling a paid order makes a refund due");
    orders
        .execute(
            "o2",
            &OrderCommand::Place { customer: "bob".into(), total_cents: 900, currency: "USD".into() },
            &CommandMetadata::new("place-o2"),
        )
        .await?;
    payments
        .execute(
            "p2",
            &PaymentCommand::Authorize { order_id: "o2".into(), amount_cents: 900 },
            &CommandMetadata::new("auth-p2"),
        )
        .await?;
    payments.execute("p2", &PaymentCommand::Capture, &CommandMetadata::new("capture-p2")).await?;
    orders
        .execute("o2", &OrderCommand::MarkPaid { payment_id: "p2".into() }, &CommandMetadata::new("pay-o2"))
        .await?;
    let cancelled = orders
        .execute(
            "o2",
            &OrderCommand::Cancel { reason: "out of stock".into() },
            &CommandMetadata::new("cancel-o2"),
        )
        .await?;
    println!("order o2: {:?}", cancelled.events);
    let refund = payments.execute("p2", &PaymentCommand::Refund, &CommandMetadata::new("refund-p2")).await?;
    println!("payment p2: {:?}", refund.events);

    println!("\n== The schema registry guards what is appended");
    let bad = orders
        .execute(
            "o3",
            &OrderCommand::Place { customer: "eve".into(), total_cents: 100, currency: "euro".into() },
            &CommandMetadata::new("place-o3"),
        )
        .await;
    report("place with currency \"euro\"", bad.map(|_| ()));

    println!("\n== Upcasting: history written by older releases");
    let legacy = orders.stream("legacy")?;
    let raw: Vec<_> =
        domain::legacy_history().iter().map(|(t, v, p)| domain::legacy_event(t, *v, p)).collect();
    store.append(&legacy, ExpectedVersion::NoStream, raw).await?;
    let (t, v, p) = domain::v2_placed();
    store
        .append(&orders.stream("mid")?, ExpectedVersion::NoStream, vec![domain::legacy_event(t, v, &p)])
        .await?;
    for id in ["legacy", "mid"] {
        for (recorded, event) in orders.events(id).await? {
            println!(
                "stored {} v{} {}  →  read as {event:?}",
                recorded.event_type,
                recorded.metadata.schema_version().unwrap_or(1),
                String::from_utf8_lossy(&recorded.data)
            );
        }
    }
    let state = orders.load("legacy").await?.state;
    println!("legacy order: {} {} cents, {:?}", state.customer, state.total_cents, state.status);
    orders
        .execute(
            "legacy",
            &OrderCommand::Ship { tracking: "TRACK-OLD".into() },
            &CommandMetadata::new("ship-legacy"),
        )
        .await?;
    let stored = store.read_stream(&legacy, ReadStream::forward()).await?;
    println!(
        "the log is untouched: {:?}",
        stored
            .iter()
            .map(|e| format!("{} v{}", e.event_type, e.metadata.schema_version().unwrap_or(1)))
            .collect::<Vec<_>>()
    );

    println!("\n== The conversation of order o1, by correlation id");
    let slice = store
        .read_all(annals_core::ReadAll::forward(100).filter(annals_core::Filter::correlation_id("place-o1")))
        .await?;
    for e in slice.events {
        println!("{:<12} {:<18} caused by {:?}", e.stream.as_str(), e.event_type, e.metadata.causation_id());
    }
    Ok(())
}

fn report<E: std::fmt::Display>(what: &str, result: Result<(), Error<E>>) {
    match result {
        Ok(()) => println!("{what}: ok"),
        Err(Error::Rejected(reason)) => println!("{what}: rejected — {reason}"),
        Err(other) => println!("{what}: refused — {other}"),
    }
}
