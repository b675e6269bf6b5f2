//! The outbox's size with rows flowing steadily: the relay (mark mode) publishes and marks
//! them while `relay.retain_sent` deletes the sent ones past it, against the same flow
//! with retention off. The table's size (heap, indexes, TOAST) is sampled as it goes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::infra::{Broker, Db, RelayLauncher};

/// One flow at one retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetentionRun {
    /// `relay.retain_sent`, e.g. "10s"; "0s" is retention off.
    pub retain_sent: String,
    pub rows_per_second: f64,
    pub rows: u64,
    /// (seconds since the flow began, table size in bytes).
    pub size_samples: Vec<(f64, i64)>,
    /// Table size once every row was sent and a sweep had its chance.
    pub final_bytes: i64,
    /// Rows left in the table then.
    pub rows_left: i64,
}

impl RetentionRun {
    pub fn peak_bytes(&self) -> i64 {
        self.size_samples.iter().map(|s| s.1).max().unwrap_or(0)
    }
}

async fn table_bytes(db: &Db) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT pg_total_relation_size('outbox')")
            .fetch_one(&db.pool)
            .await?,
    )
}

/// Inserts `rate` 1 KB rows a second for `seconds` (ten statements a second), the relay
/// running with `retain_sent`, then waits until every row was sent and, with retention
/// on, deleted.
pub async fn measure(
    db: &Db,
    launcher: &RelayLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    rate: f64,
    seconds: f64,
    retain: Duration,
) -> Result<RetentionRun> {
    let retain_sent = format!("{}s", retain.as_secs());
    db.reset().await?;
    sqlx::query("VACUUM FULL outbox").execute(&db.pool).await?;
    let broker = Broker::start(broker_source.0, broker_source.1, work).await?;
    broker.create_topic().await?;
    let mut relay = launcher.spawn(
        &db.url,
        &broker.bootstrap,
        "mark",
        "bench-retention",
        &[("OUTBOX_RELAY_RELAY__RETAIN_SENT", retain_sent.clone())],
    )?;
    let per_tick = (rate / 10.0).round().max(1.0) as i64;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut rows = 0u64;
    let mut next_sample = started;
    let mut tick = started;
    while started.elapsed().as_secs_f64() < seconds {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'agg-' || (g % 100), 'Flowed', \
                    jsonb_build_object('seq', g, 'pad', repeat('x', 960)) \
             FROM generate_series(1, $1) AS g",
        )
        .bind(per_tick)
        .execute(&db.pool)
        .await?;
        rows += per_tick as u64;
        if Instant::now() >= next_sample {
            samples.push((started.elapsed().as_secs_f64(), table_bytes(db).await?));
            next_sample += Duration::from_secs(1);
        }
        if relay.exited() {
            bail!(
                "the relay exited during the flow; its log:\n{}",
                relay.log_tail()
            );
        }
        tick += Duration::from_millis(100);
        tokio::time::sleep_until(tick.into()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while db.count("sent_at IS NULL").await? > 0 {
        if Instant::now() > deadline {
            bail!("rows still unsent 120 s after the flow ended");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !retain.is_zero() {
        // Rows sent at the end are deleted retain later, at the next sweep after that.
        let deadline = Instant::now()
            + retain
            + retain.min(Duration::from_secs(60)) * 2
            + Duration::from_secs(60);
        while db.count("sent_at IS NOT NULL").await? > 0 {
            if Instant::now() > deadline {
                bail!("sent rows still in the table past relay.retain_sent and two sweeps");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    samples.push((started.elapsed().as_secs_f64(), table_bytes(db).await?));
    let final_bytes = table_bytes(db).await?;
    let rows_left = db.count("true").await?;
    relay.stop().await;
    broker.stop().await;
    Ok(RetentionRun {
        retain_sent,
        rows_per_second: rate,
        rows,
        size_samples: samples,
        final_bytes,
        rows_left,
    })
}
