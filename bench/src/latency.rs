//! End-to-end latency (insert commit → record read by a consumer) at fixed insert rates,
//! with and without the LISTEN doorbell, and the cost of the doorbell's NOTIFY trigger on
//! the application's insert commit rate.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::infra::{
    Broker, Db, PARTITIONS, RelayLauncher, RelayProcess, TOPIC, payload_json,
    relay_producer_properties,
};

const INSERT: &str = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                      VALUES ('order', $1, 'OrderUpdated', $2::jsonb)";

/// Several rows in one INSERT statement (the doorbell trigger fires once per statement).
const INSERT_MANY: &str = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
     SELECT 'order', a, 'OrderUpdated', p::jsonb \
     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(a, p, n) ORDER BY n";

/// What wakes the relay when rows come in: the alternatives the latency and the commit
/// cost are measured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Wakeup {
    /// The default install: no trigger, the relay's own settings (it polls an idle outbox
    /// every `relay.poll_interval`, 10 ms).
    Default,
    /// `migrate --notify-trigger on`: the trigger notifies only while the relay sleeps, and
    /// `relay.poll_interval` 500 ms, the safety net (the default before the trigger was
    /// made opt-in).
    Doorbell,
    /// No trigger, `relay.poll_interval` 500 ms and no LISTEN.
    Polling,
    /// The trigger before migration 9: every inserting statement notifies (500 ms poll).
    RingAlways,
    /// No trigger, no LISTEN, and `relay.poll_interval` 5 ms (older runs).
    FastPolling,
}

