//! The path of a row: read a batch of pending rows in id order, encode, produce, collect
//! acks, then mark the batch in one statement. A row is marked only after its ack, and
//! only when every earlier row of its aggregate in the batch was acked (or parked under
//! `skip`), so a resend never lets a later row's first occurrence precede an earlier one.
//! A fully acknowledged batch is marked in the background while the next one is read and
//! produced, and while a backlog drains the next batch is read while this one is produced
//! and acknowledged; reads skip the rows still in flight or being marked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::kafka::classify::{ErrorClass, classify};
use crate::config::{RelaySettings, Settings};
use crate::encode::{EncodedRecord, Encoder};
use crate::lease::{Ownership, Snapshot};
use crate::model::{Backoff, Mode, OutboxRow, ParkPolicy, ParkReason, TopicTemplate};
use crate::kafka::producer::{
    ClusterTopics, EventReceiver, EventSender, ProducerEvent, RowProducer, TopicAnswer,
};
use crate::store::{Ack, Parking, ReadLimits, Store, StoreError};
use crate::telemetry::{
    BatchFinished, DatabaseError, Health, Metrics, ProducerClientError, PublishErrors, RowParked,
    RowsFenced, TopicLabels, emit,
};
use crate::kafka::topics::TopicLimits;
use crate::waiting::{Hold, WaitingTopics};

/// Kafka's record batch header, which a lone record is wrapped in.
const RECORD_BATCH_OVERHEAD_BYTES: usize = 61;
/// How long to wait before retrying a send that librdkafka refused with a full queue.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);
/// How long a question to the cluster about one topic may take, and how many waiting
/// topics are asked about again per tick.
const TOPIC_QUESTION_TIMEOUT: Duration = Duration::from_secs(2);
const TOPIC_QUESTIONS_PER_TICK: usize = 4;
/// How long the cluster's list of topics answers questions about them.
const CLUSTER_TOPICS_FRESH: Duration = Duration::from_secs(1);
const UNKNOWN_TOPIC: &str = "the cluster does not know the topic";
const UNANSWERED_TOPIC: &str = "the cluster did not say whether it knows the topic";
/// How long an answer about a topic stands: one the cluster could not be asked about is
/// produced to meanwhile, and a row's own topic it does not know parks its rows.
const TOPIC_ANSWER_KEPT: Duration = Duration::from_secs(30);

/// Keeps `topic`'s answer until `until`, in a map bounded as the topic caches are: rows
/// choose their topics.
fn remember_until(
    answers: &mut foldhash::HashMap<Arc<str>, Instant>,
    topic: &Arc<str>,
    until: Instant,
) {
    if answers.len() >= 10_000 {
        answers.clear();
    }
    answers.insert(topic.clone(), until);
}

/// A row for a missing topic when the relay already holds apart all it can.
fn too_much_waiting(topic: &str) -> ParkReason {
    ParkReason::Rejected(format!(
        "{UNKNOWN_TOPIC} `{topic}`, and the relay already holds apart {} topics or {} aggregates waiting for missing topics; create the topic, then replay the row",
        crate::waiting::MAX_WAITING_TOPICS,
        crate::waiting::MAX_HELD_AGGREGATES
    ))
}
/// While waiting for acks, how often to re-check (fatal errors, stall, drain deadline).
const STALLED_RECHECK: Duration = Duration::from_secs(1);
/// How long past the drain deadline the last mark may take before the relay exits anyway.
const FINAL_MARK_GRACE: Duration = Duration::from_secs(5);
/// After a fatal error, how long requests still in flight may take to report before they
/// are purged, and how long the purge's own reports may take.
const FATAL_REPORT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the Kafka producer: {0}; check the [kafka] settings")]
    Producer(#[source] rdkafka::error::KafkaError),
    #[error("relay.topic_template: {0}")]
    Template(#[from] crate::model::TemplateError),
    #[error("a background read or mark stopped unexpectedly: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl RelayError {
    pub fn is_retriable(&self) -> bool {
        match self {
            RelayError::Store(e) => e.is_retriable(),
            RelayError::Producer(_) | RelayError::Template(_) | RelayError::Task(_) => false,
        }
    }
}

/// What one tick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Nothing was pending.
    Idle,
    /// A batch was read and processed.
    Batch {
        /// The batch was full: more rows are probably waiting.
        full: bool,
        /// A permanent global error (unknown topic, authorization) held rows back.
        blocked: bool,
    },
    /// Shutdown was requested before the batch was produced.
    Stopped,
}

#[derive(Debug, Clone)]
enum Outcome {
    /// Not handed to the producer (held behind an earlier failure, or after a fatal error).
    NotSent,
    InFlight,
    Acked {
        partition: i32,
        offset: i64,
    },
    Failed,
    Parked,
}

/// What happened to each row of one batch, and to the producer while it was in flight.
struct Batch {
    outcomes: Vec<Outcome>,
    topics: Vec<Option<Arc<str>>>,
    /// The lease epoch each produced row was read under; marks are fenced by it.
    epochs: Vec<i64>,
    parkings: Vec<Parking>,
    error_kinds: HashMap<&'static str, u64>,
    /// A permanent global error held rows back (unknown topic, authorization).
    blocked: Option<String>,
    /// The producer hit a fatal error: rebuild it after this batch.
    fatal: bool,
    produced: u64,
    /// Rows handed to the producer whose delivery report has not arrived.
    outstanding: u64,
    /// Produced one record per request: a refusal concerns that row alone.
    isolating: bool,
    /// `relay.on_park = "hold"`: a row waits behind an earlier failure of its aggregate.
    hold: bool,
    /// Aggregates with a row of this batch that failed or was parked: under `hold`, a
    /// later row of theirs that the broker refuses waits rather than being parked too.
    failed_aggregates: foldhash::HashSet<String>,
    /// Rows refused as part of a record batch the broker rejected as a whole: they may be
    /// innocent, so they are sent again one record per request before anything is parked.
    refused_in_a_set: u64,
    /// Rows the broker refused on their own (parked).
    refused_alone: u64,
    /// A client-level error (authentication failing, say) arrived while rows were in
    /// flight.
    client_error: Option<String>,
    /// Template topics the broker does not know, with the reason and the position of a
    /// row that waits for each: only those rows wait.
    topic_refusals: Vec<(Arc<str>, String, usize)>,
}

impl Batch {
    fn new(rows: usize, isolating: bool, hold: bool) -> Self {
        Self {
            outcomes: vec![Outcome::NotSent; rows],
            topics: vec![None; rows],
            epochs: vec![0; rows],
            parkings: Vec::new(),
            error_kinds: HashMap::new(),
            blocked: None,
            fatal: false,
            produced: 0,
            outstanding: 0,
            isolating,
            hold,
            failed_aggregates: foldhash::HashSet::default(),
            refused_in_a_set: 0,
            refused_alone: 0,
            client_error: None,
            topic_refusals: Vec::new(),
        }
    }

    fn park(&mut self, pos: usize, row_id: i64, reason: &ParkReason) {
        self.outcomes[pos] = Outcome::Parked;
        self.parkings.push(parking(row_id, reason));
    }

    fn delivery_failed(&mut self, pos: usize, row: &OutboxRow, err: &rdkafka::error::KafkaError) {
        let (class, kind) = classify(err);
        *self.error_kinds.entry(kind).or_default() += 1;
        self.outcomes[pos] = Outcome::Failed;
        // Reports of one partition arrive in order, so an earlier row of the aggregate has
        // had its result; under `hold` only the first unsent row of an aggregate is parked.
        let behind_a_failure =
            self.hold && !self.failed_aggregates.insert(row.aggregate_id.clone());
        match row_class(class, err, row) {
            ErrorClass::PermanentRow if self.isolating || !refused_by_broker(kind) => {
                if behind_a_failure {
                    debug!(row_id = row.id, error = %err, "broker refused a row behind an earlier failure of its aggregate; it waits");
                    return;
                }
                warn!(row_id = row.id, error = %err, "broker refused the row on its own; parking it");
                self.refused_alone += 1;
                self.park(pos, row.id, &ParkReason::Rejected(err.to_string()));
            }
            ErrorClass::PermanentRow => {
                debug!(row_id = row.id, error = %err, "broker refused the row's record batch");
                self.refused_in_a_set += 1;
            }
            ErrorClass::PermanentGlobal => self.refused(pos, err),
            ErrorClass::FatalProducer => self.fatal = true,
            ErrorClass::Retriable | ErrorClass::Purged => {}
        }
    }

