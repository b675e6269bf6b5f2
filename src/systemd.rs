//! systemd's notify protocol: READY=1 once the database answered, STOPPING=1 when the
//! drain starts, and WATCHDOG=1 only while the relay loop is not stuck inside one step, so
//! systemd restarts a wedged loop. Outside systemd (no `$NOTIFY_SOCKET`) all of it is a
//! no-op.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::telemetry::Health;

fn notify(state: NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(false, &[state]) {
        debug!(error = %err, "could not notify systemd");
    }
}

pub(crate) fn ready() {
    notify(NotifyState::Ready);
}

pub(crate) fn stopping() {
    notify(NotifyState::Stopping);
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval while the relay loop has not been stuck in one
/// step for longer than the interval; withholding the ping makes systemd restart us.
pub(crate) async fn watchdog(interval: Duration, health: Arc<Health>, cancel: CancellationToken) {
    info!(?interval, "systemd watchdog enabled");
    let mut withheld = false;
    loop {
        match health.loop_stuck_for() {
            Some(stuck) if stuck > interval => {
                if !withheld {
                    error!(
                        stuck_for = ?stuck,
                        "the relay loop has been stuck in one step; withholding the watchdog ping so systemd restarts the relay"
                    );
                    withheld = true;
                }
            }
            _ => {
                if withheld {
                    info!("the relay loop moves again; watchdog pings resumed");
                    withheld = false;
                }
                notify(NotifyState::Watchdog);
            }
        }
        tokio::select! {
            _ = sleep(interval / 2) => {}
            _ = cancel.cancelled() => return,
        }
    }
}
