//! Row → Kafka record: topic, key, value and headers. Encoding is pure and total: a row
//! either becomes a record or a [`ParkReason`] saying why it never can, decided before
//! anything is produced.

use std::sync::Arc;

use crate::model::headers::{
    HEADER_AGGREGATE_TYPE, HEADER_EVENT_ID, HEADER_EVENT_TYPE, MAX_HEADER_NAME_BYTES,
    MAX_ROW_HEADER_BYTES, MAX_ROW_HEADERS, RESERVED_HEADERS,
};
use crate::model::{
    MAX_TOPIC_LEN, OutboxRow, ParkReason, QUOTED_BYTES, TopicPolicy, TopicTemplate, printable,
    validate_topic,
};

/// Rough per-record framing overhead (lengths, varints, attributes) in the record batch.
const RECORD_OVERHEAD_BYTES: usize = 64;

/// Everything needed to produce one row, borrowed from the row: encoding copies nothing
/// but the event id's text and the row's own headers.
#[derive(Debug, Clone)]
pub(crate) struct EncodedRecord<'a> {
    pub topic: Arc<str>,
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
    event_id: [u8; uuid::fmt::Hyphenated::LENGTH],
    event_type: &'a str,
    aggregate_type: &'a str,
    /// The row's `headers` object and its header columns, after the relay's own.
    extra_headers: Vec<(String, String)>,
    /// The record's uncompressed size as the broker counts it, framing included.
    pub bytes: usize,
}

impl EncodedRecord<'_> {
    /// The record with one more header after the others (counted in its size).
    pub(crate) fn with_header(mut self, name: &str, value: String) -> Self {
        self.bytes += name.len() + value.len() + 8;
        self.extra_headers.push((name.to_string(), value));
        self
    }

    /// Header names and values in the order they are written: the relay's three, then the
    /// row's own.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        // The buffer holds a hyphenated UUID: ASCII only.
        let event_id = std::str::from_utf8(&self.event_id).unwrap_or_default();
        [
            (HEADER_EVENT_ID, event_id),
            (HEADER_EVENT_TYPE, self.event_type),
            (HEADER_AGGREGATE_TYPE, self.aggregate_type),
        ]
        .into_iter()
        .chain(
            self.extra_headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }
}

/// Encodes rows for one relay; caches rendered topics per aggregate type and event type.
pub(crate) struct Encoder {
    template: TopicTemplate,
    policy: TopicPolicy,
    max_message_bytes: usize,
    topic_cache: foldhash::HashMap<String, foldhash::HashMap<String, Result<Arc<str>, ParkReason>>>,
    cached_topics: usize,
    /// Header names of `outbox.header_columns`, in the order of [`OutboxRow::column_headers`].
    column_headers: Vec<String>,
}