    /// A permanent refusal beyond the row: of its topic alone (its rows wait), or of
    /// everything (the relay backs off).
    fn refused(&mut self, pos: usize, err: &rdkafka::error::KafkaError) {
        match &self.topics[pos] {
            Some(topic) if is_unknown_topic(err) => {
                self.topic_refusals
                    .push((topic.clone(), err.to_string(), pos));
            }
            _ => self.blocked = Some(err.to_string()),
        }
    }
}

/// The one deadline of a shutdown: `drain_timeout` after cancellation was first seen.
/// Waiting for acks and retrying the last mark share it, so a stop never takes longer
/// than the drain timeout plus one statement.
#[derive(Debug, Clone)]
struct Drain {
    timeout: Duration,
    deadline: Arc<std::sync::OnceLock<Instant>>,
}

impl Drain {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            deadline: Arc::default(),
        }
    }

    /// Starts the drain (once) and returns its deadline.
    fn start(&self) -> Instant {
        *self.deadline.get_or_init(|| Instant::now() + self.timeout)
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }

    fn passed(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }
}

/// Room for every delivery report of a batch and the one read ahead, with some to spare
/// for client errors: the producer's thread blocks on a full channel rather than drop a
/// report, so it must never fill while the relay is not listening.
fn event_channel_capacity(settings: &RelaySettings) -> usize {
    settings.batch_size as usize * 2 + 1024
}

/// One replica's relay loop.
pub struct Relay {
    store: Store,
    writer: Writer,
    settings: RelaySettings,
    producer_properties: Vec<(String, String)>,
    /// Declared before the producer so that it is dropped first: a producer dropped
    /// later finds the channel closed instead of waiting for room in it.
    events: EventReceiver,
    producer: RowProducer,
    events_tx: EventSender,
    encoder: Encoder,
    topic_limits: TopicLimits,
    health: Arc<Health>,
    metrics: Metrics,
    topic_labels: TopicLabels,
    wake: Arc<Notify>,
    ownership: Arc<Ownership>,
    replica_id: String,
    /// The previous batch's mark, running while this batch is read and produced.
    pending_write: Option<PendingWrite>,
    /// The next batch, read while this one waited for its acks.
    prefetched: Option<Prefetch>,
    /// The broker refused a record batch: produce one record per request until the
    /// refused rows are sent or parked.
    isolating: bool,
    /// Between a fatal error that got nowhere and the next batch.
    fatal_backoff: Backoff,
    /// The record batch size librdkafka packs to with the configured properties.
    default_batch_bytes: usize,
    /// The producer's record batch size when a topic's limit is below librdkafka's own.
    batch_bytes_cap: Option<usize>,
    /// A smaller record batch size, to take effect before the next row is sent while
    /// nothing is in flight.
    smaller_batches_due: Option<usize>,
    /// The mean size of the last batch's rows, which sizes the next read.
    recent_row_bytes: usize,
    /// Template topics the broker does not know, whose rows wait while the others flow.
    waiting: WaitingTopics,
    /// Topics the cluster was found to know: rows for any other are not produced before
    /// it says whether it knows theirs (librdkafka would hold them, and the batch with
    /// them, for `topic.metadata.propagation.max.ms`, 30 s by default).
    known_topics: foldhash::HashSet<Arc<str>>,
    /// Topics the cluster could not be asked about, and when to ask again.
    unanswered_topics: foldhash::HashMap<Arc<str>, Instant>,
    /// Rows' own topics the cluster said it does not know, and until when that holds.
    unknown_row_topics: foldhash::HashMap<Arc<str>, Instant>,
    /// The cluster's topics, and when they were asked for.
    cluster_topics: Option<(Instant, Arc<ClusterTopics>)>,
    drain: Drain,
}

/// A batch whose every row was acknowledged, marked in the background.
struct PendingWrite {
    /// Its rows are still pending in the database until the mark commits: reads skip them.
    ids: Vec<i64>,
    settled: Settled,
    task: JoinHandle<Result<(u64, u64), RelayError>>,
}

/// Rows read ahead, and the shards they were read for: they are used only while this
/// replica still owns exactly those shards.
struct Prefetch {
    read: Read,
    shard_filter: Option<Vec<i16>>,
}

/// What becomes of an encoded row before the producer.
enum Cleared<'r> {
    Produce(EncodedRecord<'r>),
    /// Its topic does not exist yet: the row waits, and holds its aggregate.
    Waits,
}

/// The rows of one read, and how many it asked for: fewer means nothing more is pending.
struct Read {
    rows: Vec<OutboxRow>,
    asked: u32,
}

/// What a batch reports once its write is done.
struct Settled {
    read: usize,
    published_by_topic: foldhash::HashMap<Arc<str>, u64>,
    latencies: Vec<Duration>,
    started: Instant,
}

impl Relay {
    pub fn new(
        store: Store,
        settings: &Settings,
        health: Arc<Health>,
        metrics: Metrics,
        wake: Arc<Notify>,
        ownership: Arc<Ownership>,
    ) -> Result<Self, RelayError> {
        let (events_tx, events) = mpsc::channel(event_channel_capacity(&settings.relay));
        let producer_properties = settings.producer_properties();
        let producer = RowProducer::build(
            &producer_properties,
            1,
            events_tx.clone(),
            metrics.clone(),
            false,
            None,
        )
        .map_err(RelayError::Producer)?;
        let template = TopicTemplate::parse(&settings.relay.topic_template)?;
        let policy = settings.topic_policy()?;
        health.set_producer_ok(true);
        let drain = Drain::new(settings.relay.drain_timeout);
        let default_batch_bytes = librdkafka_batch_size(&producer_properties);
        let writer = Writer {
            store: store.clone(),
            replica_id: settings.replica_id(),
            mode: settings.relay.mode,
            drain: drain.clone(),
            health: health.clone(),
            ownership: ownership.clone(),
        };
        Ok(Self {
            store,
            writer,
            settings: settings.relay.clone(),
            topic_limits: TopicLimits::new(&producer_properties),
            producer_properties,
            producer,
            events_tx,
            events,
            encoder: Encoder::new(template, policy, settings.relay.max_message_bytes),
            health,
            metrics,
            topic_labels: TopicLabels::default(),
            wake,
            ownership,
            replica_id: settings.replica_id(),
            pending_write: None,
            prefetched: None,
            isolating: false,
            fatal_backoff: Backoff::new(Duration::from_secs(30)),
            default_batch_bytes,
            batch_bytes_cap: None,
            smaller_batches_due: None,
            recent_row_bytes: 1,
            waiting: WaitingTopics::default(),
            known_topics: foldhash::HashSet::default(),
            unanswered_topics: foldhash::HashMap::default(),
            unknown_row_topics: foldhash::HashMap::default(),
            cluster_topics: None,
            drain,
        })
    }