impl Wakeup {
    pub fn label(self) -> &'static str {
        match self {
            Wakeup::Default => "no trigger, poll 10 ms (default)",
            Wakeup::Doorbell => "doorbell trigger, poll 500 ms",
            Wakeup::Polling => "no trigger, poll 500 ms",
            Wakeup::RingAlways => "trigger ringing at every insert",
            Wakeup::FastPolling => "no trigger, poll 5 ms",
        }
    }

    fn trigger(self) -> bool {
        matches!(self, Wakeup::Doorbell | Wakeup::RingAlways)
    }

    /// Installs the trigger this alternative needs (or none) on the database.
    pub async fn install(self, launcher: &RelayLauncher, db: &Db) -> Result<()> {
        launcher.migrate(&db.url, Some(self.trigger()))?;
        if self == Wakeup::RingAlways {
            let pool = Db::pool(&db.url, 1).await?;
            sqlx::query(
                "CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN PERFORM pg_catalog.pg_notify(COALESCE(TG_ARGV[0], 'outbox_relay'), ''); \
                 RETURN NULL; END $$",
            )
            .execute(&pool)
            .await?;
            pool.close().await;
        }
        Ok(())
    }

    /// Installs this alternative's trigger, then starts a fresh broker and a relay (mark
    /// mode) with its settings, ready.
    pub(crate) async fn start_relay(
        self,
        db: &Db,
        launcher: &RelayLauncher,
        broker_source: (Option<&Path>, Option<&str>),
        work: &Path,
        replica_id: &str,
    ) -> Result<(Broker, RelayProcess)> {
        self.install(launcher, db).await?;
        broker_and_relay(
            db,
            launcher,
            broker_source,
            work,
            replica_id,
            &self.relay_env(),
        )
        .await
    }

    /// The relay's settings for this alternative, as environment variables.
    pub fn relay_env(self) -> Vec<(&'static str, String)> {
        let slow_poll = ("OUTBOX_RELAY_RELAY__POLL_INTERVAL", "500ms".into());
        match self {
            Wakeup::Default => Vec::new(),
            Wakeup::Doorbell | Wakeup::RingAlways => vec![slow_poll],
            Wakeup::Polling => vec![("OUTBOX_RELAY_DATABASE__LISTEN", "false".into()), slow_poll],
            Wakeup::FastPolling => vec![
                ("OUTBOX_RELAY_DATABASE__LISTEN", "false".into()),
                ("OUTBOX_RELAY_RELAY__POLL_INTERVAL", "5ms".into()),
            ],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// A trigger wakes the relay (the doorbell, or a trigger ringing at every insert).
    pub doorbell: bool,
    /// Which wake-up was measured (absent from older results, where `doorbell` tells the
    /// trigger ringing at every insert from polling).
    #[serde(default)]
    pub wakeup: Option<Wakeup>,
    /// It measured the default install (absent from older results: the doorbell was it).
    #[serde(default)]
    pub default_install: Option<bool>,
    /// How long the inserting clients' transactions took (execute → commit), measured
    /// window only: what the wake-up costs the application at this load.
    #[serde(default)]
    pub commit: Option<Percentiles>,
    /// What the rate was chosen as: `1k`, `50%`, `80%` (of the measured max drain rate);
    /// `broker only` for the floor: the relay's producer straight to a consumer.
    pub load: String,
    /// Rows per inserting transaction (one INSERT statement each).
    pub rows_per_transaction: u64,
    pub target_rows_per_second: f64,
    pub achieved_rows_per_second: f64,
    pub connections: u32,
    pub measured_rows: u64,
    /// Rows of the measured window never read back before the timeout.
    pub missing_rows: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Commit → ack, row by row. Relay rows: insert commit → the row's `sent_at`, which
    /// the relay's mark sets to its transaction's start once the broker acknowledged the
    /// row, so this bounds commit → ack from above (by the wait for the mark to start).
    /// Broker only: the produce call → its delivery report.
    #[serde(default)]
    pub ack: Option<Percentiles>,
    /// The relay's own `outbox_relay_end_to_end_latency_seconds` (row created_at →
    /// broker ack) over the measured window: the share of rows acked within 10 ms and
    /// 50 ms, and the upper bound of the bucket holding the 99th percentile. created_at is
    /// the inserting transaction's start, so this slightly overstates commit → ack.
    pub relay_ack_rows: Option<f64>,
    pub relay_ack_within_10ms: Option<f64>,
    pub relay_ack_within_50ms: Option<f64>,
    pub relay_ack_p99_bucket_ms: Option<f64>,
    /// The relay's batches over the measured window (outbox_relay_batch_size_rows and
    /// outbox_relay_batch_duration_seconds): how many, their mean size and duration.
    #[serde(default)]
    pub relay_batches: Option<f64>,
    #[serde(default)]
    pub relay_mean_batch_rows: Option<f64>,
    #[serde(default)]
    pub relay_mean_batch_ms: Option<f64>,
    /// The database statements that took the most time during the run.
    #[serde(default)]
    pub statements: Vec<crate::infra::Statement>,
    /// Checkpoints the server began during the run (warm-up, window and catch-up).
    #[serde(default)]
    pub checkpoints_during: Option<i64>,
}

impl Latency {
    /// Which wake-up it measured, for results from before `wakeup` was recorded too.
    pub fn wakeup_or_legacy(&self) -> Option<Wakeup> {
        match (self.wakeup, self.load.as_str()) {
            (Some(w), _) => Some(w),
            (None, "broker only") => None,
            (None, _) if self.doorbell => Some(Wakeup::RingAlways),
            (None, _) => Some(Wakeup::Polling),
        }
    }

    /// The row the latency targets are judged on: the default install's. Older results
    /// judged the trigger of their day.
    pub fn is_default_install(&self) -> bool {
        match (self.default_install, self.wakeup) {
            (Some(default), _) => default,
            (None, Some(w)) => w == Wakeup::Doorbell,
            (None, None) => self.doorbell && self.load != "broker only",
        }
    }

    pub fn wakeup_label(&self) -> &'static str {
        match (self.wakeup, self.wakeup_or_legacy()) {
            (None, Some(Wakeup::RingAlways)) => "on",
            (None, Some(_)) => "off",
            (_, Some(w)) => w.label(),
            (_, None) => "–",
        }
    }
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub rows: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    #[serde(default)]
    pub mean_ms: f64,
}

impl Percentiles {
    /// From latencies in microseconds.
    pub(crate) fn of(micros: impl IntoIterator<Item = u64>) -> Result<Option<Self>> {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        for us in micros {
            histogram.record(us.max(1))?;
        }
        if histogram.is_empty() {
            return Ok(None);
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Ok(Some(Self {
            rows: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1000.0,
        }))
    }
}

/// Microseconds since the Unix epoch of `stamp` (nanoseconds since `base`, taken at
/// `base_wall`): the clock PostgreSQL's `now()` reads.
fn wall_micros(base_wall: SystemTime, stamp: u64) -> u64 {
    let base = base_wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    (base.as_nanos() as u64 + stamp) / 1000
}

/// Commit → `sent_at` of the rows after the warm-up, once the relay has marked them all
/// (or 30 s have passed).
async fn commit_to_marked(
    db: &Db,
    committed: &[AtomicU64],
    warmup_rows: u64,
    base_wall: SystemTime,
) -> Result<Option<Percentiles>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let unmarked: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(&db.pool)
            .await?;
        if unmarked == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let marked: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT (payload->>'seq')::bigint, (extract(epoch FROM sent_at) * 1000000)::bigint \
         FROM outbox WHERE sent_at IS NOT NULL",
    )
    .fetch_all(&db.pool)
    .await?;
    Percentiles::of(marked.into_iter().filter_map(|(seq, sent_us)| {
        let seq = u64::try_from(seq).ok().filter(|s| *s >= warmup_rows)?;
        let commit = committed.get(seq as usize)?.load(Ordering::Relaxed);
        (commit > 0).then(|| (sent_us as u64).saturating_sub(wall_micros(base_wall, commit)))
    }))
}

