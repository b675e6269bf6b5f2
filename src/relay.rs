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

use crate::classify::{ErrorClass, classify};
use crate::config::{Mode, ParkPolicy, RelaySettings, Settings};
use crate::encode::{EncodedRecord, Encoder, ParkReason, TopicTemplate};
use crate::lease::{Ownership, Snapshot};
use crate::produce::{EventReceiver, EventSender, ProducerEvent, RowProducer};
use crate::store::{Ack, OutboxRow, Parking, Store, StoreError};
use crate::telemetry::{self, BatchReport, Health};
use crate::topics::TopicLimits;

/// Kafka's record batch header, which a lone record is wrapped in.
const RECORD_BATCH_OVERHEAD_BYTES: usize = 61;
/// How long to wait before retrying a send that librdkafka refused with a full queue.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);
/// While waiting for acks, how often to re-check (fatal errors, stall, drain deadline).
const STALLED_RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the Kafka producer: {0}; check the [kafka] settings")]
    Producer(#[source] rdkafka::error::KafkaError),
    #[error("relay.topic_template: {0}")]
    Template(#[from] crate::encode::TemplateError),
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
}

impl Batch {
    fn new(rows: usize) -> Self {
        Self {
            outcomes: vec![Outcome::NotSent; rows],
            topics: vec![None; rows],
            epochs: vec![0; rows],
            parkings: Vec::new(),
            error_kinds: HashMap::new(),
            blocked: None,
            fatal: false,
            produced: 0,
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
        match row_class(class, kind, row) {
            ErrorClass::PermanentRow => {
                warn!(row_id = row.id, error = %err, "broker refused the row; parking it");
                self.park(pos, row.id, &ParkReason::Rejected(err.to_string()));
            }
            ErrorClass::PermanentGlobal => self.blocked = Some(err.to_string()),
            ErrorClass::FatalProducer => self.fatal = true,
            ErrorClass::Retriable | ErrorClass::Purged => {}
        }
    }
}

/// Delay that doubles from 100 ms up to a cap, reset after a success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Self {
            next: Duration::from_millis(100),
            cap,
        }
    }
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

