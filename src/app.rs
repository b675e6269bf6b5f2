//! Wiring: `App::build` creates every part from `Settings` (binding the HTTP port, port 0
//! allowed) and `App::run` runs them until cancelled, then joins them all. Tests drive the
//! very same `App` that `outbox-relay run` does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{RelaySettings, Settings};
use crate::lease::{LeaseKeeper, LeaseTiming, Ownership};
use crate::model::{Backoff, Mode, PARK_REASONS};
use crate::relay::{Relay, RelayError};
use crate::store::{Store, StoreError};
use crate::telemetry::{
    self, BacklogCounted, DatabaseError, DatabaseUnavailable, Health, Metrics, emit,
};
use crate::wake;

/// How long a stopping relay tries to give its shards up before leaving them to expire.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);

pub struct App {
    settings: Settings,
    store: Store,
    relay: Relay,
    health: Arc<Health>,
    wake: Arc<Notify>,
    ownership: Arc<Ownership>,
    metrics: Metrics,
    http_listener: TcpListener,
    http_addr: SocketAddr,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let metrics = Metrics::new(&[
            (
                telemetry::PUBLISH_ERRORS,
                "kind",
                crate::kafka::classify::KINDS,
            ),
            (
                telemetry::DATABASE_ERRORS,
                "kind",
                crate::store::ERROR_KINDS,
            ),
            (telemetry::ROWS_PARKED, "reason", PARK_REASONS),
            (
                telemetry::IDLE_WAITS,
                "doorbell",
                &["armed", "busy", "waiting", "off"],
            ),
            (
                telemetry::AUDIT_MISMATCHES,
                "kind",
                &["missing", "different"],
            ),
            (
                telemetry::AUDIT_UNCHECKED,
                "reason",
                &["expired", "unreadable", "unverifiable"],
            ),
        ])
        .map_err(anyhow::Error::msg)
        .context("Failed to set up the metrics recorder")?;
        for warning in settings.warnings() {
            warn!("{warning}");
        }
        let store = Store::open(&settings)
            .context("Failed to configure the database connection from database.url")?;
        let health = Arc::new(Health::new(metrics.clone()));
        let wake = Arc::new(Notify::new());
        let ownership = Arc::new(Ownership::default());
        let relay = metrics
            .scope(|| {
                Relay::new(
                    store.clone(),
                    &settings,
                    health.clone(),
                    metrics.clone(),
                    wake.clone(),
                    ownership.clone(),
                )
            })
            .context("Failed to build the Kafka producer")?;
        let http_listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("Failed to bind http.listen = {}", settings.http.listen))?;
        let http_addr = http_listener.local_addr()?;
        Ok(App {
            settings,
            store,
            relay,
            health,
            wake,
            ownership,
            metrics,
            http_listener,
            http_addr,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `cancel`: waits for the database (the schema must exist), then relays.
    /// On cancel the relay drains its batch; every task is joined before returning.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App {
            settings,
            store,
            mut relay,
            health,
            wake,
            ownership,
            metrics,
            http_listener,
            http_addr,
        } = self;
        let replica_id = settings.replica_id();
        let tasks_cancel = cancel.child_token();
        let http = metrics.spawn(crate::http::serve(
            http_listener,
            metrics.clone(),
            health.clone(),
            settings.relay.liveness_timeout,
            tasks_cancel.clone(),
        ));
        info!(%http_addr, "serving /metrics, /healthz and /readyz");
        let brokers = metrics.spawn(crate::kafka::reachability::watch_brokers(
            settings.producer_properties(),
            health.clone(),
            settings.relay.stats_interval,
            tasks_cancel.clone(),
        ));

        let outcome = metrics
            .instrument(async {
                let SchemaFindings {
                    may_prune,
                    reports_state,
                } = wait_for_schema(&store, &settings.relay, &health, &cancel).await?;
                refuse_a_twin(
                    &store,
                    &replica_id,
                    settings.relay.lease_renew_interval,
                    &cancel,
                )
                .await?;
                if !reports_state {
                    // A registration left under this id by a run that recorded its state
                    // would show that state for good: this run cannot overwrite it.
                    if let Err(err) = store.deregister(&replica_id).await {
                        warn!(error = %err, "could not clear an earlier registration under this replica id; status may show its last state");
                    }
                }
                let listener_pool = crate::store::listener_pool(&settings.database)
                    .context("Failed to configure the LISTEN connection from database.url")?;
                if settings.database.listen {
                    announce_doorbell(&store, &settings).await;
                }
                let listener = settings.database.listen.then(|| {
                    let (doorbell, listen) = wake::doorbell(
                        listener_pool.clone(),
                        settings.database.listen_channel.clone(),
                        wake.clone(),
                        tasks_cancel.clone(),
                    );
                    relay.set_doorbell(doorbell);
                    metrics.spawn(listen)
                });
                // The keeper renews leases until the relay has drained and marked: stopping it
                // at SIGTERM would let the leases lapse mid-drain and the shards be republished.
                let keeper_cancel = CancellationToken::new();
                let keeper = metrics.spawn(
                    LeaseKeeper {
                        store: store.clone(),
                        replica_id: replica_id.clone(),
                        timing: LeaseTiming {
                            ttl: settings.relay.lease_ttl,
                            renew_interval: settings.relay.lease_renew_interval,
                            margin: settings.lease_margin(),
                        },
                        ownership: ownership.clone(),
                        health: health.clone(),
                        wake_relay: wake.clone(),
                        reports_state: reports_state.into(),
                    }
                    .run(keeper_cancel.clone()),
                );
                let stats = metrics.spawn(refresh_backlog_gauges(
                    store.clone(),
                    settings.relay.stats_interval,
                    tasks_cancel.clone(),
                ));
                let sweeper = may_prune.then(|| {
                    metrics.spawn(crate::retention::sweep_sent_rows(
                        store.clone(),
                        settings.relay.retain_sent,
                        tasks_cancel.clone(),
                    ))
                });
                let auditor = (settings.relay.audit_sample_rate > 0.0).then(|| {
                    metrics.spawn(crate::proof::audit::audit_sent_rows(
                        store.clone(),
                        settings.clone(),
                        ownership.clone(),
                        tasks_cancel.clone(),
                    ))
                });
                health.set_started();
                crate::systemd::ready();
                let watchdog = crate::systemd::watchdog_interval().map(|interval| {
                    metrics.spawn(crate::systemd::watchdog(
                        interval,
                        health.clone(),
                        tasks_cancel.clone(),
                    ))
                });
                let announce_stop = metrics.spawn({
                    let (cancel, health) = (cancel.clone(), health.clone());
                    async move {
                        cancel.cancelled().await;
                        health.set_draining();
                        crate::systemd::stopping();
                    }
                });
                info!(
                    replica = %replica_id,
                    mode = ?settings.relay.mode,
                    batch_size = settings.relay.batch_size,
                    topic_template = %settings.relay.topic_template,
                    "relaying the outbox to Kafka"
                );
                // On a worker, like the reads and marks it spawns: polled on the thread
                // that blocks on the runtime, every wake-up of the loop was a hand-off
                // between threads (half an idle relay's CPU, `bench/run.sh --steps idle`).
                let relayed = match metrics.spawn(relay.run(cancel.clone())).await {
                    Ok(relayed) => relayed,
                    Err(stopped) => Err(RelayError::Task(stopped)),
                };
                if cancel.is_cancelled() {
                    let _ = announce_stop.await;
                } else {
                    announce_stop.abort();
                }
                tasks_cancel.cancel();
                if let Some(watchdog) = watchdog {
                    let _ = watchdog.await;
                }
                if let Some(listener) = listener {
                    let _ = listener.await;
                }
                listener_pool.close().await;
                let _ = stats.await;
                if let Some(sweeper) = sweeper {
                    let _ = sweeper.await;
                }
                // A round trip in progress is not waited for.
                brokers.abort();
                // It only reads; a look in progress stops at the cancel within a fraction of
                // a second.
                if let Some(auditor) = auditor {
                    let _ = auditor.await;
                }
                keeper_cancel.cancel();
                let _ = keeper.await;
                // Bounded: the leases expire by themselves should the database not answer.
                if tokio::time::timeout(
                    HAND_OVER_TIMEOUT,
                    hand_over(&store, &replica_id, &ownership),
                )
                .await
                .is_err()
                {
                    warn!(
                        "could not hand the shards over in time; their leases expire by themselves"
                    );
                }
                relayed.context("The relay stopped")
            })
            .await;

        tasks_cancel.cancel();
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %err, "HTTP server failed"),
            Err(err) => warn!(error = %err, "HTTP task panicked"),
        }
        store.pool().close().await;
        outcome
    }
}

