//! Metrics, logs and health. Every metric the relay exports is named here, with bounded
//! labels and no ids; each `App` has a recorder of its own, so two relays in one process
//! (as tests run them) never count into each other's metrics.

mod events;
mod health;

pub(crate) use events::*;
pub use health::Health;

use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::config::{LogFormat, LogSettings};

pub(crate) const ROWS_PUBLISHED: &str = "outbox_relay_rows_published_total";
pub(crate) const ROWS_MARKED: &str = "outbox_relay_rows_marked_total";
pub(crate) const ROWS_PRUNED: &str = "outbox_relay_rows_pruned_total";
pub(crate) const ROWS_PARKED: &str = "outbox_relay_rows_parked_total";
pub(crate) const PUBLISH_ERRORS: &str = "outbox_relay_publish_errors_total";
pub(crate) const DATABASE_ERRORS: &str = "outbox_relay_database_errors_total";
pub(crate) const PRODUCER_REBUILDS: &str = "outbox_relay_producer_rebuilds_total";
pub(crate) const REFUSED_RECORD_BATCHES: &str = "outbox_relay_refused_record_batches_total";
pub(crate) const DOORBELLS: &str = "outbox_relay_doorbell_notifications_total";
pub(crate) const IDLE_WAITS: &str = "outbox_relay_idle_waits_total";
pub(crate) const AUDIT_CHECKED: &str = "outbox_relay_audit_checked_total";
pub(crate) const AUDIT_MISMATCHES: &str = "outbox_relay_audit_mismatches_total";
pub(crate) const AUDIT_UNCHECKED: &str = "outbox_relay_audit_unchecked_total";
pub(crate) const AUDIT_RUNNING: &str = "outbox_relay_audit_running";
pub(crate) const BATCH_SIZE: &str = "outbox_relay_batch_size_rows";
pub(crate) const BATCH_DURATION: &str = "outbox_relay_batch_duration_seconds";
pub(crate) const END_TO_END_LATENCY: &str = "outbox_relay_end_to_end_latency_seconds";
pub(crate) const PENDING_ROWS: &str = "outbox_relay_pending_rows";
pub(crate) const PARKED_ROWS: &str = "outbox_relay_parked_rows";
pub(crate) const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
pub(crate) const IN_FLIGHT_ROWS: &str = "outbox_relay_in_flight_rows";
pub(crate) const STALLED: &str = "outbox_relay_stalled";
pub const READY: &str = "outbox_relay_ready";
pub(crate) const SHARDS_OWNED: &str = "outbox_relay_shards_owned";
pub(crate) const LEASE_RENEWALS: &str = "outbox_relay_lease_renewals_total";
pub(crate) const LEASE_RENEWAL_FAILURES: &str = "outbox_relay_lease_renewal_failures_total";
pub(crate) const REBALANCES: &str = "outbox_relay_rebalances_total";
pub(crate) const ROWS_FENCED: &str = "outbox_relay_rows_fenced_total";
pub(crate) const PRODUCER_QUEUE_MESSAGES: &str = "outbox_relay_producer_queue_messages";
pub(crate) const PRODUCER_QUEUE_BYTES: &str = "outbox_relay_producer_queue_bytes";
pub(crate) const BROKER_RTT_AVG: &str = "outbox_relay_broker_rtt_avg_seconds";
pub(crate) const BROKER_RTT_P99: &str = "outbox_relay_broker_rtt_p99_seconds";
pub(crate) const PRODUCER_BATCH_AVG: &str = "outbox_relay_producer_batch_avg_bytes";
pub(crate) const PRODUCER_BATCH_P99: &str = "outbox_relay_producer_batch_p99_bytes";
pub(crate) const BUILD_INFO: &str = "outbox_relay_build_info";
pub(crate) const TOPICS_WAITING: &str = "outbox_relay_topics_waiting";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Metric labels whose values are known in advance, exported at zero from the start:
/// `(metric, label, values)`. Layers above this one own some of these lists.
pub(crate) type BoundedLabel = (&'static str, &'static str, &'static [&'static str]);

/// One `App`'s metrics: its own Prometheus recorder, which the tasks of that `App` record
/// into ([`Metrics::instrument`], [`Metrics::scope`]) and `/metrics` renders.
#[derive(Clone)]
pub(crate) struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    /// The process's memory, CPU and file descriptors (`process_*`), read at each render.
    process: Arc<metrics_process::Collector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A recorder with every metric described and every bounded series at zero.
    pub(crate) fn new(bounded: &[BoundedLabel]) -> Result<Metrics, String> {
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
        let metrics = Metrics {
            recorder: Arc::new(recorder),
            process: Arc::new(metrics_process::Collector::default()),
        };
        metrics.scope(|| {
            describe_all();
            metrics.process.describe();
            register_all(bounded);
        });
        Ok(metrics)
    }

    /// The Prometheus text of every metric of this `App`.
    pub(crate) fn render(&self) -> String {
        self.scope(|| self.process.collect());
        self.recorder.handle().render()
    }

    /// Runs `f` with this `App`'s recorder as the one `counter!`, `gauge!` and
    /// `histogram!` record into: for code on threads tokio does not run (librdkafka's).
    pub(crate) fn scope<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&*self.recorder, f)
    }

    /// `future`, recording into this `App`'s metrics wherever it is polled.
    pub(crate) fn instrument<F: Future>(&self, future: F) -> Instrumented<F> {
        Instrumented {
            metrics: self.clone(),
            future,
        }
    }

    /// `tokio::spawn` of an instrumented `future`.
    pub(crate) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        tokio::spawn(self.instrument(future))
    }
}

