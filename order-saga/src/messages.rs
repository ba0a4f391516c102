//! What the services say to each other: the saga's steps, the commands that start them and
//! the replies that end them, inside one envelope.
//!
//! Every message names its order, the step and the step's attempt. The orders service sends
//! one command at a time per order and applies a reply only when it answers the step and
//! attempt the saga is waiting for, so a duplicate or a late reply changes nothing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A step of the saga: the five that move an order forward and the three that undo them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Inventory holds the order's items.
    ReserveStock,
    /// The provider authorizes the total.
    AuthorizePayment,
    /// Shipping books the delivery.
    CreateShipment,
    /// The provider captures the authorized total.
    CapturePayment,
    /// Inventory turns the hold into a sale (refused once the hold expired).
    ConfirmStock,
    /// Undoes `CreateShipment`.
    CancelShipment,
    /// Undoes the payment: a void when authorized, a refund when captured.
    VoidPayment,
    /// Undoes the hold or the sale.
    ReleaseStock,
}

impl Step {
    /// The forward steps, in order.
    pub const FORWARD: [Step; 5] = [
        Step::ReserveStock,
        Step::AuthorizePayment,
        Step::CreateShipment,
        Step::CapturePayment,
        Step::ConfirmStock,
    ];

    /// The name used in the database, the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReserveStock => "reserve_stock",
            Self::AuthorizePayment => "authorize_payment",
            Self::CreateShipment => "create_shipment",
            Self::CapturePayment => "capture_payment",
            Self::ConfirmStock => "confirm_stock",
            Self::CancelShipment => "cancel_shipment",
            Self::VoidPayment => "void_payment",
            Self::ReleaseStock => "release_stock",
        }
    }

    /// The step named `name` by [`Step::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::FORWARD
            .into_iter()
            .chain([Self::CancelShipment, Self::VoidPayment, Self::ReleaseStock])
            .find(|step| step.as_str() == name)
    }

    /// The step that undoes this one; `None` for the undoing steps themselves.
    pub fn compensation(self) -> Option<Self> {
        match self {
            Self::ReserveStock | Self::ConfirmStock => Some(Self::ReleaseStock),
            Self::AuthorizePayment | Self::CapturePayment => Some(Self::VoidPayment),
            Self::CreateShipment => Some(Self::CancelShipment),
            Self::CancelShipment | Self::VoidPayment | Self::ReleaseStock => None,
        }
    }

    /// The service that carries the step out.
    pub fn service(self) -> Service {
        match self {
            Self::ReserveStock | Self::ConfirmStock | Self::ReleaseStock => Service::Inventory,
            Self::AuthorizePayment | Self::CapturePayment | Self::VoidPayment => Service::Payment,
            Self::CreateShipment | Self::CancelShipment => Service::Shipping,
        }
    }
}

/// A service of the saga; each has one stream of incoming messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Orders: receives replies.
    Orders,
    /// Inventory: receives stock commands.
    Inventory,
    /// Payment: receives payment commands.
    Payment,
    /// Shipping: receives shipment commands.
    Shipping,
}

impl Service {
    /// Every service.
    pub const ALL: [Service; 4] = [
        Service::Orders,
        Service::Inventory,
        Service::Payment,
        Service::Shipping,
    ];

    /// Its name: the PostgreSQL schema, the stream's suffix, the consumer group.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Inventory => "inventory",
            Self::Payment => "payment",
            Self::Shipping => "shipping",
        }
    }

    /// The stream this service consumes, under `prefix`.
    pub fn stream(self, prefix: &str) -> String {
        format!("{prefix}:{}", self.as_str())
    }
}

/// One line of an order, as inventory needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The product.
    pub product_id: Uuid,
    /// How many, at least 1.
    pub quantity: i32,
}

/// Where an order goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// The recipient.
    pub name: String,
    /// Street and number.
    pub line1: String,
    /// City.
    pub city: String,
    /// Postal code.
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 country code, upper case.
    pub country: String,
}

/// How a step ended, in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The step's effect is in place (or was already).
    Succeeded,
    /// The step was refused and had no effect; `reason` says why.
    Failed,
}

/// The body of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// Hold these lines for the order.
    ReserveStock {
        /// What to hold.
        lines: Vec<Line>,
    },
    /// Authorize `amount` (minor units) with `payment_method`.
    AuthorizePayment {
        /// The total, in minor units.
        amount: i64,
        /// ISO 4217 code.
        currency: String,
        /// The customer's payment method token.
        payment_method: String,
    },
    /// Book the delivery to `address`.
    CreateShipment {
        /// Where to.
        address: Address,
    },
    /// Capture the order's authorization.
    CapturePayment,
    /// Turn the order's hold into a sale.
    ConfirmStock,
    /// Cancel the order's shipment.
    CancelShipment,
    /// Void or refund the order's payment.
    VoidPayment,
    /// Give the order's stock back.
    ReleaseStock,
    /// A participant's answer to a command.
    Reply {
        /// The step answered.
        step: Step,
        /// How it ended.
        outcome: Outcome,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl Body {
    /// The step a command starts; `None` for a reply.
    pub fn step(&self) -> Option<Step> {
        Some(match self {
            Self::ReserveStock { .. } => Step::ReserveStock,
            Self::AuthorizePayment { .. } => Step::AuthorizePayment,
            Self::CreateShipment { .. } => Step::CreateShipment,
            Self::CapturePayment => Step::CapturePayment,
            Self::ConfirmStock => Step::ConfirmStock,
            Self::CancelShipment => Step::CancelShipment,
            Self::VoidPayment => Step::VoidPayment,
            Self::ReleaseStock => Step::ReleaseStock,
            Self::Reply { .. } => return None,
        })
    }
}

/// A message on a stream. Its `id` is the outbox row's and the inbox key: a message
/// published twice (a relay that crashed before deleting its row) is applied once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per message (UUIDv7).
    pub id: Uuid,
    /// The order (and saga) it concerns.
    pub order_id: Uuid,
    /// The saga's attempt of the step; a reply repeats its command's.
    pub attempt: u32,
    /// W3C trace context of the request that started the saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// When it was written.
    pub sent_at: DateTime<Utc>,
    /// What it says.
    #[serde(flatten)]
    pub body: Body,
}

impl Envelope {
    /// A new message about `order_id`.
    pub fn new(order_id: Uuid, attempt: u32, traceparent: Option<String>, body: Body) -> Self {
        Self {
            id: Uuid::now_v7(),
            order_id,
            attempt,
            traceparent,
            sent_at: Utc::now(),
            body,
        }
    }

    /// The reply to this command.
    pub fn reply(&self, step: Step, outcome: Outcome, reason: Option<String>) -> Self {
        Self::new(
            self.order_id,
            self.attempt,
            self.traceparent.clone(),
            Body::Reply {
                step,
                outcome,
                reason,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_reads_back_what_was_written() {
        let envelope = Envelope::new(
            Uuid::now_v7(),
            2,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            Body::ReserveStock {
                lines: vec![Line {
                    product_id: Uuid::now_v7(),
                    quantity: 3,
                }],
            },
        );
        let json = serde_json::to_string(&envelope).unwrap();
        assert!(json.contains(r#""kind":"reserve_stock""#), "{json}");
        assert_eq!(serde_json::from_str::<Envelope>(&json).unwrap(), envelope);
    }

    #[test]
    fn every_step_has_one_name_and_forward_steps_have_a_compensation() {
        for step in Step::FORWARD {
            assert_eq!(Step::parse(step.as_str()), Some(step));
            assert!(step.compensation().is_some());
        }
        assert_eq!(Step::parse("nope"), None);
    }
}
