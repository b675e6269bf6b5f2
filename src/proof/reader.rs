//! Records read back at the partition and offset their acks recorded, each judged against
//! what its row encodes to: found, different, missing, expired (below the partition's start)
//! or unreadable. A consumer assigned by hand: no group, no commits, nothing written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

use crate::encode::EncodedRecord;
use crate::model::headers::HEADER_EVENT_ID;

/// Offsets closer than this are read through rather than fetched again from the first.
const READ_THROUGH: i64 = 256;
/// How long a fetch from a new offset may stay empty before the reader suspects a broker
/// that does not serve a fetch from inside a record batch (tansu 0.6 does not) and reads
/// through from an offset it did serve instead.
const PROBE: Duration = Duration::from_secs(2);
/// Records read through in search of one offset before the reader gives up on it.
const READ_THROUGH_LIMIT: u64 = 1_000_000;

/// What a row's record must be.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub event_id: String,
    pub key: Vec<u8>,
    /// SHA-256 of the value and its length; `None` for a record without a value.
    pub value: Option<([u8; 32], usize)>,
}

impl Expected {
    /// What `record` must be found as at `partition` and `offset`.
    pub(crate) fn new(record: &EncodedRecord<'_>, partition: i32, offset: i64) -> Self {
        let event_id = record
            .headers()
            .find(|(name, _)| *name == HEADER_EVENT_ID)
            .map(|(_, value)| value.to_string())
            .unwrap_or_default();
        Self {
            topic: record.topic.clone(),
            partition,
            offset,
            event_id,
            key: record.key.as_bytes().to_vec(),
            value: record.value.map(digest),
        }
    }
}

fn digest(bytes: &[u8]) -> ([u8; 32], usize) {
    (Sha256::digest(bytes).into(), bytes.len())
}

/// What was found where a row's ack said its record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Finding {
    /// The record carries the row's event id, key and value.
    Found,
    /// Another record is there (what differs).
    Different(String),
    /// No record at that offset, or the partition or topic does not exist.
    Missing(String),
    /// The offset is below the partition's first: the topic's retention removed it.
    Expired(String),
    /// The broker could not be asked (a timeout, an authorization error).
    Unreadable(String),
}

impl Finding {
    /// The word a report uses: found, different, missing, expired, unreadable.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Finding::Found => "found",
            Finding::Different(_) => "different",
            Finding::Missing(_) => "missing",
            Finding::Expired(_) => "expired",
            Finding::Unreadable(_) => "unreadable",
        }
    }

    pub(crate) fn detail(&self) -> &str {
        match self {
            Finding::Found => "the record carries this row's event id, key and value",
            Finding::Different(d)
            | Finding::Missing(d)
            | Finding::Expired(d)
            | Finding::Unreadable(d) => d,
        }
    }
}

/// Reads records back by partition and offset. Blocking: run it off the async threads.
pub(crate) struct RecordReader {
    consumer: BaseConsumer,
    timeout: Duration,
}