impl Encoder {
    pub(crate) fn new(
        template: TopicTemplate,
        policy: TopicPolicy,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            template,
            policy,
            max_message_bytes,
            topic_cache: foldhash::HashMap::default(),
            cached_topics: 0,
            column_headers: Vec::new(),
        }
    }

    /// Sends the values of [`OutboxRow::column_headers`] as headers of these names.
    pub(crate) fn with_column_headers(mut self, names: Vec<String>) -> Self {
        self.column_headers = names;
        self
    }

    /// The row's topic: its own `topic` column, or the template's.
    pub(crate) fn topic(&mut self, row: &OutboxRow) -> Result<Arc<str>, ParkReason> {
        self.topic_of(&row.aggregate_type, &row.event_type, row.topic.as_deref())
    }

    /// The topic of a row with these columns: `own` (its `topic` column), or the template's.
    pub(crate) fn topic_of(
        &mut self,
        aggregate_type: &str,
        event_type: &str,
        own: Option<&str>,
    ) -> Result<Arc<str>, ParkReason> {
        match own {
            Some(topic) => {
                validate_topic(topic)?;
                self.policy.check(topic, true)?;
                Ok(Arc::from(topic))
            }
            None => self.template_topic(aggregate_type, event_type),
        }
    }

    pub(crate) fn encode<'a>(
        &mut self,
        row: &'a OutboxRow,
    ) -> Result<EncodedRecord<'a>, ParkReason> {
        if let Some(column) = row.undecodable {
            return Err(ParkReason::Undecodable(column));
        }
        if let Some(bytes) = row.withheld_bytes {
            // Measured in SQL and never fetched.
            return Err(ParkReason::TooLarge {
                bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
                limit: self.max_message_bytes,
                limit_name: "relay.max_message_bytes",
            });
        }
        let topic = self.topic(row)?;
        let value = match (&row.payload_json, &row.payload_bytes) {
            (Some(json), _) => Some(json.as_bytes()),
            (None, Some(bytes)) => Some(bytes.as_slice()),
            (None, None) => None,
        };
        let mut event_id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        row.event_id.hyphenated().encode_lower(&mut event_id);
        let mut extra_headers = Vec::new();
        if let Some(raw) = &row.headers_json {
            append_row_headers(raw, &mut extra_headers)?;
        }
        for (name, value) in self.column_headers.iter().zip(&row.column_headers) {
            if let Some(value) = value {
                extra_headers.push((name.clone(), value.clone()));
            }
        }
        let mut record = EncodedRecord {
            topic,
            key: &row.aggregate_id,
            value,
            event_id,
            event_type: &row.event_type,
            aggregate_type: &row.aggregate_type,
            extra_headers,
            bytes: 0,
        };
        record.bytes = RECORD_OVERHEAD_BYTES
            + row.aggregate_id.len()
            + value.map_or(0, <[u8]>::len)
            + record
                .headers()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>();
        if record.bytes > self.max_message_bytes {
            return Err(ParkReason::TooLarge {
                bytes: record.bytes,
                limit: self.max_message_bytes,
                limit_name: "relay.max_message_bytes",
            });
        }
        Ok(record)
    }

    fn template_topic(
        &mut self,
        aggregate_type: &str,
        event_type: &str,
    ) -> Result<Arc<str>, ParkReason> {
        // Keyed by what the template uses only, and never by text longer than a topic
        // may be: rows choose these values, and the cache must not hold their bulk.
        let event_type = if self.template.uses_event_type() {
            event_type
        } else {
            ""
        };
        if aggregate_type.len() + event_type.len() > MAX_TOPIC_LEN {
            let topic = self.template.render(aggregate_type, event_type);
            return validate_topic(&topic)
                .and_then(|()| self.policy.check(&topic, false))
                .map(|()| Arc::from(topic));
        }
        if let Some(hit) = self
            .topic_cache
            .get(aggregate_type)
            .and_then(|by_event| by_event.get(event_type))
        {
            return hit.clone();
        }
        let topic = self.template.render(aggregate_type, event_type);
        let result = validate_topic(&topic)
            .and_then(|()| self.policy.check(&topic, false))
            .map(|()| Arc::from(topic));
        if self.cached_topics >= 10_000 {
            self.topic_cache.clear();
            self.cached_topics = 0;
        }
        self.cached_topics += 1;
        self.topic_cache
            .entry(aggregate_type.to_string())
            .or_default()
            .insert(event_type.to_string(), result.clone());
        result
    }
}