const RELAY_LATENCY: &str = "outbox_relay_end_to_end_latency_seconds";

/// The rows, fractions within 10 and 50 ms and the p99 bucket bound of the relay's latency
/// histogram between two scrapes.
fn relay_window(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<(f64, f64, f64, f64)> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - earlier)
        })
        .collect();
    let total = delta.iter().find(|(le, _)| le.is_infinite())?.1;
    if total <= 0.0 {
        return None;
    }
    let within = |limit: f64| {
        delta
            .iter()
            .find(|(le, _)| (*le - limit).abs() < 1e-9)
            .map_or(f64::NAN, |(_, n)| n / total)
    };
    let p99 = delta
        .iter()
        .find(|(_, n)| *n >= 0.99 * total)
        .map_or(f64::INFINITY, |(le, _)| le * 1000.0);
    Some((total, within(0.010), within(0.050), p99))
}

#[derive(Clone)]
pub struct LatencyPlan {
    pub warmup: Duration,
    pub measure: Duration,
    pub connections: u32,
    /// At most this many inserting transactions per second: a higher row rate puts
    /// several rows in each transaction.
    pub max_transactions_per_second: f64,
}

impl LatencyPlan {
    pub fn rows_per_transaction(&self, rate: f64) -> u64 {
        (rate / self.max_transactions_per_second).ceil().max(1.0) as u64
    }
}

/// Nanoseconds since `base`, 0 meaning "not yet".
fn stamp(base: Instant) -> u64 {
    (base.elapsed().as_nanos() as u64).max(1)
}

/// The sequence number at the front of a payload as jsonb prints it (`{"seq": N, ...`: jsonb
/// orders keys by length, and `seq` is the shortest).
fn seq_of(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix("{\"seq\": ")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// Reads the topic from the beginning on a thread of its own, stamping each record's
/// arrival by its sequence number.
pub(crate) fn start_consumer(
    bootstrap: &str,
    base: Instant,
    received: Arc<Vec<AtomicU64>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<u64>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-relay-bench-latency")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .set("fetch.queue.backoff.ms", "0")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(TOPIC, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(std::thread::spawn(move || {
        let mut count = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Some(message) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let message = message.context("consumer")?;
            let now = stamp(base);
            if let Some(seq) = message.payload().and_then(seq_of) {
                if let Some(slot) = received.get(seq as usize) {
                    let _ = slot.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                    count += 1;
                }
            }
        }
        Ok(count)
    }))
}

