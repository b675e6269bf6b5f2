//! Proof of delivery: a sent row's record read back from Kafka at the partition and offset
//! its ack recorded and compared with the row (its `id` header, key, and the digest of its
//! value), for `where --verify`, `verify` and the daemon's auditor. Nothing here writes.

use std::sync::Arc;

use crate::config::Settings;
use crate::encode::Encoder;
use crate::model::TopicTemplate;
use crate::store::SentRow;

pub(crate) mod audit;
mod reader;

pub(crate) use reader::{Expected, RecordReader};

/// The encoder the relay runs with under `settings`: a sent row's topic is the one it was
/// sent to, as long as the topic template has not changed since.
pub(crate) fn encoder(settings: &Settings) -> anyhow::Result<Encoder> {
    let template = TopicTemplate::parse(&settings.relay.topic_template)?;
    let policy = settings.topic_policy()?;
    Ok(
        Encoder::new(template, policy, settings.relay.max_message_bytes)
            .with_column_headers(settings.outbox.header_columns.keys().cloned().collect()),
    )
}

/// The reader the relay's settings describe: the producer's connection settings, each
/// broker call waiting at most 10 s, a fetch queue sized to `relay.max_message_bytes`.
pub(crate) fn reader(settings: &Settings) -> rdkafka::error::KafkaResult<RecordReader> {
    RecordReader::new(
        &settings.producer_properties(),
        std::time::Duration::from_secs(10),
        settings.relay.max_message_bytes,
    )
}

/// What a sent row's record must be, or why that cannot be said.
pub(crate) fn expected(encoder: &mut Encoder, sent: &SentRow) -> Result<Expected, String> {
    let (Some(partition), Some(offset)) = (sent.partition, sent.offset) else {
        return Err("its mark recorded no partition and offset".into());
    };
    let topic = encoder
        .topic(&sent.row)
        .map_err(|reason| format!("its topic no longer renders: {reason}"))?;
    Ok(Expected {
        topic,
        partition,
        offset,
        event_id: sent.row.event_id.hyphenated().to_string(),
        key: sent.row.aggregate_id.as_bytes().to_vec(),
        value: sent.value,
    })
}

/// One row's outcome, for a report.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Outcome {
    pub row_id: i64,
    pub event_id: uuid::Uuid,
    pub topic: Option<Arc<str>>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// found, changed, different, missing, expired, unreadable or unverifiable.
    pub result: &'static str,
    pub detail: String,
}

/// Checks `rows` against their records: one outcome per row, in their order.
pub(crate) fn check(
    reader: &RecordReader,
    encoder: &mut Encoder,
    rows: &[SentRow],
) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(rows.len());
    let mut expected = Vec::new();
    let mut checked = Vec::new();
    for (i, sent) in rows.iter().enumerate() {
        outcomes.push(Outcome {
            row_id: sent.row.id,
            event_id: sent.row.event_id,
            topic: None,
            partition: sent.partition,
            offset: sent.offset,
            result: "unverifiable",
            detail: String::new(),
        });
        match self::expected(encoder, sent) {
            Ok(e) => {
                outcomes[i].topic = Some(e.topic.clone());
                expected.push(e);
                checked.push(i);
            }
            Err(why) => outcomes[i].detail = why,
        }
    }
    for (i, finding) in checked.into_iter().zip(reader.check(&expected)) {
        outcomes[i].result = finding.kind();
        outcomes[i].detail = finding.detail().to_string();
    }
    outcomes
}

/// Outcomes counted by result.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Tally {
    pub checked: u64,
    pub found: u64,
    /// The record is the row's event, but the row's value changed after it was sent.
    pub changed: u64,
    pub missing: u64,
    pub different: u64,
    pub expired: u64,
    /// Rows that could not be checked: no recorded position, no longer encodable, or a
    /// partition that could not be read.
    pub unverifiable: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, outcome: &Outcome) {
        self.checked += 1;
        match outcome.result {
            "found" => self.found += 1,
            "changed" => self.changed += 1,
            "missing" => self.missing += 1,
            "different" => self.different += 1,
            "expired" => self.expired += 1,
            _ => self.unverifiable += 1,
        }
    }

    /// Whether anything is not where the outbox says, or could not be checked.
    pub(crate) fn failed(&self) -> bool {
        self.missing + self.different + self.unverifiable > 0
    }
}
