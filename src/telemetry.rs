//! Metrics, logs and health. Every metric the relay exports is named here, emitted per
//! batch (never per row in a loop of `counter!` calls), with bounded labels and no ids.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::{LogFormat, LogSettings};
use crate::store::BacklogStats;

pub const ROWS_PUBLISHED: &str = "outbox_relay_rows_published_total";
pub const ROWS_MARKED: &str = "outbox_relay_rows_marked_total";
pub const ROWS_PARKED: &str = "outbox_relay_rows_parked_total";
pub const PUBLISH_ERRORS: &str = "outbox_relay_publish_errors_total";
pub const DATABASE_ERRORS: &str = "outbox_relay_database_errors_total";
pub const PRODUCER_REBUILDS: &str = "outbox_relay_producer_rebuilds_total";
pub const REFUSED_RECORD_BATCHES: &str = "outbox_relay_refused_record_batches_total";
pub const DOORBELLS: &str = "outbox_relay_doorbell_notifications_total";
pub const BATCH_SIZE: &str = "outbox_relay_batch_size_rows";
pub const BATCH_DURATION: &str = "outbox_relay_batch_duration_seconds";
pub const END_TO_END_LATENCY: &str = "outbox_relay_end_to_end_latency_seconds";
pub const PENDING_ROWS: &str = "outbox_relay_pending_rows";
pub const PARKED_ROWS: &str = "outbox_relay_parked_rows";
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
pub const IN_FLIGHT_ROWS: &str = "outbox_relay_in_flight_rows";
pub const STALLED: &str = "outbox_relay_stalled";
pub const READY: &str = "outbox_relay_ready";
pub const SHARDS_OWNED: &str = "outbox_relay_shards_owned";
pub const LEASE_RENEWALS: &str = "outbox_relay_lease_renewals_total";
pub const LEASE_RENEWAL_FAILURES: &str = "outbox_relay_lease_renewal_failures_total";
pub const REBALANCES: &str = "outbox_relay_rebalances_total";
pub const ROWS_FENCED: &str = "outbox_relay_rows_fenced_total";
pub const PRODUCER_QUEUE_MESSAGES: &str = "outbox_relay_producer_queue_messages";
pub const PRODUCER_QUEUE_BYTES: &str = "outbox_relay_producer_queue_bytes";
pub const BROKER_RTT: &str = "outbox_relay_broker_rtt_seconds";
pub const PRODUCER_BATCH_SIZE: &str = "outbox_relay_producer_batch_size_bytes";
pub const BUILD_INFO: &str = "outbox_relay_build_info";
pub const TOPICS_WAITING: &str = "outbox_relay_topics_waiting";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

static PROMETHEUS: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn prometheus() -> Result<PrometheusHandle, String> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(END_TO_END_LATENCY.into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_DURATION.into()), LATENCY_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_SIZE_BUCKETS)
                })
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            describe_all();
            register_all();
            Ok(handle)
        })
        .clone()
}

fn describe_all() {
    describe_counter!(ROWS_PUBLISHED, "Rows acknowledged by the broker, by topic.");
    describe_counter!(
        ROWS_MARKED,
        "Acknowledged rows marked sent or deleted, by mode."
    );
    describe_counter!(
        ROWS_PARKED,
        "Rows parked because they can never be published, by reason."
    );
    describe_counter!(PUBLISH_ERRORS, "Produce and delivery errors, by kind.");
    describe_counter!(DATABASE_ERRORS, "Database errors, by kind.");
    describe_counter!(
        PRODUCER_REBUILDS,
        "Producers torn down and rebuilt after a fatal error."
    );
    describe_counter!(
        REFUSED_RECORD_BATCHES,
        "Record batches the broker refused as a whole; their rows were sent again one record per request."
    );
    describe_counter!(DOORBELLS, "LISTEN doorbell notifications received.");
    describe_histogram!(BATCH_SIZE, "Rows per batch read from the outbox.");
    describe_histogram!(
        BATCH_DURATION,
        metrics::Unit::Seconds,
        "Time from reading a batch to marking it."
    );
    describe_histogram!(
        END_TO_END_LATENCY,
        metrics::Unit::Seconds,
        "Time from a row's created_at to its acknowledgement by the broker."
    );
    describe_gauge!(
        PENDING_ROWS,
        "Rows waiting to be published (parked rows excluded)."
    );
    describe_gauge!(PARKED_ROWS, "Rows parked and waiting for an operator.");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest pending row; 0 when none is pending."
    );
    describe_gauge!(
        IN_FLIGHT_ROWS,
        "Rows handed to the producer and not yet acknowledged."
    );
    describe_gauge!(
        STALLED,
        "1 while acknowledgements have stopped arriving for longer than relay.stall_after."
    );
    describe_gauge!(READY, "1 when /readyz answers ready.");
    describe_gauge!(SHARDS_OWNED, "Shards this replica holds a valid lease on.");
    describe_counter!(LEASE_RENEWALS, "Shard leases renewed.");
    describe_counter!(LEASE_RENEWAL_FAILURES, "Lease renewal rounds that failed.");
    describe_counter!(REBALANCES, "Times this replica's share of shards changed.");
    describe_gauge!(
        PRODUCER_QUEUE_MESSAGES,
        "Messages in the producer's queue, waiting to be sent or acknowledged (librdkafka statistics)."
    );
    describe_gauge!(
        PRODUCER_QUEUE_BYTES,
        metrics::Unit::Bytes,
        "Bytes of the messages in the producer's queue (librdkafka statistics)."
    );
    describe_gauge!(
        BROKER_RTT,
        metrics::Unit::Seconds,
        "Produce request round trip of the slowest broker over the last statistics window, by stat (avg, p99)."
    );
    describe_gauge!(
        PRODUCER_BATCH_SIZE,
        metrics::Unit::Bytes,
        "Size of the record batches sent over the last statistics window, largest over topics, by stat (avg, p99)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_gauge!(
        TOPICS_WAITING,
        "Template topics the broker does not know: their rows wait while other topics flow; /readyz names them."
    );
    describe_counter!(
        ROWS_FENCED,
        "Acknowledged rows not marked because their shard's lease moved to another replica."
    );
}

