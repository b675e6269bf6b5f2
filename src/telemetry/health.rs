//! What `/readyz`, `/healthz` and the systemd watchdog answer from, and what tests wait on
//! instead of sleeping: one set of atomics per `App`, each change mirrored in its gauge.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, gauge};

use super::{
    IN_FLIGHT_ROWS, Metrics, PRODUCER_REBUILDS, READY, REFUSED_RECORD_BATCHES, STALLED,
    TOPICS_WAITING,
};

/// Longest reason a heartbeat records.
const REASON_CHARS: usize = 500;

/// A reason as the heartbeat stores it: printable ASCII, at most [`REASON_CHARS`]. It quotes
/// the broker's or librdkafka's words, which must neither fail the heartbeat (a character
/// the database's encoding cannot store would cost the leases a round) nor reach an
/// operator's terminal as control characters.
fn storable_reason(reason: &str) -> String {
    let mut storable: String = reason
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(REASON_CHARS + 1)
        .collect();
    if storable.len() > REASON_CHARS {
        storable.truncate(REASON_CHARS - 3);
        storable.push_str("...");
    }
    storable
}

/// A replica's state as its heartbeat records it and `outbox-relay status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplicaState {
    Starting,
    Ready,
    /// Not ready for a reason of the database's, the producer's or the brokers' reach.
    Unready,
    Stalled,
    Blocked,
    Draining,
}

impl ReplicaState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Unready => "unready",
            Self::Stalled => "stalled",
            Self::Blocked => "blocked",
            Self::Draining => "draining",
        }
    }
}

/// Shared state behind `/readyz`, and what tests wait on instead of sleeping.
#[derive(Debug, Default)]
pub struct Health {
    /// The `App`'s metrics, which every gauge below is recorded into, whichever task or
    /// thread changes it.
    metrics: Option<Metrics>,
    started: AtomicBool,
    database_ok: AtomicBool,
    producer_ok: AtomicBool,
    /// The last metadata round trip to the brokers failed (an idle relay learns it here).
    broker_unreachable: AtomicBool,
    /// Whether a metadata round trip has ended yet: until then the brokers are unknown,
    /// and a relay pointed at a wrong address must not look ready meanwhile.
    brokers_checked: AtomicBool,
    stalled: AtomicBool,
    blocked: AtomicBool,
    /// The permanent broker error that blocks publishing, as the broker or client said it.
    blocked_by: std::sync::Mutex<Option<String>>,
    /// SIGTERM (or Ctrl-C) arrived: the relay finishes the rows in flight and stops.
    draining: AtomicBool,
    leases_ok: AtomicBool,
    /// Whether a lease round has finished yet, so start-up is not reported as a failure.
    leases_checked: AtomicBool,
    in_flight: AtomicU64,
    batches: AtomicU64,
    producer_rebuilds: AtomicU64,
    refused_record_batches: AtomicU64,
    /// Milliseconds since [`process_clock`] at the relay loop's last sign of progress
    /// inside a step; 0 while it waits between steps.
    step_progress_ms: AtomicU64,
    /// `topic (reason)` of each topic whose rows wait; readiness names them.
    waiting_topics: std::sync::Mutex<Vec<String>>,
}

