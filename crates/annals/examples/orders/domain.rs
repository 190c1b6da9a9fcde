//! The orders domain: an order (placed → paid → shipped, or cancelled) and
//! the payment that settles it, plus the schema evolution of `OrderPlaced`.
//!
//! Shared by `examples/orders/main.rs` and `tests/orders.rs`.

use annals::{Aggregate, DomainEvent, SchemaRegistry, Upcasters};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

// ---------------------------------------------------------------- order --

/// An order's state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Lifecycle.
    pub status: OrderStatus,
    /// Who ordered.
    pub customer: String,
    /// What it costs, in cents of `currency`.
    pub total_cents: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// The payment that settled it.
    pub payment_id: Option<String>,
}

/// Where an order is in its life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Not placed yet.
    #[default]
    New,
    /// Placed, waiting for payment.
    Placed,
    /// Paid, waiting for shipping.
    Paid,
    /// On its way; final.
    Shipped,
    /// Cancelled; final.
    Cancelled,
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderCommand {
    /// Places the order.
    Place { customer: String, total_cents: u64, currency: String },
    /// Records that a payment settled it.
    MarkPaid { payment_id: String },
    /// Ships it.
    Ship { tracking: String },
    /// Cancels it (before shipping).
    Cancel { reason: String },
}

/// What happened to an order. The stored type names are pinned with
/// `#[serde(rename)]`, so the Rust names can change without touching the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// Schema v3. v1 was `OrderCreated { customer, total }` with a float
    /// amount in euros; v2 was `OrderPlaced { customer, total_cents }`
    /// without a currency. See [`upcasters`].
    #[serde(rename = "OrderPlaced")]
    Placed { customer: String, total_cents: u64, currency: String },
    /// Paid by this payment.
    #[serde(rename = "OrderPaid")]
    Paid { payment_id: String },
    /// Shipped.
    #[serde(rename = "OrderShipped")]
    Shipped { tracking: String },
    /// Cancelled; `refund_due` when it had been paid.
    #[serde(rename = "OrderCancelled")]
    Cancelled { reason: String, refund_due: bool },
}

impl DomainEvent for OrderEvent {
    fn schema_version(&self) -> u32 {
        match self {
            OrderEvent::Placed { .. } => 3,
            _ => 1,
        }
    }
}

/// Why an order refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// The command does not fit the order's current status.
    #[error("cannot {action} an order that is {status:?}")]
    WrongStatus { action: &'static str, status: OrderStatus },
    /// Orders must cost something.
    #[error("the total must be greater than zero")]
    ZeroTotal,
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn handle(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus as S;
        let wrong = |action| Err(OrderError::WrongStatus { action, status: self.status });
        match (command, self.status) {
            (OrderCommand::Place { total_cents: 0, .. }, S::New) => Err(OrderError::ZeroTotal),
            (OrderCommand::Place { customer, total_cents, currency }, S::New) => {
                Ok(vec![OrderEvent::Placed {
                    customer: customer.clone(),
                    total_cents: *total_cents,
                    currency: currency.clone(),
                }])
            }
            (OrderCommand::Place { .. }, _) => wrong("place"),
            (OrderCommand::MarkPaid { payment_id }, S::Placed) => {
                Ok(vec![OrderEvent::Paid { payment_id: payment_id.clone() }])
            }
            (OrderCommand::MarkPaid { .. }, _) => wrong("pay"),
            (OrderCommand::Ship { tracking }, S::Paid) => {
                Ok(vec![OrderEvent::Shipped { tracking: tracking.clone() }])
            }
            (OrderCommand::Ship { .. }, _) => wrong("ship"),
            (OrderCommand::Cancel { reason }, S::Placed | S::Paid) => {
                Ok(vec![OrderEvent::Cancelled { reason: reason.clone(), refund_due: self.status == S::Paid }])
            }
            (OrderCommand::Cancel { .. }, _) => wrong("cancel"),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed { customer, total_cents, currency } => {
                self.status = OrderStatus::Placed;
                self.customer = customer.clone();
                self.total_cents = *total_cents;
                self.currency = currency.clone();
            }
            OrderEvent::Paid { payment_id } => {
                self.status = OrderStatus::Paid;
                self.payment_id = Some(payment_id.clone());
            }
            OrderEvent::Shipped { .. } => self.status = OrderStatus::Shipped,
            OrderEvent::Cancelled { .. } => self.status = OrderStatus::Cancelled,
        }
    }
}

// -------------------------------------------------------------- payment --

/// A payment's state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    /// Lifecycle.
    pub status: PaymentStatus,
    /// The order it pays.
    pub order_id: String,
    /// Amount in cents.
    pub amount_cents: u64,
}

/// Where a payment is in its life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentStatus {
    /// Nothing yet.
    #[default]
    New,
    /// Money reserved on the card.
    Authorized,
    /// Money taken.
    Captured,
    /// Money returned; final.
    Refunded,
}

/// What can be asked of a payment.
#[derive(Debug, Clone, PartialEq)]
pub enum PaymentCommand {
    /// Reserves money for an order.
    Authorize { order_id: String, amount_cents: u64 },
    /// Takes the reserved money.
    Capture,
    /// Gives captured money back.
    Refund,
}