/// Exports every unlabelled series and every bounded label value from the start, at
/// zero, so that `rate()` and alerts see a series before the first event happens.
fn register_all() {
    for name in [
        PRODUCER_REBUILDS,
        DOORBELLS,
        LEASE_RENEWALS,
        LEASE_RENEWAL_FAILURES,
        REBALANCES,
        ROWS_FENCED,
    ] {
        counter!(name).absolute(0);
    }
    for kind in crate::classify::KINDS {
        counter!(PUBLISH_ERRORS, "kind" => *kind).absolute(0);
    }
    for kind in crate::store::ERROR_KINDS {
        counter!(DATABASE_ERRORS, "kind" => *kind).absolute(0);
    }
    for reason in crate::model::PARK_REASONS {
        counter!(ROWS_PARKED, "reason" => *reason).absolute(0);
    }
    for name in [
        READY,
        STALLED,
        IN_FLIGHT_ROWS,
        SHARDS_OWNED,
        PRODUCER_QUEUE_MESSAGES,
        PRODUCER_QUEUE_BYTES,
        TOPICS_WAITING,
    ] {
        gauge!(name).set(0.0);
    }
    for stat in ["avg", "p99"] {
        gauge!(BROKER_RTT, "stat" => stat).set(0.0);
        gauge!(PRODUCER_BATCH_SIZE, "stat" => stat).set(0.0);
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Turns librdkafka's periodic statistics into a few gauges.
pub fn producer_statistics(stats: &rdkafka::statistics::Statistics) {
    gauge!(PRODUCER_QUEUE_MESSAGES).set(stats.msg_cnt as f64);
    gauge!(PRODUCER_QUEUE_BYTES).set(stats.msg_size as f64);
    // Windows are in microseconds (rtt) and bytes (batchsize); empty windows are zero.
    let rtt = stats.brokers.values().filter_map(|b| b.rtt.as_ref());
    let (rtt_avg, rtt_p99) = rtt.fold((0, 0), |(a, p), w| (a.max(w.avg), p.max(w.p99)));
    gauge!(BROKER_RTT, "stat" => "avg").set(rtt_avg as f64 / 1e6);
    gauge!(BROKER_RTT, "stat" => "p99").set(rtt_p99 as f64 / 1e6);
    let batches = stats.topics.values().map(|t| &t.batchsize);
    let (size_avg, size_p99) = batches.fold((0, 0), |(a, p), w| (a.max(w.avg), p.max(w.p99)));
    gauge!(PRODUCER_BATCH_SIZE, "stat" => "avg").set(size_avg as f64);
    gauge!(PRODUCER_BATCH_SIZE, "stat" => "p99").set(size_p99 as f64);
}

/// Sets up `tracing`: text on a terminal, JSON otherwise, `RUST_LOG` over `log.level`.
pub fn init_logging(settings: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Shared state behind `/readyz`, and what tests wait on instead of sleeping.
#[derive(Debug, Default)]
pub struct Health {
    started: AtomicBool,
    database_ok: AtomicBool,
    producer_ok: AtomicBool,
    stalled: AtomicBool,
    blocked: AtomicBool,
    leases_ok: AtomicBool,
    /// Whether a lease round has finished yet, so start-up is not reported as a failure.
    leases_checked: AtomicBool,
    in_flight: AtomicU64,
    batches: AtomicU64,
    producer_rebuilds: AtomicU64,
    refused_record_batches: AtomicU64,
    shards_owned: AtomicU64,
    /// Milliseconds since [`process_clock`] at the relay loop's last sign of progress
    /// inside a step; 0 while it waits between steps.
    step_progress_ms: AtomicU64,
    /// `topic (reason)` of each topic whose rows wait; readiness names them.
    waiting_topics: std::sync::Mutex<Vec<String>>,
}

/// A monotonic clock shared by the whole process, for atomics that hold instants.
fn process_clock() -> std::time::Instant {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

impl Health {
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.update_ready_gauge();
    }
    pub fn set_database_ok(&self, ok: bool) {
        self.database_ok.store(ok, Ordering::SeqCst);
        self.update_ready_gauge();
    }
    pub fn set_producer_ok(&self, ok: bool) {
        self.producer_ok.store(ok, Ordering::SeqCst);
        self.update_ready_gauge();
    }
    pub fn set_stalled(&self, stalled: bool) {
        if self.stalled.swap(stalled, Ordering::SeqCst) != stalled {
            gauge!(STALLED).set(if stalled { 1.0 } else { 0.0 });
            self.update_ready_gauge();
        }
    }
    /// Whether the last lease renewal round reached the database.
    pub fn set_leases_ok(&self, ok: bool) {
        let first = !self.leases_checked.swap(true, Ordering::SeqCst);
        if self.leases_ok.swap(ok, Ordering::SeqCst) != ok || first {
            self.update_ready_gauge();
        }
    }
    /// Topics whose rows wait (the others flow): not a reason to be unready, but named.
    /// `shown`: the first few as `topic (reason)`; `total`: how many wait.
    pub fn set_waiting_topics(&self, mut shown: Vec<String>, total: usize) {
        gauge!(TOPICS_WAITING).set(total as f64);
        if total > shown.len() {
            shown.push(format!("and {} more", total - shown.len()));
        }
        if let Ok(mut waiting) = self.waiting_topics.lock() {
            *waiting = shown;
        }
    }
    pub fn waiting_topics(&self) -> Vec<String> {
        self.waiting_topics
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default()
    }
    /// A permanent global error (authorization, authentication) stops publishing.
    pub fn set_blocked(&self, blocked: bool) {
        if self.blocked.swap(blocked, Ordering::SeqCst) != blocked {
            self.update_ready_gauge();
        }
    }
    pub fn set_in_flight(&self, rows: u64) {
        self.in_flight.store(rows, Ordering::SeqCst);
        gauge!(IN_FLIGHT_ROWS).set(rows as f64);
    }
    pub fn producer_rebuilt(&self) {
        self.producer_rebuilds.fetch_add(1, Ordering::SeqCst);
        counter!(PRODUCER_REBUILDS).increment(1);
    }
    pub fn set_shards_owned(&self, shards: usize) {
        self.shards_owned.store(shards as u64, Ordering::SeqCst);
    }
    pub fn shards_owned(&self) -> u64 {
        self.shards_owned.load(Ordering::SeqCst)
    }
    /// The broker refused a record batch as a whole; its rows go one record per request.
    pub fn record_batch_refused(&self) {
        self.refused_record_batches.fetch_add(1, Ordering::SeqCst);
        counter!(REFUSED_RECORD_BATCHES).increment(1);
    }
    pub fn refused_record_batches(&self) -> u64 {
        self.refused_record_batches.load(Ordering::SeqCst)
    }
    pub fn producer_rebuilds(&self) -> u64 {
        self.producer_rebuilds.load(Ordering::SeqCst)
    }
    pub fn batch_done(&self) {
        self.batches.fetch_add(1, Ordering::SeqCst);
    }

    /// The relay loop is working on a step and has just made progress.
    pub fn loop_progress(&self) {
        let now = process_clock().elapsed().as_millis().max(1) as u64;
        self.step_progress_ms.store(now, Ordering::Relaxed);
    }
    /// The relay loop finished a step and waits on purpose (poll interval, backoff).
    pub fn loop_waiting(&self) {
        self.step_progress_ms.store(0, Ordering::Relaxed);
    }
    /// How long the loop has been inside one step without progress, if it is in one.
    pub fn loop_stuck_for(&self) -> Option<Duration> {
        match self.step_progress_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(
                process_clock()
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since)),
            ),
        }
    }

    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }

    /// Why the relay is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.started.load(Ordering::SeqCst) {
            Some("starting")
        } else if !self.database_ok.load(Ordering::SeqCst) {
            Some("database unreachable or refusing writes")
        } else if !self.leases_checked.load(Ordering::SeqCst) {
            Some("starting: acquiring shard leases")
        } else if !self.leases_ok.load(Ordering::SeqCst) {
            Some("database unavailable for lease renewal")
        } else if !self.producer_ok.load(Ordering::SeqCst) {
            Some("producer unhealthy")
        } else if self.blocked.load(Ordering::SeqCst) {
            Some(
                "publishing blocked by a permanent broker error (authorization, authentication); see the logs",
            )
        } else if self.stalled.load(Ordering::SeqCst) {
            Some("stalled: broker acknowledgements have stopped")
        } else {
            None
        }
    }

    fn update_ready_gauge(&self) {
        gauge!(READY).set(if self.not_ready_reason().is_none() {
            1.0
        } else {
            0.0
        });
    }
}

