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

use crate::config::{RelaySettings, Settings};
use crate::encode::{EncodedRecord, Encoder};
use crate::kafka::classify::{ErrorClass, classify};
use crate::kafka::producer::{
    ClusterTopics, EventReceiver, EventSender, ProducerEvent, RowProducer, TopicAnswer,
};
use crate::kafka::topics::TopicLimits;
use crate::lease::{Ownership, Snapshot};
use crate::model::{Backoff, Mode, OutboxRow, ParkPolicy, ParkReason, TopicTemplate};
use crate::store::{Ack, Parking, ReadLimits, Store, StoreError};
use crate::telemetry::{
    BatchFinished, DatabaseError, Health, Metrics, ProducerClientError, PublishErrors, RelayWaited,
    RowParked, RowsFenced, TopicLabels, emit,
};
use crate::wake::{Doorbell, Sleep, TriggerWatch};
pub use waiting::MAX_WAITING_TOPICS;
use waiting::{Hold, WaitingTopics};

mod batch;
mod produce;
mod topics;
mod waiting;
mod writer;

use batch::*;
use produce::*;
use writer::*;

/// While waiting for acks, how often to re-check (fatal errors, stall, drain deadline).
const STALLED_RECHECK: Duration = Duration::from_secs(1);

/// The first look again after the doorbell's lock was found taken: a writer holds it only
/// from its outbox insert to its commit.
const BUSY_DOORBELL_FIRST: Duration = Duration::from_millis(1);
/// ... and the longest: a writer that keeps its transaction open after its outbox insert
/// keeps the relay from sleeping, and the rows other writers commit meanwhile do not ring.
const BUSY_DOORBELL_CAP: Duration = Duration::from_millis(50);

/// After the last rows, how long to wait before each of the next reads (at most the poll
/// interval), before the relay polls at its interval or sleeps on the doorbell: 22 ms of
/// quiet in all.
const QUIET_STEPS: [Duration; 7] = [
    Duration::from_millis(1),
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(4),
    Duration::from_millis(8),
];

/// How long past the drain deadline the last mark may take before the relay exits anyway.
const FINAL_MARK_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the Kafka producer: {0}; check the [kafka] settings")]
    Producer(#[source] rdkafka::error::KafkaError),
    #[error("relay.topic_template: {0}")]
    Template(#[from] crate::model::TemplateError),
    #[error("the relay loop, or a read or mark it started, stopped unexpectedly: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl RelayError {
    pub(crate) fn is_retriable(&self) -> bool {
        match self {
            RelayError::Store(e) => e.is_retriable(),
            RelayError::Producer(_) | RelayError::Template(_) | RelayError::Task(_) => false,
        }
    }
}

/// What one tick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tick {
    /// Nothing was pending.
    Idle,
    /// A batch was read and processed.
    Batch {
        /// The batch was full: more rows are probably waiting.
        full: bool,
        /// Every row of it was acknowledged: read again at once, the doorbell is only for
        /// a relay that found nothing.
        all_acked: bool,
        /// A permanent global error (unknown topic, authorization) held rows back.
        blocked: bool,
    },
    /// Shutdown was requested before the batch was produced.
    Stopped,
}

/// Room for every delivery report of a batch and the one read ahead, with some to spare
/// for client errors: the producer's thread blocks on a full channel rather than drop a
/// report, so it must never fill while the relay is not listening.
fn event_channel_capacity(settings: &RelaySettings) -> usize {
    settings.batch_size as usize * 2 + 1024
}