impl RecordReader {
    /// A consumer with the connection settings of `properties` (the producer's, minus what
    /// only a producer takes); each broker call waits at most `timeout`.
    pub(crate) fn new(properties: &[(String, String)], timeout: Duration) -> KafkaResult<Self> {
        let mut config = ClientConfig::new();
        for (key, value) in crate::config::consumer_properties(properties) {
            config.set(key, value);
        }
        config
            .set("group.id", "outbox-relay-verify")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "error");
        Ok(Self {
            consumer: config.create()?,
            timeout,
        })
    }

    /// The finding for each of `expected`, in its order.
    pub(crate) fn check(&self, expected: &[Expected]) -> Vec<Finding> {
        let mut findings = vec![Finding::Found; expected.len()];
        let mut by_partition: BTreeMap<(&str, i32), Vec<usize>> = BTreeMap::new();
        for (i, e) in expected.iter().enumerate() {
            by_partition
                .entry((&e.topic, e.partition))
                .or_default()
                .push(i);
        }
        for ((topic, partition), mut indexes) in by_partition {
            indexes.sort_by_key(|&i| expected[i].offset);
            self.check_partition(topic, partition, expected, &indexes, &mut findings);
        }
        let _ = self.consumer.unassign();
        findings
    }

    fn check_partition(
        &self,
        topic: &str,
        partition: i32,
        expected: &[Expected],
        indexes: &[usize],
        findings: &mut [Finding],
    ) {
        let (low, high) = match self
            .consumer
            .fetch_watermarks(topic, partition, self.timeout)
        {
            Ok(marks) => marks,
            Err(error) => {
                let finding = unreachable_partition(topic, partition, &error);
                for &i in indexes {
                    findings[i] = finding.clone();
                }
                return;
            }
        };
        let mut to_read = Vec::new();
        for &i in indexes {
            let offset = expected[i].offset;
            if offset < low {
                findings[i] = expired(offset, low);
            } else if high <= low {
                findings[i] = Finding::Missing(format!(
                    "the partition is empty (its next offset is {high})"
                ));
            } else {
                to_read.push(i);
            }
        }
        let mut read = ReadThrough::new(high);
        let mut next = 0;
        while next < to_read.len() {
            let wanted = expected[to_read[next]].offset;
            let fresh_fetch = match read.position {
                None => true,
                Some(at) => !read.streaming && (wanted > at + READ_THROUGH || wanted < at),
            };
            if fresh_fetch {
                let from = if read.streaming {
                    read.anchor.unwrap_or(low)
                } else {
                    wanted
                };
                if let Err(error) = self.assign(topic, partition, from) {
                    for &i in &to_read[next..] {
                        findings[i] = Finding::Unreadable(format!(
                            "cannot read {topic}/{partition}: {error}"
                        ));
                    }
                    return;
                }
                read.fetched_from = Some(from);
                read.position = Some(from);
            }
            let wait = if fresh_fetch && !read.streaming {
                PROBE.min(self.timeout)
            } else {
                self.timeout
            };
            match self.next_record(topic, partition, wait) {
                Ok(Some((offset, found))) => {
                    read.saw(offset);
                    while next < to_read.len() && expected[to_read[next]].offset < offset {
                        findings[to_read[next]] = Finding::Missing(format!(
                            "no record at offset {}: the partition skips from it to {offset} (compacted or truncated)",
                            expected[to_read[next]].offset
                        ));
                        next += 1;
                    }
                    while next < to_read.len() && expected[to_read[next]].offset == offset {
                        findings[to_read[next]] = found.judge(&expected[to_read[next]]);
                        next += 1;
                    }
                    if read.streamed > READ_THROUGH_LIMIT {
                        for &i in &to_read[next..] {
                            findings[i] = Finding::Unreadable(format!(
                                "the broker served no fetch from offset {} and reading through {READ_THROUGH_LIMIT} records did not reach it",
                                expected[i].offset
                            ));
                        }
                        return;
                    }
                }
                Ok(None) if fresh_fetch && !read.streaming => {
                    // Nothing from `wanted`: past the end, or a broker that cannot start a
                    // fetch inside a record batch. Read through from an offset it served.
                    read.stream_from(read.anchor.filter(|&a| a <= wanted).unwrap_or(low));
                }
                Ok(None) => {
                    for &i in &to_read[next..] {
                        findings[i] =
                            read.after_the_last_record(expected[i].offset, topic, partition);
                    }
                    return;
                }
                Err(error)
                    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::OffsetOutOfRange) =>
                {
                    let marks = self
                        .consumer
                        .fetch_watermarks(topic, partition, self.timeout);
                    findings[to_read[next]] = match marks {
                        Ok((low, _)) if wanted < low => expired(wanted, low),
                        Ok((_, high)) => past_the_end(wanted, high),
                        Err(_) => Finding::Missing(format!(
                            "the broker has no offset {wanted} in {topic}/{partition}"
                        )),
                    };
                    next += 1;
                    read.position = None;
                }
                Err(error) => {
                    findings[to_read[next]] = Finding::Unreadable(format!(
                        "reading {topic}/{partition} at offset {wanted}: {error}"
                    ));
                    next += 1;
                    read.position = None;
                }
            }
        }
    }

    fn assign(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.consumer.assign(&assignment)
    }

    /// The next record of the assigned partition, `None` when none came in time.
    fn next_record(
        &self,
        topic: &str,
        partition: i32,
        wait: Duration,
    ) -> KafkaResult<Option<(i64, Record)>> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.consumer.poll(left) {
                None => return Ok(None),
                Some(Err(error)) => return Err(error),
                Some(Ok(message)) => {
                    if message.topic() != topic || message.partition() != partition {
                        continue;
                    }
                    let event_id = message.headers().and_then(|headers| {
                        headers.iter().find(|h| h.key == HEADER_EVENT_ID).map(|h| {
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()
                        })
                    });
                    let record = Record {
                        event_id,
                        key: message.key().map(<[u8]>::to_vec),
                        value: message.payload().map(digest),
                    };
                    return Ok(Some((message.offset(), record)));
                }
            }
        }
    }
}

/// Where the reading of one partition stands.
struct ReadThrough {
    high: i64,
    /// The offset the next record should have.
    position: Option<i64>,
    /// Where the current fetch started.
    fetched_from: Option<i64>,
    /// An offset a fetch was served from: the broker can start there again.
    anchor: Option<i64>,
    /// The highest offset read.
    last_seen: Option<i64>,
    /// Reading through from the anchor, never fetching from a new offset.
    streaming: bool,
    /// Records read since streaming began.
    streamed: u64,
}