/// Waits until the relay's /metrics say it holds all 256 shards.
async fn wait_ready(relay: &mut RelayProcess) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if relay.exited() {
            bail!("the relay exited at start: {}", relay.log_tail());
        }
        if let Some(text) = relay.metrics().await {
            if RelayProcess::metric_sum(&text, "outbox_relay_shards_owned") >= 256.0 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the relay did not take its shards within 60 s: {}",
                relay.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows inserted at a fixed rate and read back by a consumer ([`insert_and_consume`]).
pub(crate) struct LoadRun {
    /// Per sequence number: when its row's transaction committed and when its record
    /// reached the consumer, in nanoseconds on one clock (0: never).
    pub committed: Arc<Vec<AtomicU64>>,
    pub received: Arc<Vec<AtomicU64>>,
    /// Rows of the warm-up (the sequence numbers below), not measured.
    pub warmup_rows: u64,
    pub per_tx: u64,
    /// Each measured transaction's duration (execute → commit), in microseconds.
    pub commit_micros: Vec<u64>,
    /// The wall clock at the stamps' zero (PostgreSQL's `now()` reads the wall clock).
    pub base_wall: SystemTime,
}

/// What every latency measurement shares, with whatever publishes the outbox (the relay,
/// Debezium) already running against `db` and the broker at `bootstrap`: rows inserted at
/// `rate` rows/s from `plan.connections` connections for the warm-up plus the measured
/// window, each row's commit and its record's arrival at a consumer stamped, until every
/// measured row has arrived or 60 s have passed since the last commit. `window_opens` is
/// told, before the first insert, when the measured window opens.
pub(crate) async fn insert_and_consume(
    db: &Db,
    bootstrap: &str,
    rate: f64,
    plan: &LatencyPlan,
    window_opens: impl FnOnce(tokio::time::Instant),
) -> Result<LoadRun> {
    let warmup_rows = (rate * plan.warmup.as_secs_f64()).round() as u64;
    let total = warmup_rows + (rate * plan.measure.as_secs_f64()).round() as u64;
    let (base, base_wall) = (Instant::now(), SystemTime::now());
    let committed: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let received: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = start_consumer(bootstrap, base, received.clone(), stop.clone())?;

    let pool = Db::pool(&db.url, plan.connections).await?;
    let per_tx = plan.rows_per_transaction(rate);
    let transactions = total.div_ceil(per_tx);
    let period_ns = 1e9 * per_tx as f64 / rate;
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    window_opens(start + plan.warmup);
    let mut workers = Vec::new();
    for w in 0..plan.connections as u64 {
        let pool = pool.clone();
        let committed = committed.clone();
        let step = plan.connections as u64;
        workers.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            let mut durations = Vec::new();
            let mut tx = w;
            while tx < transactions {
                let due = start + Duration::from_nanos((tx as f64 * period_ns) as u64);
                tokio::time::sleep_until(due).await;
                let seqs = tx * per_tx..((tx + 1) * per_tx).min(total);
                let began = Instant::now();
                if per_tx == 1 {
                    sqlx::query(INSERT)
                        .bind(format!("agg-{}", tx % crate::infra::AGGREGATES as u64))
                        .bind(payload_json(tx))
                        .execute(&mut *conn)
                        .await?;
                } else {
                    let keys: Vec<String> = seqs
                        .clone()
                        .map(|q| format!("agg-{}", q % crate::infra::AGGREGATES as u64))
                        .collect();
                    let payloads: Vec<String> = seqs.clone().map(payload_json).collect();
                    sqlx::query(INSERT_MANY)
                        .bind(&keys)
                        .bind(&payloads)
                        .execute(&mut *conn)
                        .await?;
                }
                let now = stamp(base);
                if seqs.start >= warmup_rows {
                    durations.push(began.elapsed().as_micros() as u64);
                }
                for seq in seqs {
                    committed[seq as usize].store(now, Ordering::Relaxed);
                }
                tx += step;
            }
            anyhow::Ok(durations)
        }));
    }
    let mut commit_micros = Vec::new();
    for worker in workers {
        commit_micros.extend(worker.await??);
    }
    pool.close().await;

    // Everything committed should arrive; give polling (without the doorbell) and a
    // backlog built up under load time to clear.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && received[warmup_rows as usize..]
            .iter()
            .any(|r| r.load(Ordering::Relaxed) == 0)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _consumed = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
    Ok(LoadRun {
        committed,
        received,
        warmup_rows,
        per_tx,
        commit_micros,
        base_wall,
    })
}

/// One latency measurement: inserts single-row transactions at `rate` rows/s for the
/// warm-up plus the measured window, from `plan.connections` connections.
#[allow(clippy::too_many_arguments)]
pub async fn measure(
    db: &Db,
    launcher: &RelayLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    wakeup: Wakeup,
    load: &str,
    rate: f64,
    plan: &LatencyPlan,
) -> Result<Latency> {
    db.reset().await?;
    wakeup.install(launcher, db).await?;
    let broker = Broker::start(broker_source.0, broker_source.1, work).await?;
    broker.create_topic().await?;
    let settled = db.settle().await?;
    let mut relay = launcher.spawn(
        &db.url,
        &broker.bootstrap,
        "mark",
        "bench-latency",
        &wakeup.relay_env(),
    )?;
    wait_ready(&mut relay).await?;
    db.statements_reset().await;

    // The relay's histogram as the measured window opens (after the warm-up).
    let scrape_port = relay.http_port;
    let mut opening = None;
    let run = insert_and_consume(db, &broker.bootstrap, rate, plan, |window| {
        opening = Some(tokio::spawn(async move {
            tokio::time::sleep_until(window).await;
            crate::infra::http_get(scrape_port, "/metrics").await
        }));
    })
    .await?;
    let ack = commit_to_marked(db, &run.committed, run.warmup_rows, run.base_wall).await?;
    let before = match opening {
        Some(opening) => opening.await?.unwrap_or_default(),
        None => String::new(),
    };
    let after = relay.metrics().await.unwrap_or_default();
    let checkpoints_during = db.checkpoints_since(settled).await?;
    let statements = db.top_statements(5).await;
    let _ = relay.stop().await;
    broker.stop().await;

    let mut result = run.summarize(wakeup.trigger(), load, rate, plan.connections)?;
    result.ack = ack;
    result.wakeup = Some(wakeup);
    result.default_install = Some(wakeup == Wakeup::Default);
    if let Some((rows, ten, fifty, p99)) = relay_window(
        &RelayProcess::histogram_buckets(&before, RELAY_LATENCY),
        &RelayProcess::histogram_buckets(&after, RELAY_LATENCY),
    ) {
        result.relay_ack_rows = Some(rows);
        result.relay_ack_within_10ms = Some(ten);
        result.relay_ack_within_50ms = Some(fifty);
        result.relay_ack_p99_bucket_ms = Some(p99);
    }
    result.statements = statements;
    result.checkpoints_during = Some(checkpoints_during);
    let delta = |name: &str| {
        RelayProcess::metric_sum(&after, name) - RelayProcess::metric_sum(&before, name)
    };
    let batches = delta("outbox_relay_batch_size_rows_count");
    if !before.is_empty() && !after.is_empty() && batches > 0.0 {
        result.relay_batches = Some(batches);
        result.relay_mean_batch_rows = Some(delta("outbox_relay_batch_size_rows_sum") / batches);
        result.relay_mean_batch_ms =
            Some(delta("outbox_relay_batch_duration_seconds_sum") * 1000.0 / batches);
    }
    Ok(result)
}

