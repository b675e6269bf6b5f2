//! What proving delivery asks of the outbox, read only: one row and its state, pages of sent
//! rows with the partition and offset of their acks and a digest of their values (never the
//! values themselves), and the sent rows of a range to re-send, whole, bounded in bytes.

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::read::decode_pending;
use super::{Store, StoreError};
use crate::model::OutboxRow;

/// Rows per page of sent rows: their values are fetched whole.
pub const PROOF_PAGE_ROWS: i64 = 500;

/// A sent row and where its ack put it (`None` when the mark recorded no position).
#[derive(Debug, Clone)]
pub struct SentRow {
    /// Without its payload and headers, except in [`Store::republish_page`].
    pub row: OutboxRow,
    pub sent_at: DateTime<Utc>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// The value the relay sends for the row, digested by the database; `None` for a row
    /// without a value, and in [`Store::republish_page`].
    pub value: Option<ValueDigest>,
}

/// A record value as a proof compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueDigest {
    pub sha256: [u8; 32],
    pub length: usize,
}

/// One row with everything the outbox knows of its state.
#[derive(Debug, Clone)]
pub struct LocatedRow {
    /// Without its payload and headers.
    pub row: OutboxRow,
    pub sent_at: Option<DateTime<Utc>>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub value: Option<ValueDigest>,
    pub parked_at: Option<DateTime<Utc>>,
    pub park_reason: Option<String>,
    pub park_error: Option<String>,
    pub discarded_at: Option<DateTime<Utc>>,
    pub discard_reason: Option<String>,
    /// The replica whose live lease holds the row's shard.
    pub owner: Option<String>,
}

/// How the rows of an id range stand, apart from the sent ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RangeCensus {
    pub pending: i64,
    pub parked: i64,
    pub discarded: i64,
}

/// Which row `where` looks for.
#[derive(Debug, Clone, Copy)]
pub enum RowKey {
    EventId(uuid::Uuid),
    RowId(i64),
}

/// Values are fetched whole: a sent row was small enough to publish.
const WHOLE: i64 = i64::MAX;

/// Columns after a row's in a proof statement: sent_at, partition, offset, SHA-256, length.
const PROOF_TRAILING: usize = 5;

/// A row of a proof statement whose `sent_at` is not NULL; `after` more columns follow the
/// proof's own.
fn decode_sent(r: &PgRow, first: bool, after: usize) -> Result<SentRow, sqlx::Error> {
    let (row, sent_at, partition, offset, value) = decode_proof(r, first, after)?;
    Ok(SentRow {
        row,
        sent_at: sent_at.ok_or_else(|| sqlx::Error::ColumnDecode {
            index: "sent_at".into(),
            source: "NULL for a sent row".into(),
        })?,
        partition,
        offset,
        value,
    })
}

type ProofColumns = (
    OutboxRow,
    Option<DateTime<Utc>>,
    Option<i32>,
    Option<i64>,
    Option<ValueDigest>,
);

/// A row of a proof statement, its sent_at NULL for a row not sent.
fn decode_proof(r: &PgRow, first: bool, after: usize) -> Result<ProofColumns, sqlx::Error> {
    let at = r.len() - after - PROOF_TRAILING;
    let sha256: Option<Vec<u8>> = r.try_get(at + 3)?;
    let length: Option<i32> = r.try_get(at + 4)?;
    let value = match (sha256, length) {
        (Some(sha), Some(length)) => Some(ValueDigest {
            sha256: sha.try_into().map_err(|_| sqlx::Error::ColumnDecode {
                index: "value_sha256".into(),
                source: "not 32 bytes".into(),
            })?,
            length: usize::try_from(length).unwrap_or_default(),
        }),
        _ => None,
    };
    Ok((
        decode_pending(r, first, after + PROOF_TRAILING)?,
        r.try_get(at)?,
        r.try_get(at + 1)?,
        r.try_get(at + 2)?,
        value,
    ))
}

/// A row of [`Store::republish_page`]: the whole row and [`super::statements::SENT_COLUMNS`].
fn decode_whole(r: &PgRow, first: bool) -> Result<SentRow, sqlx::Error> {
    let at = r.len() - 3;
    Ok(SentRow {
        row: decode_pending(r, first, 3)?,
        sent_at: r.try_get(at)?,
        partition: r.try_get(at + 1)?,
        offset: r.try_get(at + 2)?,
        value: None,
    })
}