/// Says at start whether writers can wake this relay, and how.
async fn announce_doorbell(store: &Store, settings: &Settings) {
    match store.doorbell_trigger().await {
        Ok(trigger) => match crate::store::doorbell_finding(
            trigger.as_ref(),
            &settings.database.listen_channel,
            settings.relay.poll_interval,
            &store.table_display(),
        ) {
            Ok(finding) => info!("{finding}"),
            Err(advice) => warn!("{advice}"),
        },
        Err(err) => debug!(error = %err, "could not read the doorbell trigger"),
    }
}

/// On a clean stop, gives every shard up and leaves the live set, so the other replicas
/// take over at their next heartbeat instead of waiting for the leases to expire.
/// Refuses to start (exit 2) while another running relay heartbeats under `replica_id`: two
/// relays with one name share its leases, and the second would report ready and publish
/// nothing. A registration left by a relay that died is told apart by its heartbeat, which
/// stops: it is waited out for two heartbeat intervals at most.
async fn refuse_a_twin(
    store: &Store,
    replica_id: &str,
    renew_interval: Duration,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(first) = store
        .live_heartbeat(replica_id)
        .await
        .context("Failed to read the replica registrations")?
    else {
        return Ok(());
    };
    info!(
        replica = %replica_id,
        "a live registration under this replica id exists; watching its heartbeat to tell a running twin from one that died"
    );
    let deadline = tokio::time::Instant::now() + renew_interval * 2 + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline && !cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match store.live_heartbeat(replica_id).await {
            Ok(Some(beat)) if beat != first => {
                return Err(crate::store::StoreError::Config {
                    key: "relay.replica_id".into(),
                    message: format!(
                        "another running relay uses the replica id `{replica_id}` (its heartbeat moved at {}); give each replica its own relay.replica_id (empty means <hostname>-<pid>), or stop the other",
                        beat.to_rfc3339()
                    ),
                }
                .into());
            }
            Ok(None) => return Ok(()),
            _ => {}
        }
    }
    info!(replica = %replica_id, "the earlier registration under this replica id is not heartbeating; taking it over");
    Ok(())
}

