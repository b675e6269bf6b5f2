//! Records read back at the partition and offset their acks recorded, each judged against
//! what its row says: found, changed (its value is not the row's any more), different,
//! missing, expired (below the partition's start) or unreadable. A consumer assigned by
//! hand, reading uncommitted records too: no commits, nothing written. A finding of missing
//! or different rests on what the broker answered, never on a timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

use crate::model::headers::HEADER_EVENT_ID;
use crate::store::ValueDigest;

/// Offsets closer than this are read through rather than fetched again from the first.
const READ_THROUGH: i64 = 256;
/// How long a fetch from an offset inside the partition may stay empty before the reader
/// suspects a broker that does not serve a fetch from inside a record batch (tansu 0.6 does
/// not) and reads through from an offset it did serve instead.
const PROBE: Duration = Duration::from_secs(2);
/// Reading through from an earlier offset is tried only this many offsets back; further,
/// the empty fetch is retried once instead.
const READ_THROUGH_LIMIT: i64 = 100_000;
/// How often a blocking wait looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// What a row's record must be.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The hyphenated event id, the record's `id` header.
    pub event_id: String,
    pub key: Vec<u8>,
    /// `None` for a record without a value.
    pub value: Option<ValueDigest>,
}

pub(crate) fn digest(bytes: &[u8]) -> ValueDigest {
    ValueDigest {
        sha256: Sha256::digest(bytes).into(),
        length: bytes.len(),
    }
}

/// What was found where a row's ack said its record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Finding {
    /// The record carries the row's event id, key and value.
    Found,
    /// The record carries the row's event id and key, but the row's value changed since.
    Changed(String),
    /// Another record is there (what differs).
    Different(String),
    /// No record at that offset, or the partition does not exist.
    Missing(String),
    /// The offset is below the partition's first: the topic's retention removed it.
    Expired(String),
    /// The broker could not be asked, or did not say (a timeout, an authorization error).
    Unreadable(String),
}

impl Finding {
    /// The word a report uses: found, changed, different, missing, expired, unreadable.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Finding::Found => "found",
            Finding::Changed(_) => "changed",
            Finding::Different(_) => "different",
            Finding::Missing(_) => "missing",
            Finding::Expired(_) => "expired",
            Finding::Unreadable(_) => "unreadable",
        }
    }

    pub(crate) fn detail(&self) -> &str {
        match self {
            Finding::Found => "the record carries this row's event id, key and value",
            Finding::Changed(d)
            | Finding::Different(d)
            | Finding::Missing(d)
            | Finding::Expired(d)
            | Finding::Unreadable(d) => d,
        }
    }
}

/// Reads records back by partition and offset. Blocking: run it off the async threads;
/// [`RecordReader::stop`] ends a check in progress within a fraction of a second.
pub(crate) struct RecordReader {
    consumer: BaseConsumer,
    timeout: Duration,
    stop: Arc<AtomicBool>,
}

impl RecordReader {
    /// A consumer with the connection settings of `properties` (the producer's, minus what
    /// only a producer takes); each broker call waits at most `timeout`. Its fetch queue
    /// holds about two of the largest records (`max_record_bytes`), not librdkafka's 64 MiB.
    pub(crate) fn new(
        properties: &[(String, String)],
        timeout: Duration,
        max_record_bytes: usize,
    ) -> KafkaResult<Self> {
        let mut config = ClientConfig::new();
        let consumer_properties = crate::config::consumer_properties(properties);
        for (key, value) in &consumer_properties {
            config.set(key, value);
        }
        let kbytes = (2 * max_record_bytes).div_ceil(1024).max(1024);
        if !consumer_properties
            .iter()
            .any(|(k, _)| k == "queued.max.messages.kbytes")
        {
            config.set("queued.max.messages.kbytes", kbytes.to_string());
        }
        config
            // assign() needs a group; nothing is committed to it.
            .set("group.id", "outbox-relay-verify")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "error")
            // Another producer's open transaction must not hide the relay's records.
            .set("isolation.level", "read_uncommitted")
            .set("queued.min.messages", "1000");
        Ok(Self {
            consumer: config.create()?,
            timeout,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Set to end checks in progress (the findings left are unreadable).
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The finding for each of `expected`, in its order.
    pub(crate) fn check(&self, expected: &[Expected]) -> Vec<Finding> {
        let mut findings = vec![Finding::Unreadable("not read".into()); expected.len()];
        let mut by_partition: BTreeMap<(&str, i32), Vec<usize>> = BTreeMap::new();
        for (i, e) in expected.iter().enumerate() {
            by_partition
                .entry((&e.topic, e.partition))
                .or_default()
                .push(i);
        }
        for ((topic, partition), mut indexes) in by_partition {
            if self.stopped() {
                break;
            }
            indexes.sort_by_key(|&i| expected[i].offset);
            PartitionRead::new(self, topic, partition).check(expected, &indexes, &mut findings);
        }
        let _ = self.consumer.unassign();
        findings
    }

    fn assign(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.consumer.assign(&assignment)
    }

    /// The next record of the assigned partition, or why none came within `wait`. Errors
    /// that are not this partition's (a broker connection, the group coordinator) are not
    /// charged to it: the wait goes on.
    fn next_record(&self, topic: &str, partition: i32, wait: Duration) -> Next {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stopped() {
                return Next::Quiet;
            }
            match self.consumer.poll(left.min(STOP_CHECK)) {
                None => continue,
                Some(Err(error)) => match error.rdkafka_error_code() {
                    Some(
                        RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
                    ) => {
                        return Next::OutOfRange;
                    }
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition
                        | RDKafkaErrorCode::UnknownTopic
                        | RDKafkaErrorCode::UnknownPartition
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::GroupAuthorizationFailed,
                    ) => return Next::Refused(error),
                    _ => {
                        tracing::debug!(error = %error, "reading records back: not this partition's error");
                        continue;
                    }
                },
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
                    return Next::Record(message.offset(), record);
                }
            }
        }
    }
}

