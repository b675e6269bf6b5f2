//! How acknowledged rows are retired (mark or delete) and what a parked row does to the
//! later rows of its aggregate (hold or skip).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Set `sent_at`, partition and offset on acknowledged rows.
    Mark,
    /// Delete acknowledged rows.
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ParkPolicy {
    /// Later rows of a parked row's aggregate wait until it is replayed or discarded.
    Hold,
    /// Later rows of a parked row's aggregate are published anyway.
    Skip,
}