fn append_row_headers(raw: &str, headers: &mut Vec<(String, String)>) -> Result<(), ParkReason> {
    let value: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| ParkReason::BadHeaders(format!("not JSON: {e}")))?;
    let object = match value {
        serde_json::Value::Null => return Ok(()),
        serde_json::Value::Object(object) => object,
        other => {
            return Err(ParkReason::BadHeaders(format!(
                "expected a JSON object of strings, found {}",
                json_kind(&other)
            )));
        }
    };
    if object.len() > MAX_ROW_HEADERS {
        return Err(ParkReason::BadHeaders(format!(
            "{} headers, at most {MAX_ROW_HEADERS} allowed",
            object.len()
        )));
    }
    let mut total = 0;
    for (name, value) in object {
        let quoted = printable(&name, QUOTED_BYTES);
        // Consumers often treat header names case-insensitively (HTTP bridges, Connect
        // converters): `ID` must not pass for the relay's `id`.
        if RESERVED_HEADERS
            .iter()
            .any(|reserved| reserved.eq_ignore_ascii_case(&name))
        {
            return Err(ParkReason::BadHeaders(format!(
                "header `{quoted}` is reserved for the relay (in any letter case)"
            )));
        }
        if name.is_empty()
            || name.len() > MAX_HEADER_NAME_BYTES
            || name.chars().any(char::is_control)
        {
            return Err(ParkReason::BadHeaders(format!(
                "header name `{quoted}` must be 1 to {MAX_HEADER_NAME_BYTES} bytes without control characters"
            )));
        }
        match value {
            serde_json::Value::String(text) => {
                total += name.len() + text.len();
                headers.push((name, text));
            }
            other => {
                return Err(ParkReason::BadHeaders(format!(
                    "header `{quoted}` is {}, expected a string",
                    json_kind(&other)
                )));
            }
        }
    }
    if total > MAX_ROW_HEADER_BYTES {
        return Err(ParkReason::BadHeaders(format!(
            "{total} bytes of headers, at most {MAX_ROW_HEADER_BYTES} allowed"
        )));
    }
    Ok(())
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> OutboxRow {
        OutboxRow {
            id: 7,
            aggregate_type: "order".into(),
            aggregate_id: "o-1".into(),
            event_type: "OrderPlaced".into(),
            payload_json: Some(r#"{"total": 5}"#.into()),
            payload_bytes: None,
            headers_json: Some(r#"{"traceparent": "00-abc-def-01"}"#.into()),
            topic: None,
            event_id: uuid::Uuid::nil(),
            created_at: chrono::Utc::now(),
            shard: 0,
            withheld_bytes: None,
            undecodable: None,
            aggregate_hash: 0,
            column_headers: Vec::new(),
        }
    }

    fn encoder() -> Encoder {
        let template = TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap();
        let policy = TopicPolicy::new(vec![template.glob()], true);
        Encoder::new(template, policy, 1_000_000)
    }

    #[test]
    fn topics_outside_the_allowed_globs_are_not_allowed() {
        let template = TopicTemplate::parse("outbox.{aggregate_type}.{event_type}").unwrap();
        assert_eq!(template.glob(), "outbox.*.*");
        let policy = TopicPolicy::new(vec![template.glob(), "audit-??".into()], true);
        for allowed in ["outbox.order.placed", "outbox.a.b.c", "audit-01"] {
            assert_eq!(policy.check(allowed, true), Ok(()), "{allowed}");
        }
        for refused in [
            "payments.events",
            "outbox.order",
            "audit-1",
            "__consumer_offsets",
        ] {
            assert!(policy.check(refused, true).is_err(), "{refused}");
        }
        let everything = TopicPolicy::new(vec!["*".into()], true);
        assert_eq!(everything.check("anything.at-all", true), Ok(()));
        for internal in ["__consumer_offsets", "__transaction_state", "_schemas"] {
            let why = everything.check(internal, false).unwrap_err().to_string();
            assert!(why.contains("beginning with `_`"), "{why}");
        }
        let internal = TopicPolicy::new(vec!["_audit.*".into()], true);
        assert_eq!(internal.check("_audit.x", true), Ok(()));

        let template_only = TopicPolicy::new(vec!["*".into()], false);
        assert_eq!(template_only.check("outbox.order", false), Ok(()));
        assert_eq!(
            template_only
                .check("outbox.order", true)
                .unwrap_err()
                .kind(),
            "topic_not_allowed"
        );

        let mut r = row();
        r.topic = Some("__consumer_offsets".into());
        assert_eq!(
            encoder().encode(&r).unwrap_err().kind(),
            "topic_not_allowed"
        );
        r.topic = Some("billing.invoices".into());
        assert_eq!(
            encoder().encode(&r).unwrap_err().kind(),
            "topic_not_allowed"
        );
        r.topic = Some("outbox.event.custom".into());
        assert!(encoder().encode(&r).is_ok());
    }

    #[test]
    fn encodes_topic_key_value_and_headers() {
        let row = row();
        let rec = encoder().encode(&row).unwrap();
        assert_eq!(&*rec.topic, "outbox.event.order");
        assert_eq!(rec.key, "o-1");
        assert_eq!(rec.value, Some(br#"{"total": 5}"#.as_slice()));
        let nil = uuid::Uuid::nil().to_string();
        assert_eq!(
            rec.headers().collect::<Vec<_>>(),
            vec![
                ("id", nil.as_str()),
                ("event_type", "OrderPlaced"),
                ("aggregate_type", "order"),
                ("traceparent", "00-abc-def-01"),
            ]
        );
    }

    #[test]
    fn row_topic_overrides_the_template() {
        let mut r = row();
        r.topic = Some("outbox.event.custom".into());
        assert_eq!(&*encoder().encode(&r).unwrap().topic, "outbox.event.custom");
    }

    #[test]
    fn unpublishable_rows_get_a_reason() {
        let mut r = row();
        r.topic = Some("bad topic!".into());
        assert_eq!(encoder().encode(&r).unwrap_err().kind(), "invalid_topic");

        let mut r = row();
        r.aggregate_type = "has space".into();
        assert_eq!(encoder().encode(&r).unwrap_err().kind(), "invalid_topic");

        let many: serde_json::Map<String, serde_json::Value> = (0..=MAX_ROW_HEADERS)
            .map(|i| (format!("h{i}"), "v".into()))
            .collect();
        let many = serde_json::Value::Object(many).to_string();
        let huge = format!(r#"{{"h": "{}"}}"#, "v".repeat(MAX_ROW_HEADER_BYTES));
        let long_name = format!(r#"{{"{}": "v"}}"#, "n".repeat(MAX_HEADER_NAME_BYTES + 1));
        for bad in [
            r#"{"n": 1}"#,
            "[1]",
            r#""x""#,
            r#"{"id": "mine"}"#,
            r#"{"ID": "mine"}"#,
            r#"{"Event_Type": "mine"}"#,
            r#"{"a\nb": "v"}"#,
            r#"{"": "v"}"#,
            &many,
            &huge,
            &long_name,
        ] {
            let mut r = row();
            r.headers_json = Some(bad.into());
            assert_eq!(
                encoder().encode(&r).unwrap_err().kind(),
                "bad_headers",
                "{bad}"
            );
        }

        let mut r = row();
        r.payload_json = Some(format!("\"{}\"", "x".repeat(2_000_000)));
        assert_eq!(encoder().encode(&r).unwrap_err().kind(), "too_large");
    }

    /// Row text in a park reason can neither forge a log line nor drive a terminal, and
    /// is bounded whatever the row holds.
    #[test]
    fn park_reasons_quote_row_text_escaped_and_bounded() {
        let mut r = row();
        r.topic = Some("evil\n2026-12-07 INFO forged\u{1b}[2J\u{202e}".into());
        let reason = encoder().encode(&r).unwrap_err().to_string();
        assert!(!reason.chars().any(|c| c.is_control()), "{reason}");
        assert!(reason.contains(r"evil\n2026"), "{reason}");
        assert!(reason.contains(r"\u{1b}[2J\u{202e}"), "{reason}");
        let long = ParkReason::Rejected("y".repeat(10_000)).to_string();
        assert!(
            long.len() <= crate::model::MAX_REASON_BYTES + 64,
            "{} bytes",
            long.len()
        );

        assert_eq!(printable("plain", 10), "plain");
        assert_eq!(printable("tab\there", 100), r"tab\there");
        assert_eq!(printable("ééé", 2), "é… (4 more bytes)");
    }

    #[test]
    fn null_payload_is_a_tombstone_and_bytes_pass_as_is() {
        let mut r = row();
        r.payload_json = None;
        assert_eq!(encoder().encode(&r).unwrap().value, None);
        r.payload_bytes = Some(vec![0, 159, 146, 150]);
        assert_eq!(
            encoder().encode(&r).unwrap().value,
            Some([0, 159, 146, 150].as_slice())
        );
    }
}
