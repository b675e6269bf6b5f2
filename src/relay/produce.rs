//! Producing a batch: rows handed to librdkafka in id order within the queue's room and
//! the topic's size limit, their delivery reports collected, and the producer rebuilt
//! after a fatal error.

use super::*;

/// Kafka's record batch header, which a lone record is wrapped in.
pub(super) const RECORD_BATCH_OVERHEAD_BYTES: usize = 61;

/// How long to wait before retrying a send that librdkafka refused with a full queue.
pub(super) const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// After a fatal error, how long requests still in flight may take to report before they
/// are purged, and how long the purge's own reports may take.
pub(super) const FATAL_REPORT_GRACE: Duration = Duration::from_secs(2);

impl Relay {
    /// Encodes and hands the rows to the producer in id order. A row that cannot be
    /// encoded is parked; a row refused for a reason that may pass holds the rest of its
    /// aggregate back to the next batch.
    pub(super) async fn produce_batch(
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
    pub(super) async fn pack_smaller_batches_if_due(&mut self) {
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
    pub(super) async fn check_topic_limit<'a>(
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
    pub(super) async fn collect_acks(
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
                        self.health.block(&reason);
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
    pub(super) fn notice_fatal_error(&self, batch: &mut Batch) {
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
    pub(super) fn apply_burst(
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
    pub(super) async fn wait_for_queue_space(
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
    pub(super) fn discard_stale_events(&mut self) {
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
    pub(super) async fn after_producer_trouble(
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
    pub(super) async fn rebuild_producer(&mut self, after_fatal: bool) -> Result<(), RelayError> {
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

/// The record batch size that keeps a batch within a topic's `max.message.bytes`: room for
/// the batch header and for compression that does not shrink (librdkafka measures the
/// batch before compressing it).
pub(super) fn record_batch_cap(topic_limit: usize) -> usize {
    if topic_limit > 4096 {
        topic_limit - topic_limit / 64 - 1024
    } else {
        (topic_limit / 2).max(1)
    }
}

/// The record batch size librdkafka packs to with these properties: `batch.size` (1 MB
/// by default), never more than `message.max.bytes`.
pub(super) fn librdkafka_batch_size(properties: &[(String, String)]) -> usize {
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