/// What a wait for the next record gave.
enum Next {
    Record(i64, Record),
    /// Nothing within the wait.
    Quiet,
    /// The broker says the offset is not in the partition.
    OutOfRange,
    /// The broker refused to serve the partition.
    Refused(KafkaError),
}

/// The reading of one partition.
struct PartitionRead<'a> {
    reader: &'a RecordReader,
    topic: &'a str,
    partition: i32,
    /// The offset the next record should have, while a fetch is running.
    position: Option<i64>,
    /// An offset a fetch was served from: the broker can start there again.
    anchor: Option<i64>,
    /// Where the running fetch started, until it serves a record.
    fetched_from: Option<i64>,
    /// Reading through from the anchor: no fetch from a new offset.
    streaming: bool,
}

impl<'a> PartitionRead<'a> {
    fn new(reader: &'a RecordReader, topic: &'a str, partition: i32) -> Self {
        Self {
            reader,
            topic,
            partition,
            position: None,
            anchor: None,
            fetched_from: None,
            streaming: false,
        }
    }

    fn fetch(&mut self, from: i64) -> KafkaResult<()> {
        self.reader.assign(self.topic, self.partition, from)?;
        self.position = Some(from);
        self.fetched_from = Some(from);
        Ok(())
    }

    fn check(&mut self, expected: &[Expected], indexes: &[usize], findings: &mut [Finding]) {
        let (topic, partition) = (self.topic, self.partition);
        let timeout = self.reader.timeout;
        let (low, high) = match self
            .reader
            .consumer
            .fetch_watermarks(topic, partition, timeout)
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
        let mut next = 0;
        // Every fetch either judges a row or moves the reading on; this bounds a broker
        // that answers neither way.
        let mut fetches_left = 2 * to_read.len() + 8;
        while next < to_read.len() {
            if self.reader.stopped() {
                return;
            }
            let wanted = expected[to_read[next]].offset;
            let fresh = match self.position {
                None => true,
                Some(at) => !self.streaming && (wanted > at + READ_THROUGH || wanted < at),
            };
            // An offset at or past the end the broker reports is read for from the last
            // record it reports: a broker whose end is right serves that one record and
            // then nothing (the offset is missing); one that reports the start of its last
            // record batch (tansu 0.6) serves the whole batch.
            let past_reported_end = wanted >= high;
            let probing = fresh && !self.streaming && !past_reported_end;
            if fresh {
                if fetches_left == 0 {
                    for &i in &to_read[next..] {
                        findings[i] = Finding::Unreadable(format!(
                            "the broker served {topic}/{partition} neither up to offset {} nor an error",
                            expected[i].offset
                        ));
                    }
                    return;
                }
                fetches_left -= 1;
                let from = if self.streaming {
                    self.anchor.unwrap_or(low)
                } else if past_reported_end {
                    // Read through from the last record the broker reports.
                    self.streaming = true;
                    self.anchor = Some((high - 1).max(low));
                    (high - 1).max(low)
                } else {
                    wanted
                };
                if let Err(error) = self.fetch(from) {
                    for &i in &to_read[next..] {
                        findings[i] = Finding::Unreadable(format!(
                            "cannot read {topic}/{partition}: {error}"
                        ));
                    }
                    return;
                }
            }
            let wait = if probing || past_reported_end {
                PROBE.min(timeout)
            } else {
                timeout
            };
            match self.reader.next_record(topic, partition, wait) {
                Next::Record(offset, record) => {
                    if let Some(from) = self.fetched_from.take() {
                        self.anchor = Some(from);
                    }
                    self.position = Some(offset + 1);
                    while next < to_read.len() && expected[to_read[next]].offset < offset {
                        findings[to_read[next]] = Finding::Missing(format!(
                            "no record at offset {}: the partition goes from before it to {offset} (compacted, or truncated)",
                            expected[to_read[next]].offset
                        ));
                        next += 1;
                    }
                    while next < to_read.len() && expected[to_read[next]].offset == offset {
                        findings[to_read[next]] = record.judge(&expected[to_read[next]]);
                        next += 1;
                    }
                }
                Next::Quiet if probing => {
                    // Nothing from inside the partition: a slow broker, or one that cannot
                    // start a fetch inside a record batch. Read through from an offset it
                    // served when that is near; otherwise ask once more, for longer.
                    let from = self.anchor.filter(|&a| a <= wanted).unwrap_or(low);
                    if wanted - from <= READ_THROUGH_LIMIT {
                        self.streaming = true;
                        self.anchor = Some(from);
                        self.position = None;
                    } else {
                        match self.reader.next_record(topic, partition, timeout) {
                            Next::Record(offset, record) if offset == wanted => {
                                findings[to_read[next]] = record.judge(&expected[to_read[next]]);
                                self.position = Some(offset + 1);
                            }
                            _ => {
                                findings[to_read[next]] = Finding::Unreadable(format!(
                                    "the broker served nothing from {topic}/{partition} at offset {wanted}, which it says it has"
                                ));
                                self.position = None;
                            }
                        }
                        next += 1;
                    }
                }
                Next::Quiet => {
                    // The partition ended: what is left is past the end, if the broker says
                    // so too; a broker that did not answer proves nothing.
                    let end = self
                        .reader
                        .consumer
                        .fetch_watermarks(topic, partition, timeout)
                        .ok()
                        .map(|(_, high)| high);
                    let last_read = self.position.map(|p| p - 1);
                    let stopped = self.reader.stopped();
                    for &i in &to_read[next..] {
                        let offset = expected[i].offset;
                        // Past the last record read counts only where the broker's end is
                        // known to be wrong (records were read beyond it).
                        let past_last = last_read.is_some_and(|last| offset > last);
                        let end_is_wrong = |high: i64| last_read.is_some_and(|last| last >= high);
                        findings[i] = match end {
                            Some(high)
                                if !stopped
                                    && (offset >= high || (past_last && end_is_wrong(high))) =>
                            {
                                Finding::Missing(match last_read {
                                    Some(last) => format!(
                                        "offset {offset} is past the partition's last record (offset {last})"
                                    ),
                                    None => format!(
                                        "offset {offset} is past the partition's end ({high})"
                                    ),
                                })
                            }
                            _ => Finding::Unreadable(format!(
                                "no record came from {topic}/{partition} at offset {offset} within {timeout:?}"
                            )),
                        };
                    }
                    return;
                }
                Next::OutOfRange => {
                    let marks = self
                        .reader
                        .consumer
                        .fetch_watermarks(topic, partition, timeout);
                    findings[to_read[next]] = match marks {
                        Ok((low, _)) if wanted < low => expired(wanted, low),
                        Ok((_, high)) => past_the_end(wanted, high),
                        Err(error) => Finding::Unreadable(format!(
                            "the broker refused offset {wanted} of {topic}/{partition} and then did not say its range: {error}"
                        )),
                    };
                    next += 1;
                    self.position = None;
                }
                Next::Refused(error) => {
                    let finding = unreachable_partition(topic, partition, &error);
                    for &i in &to_read[next..] {
                        findings[i] = finding.clone();
                    }
                    return;
                }
            }
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
        Some(RDKafkaErrorCode::UnknownPartition) => {
            Finding::Missing(format!("topic {topic} has no partition {partition}"))
        }
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            // A template changed since the row was sent names another topic: that is not
            // a loss, and the topic is not stored with the row.
            Finding::Unreadable(format!(
                "topic {topic} does not exist (was it deleted, or did relay.topic_template change since the row was sent?)"
            ))
        }
        _ => Finding::Unreadable(format!("cannot read {topic}/{partition}: {error}")),
    }
}

