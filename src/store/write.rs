//! Marks, deletes and parks: one set-based statement per batch that only touches rows
//! still pending, fenced by the lease each row was read under, so a repeated mark is
//! harmless and a sent row is never un-sent.

use sqlx::Row;
use tracing::{error, warn};

use super::{Store, StoreError};

/// Where the broker stored an acknowledged row, and the lease epoch it was read under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub id: i64,
    pub partition: i32,
    pub offset: i64,
    pub shard: i16,
    pub epoch: i64,
}

/// A row to park, with its bounded reason kind and the full explanation.
#[derive(Debug, Clone)]
pub struct Parking {
    pub id: i64,
    pub reason: &'static str,
    pub error: String,
}

/// The distinct (shard, epoch) leases a batch of acks was read under, sorted.
pub(crate) fn leases_of(acks: &[Ack]) -> Vec<(i16, i64)> {
    let mut pairs: Vec<(i16, i64)> = acks.iter().map(|a| (a.shard, a.epoch)).collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// (shard, epoch) pairs as the two arrays the lease statements bind.
pub(super) fn split_leases(leases: &[(i16, i64)]) -> (Vec<i16>, Vec<i64>) {
    leases.iter().copied().unzip()
}

impl Store {
    /// Marks acknowledged rows sent with where the broker put them, but only rows of
    /// shards `replica` still holds under the epoch they were read with (the lease rows are
    /// share-locked, so a takeover waits for this statement or fences it). Returns rows
    /// changed.
    pub async fn mark_sent(&self, replica: &str, acks: &[Ack]) -> Result<u64, StoreError> {
        if acks.is_empty() {
            return Ok(0);
        }
        self.in_session(async |conn| {
            let mut by_id: Vec<&Ack> = acks.iter().collect();
            by_id.sort_by_key(|a| a.id);
            by_id.dedup_by_key(|a| a.id);
            let ids: Vec<i64> = by_id.iter().map(|a| a.id).collect();
            let partitions: Vec<i32> = by_id.iter().map(|a| a.partition).collect();
            // librdkafka reports a negative offset for a record whose position the broker did
            // not say (an old broker's DUPLICATE_SEQUENCE_NUMBER): no position is recorded
            // rather than a false one.
            let offsets: Vec<Option<i64>> = by_id
                .iter()
                .map(|a| (a.offset >= 0).then_some(a.offset))
                .collect();
            let (shards, epochs) = split_leases(&leases_of(acks));
            let done = self
                .query(&self.sql()?.mark_sent)
                .bind(&ids)
                .bind(&partitions)
                .bind(&offsets)
                .bind(&shards)
                .bind(&epochs)
                .bind(replica)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    /// Deletes acknowledged rows (delete mode), fenced like [`Store::mark_sent`].
    pub async fn delete_sent(&self, replica: &str, acks: &[Ack]) -> Result<u64, StoreError> {
        if acks.is_empty() {
            return Ok(0);
        }
        self.in_session(async |conn| {
            let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
            let (shards, epochs) = split_leases(&leases_of(acks));
            let done = self
                .query(&self.sql()?.delete_sent)
                .bind(&ids)
                .bind(&shards)
                .bind(&epochs)
                .bind(replica)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    /// Parks rows that can never be published, with their reasons. Returns the ids of the
    /// rows it parked: a row already sent, parked or gone is left as it is.
    pub async fn park(&self, parked: &[Parking]) -> Result<Vec<i64>, StoreError> {
        match self.park_together(parked).await {
            Err(err) if !err.is_retriable() && !parked.is_empty() => {
                // What a row holds must never stop the relay: find the row the statement
                // failed on by parking each alone.
                warn!(error = %err, rows = parked.len(), "parking rows together failed; parking each alone");
                let mut done = Vec::with_capacity(parked.len());
                for parking in parked {
                    done.extend(self.park_alone(parking).await?);
                }
                Ok(done)
            }
            result => result,
        }
    }

    /// Parks one row; if the database refuses its error text, parks it with a note
    /// instead, and if it refuses the row itself, leaves it pending and says so.
    async fn park_alone(&self, parking: &Parking) -> Result<Vec<i64>, StoreError> {
        let err = match self.park_together(std::slice::from_ref(parking)).await {
            Err(err) if !err.is_retriable() => err,
            result => return result,
        };
        let noted = Parking {
            id: parking.id,
            reason: parking.reason,
            error: format!(
                "the database refused this row's error text ({}); see the relay's log",
                err.kind()
            ),
        };
        match self.park_together(std::slice::from_ref(&noted)).await {
            Err(again) if !again.is_retriable() => {
                error!(row_id = parking.id, reason = parking.reason, error = %again, "the database refuses to park this row; it stays pending and its aggregate is retried");
                Ok(Vec::new())
            }
            result => {
                warn!(row_id = parking.id, error = %err, "the row's error text could not be stored; parked with a note");
                result
            }
        }
    }

    async fn park_together(&self, parked: &[Parking]) -> Result<Vec<i64>, StoreError> {
        if parked.is_empty() {
            return Ok(Vec::new());
        }
        self.in_session(async |conn| {
            // Sorted and distinct ids, so that each row finds its reason by binary search,
            // with no join to misplan (see MARK_SENT).
            let mut by_id: Vec<&Parking> = parked.iter().collect();
            by_id.sort_by_key(|p| p.id);
            by_id.dedup_by_key(|p| p.id);
            let ids: Vec<i64> = by_id.iter().map(|p| p.id).collect();
            let reasons: Vec<&str> = by_id.iter().map(|p| p.reason).collect();
            let errors: Vec<&str> = by_id.iter().map(|p| p.error.as_str()).collect();
            let done = self
                .query(&self.sql()?.park)
                .bind(&ids)
                .bind(&reasons)
                .bind(&errors)
                .fetch_all(&mut *conn)
                .await?;
            done.iter()
                .map(|row| row.try_get::<i64, _>(0))
                .collect::<Result<Vec<i64>, _>>()
                .map_err(StoreError::from)
        })
        .await
    }
}
