//! The vocabulary every layer shares: the outbox row, the modes, why a row is parked, topic
//! names and retry delays. It imports nothing else from the crate, so every other module
//! may import it.

mod backoff;
pub mod headers;
mod mode;
mod park;
mod row;
mod topic;

pub use backoff::Backoff;
pub use mode::{Mode, ParkPolicy};
pub(crate) use park::QUOTED_BYTES;
pub use park::{MAX_REASON_BYTES, PARK_REASONS, ParkReason, printable};
pub use row::OutboxRow;
pub(crate) use topic::{MAX_TOPIC_LEN, validate_topic};
pub use topic::{TemplateError, TopicPolicy, TopicTemplate, is_topic_glob};