    /// Runs until `cancel`, then drains the batch in flight and returns. Database errors
    /// are retried with backoff; readiness is false meanwhile.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), RelayError> {
        let mut backoff = Backoff::new(Duration::from_secs(30));
        let mut blocked_backoff = Backoff::new(Duration::from_secs(60));
        while !cancel.is_cancelled() {
            self.health.loop_progress();
            let tick = self.tick(&cancel).await;
            self.health.loop_waiting();
            let waited = match tick {
                Ok(Tick::Batch { blocked: true, .. }) => {
                    let delay = blocked_backoff.next_delay();
                    tokio::select! {
                        _ = sleep(delay) => {}
                        _ = cancel.cancelled() => {}
                    }
                    Ok(())
                }
                Ok(Tick::Batch { full: true, .. }) => {
                    backoff.reset();
                    blocked_backoff.reset();
                    Ok(())
                }
                Ok(Tick::Batch { .. } | Tick::Idle) => {
                    backoff.reset();
                    blocked_backoff.reset();
                    self.wait_for_rows(&cancel).await
                }
                Ok(Tick::Stopped) => break,
                Err(err) => Err(err),
            };
            match waited {
                Ok(()) => {}
                Err(err) if err.is_retriable() => {
                    let delay = backoff.next_delay();
                    warn!(error = %err, retry_in = ?delay, "database unavailable; retrying");
                    tokio::select! {
                        _ = sleep(delay) => {}
                        _ = cancel.cancelled() => {}
                    }
                }
                Err(err) => {
                    if let Err(write_err) = self.settle().await {
                        warn!(error = %write_err, "the last batch's mark failed too; its rows stay pending and are sent again");
                    }
                    return Err(err);
                }
            }
        }
        // The last mark may run into the drain deadline, never much past it.
        let deadline = self.drain.start() + FINAL_MARK_GRACE;
        match tokio::time::timeout_at(deadline, self.settle()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) if !err.is_retriable() => return Err(err),
            Ok(Err(err)) => {
                warn!(error = %err, "the last batch could not be marked before exiting; its rows stay pending and are sent again");
            }
            Err(_) => {
                warn!(
                    "the last batch's mark did not finish by the drain deadline; its rows stay pending and are sent again"
                );
            }
        }
        info!("relay stopped");
        Ok(())
    }

    /// Reads, publishes and marks (or starts marking) one batch.
    async fn tick(&mut self, cancel: &CancellationToken) -> Result<Tick, RelayError> {
        let started = Instant::now();
        let releases = self.ownership.take_releases();
        if !releases.is_empty() {
            // Marks are fenced by the lease: finish ours before handing a shard over, so
            // nothing is in flight and nothing read ahead belongs to the other replica.
            self.prefetched = None;
            let released = match self.settle().await {
                Ok(()) => self
                    .store
                    .release_leases(&self.replica_id, &releases)
                    .await
                    .inspect_err(|e| database_failed(&self.health, e))
                    .map_err(RelayError::from),
                Err(err) => Err(err),
            };
            match released {
                Ok(released) => info!(shards = released, "released shards to other replicas"),
                Err(err) => {
                    // Keep renewing them until a release goes through.
                    self.ownership
                        .restore_releases(&releases, Instant::now() + self.settings.lease_ttl / 2);
                    return Err(err);
                }
            }
        }
        if !self.waiting.is_empty() {
            self.retry_waiting_topics(cancel).await;
        }
        let snapshot = self.ownership.snapshot();
        if snapshot.is_empty() {
            self.prefetched = None;
            self.settle().await?;
            return Ok(Tick::Idle);
        }
        let filter = snapshot.shard_filter();
        let Read { rows, asked } = match self.prefetched.take() {
            Some(ahead) if ahead.shard_filter == filter => ahead.read,
            _ => {
                let skip = self.pending_ids();
                self.read(filter.as_deref(), &skip)
                    .await
                    .inspect_err(|e| database_failed(&self.health, e))?
            }
        };
        self.health.set_database_ok(true);
        if rows.is_empty() {
            // A mark still running is reported by `wait_for_rows` when it commits; waiting
            // for it here would leave a doorbell unanswered while a slow mark waits.
            return Ok(Tick::Idle);
        }
        if cancel.is_cancelled() {
            return Ok(Tick::Stopped);
        }
        let span = tracing::info_span!(
            "batch",
            rows = rows.len(),
            first_id = rows[0].id,
            last_id = rows[rows.len() - 1].id
        );
        self.process_batch(rows, asked, &snapshot, filter, started, cancel)
            .instrument(span)
            .await
    }

    fn read(
        &mut self,
        shard_filter: Option<&[i16]>,
        skip: &[i64],
    ) -> impl Future<Output = Result<Read, StoreError>> + Send + 'static {
        let store = self.store.clone();
        let (limits, policy) = (self.read_limits(), self.settings.on_park);
        let shard_filter = shard_filter.map(<[i16]>::to_vec);
        let skip = skip.to_vec();
        let held = self.waiting.held_aggregates();
        async move {
            let rows = store
                .read_pending_except(limits, policy, shard_filter.as_deref(), &skip, &held)
                .await?;
            Ok(Read {
                rows,
                asked: limits.rows,
            })
        }
    }

    /// A read asks for as many rows as fit `batch_max_bytes` at the size of the last
    /// batch's rows (at most `batch_size`): the server sends every row a read asks for,
    /// even those past the byte budget, which the read then skips.
    fn read_limits(&self) -> ReadLimits {
        let fit = self.settings.batch_max_bytes / self.recent_row_bytes.max(1) + 1;
        ReadLimits {
            rows: u32::try_from(fit)
                .unwrap_or(u32::MAX)
                .clamp(1, self.settings.batch_size),
            batch_bytes: self.settings.batch_max_bytes,
            row_bytes: self.settings.max_message_bytes,
        }
    }

    /// Ids of the batch whose mark is still running: pending in the database, but sent.
    /// Topics the broker refused in this batch wait (and hold the aggregates of their
    /// rows); topics it acknowledged records of wait no more.
    fn note_waiting_topics(&mut self, rows: &[OutboxRow], batch: &mut Batch, settled: &Settled) {
        let now = std::time::Instant::now();
        for topic in settled.published_by_topic.keys() {
            self.waiting.accepted(topic);
        }
        for (topic, reason, pos) in std::mem::take(&mut batch.topic_refusals) {
            self.known_topics.remove(&topic);
            let full = self.waiting.refused(&topic, &reason, now) == Hold::Full
                || self.waiting.hold_row(&topic, rows[pos].aggregate_hash) == Hold::Full;
            if full {
                batch.park(pos, rows[pos].id, &too_much_waiting(&topic));
            }
        }
        self.publish_waiting_topics();
    }

    /// Waiting topics whose retry is due (a few per tick, so that a tick stays short
    /// however many wait): asked about again, released if the cluster knows them now.
    async fn retry_waiting_topics(&mut self, cancel: &CancellationToken) {
        let now = std::time::Instant::now();
        for topic in self.waiting.due(now, TOPIC_QUESTIONS_PER_TICK) {
            if cancel.is_cancelled() {
                break;
            }
            let answer = self.ask_cluster_about(&topic).await;
            self.health.loop_progress();
            match answer {
                TopicAnswer::Known | TopicAnswer::Refused(_) => {
                    self.waiting.accepted(&topic);
                    self.remember_known_topic(&topic);
                }
                TopicAnswer::Unknown => self.waiting.still_unknown(&topic, UNKNOWN_TOPIC, now),
                TopicAnswer::Unanswered(why) => {
                    self.waiting
                        .still_unknown(&topic, &format!("{UNANSWERED_TOPIC}: {why}"), now)
                }
            }
        }
        self.publish_waiting_topics();
    }

    /// Whether the cluster says it does not know `topic`. A topic known to exist is not
    /// asked about again, nor for a while one the cluster could not be asked about: the
    /// brokers are down or refuse the relay, and producing decides and reports that.
    async fn cluster_lacks(&mut self, topic: &Arc<str>) -> bool {
        let now = Instant::now();
        if self.known_topics.contains(topic)
            || self
                .unanswered_topics
                .get(topic)
                .is_some_and(|reask| now < *reask)
        {
            return false;
        }
        let answer = self.ask_cluster_about(topic).await;
        self.health.loop_progress();
        match answer {
            TopicAnswer::Known | TopicAnswer::Refused(_) => {
                self.remember_known_topic(topic);
                false
            }
            TopicAnswer::Unknown => true,
            TopicAnswer::Unanswered(why) => {
                debug!(%topic, %why, "{UNANSWERED_TOPIC}; producing decides");
                remember_until(&mut self.unanswered_topics, topic, now + TOPIC_ANSWER_KEPT);
                false
            }
        }
    }

    /// The cluster knows `topic` (or producing will tell): rows go to it without asking.
    fn remember_known_topic(&mut self, topic: &Arc<str>) {
        if self.known_topics.len() >= 10_000 {
            self.known_topics.clear();
        }
        self.known_topics.insert(topic.clone());
    }

    /// What stands between an encoded row and the producer: its topic must exist (a row's
    /// own missing topic parks it; a template topic's rows wait), and the row must fit the
    /// topic's size limit (learnt only for a topic that exists: a request per topic).
    async fn clear_for_producing<'r>(
        &mut self,
        row: &OutboxRow,
        record: EncodedRecord<'r>,
    ) -> Result<Cleared<'r>, ParkReason> {
        if row.topic.is_some() {
            // A row's own topic the cluster does not know: the row is parked at once, and
            // the answer kept for a while for the rows naming it after.
            let said_lately = self
                .unknown_row_topics
                .get(&record.topic)
                .is_some_and(|until| Instant::now() < *until);
            if said_lately || self.cluster_lacks(&record.topic).await {
                if !said_lately {
                    let until = Instant::now() + TOPIC_ANSWER_KEPT;
                    remember_until(&mut self.unknown_row_topics, &record.topic, until);
                }
                return Err(ParkReason::Rejected(format!(
                    "{UNKNOWN_TOPIC} `{}` named by the row",
                    record.topic
                )));
            }
        } else if !self.waiting.holds(&record.topic) && self.cluster_lacks(&record.topic).await {
            // A template topic the cluster does not know: its rows wait, the others flow.
            let now = std::time::Instant::now();
            let hold = self.waiting.refused(&record.topic, UNKNOWN_TOPIC, now);
            self.publish_waiting_topics();
            if hold == Hold::Full {
                // Rows choose their topics: past the cap, a row for yet another missing
                // topic is parked rather than every other topic stopped.
                return Err(too_much_waiting(&record.topic));
            }
        }
        if self.waiting.holds(&record.topic) {
            if self.waiting.hold_row(&record.topic, row.aggregate_hash) == Hold::Full {
                return Err(too_much_waiting(&record.topic));
            }
            return Ok(Cleared::Waits);
        }
        self.check_topic_limit(record).await.map(Cleared::Produce)
    }

    fn publish_waiting_topics(&self) {
        let (shown, total) = self.waiting.summary();
        self.health.set_waiting_topics(shown, total);
    }

    /// What the cluster says of `topic`, from its list of topics, asked for at most once
    /// per [`CLUSTER_TOPICS_FRESH`].
    async fn ask_cluster_about(&mut self, topic: &Arc<str>) -> TopicAnswer {
        let fresh = self
            .cluster_topics
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < CLUSTER_TOPICS_FRESH);
        if !fresh {
            let producer = self.producer.handle();
            let answer = tokio::task::spawn_blocking(move || {
                producer.cluster_topics(TOPIC_QUESTION_TIMEOUT)
            })
            .await
            .unwrap_or_else(|err| Err(err.to_string()));
            match answer {
                Ok(topics) => self.cluster_topics = Some((Instant::now(), Arc::new(topics))),
                Err(why) => {
                    self.cluster_topics = None;
                    return TopicAnswer::Unanswered(why);
                }
            }
        }
        match &self.cluster_topics {
            Some((_, topics)) => topics.about(topic),
            None => TopicAnswer::Unanswered("no answer".into()),
        }
    }

    fn pending_ids(&self) -> Vec<i64> {
        self.pending_write
            .as_ref()
            .map(|p| p.ids.clone())
            .unwrap_or_default()
    }

    async fn process_batch(
        &mut self,
        rows: Vec<OutboxRow>,
        asked: u32,
        snapshot: &Snapshot,
        shard_filter: Option<Vec<i16>>,
        started: Instant,
        cancel: &CancellationToken,
    ) -> Result<Tick, RelayError> {
        // Full by rows or by bytes: more rows are probably waiting.
        let bytes: usize = rows.iter().map(OutboxRow::approximate_bytes).sum();
        self.recent_row_bytes = bytes / rows.len().max(1);
        let full = rows.len() >= asked as usize || bytes >= self.settings.batch_max_bytes;
        let hold = self.settings.on_park == ParkPolicy::Hold;
        // A full batch means a backlog: read the next batch while this one is produced and
        // its acks arrive. It skips this batch and the one being marked, exactly, by id.
        let read_ahead = self.settings.pipeline && full && !cancel.is_cancelled();
        // Its own task: a read polled inside this task's ack wait (tokio::join!) was seen to
        // stall for good after its response had arrived.
        let read = read_ahead.then(|| {
            let mut skip = self.pending_ids();
            skip.extend(rows.iter().map(|r| r.id));
            let read = self.read(shard_filter.as_deref(), &skip);
            self.metrics.spawn(read)
        });
        let mut batch = Batch::new(rows.len(), self.isolating, hold);
        self.produce_batch(&rows, snapshot, &mut batch, cancel)
            .await;

        self.collect_acks(&rows, &mut batch, cancel).await;
        let ahead = match read {
            Some(read) => match read.await {
                Ok(Ok(next_rows)) => Some(next_rows),
                Ok(Err(err)) => {
                    debug!(error = %err, "reading ahead failed; reading again");
                    None
                }
                Err(join_error) => return Err(RelayError::Task(join_error)),
            },
            None => None,
        };

        // Decide what may be marked: an acked row whose earlier rows of the same aggregate
        // in this batch were all acked (or parked under `skip`).
        let mut broken = foldhash::HashSet::<&str>::default();
        let mut acks: Vec<Ack> = Vec::with_capacity(rows.len());
        let mut settled = Settled {
            read: rows.len(),
            published_by_topic: foldhash::HashMap::default(),
            latencies: Vec::with_capacity(rows.len()),
            started,
        };
        let now = Utc::now();
        for (i, row) in rows.iter().enumerate() {
            match batch.outcomes[i] {
                Outcome::Acked { partition, offset } => {
                    if let Some(topic) = &batch.topics[i] {
                        match settled.published_by_topic.get_mut(topic) {
                            Some(rows) => *rows += 1,
                            None => {
                                settled.published_by_topic.insert(topic.clone(), 1);
                            }
                        }
                    }
                    settled
                        .latencies
                        .push((now - row.created_at).to_std().unwrap_or_default());
                    if !broken.contains(row.aggregate_id.as_str()) {
                        acks.push(Ack {
                            id: row.id,
                            partition,
                            offset,
                            shard: row.shard,
                            epoch: batch.epochs[i],
                        });
                    }
                }
                Outcome::Parked if !hold => {}
                Outcome::Parked | Outcome::NotSent | Outcome::InFlight | Outcome::Failed => {
                    broken.insert(&row.aggregate_id);
                }
            }
        }

        self.note_waiting_topics(&rows, &mut batch, &settled);

        // Marks go in batch order: the previous batch's first.
        self.settle().await?;
        emit(PublishErrors(&batch.error_kinds));
        // Every row acknowledged: nothing of this batch can be sent again before the rows
        // read after it, so its mark may run while the next batch is produced. Any failure
        // or parking ends the pipeline, and the rows read ahead (which may hold later rows
        // of a broken aggregate) are dropped.
        let clean = acks.len() == rows.len() && !batch.fatal && batch.blocked.is_none();
        let any_acked = !acks.is_empty();
        if self.settings.pipeline && clean && !cancel.is_cancelled() {
            let ids = acks.iter().map(|a| a.id).collect();
            let (writer, cancel) = (self.writer.clone(), cancel.clone());
            let task = self
                .metrics
                .spawn(async move { writer.write(&[], &acks, &cancel).await });
            self.pending_write = Some(PendingWrite { ids, settled, task });
            self.prefetched = ahead.map(|read| Prefetch { read, shard_filter });
        } else {
            let (parked, marked) = self.writer.write(&batch.parkings, &acks, cancel).await?;
            self.report(settled, parked, marked);
        }

        match &batch.blocked {
            Some(reason) => {
                error!(%reason, "publishing blocked by a permanent broker error; create the topic or fix the grants, the relay retries slowly");
                self.health.set_blocked(true);
            }
            None if any_acked => self.health.set_blocked(false),
            None => {}
        }
        self.after_producer_trouble(&batch, cancel).await?;
        Ok(Tick::Batch {
            // A batch whose rows all waited for topics is full too: the next read leaves
            // them out and goes on to the rows behind them.
            full,
            blocked: batch.blocked.is_some(),
        })
    }

    /// Waits for the doorbell, the poll interval or shutdown. A mark still running in the
    /// background is reported as soon as it commits, not when the next batch is read.
    async fn wait_for_rows(&mut self, cancel: &CancellationToken) -> Result<(), RelayError> {
        let until = Instant::now() + self.settings.poll_interval;
        if let Some(pending) = self.pending_write.as_mut() {
            let written = tokio::select! {
                written = &mut pending.task => Some(written),
                _ = self.wake.notified() => None,
                _ = sleep_until(until) => None,
                _ = cancel.cancelled() => None,
            };
            // Woken before the mark committed: it stays pending, and the next read skips
            // its rows.
            let Some(written) = written else {
                return Ok(());
            };
            if let Some(pending) = self.pending_write.take() {
                let (parked, marked) = written.map_err(RelayError::Task)??;
                self.report(pending.settled, parked, marked);
            }
        }
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = sleep_until(until) => {}
            _ = cancel.cancelled() => {}
        }
        Ok(())
    }

    /// Waits for the background mark, if any, and reports its batch.
    async fn settle(&mut self) -> Result<(), RelayError> {
        let Some(pending) = self.pending_write.take() else {
            return Ok(());
        };
        let (parked, marked) = pending.task.await.map_err(RelayError::Task)??;
        self.report(pending.settled, parked, marked);
        Ok(())
    }

    fn report(&self, settled: Settled, parked: u64, marked: u64) {
        emit(BatchFinished {
            read: settled.read,
            published_by_topic: &settled.published_by_topic,
            topic_labels: &self.topic_labels,
            marked,
            parked,
            mode: match self.settings.mode {
                Mode::Mark => "mark",
                Mode::Delete => "delete",
            },
            latencies: &settled.latencies,
            duration: settled.started.elapsed(),
        });
        self.health.batch_done();
    }

    /// Encodes and hands the rows to the producer in id order. A row that cannot be
    /// encoded is parked; a row refused for a reason that may pass holds the rest of its
    /// aggregate back to the next batch.
    async fn produce_batch(
        &mut self,
        rows: &[OutboxRow],
        snapshot: &Snapshot,
        batch: &mut Batch,
        cancel: &CancellationToken,
    ) {
        let hold = self.settings.on_park == ParkPolicy::Hold;
        let mut held = foldhash::HashSet::<&str>::default();
        self.discard_stale_events();
        'rows: for (i, row) in rows.iter().enumerate() {
            if batch.fatal {
                break;
            }
            if held.contains(row.aggregate_id.as_str()) {
                continue;
            }
            // Stop producing for a shard before its lease can expire in the database.
            let Some(epoch) = snapshot.producible(row.shard, Instant::now()) else {
                held.insert(&row.aggregate_id);
                continue;
            };
            batch.epochs[i] = epoch;
            let cleared = match self.encoder.encode(row) {
                Ok(record) => self.clear_for_producing(row, record).await,
                Err(reason) => Err(reason),
            };
            let record = match cleared {
                Ok(Cleared::Produce(record)) => record,
                Ok(Cleared::Waits) => {
                    held.insert(&row.aggregate_id);
                    continue;
                }
                Err(reason) => {
                    batch.park(i, row.id, &reason);
                    if hold {
                        held.insert(&row.aggregate_id);
                    }
                    continue;
                }
            };
            if batch.produced == 0 {
                self.pack_smaller_batches_if_due().await;
            }
            let mut queue_full_since: Option<Instant> = None;
            loop {
                match self.producer.send(row.id, &record) {
                    Ok(()) => {
                        batch.outcomes[i] = Outcome::InFlight;
                        batch.produced += 1;
                        batch.outstanding += 1;
                        break;
                    }
                    Err(err) => {
                        let (class, kind) = classify(&err);
                        if kind == "queue_full" {
                            let since = *queue_full_since.get_or_insert_with(Instant::now);
                            if !self.wait_for_queue_space(rows, batch, since, cancel).await {
                                break 'rows;
                            }
                            // The lease may run out while the queue stays full.
                            if snapshot.producible(row.shard, Instant::now()).is_none() {
                                held.insert(&row.aggregate_id);
                                break;
                            }
                            continue;
                        }
                        *batch.error_kinds.entry(kind).or_default() += 1;
                        match row_class(class, &err, row) {
                            ErrorClass::PermanentRow => {
                                batch.park(i, row.id, &ParkReason::Rejected(err.to_string()));
                                if hold {
                                    held.insert(&row.aggregate_id);
                                }
                            }
                            ErrorClass::FatalProducer => batch.fatal = true,
                            ErrorClass::PermanentGlobal if is_unknown_topic(&err) => {
                                batch.topic_refusals.push((
                                    record.topic.clone(),
                                    err.to_string(),
                                    i,
                                ));
                                held.insert(&row.aggregate_id);
                            }
                            ErrorClass::PermanentGlobal => {
                                batch.blocked = Some(err.to_string());
                                held.insert(&row.aggregate_id);
                            }
                            ErrorClass::Retriable | ErrorClass::Purged => {
                                warn!(error = %err, kind, "produce refused; the row will be retried");
                                held.insert(&row.aggregate_id);
                            }
                        }
                        break;
                    }
                }
            }
            batch.topics[i] = Some(record.topic);
        }
        if batch.produced > 0 {
            self.producer.send_queued_now();
        }
    }

    /// While nothing is in flight (before a batch's first row is sent): if a topic's
    /// `max.message.bytes` learnt meanwhile is below the size librdkafka packs record
    /// batches to, the producer is rebuilt to pack them smaller, so the broker never
    /// refuses a batch for its size. A limit learnt in the middle of a batch applies from
    /// the next one; a batch refused meanwhile goes one record per request.
    async fn pack_smaller_batches_if_due(&mut self) {
        let Some(cap) = self.smaller_batches_due.take() else {
            return;
        };
        info!(
            batch_bytes = cap,
            "a topic's max.message.bytes is below the producer's record batch size; packing record batches smaller"
        );
        let previous = self.batch_bytes_cap.replace(cap);
        if let Err(err) = self.rebuild_producer(false).await {
            self.batch_bytes_cap = previous;
            warn!(error = %err, "cannot rebuild the producer for a topic's smaller size limit; batches the broker refuses go one record per request");
        }
    }

    /// Refuses a record larger than its topic's `max.message.bytes`, which the broker
    /// would otherwise reject together with every record batched with it.
    async fn check_topic_limit<'a>(
        &mut self,
        record: EncodedRecord<'a>,
    ) -> Result<EncodedRecord<'a>, ParkReason> {
        let Some(limit) = self.topic_limits.limit(&record.topic).await else {
            return Ok(record);
        };
        let cap = record_batch_cap(limit);
        if cap < self.batch_bytes_cap.unwrap_or(self.default_batch_bytes)
            && self.smaller_batches_due.is_none_or(|due| cap < due)
        {
            self.smaller_batches_due = Some(cap);
        }
        // The broker counts the record batch around a lone record too.
        let bytes = record.bytes + RECORD_BATCH_OVERHEAD_BYTES;
        if bytes > limit {
            return Err(ParkReason::TooLarge {
                bytes,
                limit,
                limit_name: "the topic's max.message.bytes",
            });
        }
        Ok(record)
    }

    /// Waits for the delivery reports of the rows in flight until every one has arrived.
    /// After a fatal error the reports still come (the refused rows' and those of requests
    /// in flight); what has not reported within [`FATAL_REPORT_GRACE`] is purged, which
    /// reports it too. On shutdown, waits until the drain deadline at most.
    async fn collect_acks(
        &mut self,
        rows: &[OutboxRow],
        batch: &mut Batch,
        cancel: &CancellationToken,
    ) {
        let generation = self.producer.generation();
        let mut last_progress = Instant::now();
        let mut fatal_since: Option<Instant> = None;
        let mut purged_at: Option<Instant> = None;
        self.health.set_in_flight(batch.outstanding);

        while batch.outstanding > 0 {
            // Wake at least every STALLED_RECHECK: to check for a fatal error, and so the
            // watchdog sees a loop that waits for acks, not one that is wedged.
            self.health.loop_progress();
            let now = Instant::now();
            let mut wake_at = if self.health.stalled() {
                now + STALLED_RECHECK
            } else {
                (last_progress + self.settings.stall_after).min(now + STALLED_RECHECK)
            };
            if batch.fatal {
                let since = *fatal_since.get_or_insert(now);
                match purged_at {
                    None if now >= since + FATAL_REPORT_GRACE => {
                        warn!(
                            outstanding = batch.outstanding,
                            "purging the rows still in flight after the fatal error; they are sent again"
                        );
                        self.producer.purge_all();
                        purged_at = Some(now);
                    }
                    Some(at) if now >= at + FATAL_REPORT_GRACE => {
                        warn!(
                            outstanding = batch.outstanding,
                            "delivery reports still missing after the purge; those rows stay pending and are sent again"
                        );
                        break;
                    }
                    _ => {}
                }
                wake_at = wake_at.min(purged_at.unwrap_or(since) + FATAL_REPORT_GRACE);
            }
            if let Some(deadline) = self.drain.deadline() {
                wake_at = wake_at.min(deadline);
            }
            tokio::select! {
                event = self.events.recv() => {
                    let acked_any = self.apply_burst(event, generation, rows, batch);
                    if acked_any {
                        last_progress = Instant::now();
                        self.health.set_stalled(false);
                    }
                    if let Some(reason) = batch.client_error.take() {
                        error!(%reason, "the Kafka client reports an error that holds rows back; fix the credentials or grants, librdkafka keeps retrying");
                        self.health.set_blocked(true);
                    }
                }
                _ = cancel.cancelled(), if self.drain.deadline().is_none() => {
                    let deadline = self.drain.start();
                    info!(outstanding = batch.outstanding, timeout = ?deadline.saturating_duration_since(Instant::now()), "draining: waiting for acknowledgements");
                }
                _ = sleep_until(wake_at) => {
                    if self.drain.passed() {
                        warn!(outstanding = batch.outstanding, "drain deadline passed; unacknowledged rows stay pending and will be sent again");
                        break;
                    }
                    self.notice_fatal_error(batch);
                    if last_progress.elapsed() >= self.settings.stall_after && !self.health.stalled() {
                        warn!(outstanding = batch.outstanding, waited = ?last_progress.elapsed(), "stalled: the broker has not acknowledged anything; librdkafka keeps retrying");
                        self.health.set_stalled(true);
                    }
                }
            }
            self.health.set_in_flight(batch.outstanding);
        }
        self.health.set_in_flight(0);
        // Asked once every report is in too: the error callback may have said nothing.
        self.notice_fatal_error(batch);
    }

    /// Marks the batch fatal when the producer has raised a fatal error. rust-rdkafka
    /// hands a fatal error to the error callback under its underlying code (the gap-less
    /// guarantee, say), so the producer itself is asked.
    fn notice_fatal_error(&self, batch: &mut Batch) {
        if batch.fatal {
            return;
        }
        if let Some(reason) = self.producer.fatal_error() {
            error!(%reason, "fatal producer error; collecting the reports in flight, then rebuilding the producer");
            batch.fatal = true;
        }
    }

    /// Applies `first` and every report already queued behind it, in one go: one wake-up,
    /// clock read and timer per burst of acks, not per row. Returns whether a row got its
    /// result.
    fn apply_burst(
        &mut self,
        first: Option<ProducerEvent>,
        generation: u64,
        rows: &[OutboxRow],
        batch: &mut Batch,
    ) -> bool {
        let mut next = first;
        let mut acked_any = false;
        while let Some(event) = next {
            acked_any |= apply_event(event, generation, rows, batch);
            if batch.outstanding == 0 {
                break;
            }
            next = self.events.try_recv().ok();
        }
        acked_any
    }

    /// librdkafka's queue is full: waits a moment for delivery reports to free room,
    /// applying them. Returns false when the rest of the batch must not be produced:
    /// shutdown, or a fatal error. The stall alarm rises when the queue stays full for
    /// `stall_after`.
    async fn wait_for_queue_space(
        &mut self,
        rows: &[OutboxRow],
        batch: &mut Batch,
        full_since: Instant,
        cancel: &CancellationToken,
    ) -> bool {
        if cancel.is_cancelled() || batch.fatal {
            return false;
        }
        let generation = self.producer.generation();
        tokio::select! {
            event = self.events.recv() => {
                if self.apply_burst(event, generation, rows, batch) {
                    self.health.set_stalled(false);
                }
            }
            _ = sleep(QUEUE_FULL_WAIT) => {}
            _ = cancel.cancelled() => return false,
        }
        self.health.loop_progress();
        self.notice_fatal_error(batch);
        if full_since.elapsed() >= self.settings.stall_after && !self.health.stalled() {
            warn!(waited = ?full_since.elapsed(), "stalled: librdkafka's queue has stayed full; the broker is not acknowledging");
            self.health.set_stalled(true);
        }
        !batch.fatal
    }

    /// Drops every event left from an earlier batch or an idle spell: reports of rows no
    /// longer in flight and client errors that concern no row of the next batch.
    fn discard_stale_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            if let ProducerEvent::Global { kind, reason, .. } = event {
                debug!(kind, %reason, "client error while no row was in flight");
            }
        }
    }

    /// Once a batch is settled: a record batch the broker refused as a whole switches to
    /// one record per request, so that only a row refused on its own is parked; a batch
    /// so produced without a fatal error switches back. A fatal error rebuilds the
    /// producer, once, and waits with backoff before the next batch unless the batch got
    /// somewhere (a row acked, or a refused row parked).
    async fn after_producer_trouble(
        &mut self,
        batch: &Batch,
        cancel: &CancellationToken,
    ) -> Result<(), RelayError> {
        let isolate = if batch.refused_in_a_set > 0 {
            self.health.record_batch_refused();
            if !self.isolating {
                warn!(
                    rows = batch.refused_in_a_set,
                    "the broker refused a record batch; sending one record per request until the refused rows are sent or parked"
                );
            }
            true
        } else if batch.isolating && !batch.fatal {
            false
        } else {
            self.isolating
        };
        if !batch.fatal && isolate == self.isolating {
            self.fatal_backoff.reset();
            return Ok(());
        }
        self.isolating = isolate;
        self.rebuild_producer(batch.fatal).await?;
        if !batch.fatal {
            if !isolate {
                info!("back to batching records after the refused rows were settled");
            }
            return Ok(());
        }
        let progressed = batch
            .outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Acked { .. }))
            || batch.refused_alone > 0;
        if progressed {
            self.fatal_backoff.reset();
        } else {
            let delay = self.fatal_backoff.next_delay();
            tokio::select! {
                _ = sleep(delay) => {}
                _ = cancel.cancelled() => {}
            }
        }
        Ok(())
    }

    /// Replaces the producer by one of the next generation (one record per request while
    /// isolating refused rows). `after_fatal` counts it as a rebuild.
    async fn rebuild_producer(&mut self, after_fatal: bool) -> Result<(), RelayError> {
        self.health.set_producer_ok(false);
        let generation = self.producer.generation() + 1;
        let replacement = match RowProducer::build(
            &self.producer_properties,
            generation,
            self.events_tx.clone(),
            self.metrics.clone(),
            self.isolating,
            self.batch_bytes_cap,
        ) {
            Ok(producer) => producer,
            Err(err) => {
                // The producer in place goes on.
                self.health.set_producer_ok(true);
                return Err(RelayError::Producer(err));
            }
        };
        let old = std::mem::replace(&mut self.producer, replacement);
        // Dropping purges and briefly flushes: keep that off the async threads, and keep
        // taking events meanwhile so that the bounded channel never holds the drop up.
        let dropping = tokio::task::spawn_blocking(move || drop(old));
        tokio::pin!(dropping);
        loop {
            tokio::select! {
                _ = &mut dropping => break,
                _ = self.events.recv() => {}
            }
        }
        if after_fatal {
            self.health.producer_rebuilt();
            warn!(
                generation,
                "producer rebuilt; unmarked rows will be sent again"
            );
        }
        self.health.set_producer_ok(true);
        Ok(())
    }
}

