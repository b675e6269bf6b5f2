//! The sweeper of sent rows (mark mode): every min(`relay.retain_sent`, 1 minute) it deletes
//! the rows sent longer ago than `retain_sent`, a batch at a time until none is left, while
//! another replica's sweep simply makes it wait for the next round.

use std::time::Duration;

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::telemetry::{DatabaseError, RowsPruned, emit};

/// Rows deleted per statement: short statements, short row locks.
pub(crate) const PRUNE_BATCH: i64 = 1000;
/// The longest wait between two sweeps.
const LONGEST_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Sweeps until `cancel`.
pub(crate) async fn sweep_sent_rows(store: Store, retain: Duration, cancel: CancellationToken) {
    let every = retain.min(LONGEST_SWEEP_INTERVAL);
    while !cancel.is_cancelled() {
        // Another replica's sweep (`busy`) simply waits for the next round.
        let sweep = store
            .prune_all_sent(retain, PRUNE_BATCH, || cancel.is_cancelled())
            .await;
        if let Some(err) = &sweep.error {
            emit(DatabaseError {
                kind: err.kind(),
                error: err,
                message: "could not delete sent rows past relay.retain_sent",
            });
        }
        if sweep.deleted > 0 {
            emit(RowsPruned {
                rows: sweep.deleted,
                older_than: retain,
            });
        }
        tokio::select! {
            _ = sleep(every) => {}
            _ = cancel.cancelled() => {}
        }
    }
}