/// What was read at an offset.
struct Record {
    event_id: Option<String>,
    key: Option<Vec<u8>>,
    value: Option<ValueDigest>,
}

impl Record {
    fn judge(&self, expected: &Expected) -> Finding {
        let same_event = self.event_id.as_deref() == Some(expected.event_id.as_str());
        let same_key = self.key.as_deref() == Some(expected.key.as_slice());
        let same_value = self.value == expected.value;
        let length = |v: &Option<ValueDigest>| match v {
            Some(v) => format!("{} bytes", v.length),
            None => "none".to_string(),
        };
        if same_event && same_key {
            return if same_value {
                Finding::Found
            } else {
                Finding::Changed(format!(
                    "the record at this offset is this event (id and key match) but its value is not what the row holds now ({}, the row {}): the row's payload, or its column's type, changed after it was sent",
                    length(&self.value),
                    length(&expected.value)
                ))
            };
        }
        let mut differences = Vec::new();
        if !same_event {
            differences.push(match &self.event_id {
                Some(id) => format!(
                    "its id header is {} (expected {})",
                    crate::model::printable(id, 64),
                    expected.event_id
                ),
                None => format!("it has no id header (expected {})", expected.event_id),
            });
        }
        if !same_key {
            differences.push("its key is another".to_string());
        }
        if !same_value {
            differences.push(format!(
                "its value is another ({}, expected {})",
                length(&self.value),
                length(&expected.value)
            ));
        }
        Finding::Different(differences.join("; "))
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
        let rewritten = Record {
            event_id: Some("e1".into()),
            key: Some(b"k".to_vec()),
            value: Some(digest(b"{\"a\":1}")),
        };
        assert_eq!(rewritten.judge(&expected()).kind(), "changed");
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
