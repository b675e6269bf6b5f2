//! The sweeper of sent rows (mark mode): every min(`relay.retain_sent`, 1 minute) it deletes
//! the rows sent longer ago than `retain_sent`, a batch at a time until none is left, while
//! another replica's sweep simply makes it wait for the next round.

use std::time::Duration;

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use crate::store::{Pruned, Store};
use crate::telemetry::{DatabaseError, RowsPruned, emit};

/// Rows deleted per statement: short statements, short row locks.
pub(crate) const PRUNE_BATCH: i64 = 1000;
/// The longest wait between two sweeps.
const LONGEST_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Sweeps until `cancel`.
pub(crate) async fn sweep_sent_rows(store: Store, retain: Duration, cancel: CancellationToken) {
    let every = retain.min(LONGEST_SWEEP_INTERVAL);
    while !cancel.is_cancelled() {
        let mut deleted = 0;
        loop {
            match store.prune_sent(retain, PRUNE_BATCH).await {
                Ok(Pruned::Rows(rows)) => {
                    deleted += rows;
                    if rows < PRUNE_BATCH as u64 || cancel.is_cancelled() {
                        break;
                    }
                }
                Ok(Pruned::Busy) => break,
                Err(err) => {
                    emit(DatabaseError {
                        kind: err.kind(),
                        error: &err,
                        message: "could not delete sent rows past relay.retain_sent",
                    });
                    break;
                }
            }
        }
        if deleted > 0 {
            emit(RowsPruned {
                rows: deleted,
                older_than: retain,
            });
        }
        tokio::select! {
            _ = sleep(every) => {}
            _ = cancel.cancelled() => {}
        }
    }
}