/// Parks and marks (or deletes) batches. Cloned into the background task that marks a
/// pipelined batch.
#[derive(Clone)]
struct Writer {
    store: Store,
    replica_id: String,
    mode: Mode,
    drain: Drain,
    health: Arc<Health>,
    ownership: Arc<Ownership>,
}

impl Writer {
    /// Parks and marks (or deletes) one batch, retrying while the database is away. If
    /// shutdown interrupts the retries, the acked rows stay pending and are sent again.
    /// Returns the rows parked and marked.
    async fn write(
        &self,
        parkings: &[Parking],
        acks: &[Ack],
        cancel: &CancellationToken,
    ) -> Result<(u64, u64), RelayError> {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let mut parked: Option<Vec<i64>> = None;
        loop {
            let result = async {
                if parked.is_none() {
                    parked = Some(self.store.park(parkings).await?);
                }
                match self.mode {
                    Mode::Mark => self.store.mark_sent(&self.replica_id, acks).await,
                    Mode::Delete => self.store.delete_sent(&self.replica_id, acks).await,
                }
            }
            .await;
            match result {
                Ok(marked) => {
                    self.health.set_database_ok(true);
                    if marked < acks.len() as u64 {
                        self.count_fenced(acks).await;
                    }
                    let parked = parked.unwrap_or_default();
                    report_parked(parkings, &parked);
                    return Ok((parked.len() as u64, marked));
                }
                Err(err) if err.is_retriable() => {
                    database_failed(&self.health, &err);
                    if cancel.is_cancelled() {
                        self.drain.start();
                    }
                    if self.drain.passed() {
                        return Err(err.into());
                    }
                    let delay = backoff.next_delay();
                    warn!(error = %err, rows = acks.len(), retry_in = ?delay, "marking failed; retrying");
                    let mut until = Instant::now() + delay;
                    if let Some(deadline) = self.drain.deadline() {
                        until = until.min(deadline);
                    }
                    tokio::select! {
                        _ = sleep_until(until) => {}
                        _ = cancel.cancelled() => {
                            self.drain.start();
                        }
                    }
                    self.health.loop_progress();
                }
                Err(err) => {
                    database_failed(&self.health, &err);
                    return Err(err.into());
                }
            }
        }
    }