/// A monotonic clock shared by the whole process, for atomics that hold instants.
fn process_clock() -> std::time::Instant {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

impl Health {
    /// Health whose gauges are recorded into `metrics`.
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    fn record(&self, update: impl FnOnce()) {
        match &self.metrics {
            Some(metrics) => metrics.scope(update),
            None => update(),
        }
    }

    pub(crate) fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.update_ready_gauge();
    }
    /// A recovery is logged once, at info (the failure was logged where it happened).
    pub(crate) fn set_database_ok(&self, ok: bool) {
        let was = self.database_ok.swap(ok, Ordering::SeqCst);
        if ok && !was && self.started.load(Ordering::SeqCst) {
            tracing::info!("the database answers again");
        }
        self.update_ready_gauge();
    }
    pub(crate) fn set_producer_ok(&self, ok: bool) {
        self.producer_ok.store(ok, Ordering::SeqCst);
        self.update_ready_gauge();
    }
    /// Returns whether this changes what was known (the first answer only when it says
    /// the brokers are unreachable).
    pub(crate) fn set_broker_reachable(&self, reachable: bool) -> bool {
        let changed = self.broker_unreachable.swap(!reachable, Ordering::SeqCst) == reachable;
        let first = !self.brokers_checked.swap(true, Ordering::SeqCst);
        if changed || first {
            self.update_ready_gauge();
        }
        changed
    }
    pub(crate) fn set_stalled(&self, stalled: bool) {
        if self.stalled.swap(stalled, Ordering::SeqCst) != stalled {
            if !stalled {
                tracing::info!("broker acknowledgements arrive again: the stall is over");
            }
            self.record(|| gauge!(STALLED).set(if stalled { 1.0 } else { 0.0 }));
            self.update_ready_gauge();
        }
    }
    /// Whether the last lease renewal round reached the database.
    pub(crate) fn set_leases_ok(&self, ok: bool) {
        let first = !self.leases_checked.swap(true, Ordering::SeqCst);
        if self.leases_ok.swap(ok, Ordering::SeqCst) != ok || first {
            self.update_ready_gauge();
        }
    }
    /// Topics whose rows wait (the others flow): not a reason to be unready, but named.
    /// `shown`: the first few as `topic (reason)`; `total`: how many wait.
    pub(crate) fn set_waiting_topics(&self, mut shown: Vec<String>, total: usize) {
        self.record(|| gauge!(TOPICS_WAITING).set(total as f64));
        if total > shown.len() {
            shown.push(format!("and {} more", total - shown.len()));
        }
        if let Ok(mut waiting) = self.waiting_topics.lock() {
            *waiting = shown;
        }
    }
    pub(crate) fn waiting_topics(&self) -> Vec<String> {
        self.waiting_topics
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default()
    }
    /// A permanent global error (authorization, authentication) stops publishing.
    pub(crate) fn block(&self, reason: &str) {
        if let Ok(mut by) = self.blocked_by.lock() {
            *by = Some(reason.to_string());
        }
        self.set_blocked(true);
    }
    /// The broker accepts the relay's records again.
    pub(crate) fn unblock(&self) {
        self.set_blocked(false);
    }
    fn set_blocked(&self, blocked: bool) {
        if self.blocked.swap(blocked, Ordering::SeqCst) != blocked {
            if !blocked {
                tracing::info!(
                    "publishing is unblocked: the broker accepts the relay's records again"
                );
            }
            self.update_ready_gauge();
        }
    }
    pub(crate) fn set_in_flight(&self, rows: u64) {
        self.in_flight.store(rows, Ordering::SeqCst);
        self.record(|| gauge!(IN_FLIGHT_ROWS).set(rows as f64));
    }
    pub(crate) fn producer_rebuilt(&self) {
        self.producer_rebuilds.fetch_add(1, Ordering::SeqCst);
        self.record(|| counter!(PRODUCER_REBUILDS).increment(1));
    }
    /// The broker refused a record batch as a whole; its rows go one record per request.
    pub(crate) fn record_batch_refused(&self) {
        self.refused_record_batches.fetch_add(1, Ordering::SeqCst);
        self.record(|| counter!(REFUSED_RECORD_BATCHES).increment(1));
    }
    pub fn refused_record_batches(&self) -> u64 {
        self.refused_record_batches.load(Ordering::SeqCst)
    }
    pub fn producer_rebuilds(&self) -> u64 {
        self.producer_rebuilds.load(Ordering::SeqCst)
    }
    pub(crate) fn batch_done(&self) {
        self.batches.fetch_add(1, Ordering::SeqCst);
    }

    /// The relay loop is working on a step and has just made progress.
    pub(crate) fn loop_progress(&self) {
        let now = process_clock().elapsed().as_millis().max(1) as u64;
        self.step_progress_ms.store(now, Ordering::Relaxed);
    }
    /// The relay loop finished a step and waits on purpose (poll interval, backoff).
    pub(crate) fn loop_waiting(&self) {
        self.step_progress_ms.store(0, Ordering::Relaxed);
    }
    /// How long the loop has been inside one step without progress, if it is in one.
    pub(crate) fn loop_stuck_for(&self) -> Option<Duration> {
        match self.step_progress_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(
                process_clock()
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since)),
            ),
        }
    }

    /// Shutdown has begun.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }

    /// Why the relay is not ready, or `None` when it is.
    pub(crate) fn not_ready_reason(&self) -> Option<&'static str> {
        self.condition().map(|(_, reason)| reason)
    }

    /// The state that keeps the relay from being ready, and why: `(state, reason)`.
    fn condition(&self) -> Option<(ReplicaState, &'static str)> {
        use ReplicaState::*;
        if !self.started.load(Ordering::SeqCst) {
            Some((Starting, "starting"))
        } else if !self.database_ok.load(Ordering::SeqCst) {
            Some((Unready, "database unreachable or refusing writes"))
        } else if !self.leases_checked.load(Ordering::SeqCst) {
            Some((Starting, "starting: acquiring shard leases"))
        } else if !self.leases_ok.load(Ordering::SeqCst) {
            Some((Unready, "database unavailable for lease renewal"))
        } else if !self.producer_ok.load(Ordering::SeqCst) {
            Some((Unready, "producer unhealthy"))
        } else if !self.brokers_checked.load(Ordering::SeqCst) {
            Some((
                Starting,
                "starting: waiting for the brokers to answer a metadata request",
            ))
        } else if self.blocked.load(Ordering::SeqCst) {
            // Before the brokers' reach: a refused login fails the metadata round trip too.
            Some((
                Blocked,
                "publishing blocked by a permanent broker error (authorization, authentication); see the logs",
            ))
        } else if self.broker_unreachable.load(Ordering::SeqCst) {
            Some((
                Unready,
                "brokers unreachable: no metadata answer from kafka.bootstrap_servers (see the logs)",
            ))
        } else if self.stalled.load(Ordering::SeqCst) {
            Some((Stalled, "stalled: broker acknowledgements have stopped"))
        } else {
            None
        }
    }

    /// What this replica says of itself in each heartbeat, for `outbox-relay status`: its
    /// state and, unless all is well, why (a blocked relay names the broker's error, a
    /// ready one the topics whose rows wait), as [`storable_reason`] makes it.
    pub(crate) fn reported_state(&self) -> (ReplicaState, Option<String>) {
        let (state, reason) = self.current_state();
        (state, reason.map(|reason| storable_reason(&reason)))
    }

    fn current_state(&self) -> (ReplicaState, Option<String>) {
        if self.draining.load(Ordering::SeqCst) {
            return (
                ReplicaState::Draining,
                Some(
                    "shutting down: waiting for the acknowledgements of the rows in flight".into(),
                ),
            );
        }
        match self.condition() {
            Some((ReplicaState::Blocked, general)) => {
                let by = self.blocked_by.lock().ok().and_then(|by| by.clone());
                (
                    ReplicaState::Blocked,
                    Some(by.map_or_else(
                        || general.to_string(),
                        |by| format!("publishing blocked by a permanent broker error: {by}"),
                    )),
                )
            }
            Some((state, reason)) => (state, Some(reason.to_string())),
            None => {
                let waiting = self.waiting_topics();
                let reason = (!waiting.is_empty())
                    .then(|| format!("rows wait for topics: {}", waiting.join(", ")));
                (ReplicaState::Ready, reason)
            }
        }
    }

    fn update_ready_gauge(&self) {
        let ready = if self.not_ready_reason().is_none() {
            1.0
        } else {
            0.0
        };
        self.record(|| gauge!(READY).set(ready));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_reason_is_printable_ascii_and_bounded() {
        assert_eq!(storable_reason("ok: fine"), "ok: fine");
        assert_eq!(storable_reason("a\nb\u{1b}[31m\u{e9}"), "a?b?[31m?");
        let long = storable_reason(&"x".repeat(2 * REASON_CHARS));
        assert_eq!(long.len(), REASON_CHARS);
        assert!(long.ends_with("..."));
        assert_eq!(
            storable_reason(&"y".repeat(REASON_CHARS)).len(),
            REASON_CHARS
        );
    }

    #[test]
    fn a_refused_login_reads_blocked_not_unreachable() {
        let health = Health::default();
        health.set_started();
        health.set_database_ok(true);
        health.set_leases_ok(true);
        health.set_producer_ok(true);
        assert_eq!(health.reported_state().0, ReplicaState::Starting);
        health.set_broker_reachable(true);
        assert_eq!(health.reported_state(), (ReplicaState::Ready, None));
        health.set_broker_reachable(false);
        health.block("Authentication failed");
        let (state, reason) = health.reported_state();
        assert_eq!(state, ReplicaState::Blocked);
        assert!(reason.unwrap().contains("Authentication failed"));
        health.set_draining();
        assert_eq!(health.reported_state().0, ReplicaState::Draining);
    }
}
