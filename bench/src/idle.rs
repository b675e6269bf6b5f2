//! What an idle relay costs: with nothing to publish, how many statements a second it sends
//! and how much CPU it and its PostgreSQL sessions spend, for each way of waking it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::infra::{Db, RelayLauncher, RelayProcess, cpu_time};
use crate::latency::Wakeup;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleCost {
    pub wakeup: Wakeup,
    pub seconds: f64,
    /// Statements the database ran a second (pg_stat_statements, this database): the
    /// relay's reads, and the doorbell's locks where it sleeps on them.
    pub statements_per_second: f64,
    /// `outbox_relay_idle_waits_total` a second: how often the relay waited for rows.
    pub waits_per_second: f64,
    /// The relay's own CPU (user + system), milliseconds a second.
    pub relay_cpu_ms_per_second: f64,
    /// CPU of the PostgreSQL backends serving the relay (application_name outbox-relay),
    /// milliseconds a second.
    pub postgres_cpu_ms_per_second: f64,
    /// How many such backends there were.
    pub backends: usize,
}

/// [`IdleCost`] of `wakeup` over `window`, on an empty outbox.
pub async fn idle_cost(
    db: &Db,
    launcher: &RelayLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    wakeup: Wakeup,
    window: Duration,
) -> Result<IdleCost> {
    db.reset().await?;
    let (broker, relay) = wakeup
        .start_relay(db, launcher, broker_source, work, "bench-idle")
        .await?;
    let measured = measure(db, &relay, window).await;
    let _ = relay.stop().await;
    broker.stop().await;
    let (statements, waits, relay_cpu, postgres_cpu, backends, seconds) = measured?;
    Ok(IdleCost {
        wakeup,
        seconds,
        statements_per_second: statements / seconds,
        waits_per_second: waits / seconds,
        relay_cpu_ms_per_second: relay_cpu.as_secs_f64() * 1e3 / seconds,
        postgres_cpu_ms_per_second: postgres_cpu.as_secs_f64() * 1e3 / seconds,
        backends,
    })
}

/// One sample of every counter the window compares.
struct Sample {
    at: Instant,
    statements: f64,
    waits: f64,
    relay_cpu: Duration,
    postgres_cpu: Duration,
}

async fn sample(db: &Db, relay: &RelayProcess, backends: &[u32]) -> Result<Sample> {
    let statements: f64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(calls), 0)::float8 FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&db.pool)
    .await?;
    let Some(metrics) = relay.metrics().await else {
        bail!("the relay's metrics did not answer: {}", relay.log_tail());
    };
    Ok(Sample {
        at: Instant::now(),
        statements,
        waits: RelayProcess::metric_sum(&metrics, "outbox_relay_idle_waits_total"),
        relay_cpu: cpu_time(relay.pid()).unwrap_or_default(),
        postgres_cpu: backends.iter().filter_map(|&pid| cpu_time(pid)).sum(),
    })
}

/// (statements, waits, relay CPU, backends' CPU, backends, seconds) over `window`, once
/// the relay has waited for rows a first time.
async fn measure(
    db: &Db,
    relay: &RelayProcess,
    window: Duration,
) -> Result<(f64, f64, Duration, Duration, usize, f64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = relay.metrics().await.unwrap_or_default();
        if RelayProcess::metric_sum(&metrics, "outbox_relay_idle_waits_total") > 0.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the relay never went idle: {}", relay.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backends: Vec<u32> = sqlx::query_scalar::<_, i32>(
        "SELECT pid FROM pg_stat_activity \
         WHERE application_name = 'outbox-relay' AND datname = current_database()",
    )
    .fetch_all(&db.pool)
    .await?
    .into_iter()
    .map(i32::unsigned_abs)
    .collect();
    let before = sample(db, relay, &backends).await?;
    tokio::time::sleep(window).await;
    let after = sample(db, relay, &backends).await?;
    Ok((
        after.statements - before.statements,
        after.waits - before.waits,
        after.relay_cpu.saturating_sub(before.relay_cpu),
        after.postgres_cpu.saturating_sub(before.postgres_cpu),
        backends.len(),
        after.at.duration_since(before.at).as_secs_f64(),
    ))
}