    /// Some acknowledged rows were not marked. A row is fenced when the lease it was read
    /// under is no longer this replica's; a row whose lease is still held was marked by an
    /// earlier attempt of the same statement that committed but whose answer was lost.
    /// Stops producing for every lost shard instead of republishing until the next renewal
    /// notices.
    async fn count_fenced(&self, acks: &[Ack]) {
        let held = crate::store::leases_of(acks);
        let still = match self.store.still_held(&self.replica_id, &held).await {
            Ok(still) => still,
            Err(err) => {
                database_failed(&self.health, &err);
                return;
            }
        };
        let fenced = acks
            .iter()
            .filter(|a| !still.contains(&(a.shard, a.epoch)))
            .count() as u64;
        if fenced == 0 {
            return;
        }
        emit(RowsFenced { rows: fenced });
        let lost: std::collections::BTreeSet<i16> = held
            .iter()
            .filter(|pair| !still.contains(pair))
            .map(|(shard, _)| *shard)
            .collect();
        warn!(
            shards = lost.len(),
            "leases lost to another replica; no longer producing for them"
        );
        self.ownership.forget(&lost);
    }
}

/// Counts and logs the parkings the database carried out, by reason.
fn report_parked(parkings: &[Parking], parked_ids: &[i64]) {
    for p in parkings.iter().filter(|p| parked_ids.contains(&p.id)) {
        emit(RowParked {
            row_id: p.id,
            reason: p.reason,
            error: &p.error,
        });
    }
}

