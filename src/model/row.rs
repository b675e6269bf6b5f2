//! A pending outbox row as the relay reads it: what every layer passes around, owned by
//! none of them.

use chrono::{DateTime, Utc};

/// A pending outbox row, as read for publishing.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// `payload` (jsonb) as JSON text.
    pub payload_json: Option<String>,
    pub payload_bytes: Option<Vec<u8>>,
    /// `headers` (jsonb) as JSON text.
    pub headers_json: Option<String>,
    pub topic: Option<String>,
    pub event_id: uuid::Uuid,
    pub created_at: DateTime<Utc>,
    /// Stable hash of `aggregate_id`, computed by the database.
    pub shard: i16,
    /// The size of a payload or headers larger than the read's per-row limit, which was
    /// therefore not fetched (`payload_json`, `payload_bytes` or `headers_json` is None
    /// for it): the row is parked from this length alone.
    pub withheld_bytes: Option<i64>,
    /// The first column whose text is not UTF-8 (possible in a SQL_ASCII database): the
    /// row is parked, its text fields hold a lossy copy.
    pub undecodable: Option<&'static str>,
    /// `hashtextextended(aggregate_id, 0)`: what a read is told to leave out, in eight
    /// bytes whatever the id's length.
    pub aggregate_hash: i64,
    /// The values of the columns `outbox.header_columns` sends as headers, in the order of
    /// their header names; `None` for NULL (no header) or a value over the read's limit.
    pub column_headers: Vec<Option<String>>,
}

impl OutboxRow {
    /// About what the row takes in memory and on the wire: its variable-length fields.
    pub fn approximate_bytes(&self) -> usize {
        self.aggregate_type.len()
            + self.aggregate_id.len()
            + self.event_type.len()
            + self.payload_json.as_ref().map_or(0, String::len)
            + self.payload_bytes.as_ref().map_or(0, Vec::len)
            + self.headers_json.as_ref().map_or(0, String::len)
            + self.topic.as_ref().map_or(0, String::len)
            + self
                .column_headers
                .iter()
                .map(|h| h.as_ref().map_or(0, String::len))
                .sum::<usize>()
    }
}