impl ReadThrough {
    fn new(high: i64) -> Self {
        Self {
            high,
            position: None,
            fetched_from: None,
            anchor: None,
            last_seen: None,
            streaming: false,
            streamed: 0,
        }
    }

    fn saw(&mut self, offset: i64) {
        if let Some(from) = self.fetched_from.take() {
            self.anchor = Some(from);
        }
        self.position = Some(offset + 1);
        self.last_seen = Some(self.last_seen.map_or(offset, |l| l.max(offset)));
        if self.streaming {
            self.streamed += 1;
        }
    }

    fn stream_from(&mut self, from: i64) {
        self.streaming = true;
        self.anchor = Some(from);
        self.position = None;
    }

    /// What to say of `offset` once no more records came after the last one read.
    fn after_the_last_record(&self, offset: i64, topic: &str, partition: i32) -> Finding {
        // The end offset a broker reports is trusted unless records were read beyond it
        // (tansu 0.6 reports the last record batch's first offset, plus one).
        let end_is_credible = self.last_seen.is_none_or(|seen| seen < self.high);
        let past = match self.last_seen {
            Some(seen) => offset > seen,
            None => true,
        };
        if past && (offset >= self.high || !end_is_credible) {
            Finding::Missing(match self.last_seen {
                Some(seen) => format!(
                    "offset {offset} is past the partition's last record (at offset {seen})"
                ),
                None => format!(
                    "offset {offset} is past the partition's end ({})",
                    self.high
                ),
            })
        } else {
            Finding::Unreadable(format!(
                "no record came from {topic}/{partition} at offset {offset} within the timeout, though the broker says it has it"
            ))
        }
    }
}

fn expired(offset: i64, low: i64) -> Finding {
    Finding::Expired(format!(
        "offset {offset} is below the partition's first ({low}): removed by the topic's retention"
    ))
}

fn past_the_end(offset: i64, high: i64) -> Finding {
    Finding::Missing(format!(
        "offset {offset} is past the partition's end ({high}): the broker does not have it"
    ))
}

fn unreachable_partition(topic: &str, partition: i32, error: &KafkaError) -> Finding {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition)
        | Some(RDKafkaErrorCode::UnknownTopic)
        | Some(RDKafkaErrorCode::UnknownPartition) => Finding::Missing(format!(
            "the broker has no partition {partition} of topic {topic}"
        )),
        _ => Finding::Unreadable(format!(
            "cannot read the offsets of {topic}/{partition}: {error}"
        )),
    }
}

/// What was read at an offset.
struct Record {
    event_id: Option<String>,
    key: Option<Vec<u8>>,
    value: Option<([u8; 32], usize)>,
}

impl Record {
    fn judge(&self, expected: &Expected) -> Finding {
        let mut differences = Vec::new();
        if self.event_id.as_deref() != Some(expected.event_id.as_str()) {
            differences.push(match &self.event_id {
                Some(id) => format!(
                    "its id header is {} (expected {})",
                    crate::model::printable(id, 64),
                    expected.event_id
                ),
                None => format!("it has no id header (expected {})", expected.event_id),
            });
        }
        if self.key.as_deref() != Some(expected.key.as_slice()) {
            differences.push("its key is another".to_string());
        }
        if self.value != expected.value {
            let length = |v: &Option<([u8; 32], usize)>| match v {
                Some((_, n)) => format!("{n} bytes"),
                None => "none".to_string(),
            };
            differences.push(format!(
                "its value is another ({}, expected {})",
                length(&self.value),
                length(&expected.value)
            ));
        }
        if differences.is_empty() {
            Finding::Found
        } else {
            Finding::Different(differences.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Expected {
        Expected {
            topic: Arc::from("t"),
            partition: 0,
            offset: 7,
            event_id: "e1".into(),
            key: b"k".to_vec(),
            value: Some(digest(b"{}")),
        }
    }

    #[test]
    fn a_record_is_found_only_with_the_rows_id_key_and_value() {
        let same = Record {
            event_id: Some("e1".into()),
            key: Some(b"k".to_vec()),
            value: Some(digest(b"{}")),
        };
        assert_eq!(same.judge(&expected()), Finding::Found);
        let other = Record {
            event_id: Some("e2".into()),
            key: Some(b"k".to_vec()),
            value: Some(digest(b"{\"a\":1}")),
        };
        let Finding::Different(what) = other.judge(&expected()) else {
            panic!("another id and value must be different");
        };
        assert!(
            what.contains("id header is e2") && what.contains("value"),
            "{what}"
        );
        assert!(!what.contains("key"), "{what}");
        let bare = Record {
            event_id: None,
            key: None,
            value: None,
        };
        let Finding::Different(what) = bare.judge(&expected()) else {
            panic!("a bare record must be different");
        };
        assert!(
            what.contains("no id header") && what.contains("key"),
            "{what}"
        );
    }
}
