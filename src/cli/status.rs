//! `outbox-relay status`: the backlog and the replicas sharing it, as a table or JSON.

use super::*;

#[derive(serde::Serialize)]
struct StatusReport {
    pending_rows: i64,
    /// True when more rows are pending than the relay counts exactly (see `status`).
    pending_rows_estimated: bool,
    oldest_pending_age_seconds: Option<f64>,
    parked_rows: i64,
    shard_count: i16,
    shards_unowned: i64,
    replicas: Vec<crate::store::ReplicaStatus>,
}

/// The pending count as a person reads it: an estimate says so.
pub(super) fn pending_text(rows: i64, estimated: bool) -> String {
    if estimated {
        format!(
            "about {rows} (estimated: more than {} pending)",
            crate::store::EXACT_PENDING_UP_TO
        )
    } else {
        rows.to_string()
    }
}

pub(super) async fn status(
    settings: Settings,
    json: bool,
    watch: Option<Duration>,
) -> anyhow::Result<()> {
    let Some(every) = watch else {
        let store = open_outbox(&settings).await?;
        let result = show(&store, json, false).await;
        store.pool().close().await;
        return result;
    };
    if every.is_zero() {
        return Err(BadArguments("--watch needs an interval above 0, e.g. 2s".into()).into());
    }
    // Registered once, before the database is touched: a Ctrl-C that arrives while a
    // refresh waits on the database ends the watch too, instead of being lost between waits.
    let stopped = stop_requested()?;
    tokio::pin!(stopped);
    let store = tokio::select! {
        () = &mut stopped => return Ok(()),
        store = open_outbox(&settings) => store?,
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stopped => break,
            _ = tick.tick() => {}
        }
        if terminal && !json {
            // Home and clear: the table is redrawn in place.
            print!("\x1b[H\x1b[2J");
        }
        let refreshed = tokio::select! {
            // Not waiting for the pool to close: its connection may wait on a lock.
            () = &mut stopped => return Ok(()),
            refreshed = show(&store, json, true) => refreshed,
        };
        if let Err(err) = refreshed {
            // A database that goes away is shown, not fatal: the watch goes on.
            println!("{err:#}");
        }
    }
    store.pool().close().await;
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM; both handlers are in place when it returns.
fn stop_requested() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("Failed to listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("Failed to listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Prints the status once; `compact` JSON is one line (for --watch).
async fn show(store: &Store, json: bool, compact: bool) -> anyhow::Result<()> {
    let backlog = store
        .backlog_stats()
        .await
        .context("Failed to read the outbox")?;
    let (replicas, unowned) = store
        .replica_status()
        .await
        .context("Failed to read the lease table")?;
    let report = StatusReport {
        pending_rows: backlog.pending_rows,
        pending_rows_estimated: backlog.pending_rows_estimated,
        oldest_pending_age_seconds: backlog.oldest_pending_age.map(|d| d.as_secs_f64()),
        parked_rows: backlog.parked_rows,
        shard_count: crate::lease::SHARD_COUNT,
        shards_unowned: unowned,
        replicas,
    };
    if json {
        if compact {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        return Ok(());
    }
    let age = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.1}s"));
    println!(
        "pending rows     {}",
        pending_text(report.pending_rows, report.pending_rows_estimated)
    );
    println!(
        "oldest pending   {}",
        age(report.oldest_pending_age_seconds)
    );
    println!("parked rows      {}", report.parked_rows);
    println!(
        "unowned shards   {} of {}",
        report.shards_unowned, report.shard_count
    );
    println!();
    println!(
        "{:<32} {:<9} {:>7} {:>10} {:>14}  {:<23}  why",
        "replica", "state", "shards", "heartbeat", "lease renewed", "started"
    );
    for r in &report.replicas {
        let (state, why) = replica_state_text(r);
        println!(
            "{:<32} {:<9} {:>7} {:>10} {:>14}  {:<23}  {}",
            r.replica_id,
            state,
            r.shards,
            format!("{:.1}s ago", r.heartbeat_age_seconds),
            r.oldest_lease_renewal_seconds
                .map_or("-".to_string(), |s| format!("{s:.1}s ago")),
            r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            why,
        );
    }
    if report.replicas.is_empty() {
        println!("(no replica has registered)");
    }
    Ok(())
}

/// A replica's state and why, as the table shows them. A replica whose heartbeat expired
/// is `gone` (it died without handing over, or cannot reach the database), whatever it
/// last said; its registration is deleted an hour later.
fn replica_state_text(replica: &crate::store::ReplicaStatus) -> (String, String) {
    let said = replica.state.as_deref().unwrap_or("-");
    if !replica.live {
        let last = match (&replica.state, &replica.state_reason) {
            (Some(state), Some(reason)) => format!(" (last said: {state}: {reason})"),
            (Some(state), None) => format!(" (last said: {state})"),
            _ => String::new(),
        };
        return (
            "gone".into(),
            format!(
                "no heartbeat for {:.0}s: stopped without handing over, or cannot reach the database{last}",
                replica.heartbeat_age_seconds
            ),
        );
    }
    let why = match (&replica.state, &replica.state_reason) {
        (_, Some(reason)) => reason.clone(),
        (None, None) => "a relay of an earlier version, or a role that may not record it".into(),
        (Some(_), None) => String::new(),
    };
    (said.to_string(), why)
}
