//! The doorbell: a LISTEN connection that wakes the relay when the notify trigger fires.
//! It is only a hint. When the connection drops it reconnects with backoff and rings once,
//! so the poll that follows covers whatever was missed meanwhile.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::model::Backoff;
use crate::telemetry::{DoorbellRang, emit};

/// Listens on `channel` until `cancel`, ringing `wake` for every notification.
pub(crate) async fn listen(
    pool: PgPool,
    channel: String,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(30));
    while !cancel.is_cancelled() {
        let mut listener = match connect(&pool, &channel).await {
            Ok(listener) => listener,
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(error = %err, retry_in = ?delay, "LISTEN connection failed; polling covers the gap");
                tokio::select! {
                    _ = sleep(delay) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        debug!(%channel, "listening for the outbox doorbell");
        // Anything committed while we were not listening is found by this poll.
        wake.notify_one();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => {
                        backoff.reset();
                        emit(DoorbellRang);
                        wake.notify_one();
                    }
                    Ok(None) => {
                        // The connection was lost; the next try_recv reconnects.
                        warn!("LISTEN connection lost; reconnecting");
                        wake.notify_one();
                    }
                    Err(err) => {
                        warn!(error = %err, "LISTEN connection failed; reconnecting");
                        wake.notify_one();
                        break;
                    }
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = sleep(delay) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}