/// One batch's outcome, reported as a handful of metric updates.
pub struct BatchReport<'a> {
    pub read: usize,
    pub published_by_topic: &'a foldhash::HashMap<std::sync::Arc<str>, u64>,
    pub marked: u64,
    pub mode: &'static str,
    pub latencies: &'a [Duration],
    pub duration: Duration,
}

/// How many distinct topics get a `topic` label of their own; rows of any further topic
/// are counted under [`OTHER_TOPICS`]. Topics can come from row data, and every label
/// value is a time series Prometheus keeps.
pub const MAX_TOPIC_LABELS: usize = 100;
/// The `topic` label of rows published to topics beyond the first [`MAX_TOPIC_LABELS`].
pub const OTHER_TOPICS: &str = "_other";

/// The topics that have a label of their own: the first `capacity` ever seen.
#[derive(Debug)]
pub struct TopicLabels {
    capacity: usize,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl TopicLabels {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seen: Default::default(),
        }
    }

    /// `topic` itself while it is among the first `capacity` topics, [`OTHER_TOPICS`] after.
    pub fn label(&self, topic: &str) -> String {
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

fn topic_labels() -> &'static TopicLabels {
    static LABELS: OnceLock<TopicLabels> = OnceLock::new();
    LABELS.get_or_init(|| TopicLabels::new(MAX_TOPIC_LABELS))
}