pin_project_lite::pin_project! {
    /// A future polled inside [`Metrics::scope`]: see [`Metrics::instrument`].
    pub(crate) struct Instrumented<F> {
        metrics: Metrics,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Instrumented<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let metrics = this.metrics;
        let future = this.future;
        metrics.scope(|| future.poll(cx))
    }
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
    describe_counter!(
        ROWS_PRUNED,
        "Sent rows deleted because they were older than relay.retain_sent (mark mode)."
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
    describe_counter!(
        IDLE_WAITS,
        "Waits of the idle relay for rows, by doorbell: armed (writers ring), busy (a writer was committing; the relay looks again within 50 ms or the poll interval), waiting (another replica sleeps and rings for this one), off (polling only: no doorbell trigger, no LISTEN, or its session down)."
    );
    describe_counter!(
        AUDIT_CHECKED,
        "Sent rows whose records the auditor read back from Kafka (relay.audit_sample_rate)."
    );
    describe_counter!(
        AUDIT_UNCHECKED,
        "Sampled rows the auditor could not check, by reason: expired (removed by the topic's retention), unreadable (the broker did not serve the partition: grants, a topic that does not exist, timeouts), unverifiable (no recorded offset, a topic that no longer renders)."
    );
    describe_gauge!(
        AUDIT_RUNNING,
        "1 while the auditor runs (relay.audit_sample_rate above 0 and its consumer built)."
    );
    describe_counter!(
        AUDIT_MISMATCHES,
        "Audited rows whose record was not where their ack said, by kind: missing (no record at that offset) or different (another record is there)."
    );
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
        BROKER_RTT_AVG,
        metrics::Unit::Seconds,
        "Average produce request round trip of the slowest broker over the last statistics window."
    );
    describe_gauge!(
        BROKER_RTT_P99,
        metrics::Unit::Seconds,
        "99th percentile of the produce request round trip of the slowest broker over the last statistics window."
    );
    describe_gauge!(
        PRODUCER_BATCH_AVG,
        metrics::Unit::Bytes,
        "Average size of the record batches sent over the last statistics window, largest over topics."
    );
    describe_gauge!(
        PRODUCER_BATCH_P99,
        metrics::Unit::Bytes,
        "99th percentile of the size of the record batches sent over the last statistics window, largest over topics."
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
fn register_all(bounded: &[BoundedLabel]) {
    for name in [
        PRODUCER_REBUILDS,
        DOORBELLS,
        LEASE_RENEWALS,
        LEASE_RENEWAL_FAILURES,
        REBALANCES,
        ROWS_FENCED,
        ROWS_PRUNED,
        AUDIT_CHECKED,
    ] {
        counter!(name).absolute(0);
    }
    for (metric, label, values) in bounded {
        for value in *values {
            counter!(*metric, *label => *value).absolute(0);
        }
    }
    for name in [
        READY,
        STALLED,
        IN_FLIGHT_ROWS,
        SHARDS_OWNED,
        PRODUCER_QUEUE_MESSAGES,
        PRODUCER_QUEUE_BYTES,
        TOPICS_WAITING,
        AUDIT_RUNNING,
    ] {
        gauge!(name).set(0.0);
    }
    for name in [
        BROKER_RTT_AVG,
        BROKER_RTT_P99,
        PRODUCER_BATCH_AVG,
        PRODUCER_BATCH_P99,
    ] {
        gauge!(name).set(0.0);
    }
    gauge!(
        BUILD_INFO,
        "version" => crate::build::VERSION,
        "revision" => crate::build::GIT_REVISION,
        "librdkafka" => crate::build::librdkafka_version()
    )
    .set(1.0);
}

/// Sets up `tracing`: text on a terminal, JSON otherwise, `RUST_LOG` over `log.level`.
/// A one-shot command (`daemon` false) talks to a person: its log lines (PostgreSQL's
/// notices among them) are text unless `log.format = "json"` says otherwise. Colours only
/// on a terminal, never into a file or a pipe.
pub fn init_logging(settings: &LogSettings, daemon: bool) {
    let from_environment = tracing_subscriber::EnvFilter::try_from_default_env();
    let chosen_by_environment = from_environment.is_ok();
    let mut filter = from_environment
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // PostgreSQL's notices to a one-shot command are its own chatter ("relation ... already
    // exists, skipping" at every `migrate`); warnings still show, and a filter that names
    // sqlx decides for itself.
    if !daemon
        && !chosen_by_environment
        && !settings.level.contains("sqlx")
        && let Ok(quiet_notices) = "sqlx::postgres::notice=warn".parse()
    {
        filter = filter.add_directive(quiet_notices);
    }
    let terminal = std::io::stderr().is_terminal();
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => daemon && !terminal,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