impl LoadRun {
    /// The latency of this run's measured rows, and how long their transactions took.
    pub(crate) fn summarize(
        &self,
        doorbell: bool,
        load: &str,
        rate: f64,
        connections: u32,
    ) -> Result<Latency> {
        let mut latency = summarize(
            &self.committed,
            &self.received,
            self.warmup_rows,
            Summary {
                doorbell,
                load,
                rate,
                per_tx: self.per_tx,
                connections,
            },
        )?;
        latency.commit = Percentiles::of(self.commit_micros.iter().copied())?;
        Ok(latency)
    }
}

struct Summary<'a> {
    doorbell: bool,
    load: &'a str,
    rate: f64,
    per_tx: u64,
    connections: u32,
}

/// Percentiles of arrival − commit over the rows after the warm-up.
fn summarize(
    committed: &[AtomicU64],
    received: &[AtomicU64],
    warmup_rows: u64,
    s: Summary<'_>,
) -> Result<Latency> {
    let total = committed.len() as u64;
    let mut latencies_us = Vec::with_capacity((total - warmup_rows) as usize);
    let mut missing = 0u64;
    let (mut first_commit, mut last_commit) = (u64::MAX, 0u64);
    for seq in warmup_rows as usize..total as usize {
        let c = committed[seq].load(Ordering::Relaxed);
        let r = received[seq].load(Ordering::Relaxed);
        first_commit = first_commit.min(c);
        last_commit = last_commit.max(c);
        if r == 0 {
            missing += 1;
            continue;
        }
        latencies_us.push(r.saturating_sub(c) / 1000);
    }
    let measured = total - warmup_rows;
    let span = (last_commit.saturating_sub(first_commit)) as f64 / 1e9;
    let percentiles = Percentiles::of(latencies_us)?.unwrap_or_default();
    Ok(Latency {
        doorbell: s.doorbell,
        wakeup: None,
        default_install: None,
        commit: None,
        load: s.load.into(),
        rows_per_transaction: s.per_tx,
        target_rows_per_second: s.rate,
        achieved_rows_per_second: if span > 0.0 {
            measured.saturating_sub(s.per_tx) as f64 / span
        } else {
            0.0
        },
        connections: s.connections,
        measured_rows: measured,
        missing_rows: missing,
        p50_ms: percentiles.p50_ms,
        p99_ms: percentiles.p99_ms,
        p999_ms: percentiles.p999_ms,
        max_ms: percentiles.max_ms,
        mean_ms: percentiles.mean_ms,
        ack: None,
        relay_ack_rows: None,
        relay_ack_within_10ms: None,
        relay_ack_within_50ms: None,
        relay_ack_p99_bucket_ms: None,
        relay_batches: None,
        relay_mean_batch_rows: None,
        relay_mean_batch_ms: None,
        statements: Vec::new(),
        checkpoints_during: None,
    })
}

/// Stamps each record's delivery report by its sequence number.
struct AckStamps {
    base: Instant,
    acked: Arc<Vec<AtomicU64>>,
}

impl ClientContext for AckStamps {}

impl ProducerContext for AckStamps {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        if result.is_ok() {
            if let Some(slot) = self.acked.get(seq) {
                slot.store(stamp(self.base), Ordering::Relaxed);
            }
        }
    }
}