impl Store {
    /// The rows (at most ten) with this event id or row id, oldest first.
    pub async fn locate(&self, key: RowKey) -> Result<Vec<LocatedRow>, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            let query = match key {
                RowKey::EventId(event_id) => self
                    .query(&statements.locate_by_event_id)
                    .bind(WHOLE)
                    .bind(event_id),
                RowKey::RowId(id) => self.query(&statements.locate_by_id).bind(WHOLE).bind(id),
            };
            let rows = query.fetch_all(&mut *conn).await?;
            let mut located = Vec::with_capacity(rows.len());
            for r in &rows {
                let (row, sent_at, partition, offset, value) = decode_proof(r, true, 6)?;
                let at = r.len() - 6;
                located.push(LocatedRow {
                    row,
                    sent_at,
                    partition,
                    offset,
                    value,
                    parked_at: r.try_get(at)?,
                    park_reason: r.try_get(at + 1)?,
                    park_error: r.try_get(at + 2)?,
                    discarded_at: r.try_get(at + 3)?,
                    discard_reason: r.try_get(at + 4)?,
                    owner: r.try_get(at + 5)?,
                });
            }
            Ok(located)
        })
        .await
    }

    /// Up to `limit` rows sent after `after` (sent_at, id) and before `until`, in that
    /// order, of `shards` where given, each kept with probability `keep` (1 keeps all).
    pub async fn sent_page(
        &self,
        after: (DateTime<Utc>, i64),
        until: DateTime<Utc>,
        keep: f64,
        shards: Option<&[i16]>,
        limit: i64,
    ) -> Result<Vec<SentRow>, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            let mut rows = self
                .query(&statements.sent_page)
                .bind(WHOLE)
                .bind(after.0)
                .bind(after.1)
                .bind(until)
                .bind(keep)
                .bind(limit)
                .bind(shards)
                .fetch(&mut *conn);
            let mut sent = Vec::new();
            while let Some(r) = rows.try_next().await? {
                sent.push(decode_sent(&r, sent.is_empty(), 0)?);
            }
            Ok(sent)
        })
        .await
    }

    /// The sent rows among `ids`, in id order.
    pub async fn sent_by_ids(&self, ids: &[i64]) -> Result<Vec<SentRow>, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            let rows = self
                .query(&statements.sent_by_ids)
                .bind(WHOLE)
                .bind(ids)
                .fetch_all(&mut *conn)
                .await?;
            let mut sent = Vec::with_capacity(rows.len());
            for r in &rows {
                sent.push(decode_sent(r, sent.is_empty(), 0)?);
            }
            Ok(sent)
        })
        .await
    }

    /// The ids of at most `limit` rows sent in `[since, until)`, drawn at random.
    pub async fn sample_sent_ids(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            Ok(self
                .query_scalar(&statements.sample_sent_ids)
                .bind(since)
                .bind(until)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?)
        })
        .await
    }

    /// How many rows were sent in `[since, until)`.
    pub async fn count_sent_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            Ok(self
                .query_scalar(&statements.count_sent_between)
                .bind(since)
                .bind(until)
                .fetch_one(&mut *conn)
                .await?)
        })
        .await
    }

    /// The lowest and highest id of the rows sent in `[since, until)`.
    pub async fn sent_id_bounds(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            let (low, high): (Option<i64>, Option<i64>) = self
                .query(&statements.sent_id_bounds)
                .bind(since)
                .bind(until)
                .try_map(|r: PgRow| Ok((r.try_get(0)?, r.try_get(1)?)))
                .fetch_one(&mut *conn)
                .await?;
            Ok(low.zip(high))
        })
        .await
    }

    /// Up to `limit` whole sent rows with ids in `(after, last]`, sent in `[since, until)`
    /// where given and of `aggregate` where given, in id order; the page ends after the row
    /// that takes it to `max_bytes`.
    pub async fn republish_page(
        &self,
        after: i64,
        last: i64,
        sent: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        aggregate: Option<&str>,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<SentRow>, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            let mut rows = self
                .query(&statements.republish_page)
                .bind(WHOLE)
                .bind(after)
                .bind(last)
                .bind(sent.0)
                .bind(sent.1)
                .bind(aggregate)
                .bind(limit)
                .fetch(&mut *conn);
            let mut page = Vec::new();
            let mut bytes = 0;
            while let Some(r) = rows.try_next().await? {
                let row = decode_whole(&r, page.is_empty())?;
                bytes += row.row.approximate_bytes();
                page.push(row);
                // Dropping the answer's stream here makes the connection skip the rest.
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    /// How many rows [`Store::republish_page`] would return over the whole range.
    pub async fn count_republishable(
        &self,
        after: i64,
        last: i64,
        sent: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        aggregate: Option<&str>,
    ) -> Result<i64, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            Ok(self
                .query_scalar(&statements.count_republishable)
                .bind(after)
                .bind(last)
                .bind(sent.0)
                .bind(sent.1)
                .bind(aggregate)
                .fetch_one(&mut *conn)
                .await?)
        })
        .await
    }

    /// The pending, parked and discarded rows with ids in `[first, last]` (of `aggregate`
    /// where given).
    pub async fn range_census(
        &self,
        first: i64,
        last: i64,
        aggregate: Option<&str>,
    ) -> Result<RangeCensus, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            Ok(self
                .query(&statements.range_census)
                .bind(first)
                .bind(last)
                .bind(aggregate)
                .try_map(|r: PgRow| {
                    Ok(RangeCensus {
                        pending: r.try_get(0)?,
                        parked: r.try_get(1)?,
                        discarded: r.try_get(2)?,
                    })
                })
                .fetch_one(&mut *conn)
                .await?)
        })
        .await
    }

    /// (aggregate type, event type, topic column) of the oldest pending rows, distinct, at
    /// most `limit`.
    pub async fn pending_topic_sources(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
        let statements = self.sql()?;
        self.in_session(async |conn| {
            Ok(self
                .query(&statements.pending_topic_sources)
                .bind(limit)
                .try_map(|r: PgRow| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .fetch_all(&mut *conn)
                .await?)
        })
        .await
    }

    /// The database's clock.
    pub async fn database_now(&self) -> Result<DateTime<Utc>, StoreError> {
        self.in_session(async |conn| {
            Ok(self
                .query_scalar("SELECT pg_catalog.now()")
                .fetch_one(&mut *conn)
                .await?)
        })
        .await
    }
}