/// What happened to a payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentEvent {
    /// Money reserved.
    #[serde(rename = "PaymentAuthorized")]
    Authorized { order_id: String, amount_cents: u64 },
    /// Money taken.
    #[serde(rename = "PaymentCaptured")]
    Captured,
    /// Money returned.
    #[serde(rename = "PaymentRefunded")]
    Refunded { amount_cents: u64 },
}

impl DomainEvent for PaymentEvent {}

/// Why a payment refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The command does not fit the payment's status.
    #[error("cannot {action} a payment that is {status:?}")]
    WrongStatus { action: &'static str, status: PaymentStatus },
    /// Payments must move money.
    #[error("the amount must be greater than zero")]
    ZeroAmount,
}

impl Aggregate for Payment {
    const TYPE: &'static str = "payment";
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;

    fn handle(&self, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentError> {
        use PaymentStatus as S;
        let wrong = |action| Err(PaymentError::WrongStatus { action, status: self.status });
        match (command, self.status) {
            (PaymentCommand::Authorize { amount_cents: 0, .. }, S::New) => Err(PaymentError::ZeroAmount),
            (PaymentCommand::Authorize { order_id, amount_cents }, S::New) => {
                Ok(vec![PaymentEvent::Authorized { order_id: order_id.clone(), amount_cents: *amount_cents }])
            }
            (PaymentCommand::Authorize { .. }, _) => wrong("authorize"),
            (PaymentCommand::Capture, S::Authorized) => Ok(vec![PaymentEvent::Captured]),
            (PaymentCommand::Capture, _) => wrong("capture"),
            (PaymentCommand::Refund, S::Captured) => {
                Ok(vec![PaymentEvent::Refunded { amount_cents: self.amount_cents }])
            }
            (PaymentCommand::Refund, _) => wrong("refund"),
        }
    }

    fn apply(&mut self, event: &PaymentEvent) {
        match event {
            PaymentEvent::Authorized { order_id, amount_cents } => {
                self.status = PaymentStatus::Authorized;
                self.order_id = order_id.clone();
                self.amount_cents = *amount_cents;
            }
            PaymentEvent::Captured => self.status = PaymentStatus::Captured,
            PaymentEvent::Refunded { .. } => self.status = PaymentStatus::Refunded,
        }
    }
}

// ----------------------------------------------------- schema evolution --

/// How old `OrderPlaced` payloads become v3, applied on every read; the
/// stored events are never rewritten.
///
/// - v1 `OrderCreated { customer, total }` (float euros) →
///   v2 `OrderPlaced { customer, total_cents }` (a rename and a unit change)
/// - v2 → v3 adds `currency`, which was always euros before v3.
pub fn upcasters() -> Upcasters {
    Upcasters::new()
        .upcast_renamed("OrderCreated", 1, "OrderPlaced", |v1| {
            let customer = v1.get("customer").cloned().ok_or("v1 OrderCreated without customer")?;
            let euros =
                v1.get("total").and_then(Value::as_f64).ok_or("v1 OrderCreated without a numeric total")?;
            if !(0.0..=1e13).contains(&euros) {
                return Err(format!("v1 total {euros} is out of range"));
            }
            // Round, not truncate: 19.99 is stored as 19.989999… in binary.
            let cents = (euros * 100.0).round() as u64;
            Ok(json!({ "customer": customer, "total_cents": cents }))
        })
        .upcast("OrderPlaced", 2, |mut v2| {
            let obj = v2.as_object_mut().ok_or("v2 OrderPlaced is not an object")?;
            obj.entry("currency").or_insert_with(|| json!("EUR"));
            Ok(v2)
        })
}

/// The JSON Schemas of the order events the current code writes.
pub fn schemas() -> SchemaRegistry {
    let registry = SchemaRegistry::new();
    let placed = json!({
        "type": "object",
        "required": ["customer", "total_cents", "currency"],
        "properties": {
            "customer": { "type": "string", "minLength": 1 },
            "total_cents": { "type": "integer", "minimum": 1 },
            "currency": { "type": "string", "pattern": "^[A-Z]{3}$" }
        }
    });
    let shipped = json!({
        "type": "object",
        "required": ["tracking"],
        "properties": { "tracking": { "type": "string", "minLength": 1 } }
    });
    // Both schemas are literals known to compile; a failure here is a bug
    // in this file, caught by the tests.
    registry.register("OrderPlaced", 3, placed).expect("OrderPlaced v3 schema compiles");
    registry.register("OrderShipped", 1, shipped).expect("OrderShipped v1 schema compiles");
    registry
}

/// Events as an older release of the service wrote them for one order:
/// (type, schema version, payload).
pub fn legacy_history() -> Vec<(&'static str, u32, Value)> {
    vec![
        ("OrderCreated", 1, json!({ "customer": "grace", "total": 19.99 })),
        ("OrderPaid", 1, json!({ "payment_id": "pay-legacy" })),
    ]
}

/// A v2 placement, written by the release in between.
pub fn v2_placed() -> (&'static str, u32, Value) {
    ("OrderPlaced", 2, json!({ "customer": "alan", "total_cents": 4200 }))
}

/// Turns a legacy (type, version, payload) into an event to append raw.
pub fn legacy_event(event_type: &str, version: u32, payload: &Value) -> annals_core::EventData {
    let meta = annals_core::Metadata::new().with(annals_core::metadata::keys::SCHEMA_VERSION, version);
    annals_core::EventData::json(event_type, payload).expect("a JSON value serializes").with_metadata(meta)
}