async fn hand_over(store: &Store, replica_id: &str, ownership: &Ownership) {
    let held = ownership.take_all();
    match store.release_leases(replica_id, &held).await {
        Ok(released) => info!(shards = released, "shards handed over"),
        Err(err) => warn!(error = %err, "could not release the leases; they expire by themselves"),
    }
    if let Err(err) = store.deregister(replica_id).await {
        warn!(error = %err, "could not leave the replica list; the entry expires by itself");
    }
}

/// The connected role lacks privileges `run` needs; restarting cannot help.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database role lacks {}; grant {} (deploy/sql/least-privilege.sql grants exactly what the relay needs)",
    .0.join(", "),
    if .0.len() == 1 { "it" } else { "them" }
)]
pub(crate) struct MissingGrants(pub Vec<String>);

/// Said by `run` and `check` when roles other than the schema's owner may create in it.
pub(crate) const SCHEMA_CREATORS_ADVICE: &str = "roles other than its owner may create in the outbox's schema, where a planted table, function or operator could stand in for one the relay uses; revoke it (REVOKE CREATE ON SCHEMA ... FROM PUBLIC, or from each role; deploy/sql/least-privilege.sql does)";

/// Whether this relay deletes sent rows past `relay.retain_sent`.
fn prunes_sent(relay: &RelaySettings) -> bool {
    relay.mode == Mode::Mark && !relay.retain_sent.is_zero()
}

