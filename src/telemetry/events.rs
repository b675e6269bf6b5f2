//! The relay's internal events: one struct per thing that happens, whose `emit` both logs
//! it and counts it, so a log line and its metric cannot drift apart. Counters are bumped
//! per batch or per rare event, never per row of a healthy batch.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tracing::{debug, info, warn};

use super::*;

/// Something that happened, logged and counted by [`InternalEvent::emit`].
pub(crate) trait InternalEvent {
    fn emit(self);
}

/// Emits an internal event into the metrics of the `App` whose task runs it.
pub(crate) fn emit(event: impl InternalEvent) {
    event.emit();
}

/// One batch's outcome, reported as a handful of metric updates.
pub(crate) struct BatchFinished<'a> {
    pub read: usize,
    pub published_by_topic: &'a foldhash::HashMap<Arc<str>, u64>,
    pub topic_labels: &'a TopicLabels,
    pub marked: u64,
    pub parked: u64,
    pub mode: &'static str,
    pub latencies: &'a [Duration],
    pub duration: Duration,
}

impl InternalEvent for BatchFinished<'_> {
    fn emit(self) {
        histogram!(BATCH_SIZE).record(self.read as f64);
        histogram!(BATCH_DURATION).record(self.duration.as_secs_f64());
        for (topic, rows) in self.published_by_topic {
            counter!(ROWS_PUBLISHED, "topic" => self.topic_labels.label(topic)).increment(*rows);
        }
        counter!(ROWS_MARKED, "mode" => self.mode).increment(self.marked);
        let latency = histogram!(END_TO_END_LATENCY);
        for d in self.latencies {
            latency.record(d.as_secs_f64());
        }
        debug!(
            read = self.read,
            marked = self.marked,
            parked = self.parked,
            "batch done"
        );
    }
}

/// How many distinct topics get a `topic` label of their own; rows of any further topic
/// are counted under [`OTHER_TOPICS`]. Topics can come from row data, and every label
/// value is a time series Prometheus keeps.
pub(crate) const MAX_TOPIC_LABELS: usize = 100;
/// The `topic` label of rows published to topics beyond the first [`MAX_TOPIC_LABELS`].
pub(crate) const OTHER_TOPICS: &str = "_other";

/// The topics that have a label of their own: the first `capacity` ever seen.
#[derive(Debug)]
pub(crate) struct TopicLabels {
    capacity: usize,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Default for TopicLabels {
    fn default() -> Self {
        Self::new(MAX_TOPIC_LABELS)
    }
}

impl TopicLabels {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seen: Default::default(),
        }
    }

    /// `topic` itself while it is among the first `capacity` topics, [`OTHER_TOPICS`] after.
    pub(crate) fn label(&self, topic: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(topic) {
            return topic.to_string();
        }
        if seen.len() < self.capacity {
            seen.insert(topic.to_string());
            return topic.to_string();
        }
        OTHER_TOPICS.to_string()
    }
}

/// Produce and delivery errors of one batch, by kind; each was logged where it happened.
pub(crate) struct PublishErrors<'a>(pub &'a HashMap<&'static str, u64>);

impl InternalEvent for PublishErrors<'_> {
    fn emit(self) {
        for (kind, n) in self.0 {
            counter!(PUBLISH_ERRORS, "kind" => *kind).increment(*n);
        }
    }
}

/// A connection-level producer error (one broker failing authentication, say).
pub(crate) struct ProducerClientError<'a> {
    pub kind: &'static str,
    pub reason: &'a str,
}

impl InternalEvent for ProducerClientError<'_> {
    fn emit(self) {
        counter!(PUBLISH_ERRORS, "kind" => self.kind).increment(1);
        // librdkafka's error callback logged it, on its own thread.
        debug!(
            kind = self.kind,
            reason = self.reason,
            "producer client error counted; the partitions of healthy brokers go on"
        );
    }
}

/// A row parked: it can never be published as it stands.
pub(crate) struct RowParked<'a> {
    pub row_id: i64,
    pub reason: &'static str,
    pub error: &'a str,
}

impl InternalEvent for RowParked<'_> {
    fn emit(self) {
        counter!(ROWS_PARKED, "reason" => self.reason).increment(1);
        warn!(row_id = self.row_id, reason = self.reason, error = %self.error, "row parked");
    }
}

/// Acknowledged rows not marked because their shard's lease moved to another replica.
pub(crate) struct RowsFenced {
    pub rows: u64,
}

impl InternalEvent for RowsFenced {
    fn emit(self) {
        counter!(ROWS_FENCED).increment(self.rows);
        warn!(
            fenced = self.rows,
            "acknowledged rows not marked: their shard moved to another replica, which sends them again"
        );
    }
}

/// A database error, logged at debug with `message` (callers that retry warn on their own).
pub(crate) struct DatabaseError<'a> {
    pub kind: &'static str,
    pub error: &'a dyn Display,
    pub message: &'static str,
}

impl InternalEvent for DatabaseError<'_> {
    fn emit(self) {
        counter!(DATABASE_ERRORS, "kind" => self.kind).increment(1);
        debug!(kind = self.kind, error = %self.error, "{}", self.message);
    }
}