fn database_failed(health: &Health, err: &StoreError) {
    emit(DatabaseError {
        kind: err.kind(),
        error: err,
        while_doing: "relaying",
    });
    if err.is_retriable() {
        health.set_database_ok(false);
    }
}

/// Applies one producer report to the batch in flight. Returns whether a row of this batch
/// got its delivery result. Reports of an earlier producer generation are dropped. A fatal
/// error does not end the batch's reports: librdkafka raises it before the reports of the
/// refused record batch, and requests in flight still report, so the caller keeps
/// collecting until every row produced has its result.
fn apply_event(
    event: ProducerEvent,
    generation: u64,
    rows: &[OutboxRow],
    batch: &mut Batch,
) -> bool {
    match event {
        ProducerEvent::Delivered {
            generation: g,
            row_id,
            result,
        } if g == generation => {
            let Ok(pos) = rows.binary_search_by_key(&row_id, |r| r.id) else {
                return false;
            };
            if !matches!(batch.outcomes[pos], Outcome::InFlight) {
                return false;
            }
            batch.outstanding -= 1;
            match result {
                Ok((partition, offset)) => {
                    batch.outcomes[pos] = Outcome::Acked { partition, offset }
                }
                Err(err) => batch.delivery_failed(pos, &rows[pos], &err),
            }
            true
        }
        ProducerEvent::Fatal {
            generation: g,
            reason,
        } if g == generation => {
            if !batch.fatal {
                error!(%reason, "fatal producer error; collecting the reports in flight, then rebuilding the producer");
            }
            batch.fatal = true;
            false
        }
        ProducerEvent::Global {
            generation: g,
            kind,
            reason,
        } if g == generation => {
            // A connection-level error (one broker failing authentication, say) does not
            // cut the batch: the partitions of healthy brokers go on. It is counted now,
            // and readiness is false until a batch is fully acknowledged.
            emit(ProducerClientError {
                kind,
                reason: &reason,
            });
            batch.client_error = Some(reason);
            false
        }
        // A report from a producer already torn down.
        _ => false,
    }
}