/// One replica's relay loop.
pub struct Relay {
    store: Store,
    writer: Writer,
    settings: RelaySettings,
    producer_properties: Vec<(String, String)>,
    producer: RowProducer,
    events_tx: EventSender,
    events: EventReceiver,
    encoder: Encoder,
    topic_limits: TopicLimits,
    health: Arc<Health>,
    wake: Arc<Notify>,
    ownership: Arc<Ownership>,
    replica_id: String,
    /// The previous batch's mark, running while this batch is read and produced.
    pending_write: Option<PendingWrite>,
    /// The next batch, read while this one waited for its acks.
    prefetched: Option<Prefetch>,
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
    rows: Vec<OutboxRow>,
    shard_filter: Option<Vec<i16>>,
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
        wake: Arc<Notify>,
        ownership: Arc<Ownership>,
    ) -> Result<Self, RelayError> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let producer_properties = settings.producer_properties();
        let producer = RowProducer::build(&producer_properties, 1, events_tx.clone())
            .map_err(RelayError::Producer)?;
        let template = TopicTemplate::parse(&settings.relay.topic_template)?;
        health.set_producer_ok(true);
        let writer = Writer {
            store: store.clone(),
            replica_id: settings.replica_id(),
            mode: settings.relay.mode,
            drain_timeout: settings.relay.drain_timeout,
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
            encoder: Encoder::new(template, settings.relay.max_message_bytes),
            health,
            wake,
            ownership,
            replica_id: settings.replica_id(),
            pending_write: None,
            prefetched: None,
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
        if let Err(err) = self.settle().await {
            if !err.is_retriable() {
                return Err(err);
            }
            warn!(error = %err, "the last batch could not be marked before exiting; its rows stay pending and are sent again");
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
        let snapshot = self.ownership.snapshot();
        if snapshot.is_empty() {
            self.prefetched = None;
            self.settle().await?;
            return Ok(Tick::Idle);
        }
        let filter = snapshot.shard_filter();
        let rows = match self.prefetched.take() {
            Some(ahead) if ahead.shard_filter == filter => ahead.rows,
            _ => {
                let skip = self.pending_ids();
                self.read(filter.as_deref(), &skip)
                    .await
                    .inspect_err(|e| database_failed(&self.health, e))?
            }
        };
        self.health.set_database_ok(true);
        if rows.is_empty() {
            self.settle().await?;
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
        self.process_batch(rows, &snapshot, filter, started, cancel)
            .instrument(span)
            .await
    }

    fn read(
        &self,
        shard_filter: Option<&[i16]>,
        skip: &[i64],
    ) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send + 'static {
        let store = self.store.clone();
        let (limit, policy) = (self.settings.batch_size, self.settings.on_park);
        let shard_filter = shard_filter.map(<[i16]>::to_vec);
        let skip = skip.to_vec();
        async move {
            store
                .read_pending(limit, policy, shard_filter.as_deref(), &skip)
                .await
        }
    }

    /// Ids of the batch whose mark is still running: pending in the database, but sent.
    fn pending_ids(&self) -> Vec<i64> {
        self.pending_write
            .as_ref()
            .map(|p| p.ids.clone())
            .unwrap_or_default()
    }

    async fn process_batch(
        &mut self,
        rows: Vec<OutboxRow>,
        snapshot: &Snapshot,
        shard_filter: Option<Vec<i16>>,
        started: Instant,
        cancel: &CancellationToken,
    ) -> Result<Tick, RelayError> {
        let full = rows.len() == self.settings.batch_size as usize;
        let hold = self.settings.on_park == ParkPolicy::Hold;
        // A full batch means a backlog: read the next batch while this one is produced and
        // its acks arrive. It skips this batch and the one being marked, exactly, by id.
        let read_ahead = self.settings.pipeline && full && !cancel.is_cancelled();
        // Its own task: a read polled inside this task's ack wait (tokio::join!) was seen to
        // stall for good after its response had arrived.
        let read = read_ahead.then(|| {
            let mut skip = self.pending_ids();
            skip.extend(rows.iter().map(|r| r.id));
            tokio::spawn(self.read(shard_filter.as_deref(), &skip))
        });
        let mut batch = Batch::new(rows.len());
        self.produce_batch(&rows, snapshot, &mut batch).await;

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

        // Marks go in batch order: the previous batch's first.
        self.settle().await?;
        telemetry::publish_errors(&batch.error_kinds);
        // Every row acknowledged: nothing of this batch can be sent again before the rows
        // read after it, so its mark may run while the next batch is produced. Any failure
        // or parking ends the pipeline, and the rows read ahead (which may hold later rows
        // of a broken aggregate) are dropped.
        let clean = acks.len() == rows.len() && !batch.fatal && batch.blocked.is_none();
        let any_acked = !acks.is_empty();
        if self.settings.pipeline && clean && !cancel.is_cancelled() {
            let ids = acks.iter().map(|a| a.id).collect();
            let (writer, cancel) = (self.writer.clone(), cancel.clone());
            let task = tokio::spawn(async move { writer.write(&[], &acks, &cancel).await });
            self.pending_write = Some(PendingWrite { ids, settled, task });
            self.prefetched = ahead.map(|rows| Prefetch { rows, shard_filter });
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
        if batch.fatal {
            self.rebuild_producer().await?;
        }
        Ok(Tick::Batch {
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
        telemetry::batch_finished(&BatchReport {
            read: settled.read,
            published_by_topic: &settled.published_by_topic,
            marked,
            mode: match self.settings.mode {
                Mode::Mark => "mark",
                Mode::Delete => "delete",
            },
            latencies: &settled.latencies,
            duration: settled.started.elapsed(),
        });
        self.health.batch_done();
        debug!(read = settled.read, marked, parked, "batch done");
    }

    /// Encodes and hands the rows to the producer in id order. A row that cannot be
    /// encoded is parked; a row refused for a reason that may pass holds the rest of its
    /// aggregate back to the next batch.
    async fn produce_batch(&mut self, rows: &[OutboxRow], snapshot: &Snapshot, batch: &mut Batch) {
        let hold = self.settings.on_park == ParkPolicy::Hold;
        let mut held = foldhash::HashSet::<&str>::default();
        for (i, row) in rows.iter().enumerate() {
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
            let encoded = match self.encoder.encode(row) {
                Ok(record) => self.check_topic_limit(record).await,
                Err(reason) => Err(reason),
            };
            let record = match encoded {
                Ok(record) => record,
                Err(reason) => {
                    batch.park(i, row.id, &reason);
                    if hold {
                        held.insert(&row.aggregate_id);
                    }
                    continue;
                }
            };
            loop {
                match self.producer.send(row.id, &record) {
                    Ok(()) => {
                        batch.outcomes[i] = Outcome::InFlight;
                        batch.produced += 1;
                        break;
                    }
                    Err(err) => {
                        let (class, kind) = classify(&err);
                        if kind == "queue_full" {
                            sleep(QUEUE_FULL_WAIT).await;
                            self.health.loop_progress();
                            continue;
                        }
                        *batch.error_kinds.entry(kind).or_default() += 1;
                        match row_class(class, kind, row) {
                            ErrorClass::PermanentRow => {
                                batch.park(i, row.id, &ParkReason::Rejected(err.to_string()));
                                if hold {
                                    held.insert(&row.aggregate_id);
                                }
                            }
                            ErrorClass::FatalProducer => batch.fatal = true,
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

    /// Refuses a record larger than its topic's `max.message.bytes`, which the broker
    /// would otherwise reject together with every record batched with it.
    async fn check_topic_limit<'a>(
        &mut self,
        record: EncodedRecord<'a>,
    ) -> Result<EncodedRecord<'a>, ParkReason> {
        let Some(limit) = self.topic_limits.limit(&record.topic).await else {
            return Ok(record);
        };
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

    /// Waits for the delivery reports of the rows in flight, until all arrived or the
    /// producer hit a fatal error. On shutdown, waits at most `drain_timeout` more.
    async fn collect_acks(
        &mut self,
        rows: &[OutboxRow],
        batch: &mut Batch,
        cancel: &CancellationToken,
    ) {
        let generation = self.producer.generation();
        let mut outstanding = batch.produced;
        let mut last_progress = Instant::now();
        let mut drain_deadline: Option<Instant> = None;
        self.health.set_in_flight(outstanding);

        while outstanding > 0 && !batch.fatal {
            // Wake at least every STALLED_RECHECK: to check for a fatal error, and so the
            // watchdog sees a loop that waits for acks, not one that is wedged.
            self.health.loop_progress();
            let mut wake_at = if self.health.stalled() {
                Instant::now() + STALLED_RECHECK
            } else {
                (last_progress + self.settings.stall_after).min(Instant::now() + STALLED_RECHECK)
            };
            if let Some(deadline) = drain_deadline {
                wake_at = wake_at.min(deadline);
            }
            tokio::select! {
                event = self.events.recv() => {
                    // Take every report already queued in one go: one wake-up, clock read
                    // and timer per burst of acks, not per row.
                    let mut next = event;
                    let mut acked_any = false;
                    loop {
                        let Some(event) = next else {
                            batch.fatal = true;
                            break;
                        };
                        acked_any |= apply_event(event, generation, rows, batch, &mut outstanding);
                        if outstanding == 0 || batch.fatal {
                            break;
                        }
                        match self.events.try_recv() {
                            Ok(event) => next = Some(event),
                            Err(_) => break,
                        }
                    }
                    if acked_any {
                        last_progress = Instant::now();
                        self.health.set_stalled(false);
                    }
                }
                _ = cancel.cancelled(), if drain_deadline.is_none() => {
                    info!(outstanding, timeout = ?self.settings.drain_timeout, "draining: waiting for acknowledgements");
                    drain_deadline = Some(Instant::now() + self.settings.drain_timeout);
                }
                _ = sleep_until(wake_at) => {
                    if drain_deadline.is_some_and(|d| Instant::now() >= d) {
                        warn!(outstanding, "drain deadline passed; unacknowledged rows stay pending and will be sent again");
                        break;
                    }
                    if let Some(reason) = self.producer.fatal_error() {
                        error!(%reason, "fatal producer error; rebuilding the producer");
                        batch.fatal = true;
                    } else if last_progress.elapsed() >= self.settings.stall_after && !self.health.stalled() {
                        warn!(outstanding, waited = ?last_progress.elapsed(), "stalled: the broker has not acknowledged anything; librdkafka keeps retrying");
                        self.health.set_stalled(true);
                    }
                }
            }
            self.health.set_in_flight(outstanding);
        }
        self.health.set_in_flight(0);
    }

    async fn rebuild_producer(&mut self) -> Result<(), RelayError> {
        self.health.set_producer_ok(false);
        let generation = self.producer.generation() + 1;
        let replacement = RowProducer::build(
            &self.producer_properties,
            generation,
            self.events_tx.clone(),
        )
        .map_err(RelayError::Producer)?;
        let old = std::mem::replace(&mut self.producer, replacement);
        // Dropping purges and briefly flushes: keep that off the async threads.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        self.health.producer_rebuilt();
        self.health.set_producer_ok(true);
        warn!(
            generation,
            "producer rebuilt; unmarked rows will be sent again"
        );
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
    drain_timeout: Duration,
    health: Arc<Health>,
    ownership: Arc<Ownership>,
}

impl Writer {
    /// Parks and marks (or deletes) one batch, retrying while the database is away. If
    /// shutdown interrupts the retries, the acked rows stay pending and are sent again.
    async fn write(
        &self,
        parkings: &[Parking],
        acks: &[Ack],
        cancel: &CancellationToken,
    ) -> Result<(u64, u64), RelayError> {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let mut parked = None;
        let give_up_at = Instant::now() + self.drain_timeout;
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
                    let fenced = acks.len() as u64 - marked.min(acks.len() as u64);
                    if fenced > 0 {
                        telemetry::rows_fenced(fenced);
                        warn!(
                            fenced,
                            "acknowledged rows not marked: their shard moved to another replica, which sends them again"
                        );
                        self.forget_lost_shards(acks).await;
                    }
                    let parked = parked.unwrap_or(0);
                    if parked > 0 {
                        for p in parkings {
                            telemetry::rows_parked(p.reason, 1);
                            warn!(row_id = p.id, reason = p.reason, error = %p.error, "row parked");
                        }
                    }
                    return Ok((parked, marked));
                }
                Err(err) if err.is_retriable() => {
                    database_failed(&self.health, &err);
                    if cancel.is_cancelled() && Instant::now() >= give_up_at {
                        return Err(err.into());
                    }
                    let delay = backoff.next_delay();
                    warn!(error = %err, rows = acks.len(), retry_in = ?delay, "marking failed; retrying");
                    sleep(delay).await;
                    self.health.loop_progress();
                }
                Err(err) => {
                    database_failed(&self.health, &err);
                    return Err(err.into());
                }
            }
        }
    }

    /// After a fenced mark, stops producing for every shard of the batch the database no
    /// longer gives this replica, instead of republishing until the next renewal notices.
    async fn forget_lost_shards(&self, acks: &[Ack]) {
        let held = crate::store::leases_of(acks);
        match self.store.still_held(&self.replica_id, &held).await {
            Ok(still) => {
                let lost: std::collections::BTreeSet<i16> = held
                    .iter()
                    .filter(|pair| !still.contains(pair))
                    .map(|(shard, _)| *shard)
                    .collect();
                if !lost.is_empty() {
                    warn!(
                        shards = lost.len(),
                        "leases lost to another replica; no longer producing for them"
                    );
                    self.ownership.forget(&lost);
                }
            }
            Err(err) => database_failed(&self.health, &err),
        }
    }
}

fn database_failed(health: &Health, err: &StoreError) {
    telemetry::database_error(err.kind());
    if err.is_retriable() {
        health.set_database_ok(false);
    }
}

/// Applies one producer report to the batch in flight. Returns whether a row of this batch
/// got its delivery result.
fn apply_event(
    event: ProducerEvent,
    generation: u64,
    rows: &[OutboxRow],
    batch: &mut Batch,
    outstanding: &mut u64,
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
            *outstanding -= 1;
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
            error!(%reason, "fatal producer error; rebuilding the producer");
            batch.fatal = true;
            false
        }
        ProducerEvent::Global {
            generation: g,
            kind,
            reason,
        } if g == generation => {
            // Nothing will be acknowledged: drop this producer (purging its queue) and try
            // again later with a fresh one.
            *batch.error_kinds.entry(kind).or_default() += 1;
            batch.blocked = Some(reason);
            batch.fatal = true;
            false
        }
        // A report from a producer already torn down.
        _ => false,
    }
}

/// A missing topic is the row's own problem when the row named it, everyone's otherwise;
/// authorization and authentication failures are everyone's whatever the row says.
fn row_class(class: ErrorClass, kind: &str, row: &OutboxRow) -> ErrorClass {
    if class == ErrorClass::PermanentGlobal && kind == "unknown_topic" && row.topic.is_some() {
        ErrorClass::PermanentRow
    } else {
        class
    }
}

fn parking(id: i64, reason: &ParkReason) -> Parking {
    Parking {
        id,
        reason: reason.kind(),
        error: reason.to_string(),
    }
}
