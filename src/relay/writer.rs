//! The writer: marks (or deletes) acknowledged rows and parks unpublishable ones, fenced by
//! the leases the rows were read under, retrying the database until the drain deadline.

use super::*;

/// The one deadline of a shutdown: `drain_timeout` after cancellation was first seen.
/// Waiting for acks and retrying the last mark share it, so a stop never takes longer
/// than the drain timeout plus one statement.
#[derive(Debug, Clone)]
pub(super) struct Drain {
    pub(super) timeout: Duration,
    pub(super) deadline: Arc<std::sync::OnceLock<Instant>>,
}

impl Drain {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            deadline: Arc::default(),
        }
    }

    /// Starts the drain (once) and returns its deadline.
    pub(super) fn start(&self) -> Instant {
        *self.deadline.get_or_init(|| Instant::now() + self.timeout)
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }

    pub(super) fn passed(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }
}

/// Parks and marks (or deletes) batches. Cloned into the background task that marks a
/// pipelined batch.
#[derive(Clone)]
pub(super) struct Writer {
    pub(super) store: Store,
    pub(super) replica_id: String,
    pub(super) mode: Mode,
    pub(super) drain: Drain,
    pub(super) health: Arc<Health>,
    pub(super) ownership: Arc<Ownership>,
}

impl Writer {
    /// Parks and marks (or deletes) one batch, retrying while the database is away. If
    /// shutdown interrupts the retries, the acked rows stay pending and are sent again.
    /// Returns the rows parked and marked.
    pub(super) async fn write(
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
    pub(super) async fn count_fenced(&self, acks: &[Ack]) {
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
pub(super) fn report_parked(parkings: &[Parking], parked_ids: &[i64]) {
    for p in parkings.iter().filter(|p| parked_ids.contains(&p.id)) {
        emit(RowParked {
            row_id: p.id,
            reason: p.reason,
            error: &p.error,
        });
    }
}

pub(super) fn database_failed(health: &Health, err: &StoreError) {
    emit(DatabaseError {
        kind: err.kind(),
        error: err,
        message: "database error",
    });
    if err.is_retriable() {
        health.set_database_ok(false);
    }
}