/// The floor under the relay's latency: records produced with the relay's producer
/// settings (acks=all, idempotent, lz4) at `rate` records/s straight to the broker, each
/// sent at once (linger 0: the relay sends a batch as soon as it is queued),
/// read by the same consumer; measured from the produce call, to the consumer and to the
/// delivery report.
pub async fn broker_floor(
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    rate: f64,
    plan: &LatencyPlan,
) -> Result<Latency> {
    let broker = Broker::start(broker_source.0, broker_source.1, work).await?;
    broker.create_topic().await?;
    let warmup_rows = (rate * plan.warmup.as_secs_f64()).round() as u64;
    let total = warmup_rows + (rate * plan.measure.as_secs_f64()).round() as u64;
    let base = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let received: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = start_consumer(&broker.bootstrap, base, received.clone(), stop.clone())?;
    let bootstrap = broker.bootstrap.clone();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let producing = sent.clone();
    let context = AckStamps {
        base,
        acked: acked.clone(),
    };
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut config = ClientConfig::new();
        for (key, value) in relay_producer_properties(&bootstrap) {
            config.set(key, value);
        }
        config.set("linger.ms", "0");
        let producer: ThreadedProducer<AckStamps> = config.create_with_context(context)?;
        producer
            .client()
            .fetch_metadata(Some(TOPIC), Duration::from_secs(10))?;
        let start = Instant::now() + Duration::from_millis(200);
        for seq in 0..total {
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let key = format!("agg-{}", seq % crate::infra::AGGREGATES as u64);
            let value = payload_json(seq);
            producing[seq as usize].store(stamp(base), Ordering::Relaxed);
            producer
                .send(
                    BaseRecord::with_opaque_to(TOPIC, seq as usize)
                        .key(&key)
                        .payload(&value),
                )
                .map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(30))?;
        Ok(())
    })
    .await??;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && received[warmup_rows as usize..]
            .iter()
            .any(|r| r.load(Ordering::Relaxed) == 0)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
    broker.stop().await;
    let mut floor = summarize(
        &sent,
        &received,
        warmup_rows,
        Summary {
            doorbell: false,
            load: "broker only",
            rate,
            per_tx: 1,
            connections: 1,
        },
    )?;
    floor.ack = Percentiles::of((warmup_rows as usize..total as usize).filter_map(|seq| {
        let (s, a) = (
            sent[seq].load(Ordering::Relaxed),
            acked[seq].load(Ordering::Relaxed),
        );
        (a > 0).then(|| a.saturating_sub(s) / 1000)
    }))?;
    Ok(floor)
}

/// Single-row INSERT transactions (autocommit) from `connections` connections for
/// `duration`, counted once every connection has started; returns commits per second.
async fn commit_rate(db: &Db, connections: u32, duration: Duration) -> Result<f64> {
    let writers = Writers::start(db, connections).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rate = writers.rate_over(duration).await;
    writers.stop().await?;
    Ok(rate)
}

/// The application's single-row commit rate with one way of waking the relay in place,
/// the relay running and publishing what is committed (no relay and no trigger for
/// `None`, the application alone).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WakeupCost {
    pub connections: u32,
    pub seconds: f64,
    /// `None`: no relay, no trigger.
    pub wakeup: Option<Wakeup>,
    /// Whether the relay ran: without it, the trigger's own cost (absent from older
    /// results, where it always ran).
    #[serde(default = "yes")]
    pub relay_running: bool,
    pub commits_per_second: f64,
    /// Rows the relay published meanwhile (its rows_marked_total), 0 without a relay.
    pub rows_published: f64,
    /// Notifications the relay received meanwhile (its doorbell_notifications_total).
    #[serde(default)]
    pub notifications: f64,
}

fn yes() -> bool {
    true
}

/// A fresh broker with the bench's topic, and a relay (mark mode) on it, ready.
async fn broker_and_relay(
    db: &Db,
    launcher: &RelayLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    replica_id: &str,
    env: &[(&str, String)],
) -> Result<(Broker, RelayProcess)> {
    let broker = Broker::start(broker_source.0, broker_source.1, work).await?;
    broker.create_topic().await?;
    db.settle().await?;
    let mut relay = launcher.spawn(&db.url, &broker.bootstrap, "mark", replica_id, env)?;
    wait_ready(&mut relay).await?;
    Ok((broker, relay))
}