/// What the relay may do besides relaying, as the schema and the role's grants allow.
struct SchemaFindings {
    /// Delete sent rows past `relay.retain_sent`.
    may_prune: bool,
    /// Record its state in each heartbeat, for `status`.
    reports_state: bool,
}

/// Retries until the database answers; fails at once if the outbox table is missing or
/// the role lacks a privilege the relay cannot do without. What is optional and missing
/// (DELETE for `relay.retain_sent`, the state columns of `outbox_replica`, on a role or
/// schema made for an earlier version) is warned about and done without, rather than stop
/// relaying.
async fn wait_for_schema(
    store: &Store,
    relay: &RelaySettings,
    health: &Health,
    cancel: &CancellationToken,
) -> anyhow::Result<SchemaFindings> {
    let mut backoff = Backoff::new(Duration::from_secs(10));
    loop {
        match store.verify_schema().await {
            Ok(version) => {
                info!(%version, "connected to PostgreSQL");
                let missing = store
                    .missing_grants(relay.mode, false)
                    .await
                    .context("Failed to check the role's privileges")?;
                if !missing.is_empty() {
                    return Err(MissingGrants(missing).into());
                }
                let mut may_prune = prunes_sent(relay);
                if may_prune {
                    let without_delete = store
                        .missing_grants(relay.mode, true)
                        .await
                        .context("Failed to check the role's privileges")?;
                    if !without_delete.is_empty() {
                        warn!(
                            missing = %without_delete.join(", "),
                            "relay.retain_sent is on but the role may not delete: sent rows are kept; grant it (deploy/sql/least-privilege.sql does) or set relay.retain_sent = \"0s\""
                        );
                        may_prune = false;
                    }
                }
                match store.schema_creators().await {
                    Ok(creators) if !creators.is_empty() => {
                        warn!(roles = %creators.join(", "), "{}", SCHEMA_CREATORS_ADVICE)
                    }
                    Ok(_) => {}
                    Err(err) => {
                        warn!(error = %err, "cannot tell who may create in the outbox's schema")
                    }
                }
                let reports_state = match store.replica_state_unrecordable().await {
                    Ok(None) => true,
                    Ok(Some(advice)) => {
                        warn!("{advice}");
                        false
                    }
                    Err(err) => {
                        warn!(error = %err, "cannot tell whether the heartbeat may record the replica's state; it does not");
                        false
                    }
                };
                health.set_database_ok(true);
                return Ok(SchemaFindings {
                    may_prune,
                    reports_state,
                });
            }
            Err(err) if err.is_retriable() => {
                let delay = backoff.next_delay();
                emit(DatabaseUnavailable {
                    kind: err.kind(),
                    error: &err,
                    retry_in: delay,
                });
                tokio::select! {
                    _ = sleep(delay) => {}
                    _ = cancel.cancelled() => return Ok(SchemaFindings { may_prune: false, reports_state: false }),
                }
            }
            Err(err @ StoreError::Schema(_)) => {
                return Err(err).context("The outbox schema is not in place");
            }
            Err(err) => return Err(err).context("Failed to use the outbox table"),
        }
    }
}

async fn refresh_backlog_gauges(store: Store, every: Duration, cancel: CancellationToken) {
    loop {
        match store.backlog_stats().await {
            Ok(stats) => emit(BacklogCounted {
                pending_rows: stats.pending_rows,
                parked_rows: stats.parked_rows,
                oldest_pending_age: stats.oldest_pending_age,
            }),
            Err(err) => emit(DatabaseError {
                kind: err.kind(),
                error: &err,
                message: "could not refresh backlog gauges",
            }),
        }
        tokio::select! {
            _ = sleep(every) => {}
            _ = cancel.cancelled() => return,
        }
    }
}
