//! Why a row can never be published as it stands, with bounded labels, and how row text is
//! quoted where people read it: escaped and bounded, so a row can neither forge a log line
//! nor drive a terminal.

use std::fmt;

/// How much of a row's text a park reason quotes.
pub(crate) const QUOTED_BYTES: usize = 200;
/// The longest park reason stored in `park_error` and logged.
pub const MAX_REASON_BYTES: usize = 1024;

/// Every label [`ParkReason::kind`] can return.
pub const PARK_REASONS: &[&str] = &[
    "too_large",
    "invalid_topic",
    "bad_headers",
    "rejected_by_broker",
    "undecodable",
    "topic_not_allowed",
];

/// Why a row can never be published as it stands. The label values are bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParkReason {
    /// `limit_name` says whose limit: the relay's or the topic's.
    TooLarge {
        bytes: usize,
        limit: usize,
        limit_name: &'static str,
    },
    InvalidTopic(String),
    BadHeaders(String),
    Rejected(String),
    /// The named column's text is not UTF-8.
    Undecodable(&'static str),
    /// The topic is outside `relay.allowed_topics`, or a row's own with
    /// `relay.row_topics = false`.
    TopicNotAllowed(String),
}

impl ParkReason {
    /// Bounded label for metrics and the `park_reason` column.
    pub fn kind(&self) -> &'static str {
        match self {
            ParkReason::TooLarge { .. } => "too_large",
            ParkReason::InvalidTopic(_) => "invalid_topic",
            ParkReason::BadHeaders(_) => "bad_headers",
            ParkReason::Rejected(_) => "rejected_by_broker",
            ParkReason::Undecodable(_) => "undecodable",
            ParkReason::TopicNotAllowed(_) => "topic_not_allowed",
        }
    }
}

impl fmt::Display for ParkReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParkReason::TooLarge {
                bytes,
                limit,
                limit_name,
            } => write!(
                f,
                "record of {bytes} bytes (uncompressed) exceeds {limit_name} = {limit}"
            ),
            ParkReason::InvalidTopic(why) => {
                write!(f, "invalid topic: {}", printable(why, MAX_REASON_BYTES))
            }
            ParkReason::BadHeaders(why) => {
                write!(f, "bad headers: {}", printable(why, MAX_REASON_BYTES))
            }
            ParkReason::Rejected(why) => write!(
                f,
                "rejected by the broker: {}",
                printable(why, MAX_REASON_BYTES)
            ),
            ParkReason::TopicNotAllowed(why) => {
                write!(f, "topic not allowed: {}", printable(why, MAX_REASON_BYTES))
            }
            ParkReason::Undecodable(column) => write!(
                f,
                "column {column} is not valid UTF-8 (a SQL_ASCII database stores any bytes); fix the row's text and replay it"
            ),
        }
    }
}

/// Text from a row, or quoting one, as the relay writes it where people read it
/// (`park_error`, logs, `parked list`): control and bidirectional-formatting characters
/// escaped (`\n`, `\u{1b}`), so it can neither forge a log line nor drive a terminal, and
/// at most about `max` bytes, cut at a character boundary with the length left out said.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 16);
    for (at, c) in text.char_indices() {
        if out.len() >= max {
            out.push_str(&format!("… ({} more bytes)", text.len() - at));
            break;
        }
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters that reorder how a terminal shows the text around them (Trojan Source).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}
