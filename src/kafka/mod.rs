//! Kafka: the idempotent producer and its delivery reports, what each Kafka error means
//! to the relay, and the record size limit each topic has. Nothing here touches the
//! database.

pub(crate) mod classify;
pub(crate) mod producer;
pub(crate) mod reachability;
pub(crate) mod topics;
