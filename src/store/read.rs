//! The read: pending rows in id order, oldest first, never holding a transaction open;
//! text too large to publish is measured in SQL and never fetched, and the aggregates of
//! parked rows wait behind them (the `hold` policy).

use futures_util::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::{Column, Postgres, Row};

use super::{Store, StoreError};
use crate::model::{OutboxRow, ParkPolicy};

/// How much one read may fetch: rows, bytes in all, and bytes of one row's payload or
/// headers (a larger one is measured in SQL and never fetched).
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub rows: u32,
    pub batch_bytes: usize,
    pub row_bytes: usize,
}

/// One row of `read_pending`'s answer, by position. With `check_types` each column's type
/// is first compared with its field's; without, the value is decoded as it comes, which is
/// for the rows after the first, whose column types are the same. The last `trailing`
/// columns are not the row's (a statement that selects more than the read).
pub(super) fn decode_pending(
    r: &PgRow,
    check_types: bool,
    trailing: usize,
) -> Result<OutboxRow, sqlx::Error> {
    fn get<'r, T>(r: &'r PgRow, column: usize, check_types: bool) -> Result<T, sqlx::Error>
    where
        T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
    {
        if check_types {
            r.try_get(column)
        } else {
            r.try_get_unchecked(column)
        }
    }
    // Text arrives as the database stores it: in a SQL_ASCII database it need not be
    // UTF-8. Such a value is kept (lossily, so the row still has an aggregate) and the row
    // marked undecodable, to be parked instead of failing the whole read.
    let mut undecodable = None;
    let mut text = |column: usize, name: &'static str| -> Result<Option<String>, sqlx::Error> {
        if check_types {
            // Text, or the bytes of text (the raw read).
            let ty = r.column(column).type_info();
            if !<String as sqlx::Type<Postgres>>::compatible(ty)
                && !<Vec<u8> as sqlx::Type<Postgres>>::compatible(ty)
            {
                return r.try_get::<Option<String>, _>(column);
            }
        }
        let Some(bytes) = r.try_get_unchecked::<Option<&[u8]>, _>(column)? else {
            return Ok(None);
        };
        Ok(Some(match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => {
                undecodable.get_or_insert(name);
                String::from_utf8_lossy(bytes).into_owned()
            }
        }))
    };
    let aggregate_type = text(1, "aggregate_type")?.unwrap_or_default();
    let aggregate_id = text(2, "aggregate_id")?.unwrap_or_default();
    let event_type = text(3, "event_type")?.unwrap_or_default();
    let payload_json = text(4, "payload")?;
    let headers_json = text(6, "headers")?;
    let topic = text(7, "topic")?;
    let column_headers = (13..r.len() - trailing)
        .map(|column| text(column, "a header column"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(OutboxRow {
        id: get(r, 0, check_types)?,
        aggregate_type,
        aggregate_id,
        event_type,
        payload_json,
        payload_bytes: get(r, 5, check_types)?,
        headers_json,
        topic,
        undecodable,
        column_headers,
        event_id: get(r, 8, check_types)?,
        created_at: get(r, 9, check_types)?,
        shard: get(r, 10, check_types)?,
        withheld_bytes: get(r, 11, check_types)?,
        aggregate_hash: get(r, 12, check_types)?,
    })
}

/// Ids a read leaves out, as the longest run of consecutive ids (`run_first..=run_last`,
/// empty when `run_first > run_last`) and the others below and above it. Every id of the
/// run is in the skip list, so leaving out the range leaves out exactly those ids.
#[derive(Debug, PartialEq, Eq)]
struct SkipList {
    below: Vec<i64>,
    run_first: i64,
    run_last: i64,
    above: Vec<i64>,
}

impl SkipList {
    fn new(skip: &[i64]) -> Self {
        let mut ids = skip.to_vec();
        ids.sort_unstable();
        ids.dedup();
        // (start index, length) of the longest run.
        let (mut best, mut start) = ((0, 0), 0);
        for i in 0..ids.len() {
            if i > 0 && ids[i - 1].checked_add(1) != Some(ids[i]) {
                start = i;
            }
            if i + 1 - start > best.1 {
                best = (start, i + 1 - start);
            }
        }
        let (first, len) = best;
        if len == 0 {
            // An empty run: `id < MIN + 1` and `id > MIN` together cover every id.
            return Self {
                below: Vec::new(),
                run_first: i64::MIN + 1,
                run_last: i64::MIN,
                above: Vec::new(),
            };
        }
        let above = ids.split_off(first + len);
        let run = ids.split_off(first);
        Self {
            below: ids,
            run_first: run[0],
            run_last: run[len - 1],
            above,
        }
    }
}

impl Store {
    /// Whether any row of `shards` (all: `None`) is pending. It leaves out nothing the
    /// read leaves out (rows in flight, held aggregates, rows behind a parked one), so
    /// `false` means the read would find nothing.
    pub async fn any_pending(&self, shards: Option<&[i16]>) -> Result<bool, StoreError> {
        let sql = &self.sql()?.any_pending;
        self.in_session(async |conn| {
            Ok(self
                .query_scalar(sql)
                .bind(shards)
                .fetch_one(&mut *conn)
                .await?)
        })
        .await
    }

    /// The next pending rows in id order, leaving out `skip` (rows already sent whose mark
    /// has not committed yet). A row whose aggregate has an earlier parked row waits behind
    /// it unless the policy is `skip`. That check costs one probe of the parked index per
    /// row, so it is skipped, by one probe per side of the skipped run, while nothing is
    /// parked.
    ///
    /// A payload or headers object larger than `limits.row_bytes` is measured in SQL and
    /// not fetched ([`OutboxRow::withheld_bytes`]); a payload stored in at most 8 KB is
    /// fetched without measuring (its text is at most a few times that). The read stops
    /// after `limits.rows` rows, or after the row that takes it to `limits.batch_bytes`.
    pub async fn read_pending(
        &self,
        limits: ReadLimits,
        policy: ParkPolicy,
        shards: Option<&[i16]>,
        skip: &[i64],
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.read_pending_except(limits, policy, shards, skip, &[])
            .await
    }

    /// [`Store::read_pending`], leaving out every row of the aggregates whose
    /// [`OutboxRow::aggregate_hash`] is `held` (those waiting for a topic: reading them
    /// again and again would fill every batch; a row of another aggregate with the same
    /// hash waits with them).
    pub(crate) async fn read_pending_except(
        &self,
        limits: ReadLimits,
        policy: ParkPolicy,
        shards: Option<&[i16]>,
        skip: &[i64],
        held: &[i64],
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let skip = SkipList::new(skip);
        let held = (!held.is_empty()).then_some(held);
        match self
            .read_pending_as(false, limits, policy, shards, &skip, held)
            .await
        {
            Err(StoreError::Statement { code, .. }) if code == "22021" => {
                self.read_pending_as(true, limits, policy, shards, &skip, held)
                    .await
            }
            read => read,
        }
    }

    async fn read_pending_as(
        &self,
        raw: bool,
        limits: ReadLimits,
        policy: ParkPolicy,
        shards: Option<&[i16]>,
        skip: &SkipList,
        held: Option<&[i64]>,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = limits.rows;
        let statements = self.sql()?;
        let sql = if raw {
            &statements.read_pending_raw
        } else {
            &statements.read_pending
        };
        self.in_session(async |conn| {
            let mut rows = self
                .query(sql)
                .bind(i64::from(limit))
                .bind(policy == ParkPolicy::Skip)
                .bind(shards)
                .bind(&skip.below)
                .bind(skip.run_first)
                .bind(skip.run_last)
                .bind(&skip.above)
                .bind(i64::try_from(limits.row_bytes).unwrap_or(i64::MAX))
                .bind(held)
                .fetch(&mut *conn);
            // Each row is decoded as it arrives, while the server still sends the rest.
            // By position, in the SELECT's order: a lookup by name hashes the name per
            // column per row. Every row of one answer has the same column types, so only
            // the first row's are checked against the Rust types (the check resolved each
            // column's type again per row, a fifth of the relay's decoding work).
            let mut decoded = Vec::with_capacity(limit.min(1024) as usize);
            let mut bytes = 0;
            while let Some(row) = rows.try_next().await? {
                let row = decode_pending(&row, decoded.is_empty(), 0)?;
                bytes += row.approximate_bytes();
                decoded.push(row);
                // Dropping the answer's stream here makes the connection skip the rest.
                if bytes >= limits.batch_bytes {
                    break;
                }
            }
            Ok(decoded)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::SkipList;

    fn skip(ids: &[i64]) -> SkipList {
        SkipList::new(ids)
    }

    #[test]
    fn no_skipped_ids_leave_out_no_range() {
        let s = skip(&[]);
        assert!(s.run_first > s.run_last);
        assert!(s.below.is_empty() && s.above.is_empty());
        // The two sides `id < run_first` and `id > run_last` cover every id.
        assert_eq!(s.run_first, s.run_last + 1);
    }

    #[test]
    fn two_adjacent_batches_are_one_range() {
        let ids: Vec<i64> = (1001..=3000).rev().collect();
        assert_eq!(
            skip(&ids),
            SkipList {
                below: vec![],
                run_first: 1001,
                run_last: 3000,
                above: vec![],
            }
        );
    }

    #[test]
    fn the_longest_run_is_a_range_and_the_rest_are_listed() {
        assert_eq!(
            skip(&[40, 7, 10, 11, 12, 13, 20, 21, 12, 5]),
            SkipList {
                below: vec![5, 7],
                run_first: 10,
                run_last: 13,
                above: vec![20, 21, 40],
            }
        );
    }

    #[test]
    fn a_single_id_is_a_run_of_one() {
        assert_eq!(
            skip(&[42]),
            SkipList {
                below: vec![],
                run_first: 42,
                run_last: 42,
                above: vec![],
            }
        );
    }

    #[test]
    fn ids_at_the_ends_of_the_range_do_not_overflow() {
        assert_eq!(
            skip(&[i64::MAX, i64::MAX - 1, i64::MIN]),
            SkipList {
                below: vec![i64::MIN],
                run_first: i64::MAX - 1,
                run_last: i64::MAX,
                above: vec![],
            }
        );
    }
}
