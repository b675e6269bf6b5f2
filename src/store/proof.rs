//! What proving delivery asks of the outbox, read only: one row and its state, pages of sent
//! rows with the partition and offset of their acks, and the sent rows of a range to re-send.

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
    pub row: OutboxRow,
    pub sent_at: DateTime<Utc>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
}

/// One row with everything the outbox knows of its state.
#[derive(Debug, Clone)]
pub struct LocatedRow {
    pub row: OutboxRow,
    pub sent_at: Option<DateTime<Utc>>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
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

fn decode_sent(r: &PgRow, first: bool) -> Result<SentRow, sqlx::Error> {
    let at = r.len() - 3;
    Ok(SentRow {
        row: decode_pending(r, first, 3)?,
        sent_at: r.try_get(at)?,
        partition: r.try_get(at + 1)?,
        offset: r.try_get(at + 2)?,
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
                let at = r.len() - 9;
                located.push(LocatedRow {
                    row: decode_pending(r, true, 9)?,
                    sent_at: r.try_get(at)?,
                    partition: r.try_get(at + 1)?,
                    offset: r.try_get(at + 2)?,
                    parked_at: r.try_get(at + 3)?,
                    park_reason: r.try_get(at + 4)?,
                    park_error: r.try_get(at + 5)?,
                    discarded_at: r.try_get(at + 6)?,
                    discard_reason: r.try_get(at + 7)?,
                    owner: r.try_get(at + 8)?,
                });
            }
            Ok(located)
        })
        .await
    }

    /// Up to `limit` rows sent after `after` (sent_at, id) and before `until`, in that
    /// order, each kept with probability `keep` (1 keeps all: the next page then starts
    /// after the last row of this one).
    pub async fn sent_page(
        &self,
        after: (DateTime<Utc>, i64),
        until: DateTime<Utc>,
        keep: f64,
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
                .fetch(&mut *conn);
            let mut sent = Vec::new();
            while let Some(r) = rows.try_next().await? {
                sent.push(decode_sent(&r, sent.is_empty())?);
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
                sent.push(decode_sent(r, sent.is_empty())?);
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

    /// Up to `limit` sent rows with ids in `(after, last]`, sent in `[since, until)` where
    /// given and of `aggregate` where given, in id order.
    pub async fn republish_page(
        &self,
        after: i64,
        last: i64,
        sent: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        aggregate: Option<&str>,
        limit: i64,
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
            while let Some(r) = rows.try_next().await? {
                page.push(decode_sent(&r, page.is_empty())?);
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