/// The record batch size that keeps a batch within a topic's `max.message.bytes`: room for
/// the batch header and for compression that does not shrink (librdkafka measures the
/// batch before compressing it).
fn record_batch_cap(topic_limit: usize) -> usize {
    if topic_limit > 4096 {
        topic_limit - topic_limit / 64 - 1024
    } else {
        (topic_limit / 2).max(1)
    }
}

/// The record batch size librdkafka packs to with these properties: `batch.size` (1 MB
/// by default), never more than `message.max.bytes`.
fn librdkafka_batch_size(properties: &[(String, String)]) -> usize {
    let get = |name: &str| {
        properties
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let batch = get("batch.size").unwrap_or(1_000_000);
    get("message.max.bytes").map_or(batch, |max| batch.min(max))
}

/// A refusal the broker makes of a whole record batch, which may hold innocent rows.
fn refused_by_broker(kind: &str) -> bool {
    matches!(kind, "message_too_large" | "invalid_record")
}

/// A missing topic is the row's own problem when the row named it, everyone's otherwise;
/// authorization and authentication failures are everyone's whatever the row says.
/// A topic the row named itself that does not exist or that the relay may not write is
/// the row's problem (parked); the template's topic is the relay's (its rows wait).
fn row_class(class: ErrorClass, err: &rdkafka::error::KafkaError, row: &OutboxRow) -> ErrorClass {
    if class == ErrorClass::PermanentGlobal && is_topic_refusal(err) && row.topic.is_some() {
        ErrorClass::PermanentRow
    } else {
        class
    }
}

/// The broker does not know the topic (not created yet): only its rows wait. An
/// authorization refusal stays global: the relay's grants are one decision.
fn is_unknown_topic(err: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        err,
        rdkafka::error::KafkaError::MessageProduction(
            C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition
        )
    )
}

