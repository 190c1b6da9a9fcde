//! The JSON shapes of the consumer-group endpoints, typed so that
//! `/openapi.json` describes exactly what the handlers send.

use annals::consumers::{Delivery, GroupStats, ParkedMessage};
use annals_core::Uuid;
use serde::Serialize;
use utoipa::ToSchema;

use super::{GroupFilter, GroupSpec};
use crate::{error::ErrorBody, wire::EventOut};

/// A running group's settings, defaults filled in.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupOut {
    /// The group's name.
    pub group: String,
    /// The stream it consumes, or `$all`.
    pub stream: String,
    /// `$all` only: which events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<GroupFilter>,
    /// `start` or `end`: where it started without a checkpoint.
    pub start_from: &'static str,
    /// Redeliveries after the first failure before a message is parked.
    pub max_retries: u32,
    /// An unacked delivery is taken back after this long.
    pub ack_timeout_ms: u64,
}

impl GroupOut {
    pub(super) fn new(group: &str, spec: &GroupSpec) -> Self {
        GroupOut {
            group: group.to_owned(),
            stream: spec.stream.clone(),
            filter: spec.filter.clone(),
            start_from: spec.start_from,
            max_retries: spec.max_retries,
            ack_timeout_ms: spec.ack_timeout_ms,
        }
    }
}

/// The body of `GET /groups`.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupListOut {
    /// The running groups the caller may see.
    pub groups: Vec<GroupOut>,
}

/// One consumer of a group, in [`GroupCountsOut`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerOut {
    /// The consumer's id.
    pub id: String,
    /// Deliveries it has not settled.
    pub in_flight: usize,
    /// Most unsettled deliveries it accepts.
    pub max_in_flight: usize,
}

/// A group's live figures, in [`GroupStatsOut`].
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupCountsOut {
    /// Connected consumers.
    pub consumers: Vec<ConsumerOut>,
    /// Deliveries not settled yet, over all consumers.
    pub in_flight: usize,
    /// Events read but not delivered yet.
    pub waiting: usize,
    /// Messages in the dead-letter stream now.
    pub parked: usize,
    /// The saved checkpoint (position of the last settled event), if any.
    pub last_checkpoint: Option<u64>,
    /// Events committed after the checkpoint.
    pub lag: u64,
    /// Deliveries made since the group started here.
    pub delivered: u64,
    /// Deliveries acked.
    pub acked: u64,
    /// Deliveries retried.
    pub retried: u64,
    /// Deliveries taken back after `ack_timeout_ms`.
    pub timed_out: u64,
    /// Why the group's subscription last failed, until it reads an event
    /// again (e.g. its stream was tombstoned); `null` while nothing failed.
    /// It keeps resubscribing, at most every 30 s.
    pub subscription_error: Option<String>,
}

/// The body of `GET /groups/{group}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupStatsOut {
    /// The group's name.
    pub group: String,
    /// Its settings.
    pub settings: GroupOut,
    /// Its live figures.
    pub stats: GroupCountsOut,
}

impl GroupStatsOut {
    pub(super) fn new(group: String, spec: &GroupSpec, s: &GroupStats) -> Self {
        let consumers = s
            .consumers
            .iter()
            .map(|c| ConsumerOut { id: c.id.clone(), in_flight: c.in_flight, max_in_flight: c.max_in_flight })
            .collect();
        GroupStatsOut {
            settings: GroupOut::new(&group, spec),
            group,
            stats: GroupCountsOut {
                consumers,
                in_flight: s.in_flight,
                waiting: s.waiting,
                parked: s.parked,
                last_checkpoint: s.last_checkpoint,
                lag: s.lag,
                delivered: s.delivered,
                acked: s.acked,
                retried: s.retried,
                timed_out: s.timed_out,
                subscription_error: s.subscription_error.clone(),
            },
        }
    }
}

/// A parked (dead-lettered) message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedOut {
    /// The original event's id.
    pub event_id: Uuid,
    /// Its stream.
    pub stream: String,
    /// Its version in that stream.
    pub version: u64,
    /// Its global position (identifies the parked message).
    pub position: u64,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The last failure reason.
    pub reason: String,
    /// How many times it was delivered and failed.
    pub attempts: u32,
    /// When it was parked, microseconds since the Unix epoch.
    pub parked_at: i64,
}

impl From<&ParkedMessage> for ParkedOut {
    fn from(p: &ParkedMessage) -> Self {
        ParkedOut {
            event_id: p.event_id,
            stream: p.stream.as_str().to_owned(),
            version: p.version,
            position: p.position,
            event_type: p.event_type.clone(),
            reason: p.reason.clone(),
            attempts: p.attempts,
            parked_at: p.parked_at.as_micros(),
        }
    }
}

/// The body of `GET /groups/{group}/parked`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedListOut {
    /// The group's name.
    pub group: String,
    /// The messages parked now.
    pub parked: Vec<ParkedOut>,
}

/// The body of `POST /groups/{group}/parked/replay`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayOut {
    /// The group's name.
    pub group: String,
    /// How many parked messages were queued for delivery again.
    pub queued: usize,
}

/// One delivery to a consumer (pull response, or a WebSocket message).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryOut {
    /// Always `delivery`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Settle it with this id.
    pub delivery_id: u64,
    /// 1 for the first delivery, then counting retries and timeouts.
    pub attempt: u32,
    /// Whether this is a replay of a parked message.
    pub replay: bool,
    /// The event.
    pub event: EventOut,
}

impl From<&Delivery> for DeliveryOut {
    fn from(d: &Delivery) -> Self {
        DeliveryOut {
            kind: "delivery",
            delivery_id: d.id,
            attempt: d.attempt,
            replay: d.replay,
            event: EventOut::from(&d.event),
        }
    }
}

/// The body of `POST /groups/{group}/next`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PullOut {
    /// The group's name.
    pub group: String,
    /// The consumer that pulled.
    pub consumer: String,
    /// Up to `max` deliveries (empty when none arrived within `wait_ms`).
    pub deliveries: Vec<DeliveryOut>,
}

/// A delivery that could not be settled, in [`SettleOut`].
#[derive(Debug, Serialize, ToSchema)]
pub struct SettleErrorOut {
    /// The delivery.
    pub delivery_id: u64,
    /// Why it was not settled (e.g. `unknown_delivery`).
    pub error: ErrorBody,
}

/// The body of `POST /groups/{group}/ack` and `/nack`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettleOut {
    /// Deliveries settled.
    pub settled: Vec<u64>,
    /// Deliveries that were not, with the reason.
    pub errors: Vec<SettleErrorOut>,
}