/// The database is not usable yet at start-up; the relay retries.
pub(crate) struct DatabaseUnavailable<'a> {
    pub kind: &'static str,
    pub error: &'a dyn Display,
    pub retry_in: Duration,
}

impl InternalEvent for DatabaseUnavailable<'_> {
    fn emit(self) {
        counter!(DATABASE_ERRORS, "kind" => self.kind).increment(1);
        warn!(error = %self.error, retry_in = ?self.retry_in, "waiting for the database");
    }
}

/// The backlog as the database last counted it.
pub(crate) struct BacklogCounted {
    pub pending_rows: i64,
    pub parked_rows: i64,
    pub oldest_pending_age: Option<Duration>,
}

impl InternalEvent for BacklogCounted {
    fn emit(self) {
        gauge!(PENDING_ROWS).set(self.pending_rows as f64);
        gauge!(PARKED_ROWS).set(self.parked_rows as f64);
        gauge!(OLDEST_PENDING_AGE).set(self.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
    }
}

/// A lease round that did not reach the database: shards are given up when their leases
/// run out.
pub(crate) struct LeaseRenewalFailed<'a> {
    pub kind: &'static str,
    pub error: &'a dyn Display,
}

impl InternalEvent for LeaseRenewalFailed<'_> {
    fn emit(self) {
        counter!(DATABASE_ERRORS, "kind" => self.kind).increment(1);
        counter!(LEASE_RENEWAL_FAILURES).increment(1);
        warn!(error = %self.error, "lease renewal failed; shards are given up when their leases run out");
    }
}

/// A lease round renewed this many leases.
pub(crate) struct LeasesRenewed {
    pub leases: usize,
}

impl InternalEvent for LeasesRenewed {
    fn emit(self) {
        counter!(LEASE_RENEWALS).increment(self.leases as u64);
    }
}

/// The shards this replica holds a valid lease on, after a lease round.
pub(crate) struct ShardsOwned {
    pub shards: usize,
}

impl InternalEvent for ShardsOwned {
    fn emit(self) {
        gauge!(SHARDS_OWNED).set(self.shards as f64);
    }
}

/// The live replicas changed, and with them this replica's share of shards.
pub(crate) struct Rebalanced {
    pub replicas: usize,
    pub shards: usize,
}

impl InternalEvent for Rebalanced {
    fn emit(self) {
        counter!(REBALANCES).increment(1);
        info!(
            replicas = self.replicas,
            shards = self.shards,
            "rebalancing shards"
        );
    }
}

/// A sweep deleted sent rows past `relay.retain_sent`.
pub(crate) struct RowsPruned {
    pub(crate) rows: u64,
    pub(crate) older_than: Duration,
}

impl InternalEvent for RowsPruned {
    fn emit(self) {
        counter!(ROWS_PRUNED).increment(self.rows);
        info!(
            rows = self.rows,
            older_than = %humantime::format_duration(self.older_than),
            "deleted sent rows past relay.retain_sent"
        );
    }
}

/// A LISTEN notification woke the relay.
pub(crate) struct DoorbellRang;

impl InternalEvent for DoorbellRang {
    fn emit(self) {
        counter!(DOORBELLS).increment(1);
    }
}

/// The idle relay waited for rows: `armed` (writers ring), `busy` (a writer was
/// committing: look again shortly), `waiting` (another replica sleeps and rings for this
/// one) or `off` (polling only).
pub(crate) struct RelayWaited(pub &'static str);

impl InternalEvent for RelayWaited {
    fn emit(self) {
        counter!(IDLE_WAITS, "doorbell" => self.0).increment(1);
    }
}

/// librdkafka's periodic statistics, turned into a few gauges.
pub(crate) struct ProducerStatistics<'a>(pub &'a rdkafka::statistics::Statistics);

impl InternalEvent for ProducerStatistics<'_> {
    fn emit(self) {
        let stats = self.0;
        gauge!(PRODUCER_QUEUE_MESSAGES).set(stats.msg_cnt as f64);
        gauge!(PRODUCER_QUEUE_BYTES).set(stats.msg_size as f64);
        // Windows are in microseconds (rtt) and bytes (batchsize); empty windows are zero.
        let rtt = stats.brokers.values().filter_map(|b| b.rtt.as_ref());
        let (rtt_avg, rtt_p99) = rtt.fold((0, 0), |(a, p), w| (a.max(w.avg), p.max(w.p99)));
        gauge!(BROKER_RTT_AVG).set(rtt_avg as f64 / 1e6);
        gauge!(BROKER_RTT_P99).set(rtt_p99 as f64 / 1e6);
        let batches = stats.topics.values().map(|t| &t.batchsize);
        let (size_avg, size_p99) = batches.fold((0, 0), |(a, p), w| (a.max(w.avg), p.max(w.p99)));
        gauge!(PRODUCER_BATCH_AVG).set(size_avg as f64);
        gauge!(PRODUCER_BATCH_P99).set(size_p99 as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_labels_are_capped() {
        let labels = TopicLabels::new(2);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), OTHER_TOPICS);
        assert_eq!(labels.label("a"), "a", "a topic seen early keeps its label");
        for i in 0..1000 {
            assert_eq!(labels.label(&format!("row-chosen-{i}")), OTHER_TOPICS);
        }
        assert_eq!(labels.seen.lock().unwrap().len(), 2);
    }
}