/// The broker refuses one topic: it does not know it, or the relay's principal may not
/// write it.
fn is_topic_refusal(err: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        err,
        rdkafka::error::KafkaError::MessageProduction(
            C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::UnknownPartition
                | C::TopicAuthorizationFailed
        )
    )
}

fn parking(id: i64, reason: &ParkReason) -> Parking {
    Parking {
        id,
        reason: reason.kind(),
        error: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    fn row(id: i64, aggregate: &str) -> OutboxRow {
        OutboxRow {
            id,
            aggregate_type: "order".into(),
            aggregate_id: aggregate.into(),
            event_type: "E".into(),
            payload_json: None,
            payload_bytes: None,
            headers_json: None,
            topic: None,
            event_id: uuid::Uuid::nil(),
            created_at: Utc::now(),
            shard: 0,
            withheld_bytes: None,
            undecodable: None,
            aggregate_hash: 0,
        }
    }

    fn in_flight(rows: &[OutboxRow], isolating: bool) -> Batch {
        let mut batch = Batch::new(rows.len(), isolating, true);
        for outcome in &mut batch.outcomes {
            *outcome = Outcome::InFlight;
        }
        batch.produced = rows.len() as u64;
        batch.outstanding = rows.len() as u64;
        batch
    }

    fn refused(row_id: i64, generation: u64) -> ProducerEvent {
        ProducerEvent::Delivered {
            generation,
            row_id,
            result: Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge,
            )),
        }
    }

    fn fatal(generation: u64) -> ProducerEvent {
        ProducerEvent::Fatal {
            generation,
            reason: "gap-less".into(),
        }
    }

    /// librdkafka raises the fatal error before the refused batch's reports; the other
    /// order must come to the same: every report applied, nothing parked, the refused rows
    /// left for one record per request.
    #[test]
    fn a_refused_record_batch_is_settled_alike_whichever_comes_first() {
        let rows = [row(1, "a"), row(2, "b"), row(3, "a")];
        let orders = [
            vec![fatal(7), refused(1, 7), refused(2, 7), refused(3, 7)],
            vec![refused(1, 7), refused(2, 7), refused(3, 7), fatal(7)],
        ];
        for events in orders {
            let mut batch = in_flight(&rows, false);
            for event in events {
                apply_event(event, 7, &rows, &mut batch);
            }
            assert!(batch.fatal);
            assert_eq!(batch.outstanding, 0);
            assert_eq!(batch.refused_in_a_set, 3);
            assert!(
                batch.parkings.is_empty(),
                "nothing parked outside isolation"
            );
        }
    }

    #[test]
    fn a_row_refused_on_its_own_is_parked() {
        let rows = [row(1, "a"), row(2, "a")];
        let mut batch = in_flight(&rows, true);
        apply_event(refused(1, 3), 3, &rows, &mut batch);
        apply_event(
            ProducerEvent::Delivered {
                generation: 3,
                row_id: 2,
                result: Err(KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue)),
            },
            3,
            &rows,
            &mut batch,
        );
        assert_eq!(batch.refused_alone, 1);
        assert_eq!(batch.parkings.len(), 1);
        assert_eq!(batch.parkings[0].id, 1);
        assert!(
            matches!(batch.outcomes[1], Outcome::Failed),
            "purged: sent again"
        );
    }

    /// The broker may refuse every record of a partition, each on its own: under `hold`
    /// only the first unsent row of an aggregate is parked and the rest waits behind it;
    /// under `skip` each refused row is parked.
    #[test]
    fn a_refusal_behind_a_parked_row_of_its_aggregate_waits_under_hold() {
        let rows = [row(1, "a"), row(2, "b"), row(3, "a")];
        for (hold, parked) in [(true, vec![1, 2]), (false, vec![1, 2, 3])] {
            let mut batch = in_flight(&rows, true);
            batch.hold = hold;
            for id in 1..=3 {
                apply_event(refused(id, 3), 3, &rows, &mut batch);
            }
            let ids: Vec<i64> = batch.parkings.iter().map(|p| p.id).collect();
            assert_eq!(ids, parked, "hold = {hold}");
            assert_eq!(batch.refused_alone, parked.len() as u64);
            assert!(matches!(
                batch.outcomes[2],
                Outcome::Failed | Outcome::Parked
            ));
        }
    }

    /// A row's own topic that does not exist or that the relay may not write is that
    /// row's problem (parked); for the template's topic, a missing topic waits on its own
    /// and an authorization refusal stays global.
    #[test]
    fn topic_refusals_are_the_rows_own_or_the_topics() {
        let code = |c| KafkaError::MessageProduction(c);
        let mut own = row(1, "a");
        own.topic = Some("outbox.event.own".into());
        let template = row(2, "b");
        for c in [
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            let (class, _) = classify(&code(c));
            assert_eq!(row_class(class, &code(c), &own), ErrorClass::PermanentRow);
            assert_eq!(
                row_class(class, &code(c), &template),
                ErrorClass::PermanentGlobal
            );
        }

        let rows = [row(1, "a"), row(2, "b")];
        let mut batch = in_flight(&rows, false);
        batch.topics = vec![Some(Arc::from("outbox.event.new")), Some(Arc::from("t"))];
        for (id, c) in [
            (1, RDKafkaErrorCode::UnknownTopicOrPartition),
            (2, RDKafkaErrorCode::TopicAuthorizationFailed),
        ] {
            apply_event(
                ProducerEvent::Delivered {
                    generation: 3,
                    row_id: id,
                    result: Err(code(c)),
                },
                3,
                &rows,
                &mut batch,
            );
        }
        assert_eq!(batch.topic_refusals.len(), 1);
        assert_eq!(&*batch.topic_refusals[0].0, "outbox.event.new");
        assert!(
            batch.blocked.is_some(),
            "an authorization refusal stays global"
        );
        assert!(batch.parkings.is_empty());
    }

    #[test]
    fn reports_of_another_generation_and_client_errors_leave_the_batch_alone() {
        let rows = [row(1, "a")];
        let mut batch = in_flight(&rows, false);
        assert!(!apply_event(refused(1, 2), 3, &rows, &mut batch));
        apply_event(fatal(2), 3, &rows, &mut batch);
        apply_event(
            ProducerEvent::Global {
                generation: 3,
                kind: "authentication_failed",
                reason: "one broker".into(),
            },
            3,
            &rows,
            &mut batch,
        );
        assert!(!batch.fatal, "a stale fatal error does not cut the batch");
        assert_eq!(batch.outstanding, 1);
        assert!(matches!(batch.outcomes[0], Outcome::InFlight));
        assert!(batch.client_error.is_some());
    }
}
