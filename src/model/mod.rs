//! The vocabulary every layer shares: the outbox row, the modes, why a row is parked, topic
//! names and retry delays. It imports nothing else from the crate, so every other module
//! may import it.

mod backoff;
mod mode;
mod park;
mod row;
mod topic;

pub use backoff::Backoff;
pub use mode::{Mode, ParkPolicy};
pub use park::{MAX_REASON_BYTES, PARK_REASONS, ParkReason, QUOTED_BYTES, printable};
pub use row::OutboxRow;
pub use topic::{
    MAX_TOPIC_LEN, TemplateError, TopicPolicy, TopicTemplate, is_topic_glob, validate_topic,
};
