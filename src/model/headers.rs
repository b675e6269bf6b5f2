//! The headers of a record: the names the relay writes itself, and the bounds on the headers
//! a row brings (its `headers` object, its header columns).

/// Header names the relay writes itself; a row's own headers may not reuse them.
pub const HEADER_EVENT_ID: &str = "id";
pub const HEADER_EVENT_TYPE: &str = "event_type";
pub const HEADER_AGGREGATE_TYPE: &str = "aggregate_type";
pub const RESERVED_HEADERS: [&str; 3] = [HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_AGGREGATE_TYPE];

/// A row's own headers: at most this many, names of at most this many bytes, and names
/// and values together of at most this many bytes. Beyond, the row is parked.
pub const MAX_ROW_HEADERS: usize = 64;
pub const MAX_HEADER_NAME_BYTES: usize = 256;
pub const MAX_ROW_HEADER_BYTES: usize = 64 * 1024;