/// [`WakeupCost`] of `wakeup` from `connections` connections for `duration`, with the
/// relay running or not.
#[allow(clippy::too_many_arguments)]
pub async fn wakeup_cost(
    db: &Db,
    launcher: &RelayLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    wakeup: Option<Wakeup>,
    relay_running: bool,
    connections: u32,
    duration: Duration,
) -> Result<WakeupCost> {
    db.reset().await?;
    let wakeup = match wakeup {
        Some(wakeup) if relay_running => wakeup,
        _ => {
            match wakeup {
                Some(wakeup) => wakeup.install(launcher, db).await?,
                None => launcher.migrate(&db.url, Some(false))?,
            }
            db.settle().await?;
            let rate = commit_rate(db, connections, duration).await?;
            return Ok(WakeupCost {
                connections,
                seconds: duration.as_secs_f64(),
                wakeup,
                relay_running: false,
                commits_per_second: rate,
                rows_published: 0.0,
                notifications: 0.0,
            });
        }
    };
    let (broker, relay) = wakeup
        .start_relay(db, launcher, broker_source, work, "bench-wakeup")
        .await?;
    let rate = commit_rate(db, connections, duration).await;
    let metrics = relay.metrics().await.unwrap_or_default();
    let _ = relay.stop().await;
    broker.stop().await;
    Ok(WakeupCost {
        connections,
        seconds: duration.as_secs_f64(),
        wakeup: Some(wakeup),
        relay_running: true,
        commits_per_second: rate?,
        rows_published: RelayProcess::metric_sum(&metrics, "outbox_relay_rows_marked_total"),
        notifications: RelayProcess::metric_sum(
            &metrics,
            "outbox_relay_doorbell_notifications_total",
        ),
    })
}

/// The trigger's cost as older runs measured it: commits/s with no relay running, trigger
/// off and on (kept so their results still load).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotifyCost {
    pub connections: u32,
    pub seconds: f64,
    pub commits_per_second_trigger_off: f64,
    pub commits_per_second_trigger_on: f64,
    /// (on − off) / off: negative when the trigger slows commits down.
    pub change: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_histogram_window() {
        let before = [
            (0.005, 10.0),
            (0.01, 10.0),
            (0.05, 10.0),
            (f64::INFINITY, 10.0),
        ];
        let after = [
            (0.005, 60.0),
            (0.01, 108.0),
            (0.05, 110.0),
            (f64::INFINITY, 110.0),
        ];
        let (rows, ten, fifty, p99) = relay_window(&before, &after).unwrap();
        assert_eq!(rows, 100.0);
        assert!((ten - 0.98).abs() < 1e-9);
        assert!((fifty - 1.0).abs() < 1e-9);
        assert_eq!(p99, 50.0);
    }

    #[test]
    fn percentiles_of_microseconds() {
        assert!(Percentiles::of(std::iter::empty()).unwrap().is_none());
        let p = Percentiles::of((1..=1000).map(|ms| ms * 1000))
            .unwrap()
            .unwrap();
        assert_eq!(p.rows, 1000);
        assert!((p.p50_ms - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99_ms - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max_ms - 1000.0).abs() < 1.0, "{p:?}");
        assert!((p.mean_ms - 500.5).abs() < 1.0, "{p:?}");
    }

    #[test]
    fn wall_clock_of_a_stamp() {
        let base = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(wall_micros(base, 2_500_000), 1_000_002_500);
    }

    #[test]
    fn seq_from_jsonb_text() {
        assert_eq!(seq_of(br#"{"seq": 42, "blob": "x"}"#), Some(42));
        assert_eq!(seq_of(br#"{"blob": "x"}"#), None);
    }
}

/// The doorbell trigger's cost to the application measured in pairs of windows on one
/// running relay, the writers never stopping: the trigger installed for one window and
/// removed for the other, in the order ABBA ABBA..., so that the host's drift (autovacuum,
/// checkpoints, the table's growth) falls on both alike. Measurements made each on a fresh
/// relay, broker and table differ by up to 15 % between rounds; neighbouring windows of
/// one session much less.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedWakeupCost {
    pub connections: u32,
    pub window_seconds: f64,
    /// Commits per second in each window with the doorbell trigger in place, in pair order.
    pub with_trigger: Vec<f64>,
    /// The same in the other window of each pair: without the trigger (the relay polls),
    /// or with the baseline `against` names.
    pub without_trigger: Vec<f64>,
    /// What the doorbell is compared with: `none` (no trigger) or `trigger-without-when`
    /// (the doorbell before migration 11, its function called at every insert).
    #[serde(default = "no_trigger")]
    pub against: PairedBaseline,
    /// Notifications the relay received over the whole session.
    pub notifications: f64,
    pub rows_published: f64,
}

/// What the paired step compares the doorbell with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PairedBaseline {
    /// No trigger: the relay polls. What the ≤ 5 % target is judged against.
    None,
    /// The doorbell before migration 11: the same function, no WHEN clause, so every
    /// inserting statement calls it.
    TriggerWithoutWhen,
}

fn no_trigger() -> PairedBaseline {
    PairedBaseline::None
}

impl PairedBaseline {
    pub fn describe(self) -> &'static str {
        match self {
            Self::None => "without",
            Self::TriggerWithoutWhen => "with the trigger before migration 11 (no WHEN clause)",
        }
    }

    /// Puts this baseline in place of the doorbell.
    async fn install(self, db: &Db, launcher: &RelayLauncher) -> Result<()> {
        match self {
            Self::None => launcher.migrate(&db.url, Some(false)),
            Self::TriggerWithoutWhen => {
                sqlx::raw_sql(
                    "BEGIN; SET LOCAL lock_timeout = '10s'; \
                     DROP TRIGGER IF EXISTS outbox_notify ON outbox; \
                     CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT \
                     EXECUTE FUNCTION outbox_notify('outbox_relay'); COMMIT",
                )
                .execute(&db.pool)
                .await?;
                Ok(())
            }
        }
    }
}