pub fn batch_finished(report: &BatchReport<'_>) {
    histogram!(BATCH_SIZE).record(report.read as f64);
    histogram!(BATCH_DURATION).record(report.duration.as_secs_f64());
    for (topic, rows) in report.published_by_topic {
        counter!(ROWS_PUBLISHED, "topic" => topic_labels().label(topic)).increment(*rows);
    }
    counter!(ROWS_MARKED, "mode" => report.mode).increment(report.marked);
    let latency = histogram!(END_TO_END_LATENCY);
    for d in report.latencies {
        latency.record(d.as_secs_f64());
    }
}

pub fn publish_error(kind: &'static str) {
    counter!(PUBLISH_ERRORS, "kind" => kind).increment(1);
}

pub fn publish_errors(by_kind: &HashMap<&'static str, u64>) {
    for (kind, n) in by_kind {
        counter!(PUBLISH_ERRORS, "kind" => *kind).increment(*n);
    }
}

pub fn rows_parked(reason: &'static str, rows: u64) {
    counter!(ROWS_PARKED, "reason" => reason).increment(rows);
}

pub fn database_error(kind: &'static str) {
    counter!(DATABASE_ERRORS, "kind" => kind).increment(1);
}

pub fn doorbell() {
    counter!(DOORBELLS).increment(1);
}

pub fn backlog(stats: &BacklogStats) {
    gauge!(PENDING_ROWS).set(stats.pending_rows as f64);
    gauge!(PARKED_ROWS).set(stats.parked_rows as f64);
    gauge!(OLDEST_PENDING_AGE).set(stats.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
}

pub fn shards_owned(shards: usize) {
    gauge!(SHARDS_OWNED).set(shards as f64);
}

pub fn lease_renewed(leases: usize) {
    counter!(LEASE_RENEWALS).increment(leases as u64);
}

pub fn lease_renewal_failed() {
    counter!(LEASE_RENEWAL_FAILURES).increment(1);
}

pub fn rebalanced() {
    counter!(REBALANCES).increment(1);
}

pub fn rows_fenced(rows: u64) {
    counter!(ROWS_FENCED).increment(rows);
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