/// One replica's relay loop.
pub(crate) struct Relay {
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
    /// Tells writers whether to ring; `None` polls only.
    doorbell: Option<Doorbell>,
    /// Whether a trigger rings the doorbell: without one the relay polls only.
    doorbell_trigger: Option<TriggerWatch>,
    /// This replica may hold one of the doorbell's locks (it sleeps, or waits for another
    /// replica that sleeps): writers ring for it until it tells the doorbell it is awake.
    holds_doorbell_lock: bool,
    /// How soon to look again while a writer still commits behind the doorbell's lock.
    busy_doorbell: Backoff,
    /// Reads that found nothing since the last rows, while fewer than `QUIET_STEPS`.
    quiet_steps: usize,
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
    pub(crate) fn new(
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
            encoder: Encoder::new(template, policy, settings.relay.max_message_bytes)
                .with_column_headers(settings.outbox.header_columns.keys().cloned().collect()),
            health,
            metrics,
            topic_labels: TopicLabels::default(),
            wake,
            doorbell: None,
            doorbell_trigger: None,
            holds_doorbell_lock: false,
            quiet_steps: 0,
            busy_doorbell: Backoff::between(
                BUSY_DOORBELL_FIRST,
                BUSY_DOORBELL_CAP.min(settings.relay.poll_interval),
            ),
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

    /// Lets writers ring this relay awake through `doorbell` instead of waiting for its poll.
    pub(crate) fn set_doorbell(&mut self, doorbell: Doorbell) {
        self.doorbell_trigger = Some(doorbell.trigger_watch());
        self.doorbell = Some(doorbell);
    }

    /// Runs until `cancel`, then drains the batch in flight and returns. Database errors
    /// are retried with backoff; readiness is false meanwhile.
    pub(crate) async fn run(mut self, cancel: CancellationToken) -> Result<(), RelayError> {
        let relayed = self.relay_until(cancel).await;
        // However the loop ended: dropping the producer stops its thread, purges and
        // briefly flushes, so it happens off the runtime's workers (on a one-CPU pod the
        // only one), after the channel it reports into is closed.
        let Relay {
            events, producer, ..
        } = self;
        drop(events);
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
        relayed
    }

    async fn relay_until(&mut self, cancel: CancellationToken) -> Result<(), RelayError> {
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
                Ok(
                    Tick::Batch { full: true, .. }
                    | Tick::Batch {
                        all_acked: true, ..
                    },
                ) => {
                    self.busy_doorbell.reset();
                    self.quiet_steps = 0;
                    backoff.reset();
                    blocked_backoff.reset();
                    Ok(())
                }
                Ok(tick @ (Tick::Batch { .. } | Tick::Idle)) => {
                    backoff.reset();
                    blocked_backoff.reset();
                    self.wait_for_rows(tick != Tick::Idle, &cancel).await
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
                // Quiet for a while: asking the pending index alone costs the server under
                // a third of an empty read (`bench/run.sh --steps idle`), and finds
                // whatever the read would.
                if self.quiet_steps >= QUIET_STEPS.len()
                    && !self
                        .store
                        .any_pending(filter.as_deref())
                        .await
                        .inspect_err(|e| database_failed(&self.health, e))?
                {
                    self.health.set_database_ok(true);
                    return Ok(Tick::Idle);
                }
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
        self.wake_up();
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

        let acks = markable(&rows, &batch);
        let mut settled = Settled {
            read: rows.len(),
            published_by_topic: foldhash::HashMap::default(),
            latencies: Vec::with_capacity(rows.len()),
            started,
        };
        let now = Utc::now();
        for (i, row) in rows.iter().enumerate() {
            if let Outcome::Acked { .. } = batch.outcomes[i] {
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
                error!(%reason, "publishing blocked by a permanent broker error: grant the relay's principal Write (and Describe) on the topic named, or fix the credentials; the relay retries slowly");
                self.health.block(reason);
            }
            None if any_acked => self.health.unblock(),
            None => {}
        }
        self.after_producer_trouble(&batch, cancel).await?;
        Ok(Tick::Batch {
            // A batch whose rows all waited for topics is full too: the next read leaves
            // them out and goes on to the rows behind them.
            full,
            all_acked: clean,
            blocked: batch.blocked.is_some(),
        })
    }

    /// Waits for the doorbell, the poll interval or shutdown. A mark still running in the
    /// background is reported as soon as it commits, not when the next batch is read.
    /// Returns at once when the doorbell was just armed: rows committed before it are
    /// visible to the next read, and those after it ring.
    async fn wait_for_rows(
        &mut self,
        found_rows: bool,
        cancel: &CancellationToken,
    ) -> Result<(), RelayError> {
        if found_rows {
            self.busy_doorbell.reset();
        }
        let (sleep, until) = match QUIET_STEPS.get(self.quiet_steps) {
            // Rows came a moment ago and more are likely: a relay that slept after every
            // batch would have the writers ring at nearly every commit. Look again shortly
            // first, and sleep on the doorbell only once the outbox has been quiet a while.
            Some(step) => {
                self.quiet_steps += 1;
                (
                    None,
                    Instant::now() + (*step).min(self.settings.poll_interval),
                )
            }
            None => match self.ask_doorbell().await {
                Some((sleep, until)) => (Some(sleep), until),
                None => return Ok(()),
            },
        };
        let mut woken = false;
        if let Some(pending) = self.pending_write.as_mut() {
            let written = tokio::select! {
                written = &mut pending.task => Some(written),
                _ = self.wake.notified() => None,
                _ = sleep_until(until) => None,
                _ = cancel.cancelled() => None,
            };
            match written {
                // Woken before the mark committed: it stays pending, and the next read
                // skips its rows.
                None => woken = true,
                Some(written) => {
                    if let Some(pending) = self.pending_write.take() {
                        let (parked, marked) = written.map_err(RelayError::Task)??;
                        self.report(pending.settled, parked, marked);
                    }
                }
            }
        }
        if !woken {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = sleep_until(until) => {}
                _ = cancel.cancelled() => {}
            }
        }
        // A waiter keeps waiting until its next read finds rows or it takes the sleeper's
        // place; a sleeper lets writers stop ringing before it reads.
        if sleep == Some(Sleep::Asleep) {
            self.wake_up();
        }
        Ok(())
    }

    /// Asks the doorbell to let this relay sleep: how, and until when at the latest; `None`
    /// when it was just armed (or registered), and the relay must read once more first.
    /// Armed before waiting for a mark still running: rows committed meanwhile ring. A
    /// replica without shards reads nothing, so writers need not ring for it; the lease
    /// keeper wakes it when it gets some. Without a doorbell trigger it polls.
    async fn ask_doorbell(&mut self) -> Option<(Sleep, Instant)> {
        let poll_due = Instant::now() + self.settings.poll_interval;
        let writers_ring = match self.doorbell_trigger.as_mut() {
            Some(trigger) if !self.ownership.snapshot().is_empty() => {
                trigger.installed(&self.store).await
            }
            _ => false,
        };
        let sleep = match &self.doorbell {
            Some(doorbell) if writers_ring => doorbell.ask_to_sleep().await,
            _ => Sleep::Off,
        };
        let until = match sleep {
            Sleep::Armed | Sleep::Registered => {
                self.holds_doorbell_lock = true;
                if sleep == Sleep::Armed {
                    self.busy_doorbell.reset();
                }
                return None;
            }
            Sleep::Asleep => {
                emit(RelayWaited("armed"));
                poll_due
            }
            Sleep::Busy => {
                emit(RelayWaited("busy"));
                self.holds_doorbell_lock = true;
                Instant::now() + self.busy_doorbell.next_delay()
            }
            Sleep::Waiting => {
                emit(RelayWaited("waiting"));
                poll_due
            }
            Sleep::Off => {
                emit(RelayWaited("off"));
                self.wake_up();
                poll_due
            }
        };
        Some((sleep, until))
    }

    /// Writers stop ringing for this relay: it is reading rows.
    fn wake_up(&mut self) {
        if std::mem::take(&mut self.holds_doorbell_lock)
            && let Some(doorbell) = &self.doorbell
        {
            doorbell.wake();
        }
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
}