impl PairedWakeupCost {
    /// Each pair's change of the commit rate with the trigger, as a fraction.
    pub fn changes(&self) -> Vec<f64> {
        self.with_trigger
            .iter()
            .zip(&self.without_trigger)
            .map(|(with, without)| with / without - 1.0)
            .collect()
    }
}

/// Writers committing single-row INSERT transactions until stopped, counting commits.
struct Writers {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    pool: sqlx::PgPool,
}

impl Writers {
    async fn start(db: &Db, connections: u32) -> Result<Self> {
        let pool = Db::pool(&db.url, connections).await?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..connections as u64 {
            let (pool, count, stop) = (pool.clone(), count.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn = pool.acquire().await?;
                let mut seq = w;
                while !stop.load(Ordering::Relaxed) {
                    sqlx::query(INSERT)
                        .bind(format!("agg-{}", seq % crate::infra::AGGREGATES as u64))
                        .bind(payload_json(seq))
                        .execute(&mut *conn)
                        .await?;
                    count.fetch_add(1, Ordering::Relaxed);
                    seq += connections as u64;
                }
                anyhow::Ok(())
            }));
        }
        Ok(Self {
            count,
            stop,
            tasks,
            pool,
        })
    }

    /// Commits per second over the next `window`.
    async fn rate_over(&self, window: Duration) -> f64 {
        let (before, started) = (self.count.load(Ordering::Relaxed), Instant::now());
        tokio::time::sleep(window).await;
        let commits = self.count.load(Ordering::Relaxed) - before;
        commits as f64 / started.elapsed().as_secs_f64()
    }

    async fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await??;
        }
        self.pool.close().await;
        Ok(())
    }
}

/// [`PairedWakeupCost`] from `connections` connections, `pairs` pairs of `window`.
#[allow(clippy::too_many_arguments)]
pub async fn paired_wakeup_cost(
    db: &Db,
    launcher: &RelayLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    connections: u32,
    window: Duration,
    pairs: usize,
    against: PairedBaseline,
    mut progress: impl FnMut(String),
) -> Result<PairedWakeupCost> {
    db.reset().await?;
    let (broker, relay) = Wakeup::Doorbell
        .start_relay(db, launcher, broker_source, work, "bench-wakeup-paired")
        .await?;
    let writers = Writers::start(db, connections).await?;
    // Past the writers' start and the relay's first batches.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut cost = PairedWakeupCost {
        connections,
        window_seconds: window.as_secs_f64(),
        with_trigger: Vec::new(),
        without_trigger: Vec::new(),
        against,
        notifications: 0.0,
        rows_published: 0.0,
    };
    let mut measured = Ok(());
    for pair in 0..pairs {
        let order = if pair % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut rates = [0.0; 2];
        for trigger in order {
            // Installing or removing the trigger locks the table for a moment: the window
            // starts once it is done and the writers are past it.
            let installed = if trigger {
                launcher.migrate(&db.url, Some(true))
            } else {
                against.install(db, launcher).await
            };
            if let Err(err) = installed {
                measured = Err(err);
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            rates[usize::from(!trigger)] = writers.rate_over(window).await;
        }
        if measured.is_err() {
            break;
        }
        cost.with_trigger.push(rates[0]);
        cost.without_trigger.push(rates[1]);
        progress(format!(
            "  pair {} of {pairs}: {:.0} commits/s with the trigger, {:.0} {} ({:+.1}%)",
            pair + 1,
            rates[0],
            rates[1],
            against.describe(),
            (rates[0] / rates[1] - 1.0) * 100.0
        ));
    }
    let stopped = writers.stop().await;
    let metrics = relay.metrics().await.unwrap_or_default();
    cost.rows_published = RelayProcess::metric_sum(&metrics, "outbox_relay_rows_marked_total");
    cost.notifications =
        RelayProcess::metric_sum(&metrics, "outbox_relay_doorbell_notifications_total");
    let _ = relay.stop().await;
    broker.stop().await;
    launcher.migrate(&db.url, Some(false))?;
    measured?;
    stopped?;
    Ok(cost)
}
