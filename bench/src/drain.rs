//! Draining a backlog: the relay (1 or several replicas, as subprocesses) and the peer
//! (bench/peer.py, the loop a team writes by hand), timed from start until nothing is
//! pending, with the start-up (until the first retirement) measured apart, and the WAL the
//! server wrote meanwhile counted per row. (Debezium's drain, in debezium.rs, fills the
//! same record.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::infra::{
    Broker, Db, ONE_KB_ROW, RelayLauncher, RelayProcess, Statement, TOPIC, busy_cores_since,
    cpu_time, machine_busy_time, peak_rss, spawn_tied,
};

/// How often the peer's process is polled, and the relays' /metrics at the start and
/// near the end of a drain.
const POLL: Duration = Duration::from_millis(25);
/// The longest wait between two scrapes of the relays' /metrics mid-drain. A scrape costs
/// a relay about 0.4 ms of CPU, which counts in its CPU per row: the wait grows with the
/// rows still to go at the rate seen so far, and shrinks to POLL as the end nears.
const MAX_SCRAPE_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Drain {
    /// `relay`, `peer` or `debezium`.
    pub who: String,
    /// `mark` or `delete`; `wal` for Debezium, which reads the inserts from the WAL and
    /// leaves the rows in the table.
    pub mode: String,
    pub replicas: u32,
    pub rows: u64,
    /// About how large each row's payload is (1 KB unless the wide-rows step).
    #[serde(default = "one_kb_row")]
    pub row_bytes: u64,
    pub make_rows_seconds: f64,
    /// Start of the process(es) until the first rows were retired.
    pub startup_seconds: f64,
    /// Start until nothing was pending.
    pub total_seconds: f64,
    /// First retirement until nothing was pending.
    pub drain_seconds: f64,
    /// Rows retired after the first retirement, per second of `drain_seconds`: the
    /// steady drain rate, start-up excluded.
    pub rows_per_second: f64,
    /// All rows over `total_seconds`, start-up included.
    pub rows_per_second_with_startup: f64,
    /// utime + stime of all replicas from start to drained.
    pub cpu_seconds: f64,
    pub cpu_us_per_row: f64,
    /// Largest VmHWM of one replica.
    pub peak_rss_bytes: u64,
    /// Records in the topic afterwards (at least `rows`; more means resends).
    pub records_in_kafka: i64,
    pub broker_peak_rss_bytes: Option<u64>,
    /// Batches the relay reported (outbox_relay_batch_duration_seconds), and their mean
    /// duration: read, produce, acks and mark of one batch.
    pub batches: u64,
    pub mean_batch_ms: f64,
    /// The database statements that took the most time during the drain.
    pub statements: Vec<Statement>,
    /// Checkpoints the server began while the backlog was made and drained.
    #[serde(default)]
    pub checkpoints_during: Option<i64>,
    /// WAL the server wrote from the start of the drain until it was done, per row of the
    /// backlog (the marks or deletes; Debezium only reads). Absent from older results.
    #[serde(default)]
    pub wal_bytes_per_row: Option<f64>,
    /// Cores the whole machine kept busy on average from start to drained (PostgreSQL,
    /// the broker, the contender and the bench together). Absent from older results.
    #[serde(default)]
    pub busy_cores: Option<f64>,
    /// The broker's CPU (user + system) from start to drained, per row.
    #[serde(default)]
    pub broker_cpu_us_per_row: Option<f64>,
}

/// The broker's CPU since `before` (a [`Broker::cpu_time`] reading), per row.
pub fn broker_cpu_per_row(broker: &Broker, before: Option<Duration>, rows: u64) -> Option<f64> {
    let used = broker.cpu_time()?.checked_sub(before?)?;
    Some(used.as_secs_f64() * 1e6 / rows.max(1) as f64)
}

fn one_kb_row() -> u64 {
    ONE_KB_ROW
}

impl Drain {
    /// Rows of the usual 1 KB event (the wide-rows step's are larger).
    pub fn of_one_kb_rows(&self) -> bool {
        self.row_bytes <= ONE_KB_ROW
    }

    /// The backlog: `200k`, or `1.5k × 200 KB` for wide rows.
    pub fn backlog(&self) -> String {
        if self.of_one_kb_rows() {
            human_rows(self.rows)
        } else {
            format!("{} × {} KB", human_rows(self.rows), self.row_bytes / 1000)
        }
    }

    pub fn label(&self) -> String {
        let size = self.backlog();
        match self.who.as_str() {
            "peer" => format!("peer {} {}", self.mode, size),
            "debezium" => format!("debezium {size}"),
            _ => format!("relay {} {} x{}", self.mode, size, self.replicas),
        }
    }
}

pub fn human_rows(rows: u64) -> String {
    if rows >= 1_000_000 && rows % 1_000_000 == 0 {
        format!("{}M", rows / 1_000_000)
    } else if rows >= 1_000 && rows % 1_000 == 0 {
        format!("{}k", rows / 1_000)
    } else {
        rows.to_string()
    }
}

/// What a drain starts from: `rows` pending rows of about `row_bytes` each.
#[derive(Debug, Clone, Copy)]
pub struct Backlog {
    pub rows: u64,
    pub row_bytes: u64,
}

impl Backlog {
    /// Rows of the usual 1 KB event.
    pub fn of(rows: u64) -> Self {
        Self {
            rows,
            row_bytes: ONE_KB_ROW,
        }
    }
}

/// A timeout proportional to the backlog: nothing here should drain slower than 500 rows/s.
pub fn drain_timeout(rows: u64) -> Duration {
    Duration::from_secs(120 + rows / 500)
}

/// Drains `rows` rows with `replicas` relay replicas in `mode` against a fresh broker.
pub async fn relay(
    db: &Db,
    launcher: &RelayLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    backlog: Backlog,
    mode: &str,
    replicas: u32,
) -> Result<Drain> {
    let Backlog { rows, row_bytes } = backlog;
    db.reset().await?;
    let settled = db.settle().await?;
    let make = db.make_rows_of(rows, mode, row_bytes).await?;
    let broker = Broker::start(broker_source.0, broker_source.1, work).await?;
    broker.create_topic().await?;
    db.statements_reset().await;

    let wal_before = db.wal_position().await?;
    let (busy_before, broker_before) = (machine_busy_time(), broker.cpu_time());
    let started = Instant::now();
    let mut procs: Vec<RelayProcess> = Vec::new();
    for i in 0..replicas {
        procs.push(launcher.spawn(
            &db.url,
            &broker.bootstrap,
            mode,
            &format!("bench-{mode}-{i}"),
            &[],
        )?);
    }
    let deadline = started + drain_timeout(rows);
    let mut first: Option<(Instant, f64)> = None;
    let mut last_db_check = Instant::now();
    // Done when the replicas' rows_marked_total (rows marked or deleted; each row once)
    // adds up to the backlog: polling the database instead would load it while it is
    // measured (an EXISTS over the pending index walks the not yet vacuumed entries).
    // A database check every 2 s backs it up. The end is seen within POLL: the scrapes
    // come closer together as it nears.
    loop {
        for p in procs.iter_mut() {
            if p.exited() {
                bail!(
                    "relay replica {} exited during the drain; its log:\n{}",
                    p.replica_id,
                    p.log_tail()
                );
            }
        }
        let mut retired = 0.0;
        for p in &procs {
            if let Some(text) = p.metrics().await {
                retired += RelayProcess::metric_sum(&text, "outbox_relay_rows_marked_total");
            }
        }
        if first.is_none() && retired > 0.0 {
            first = Some((Instant::now(), retired));
        }
        if retired >= rows as f64 {
            break;
        }
        let wait = match first {
            Some((at, at_rows)) if retired > at_rows => {
                let rate = (retired - at_rows) / at.elapsed().as_secs_f64();
                let to_go = (rows as f64 - retired) / rate;
                Duration::from_secs_f64(to_go / 4.0).clamp(POLL, MAX_SCRAPE_INTERVAL)
            }
            _ => POLL,
        };
        if last_db_check.elapsed() >= Duration::from_secs(2) {
            last_db_check = Instant::now();
            if !db.any_pending().await? {
                break;
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("{}:\n{}", p.replica_id, p.log_tail()))
                .collect();
            bail!(
                "the relay did not drain {rows} rows within {:?} ({retired} retired); the replicas' logs:\n{}",
                drain_timeout(rows),
                logs.join("\n")
            );
        }
        tokio::time::sleep(wait).await;
    }
    let done = Instant::now();
    let busy_cores = busy_cores_since(busy_before, done - started);
    let broker_cpu_us_per_row = broker_cpu_per_row(&broker, broker_before, rows);
    let wal_after = db.wal_position().await?;
    let mut cpu = Duration::ZERO;
    let mut rss = 0u64;
    for p in &procs {
        cpu += cpu_time(p.pid()).unwrap_or_default();
        rss = rss.max(peak_rss(p.pid()).unwrap_or(0));
    }
    let checkpoints_during = db.checkpoints_since(settled).await?;
    let statements = db.top_statements(6).await;
    let (mut batches, mut batch_seconds) = (0.0, 0.0);
    for p in &procs {
        if let Some(text) = p.metrics().await {
            batches += RelayProcess::metric_sum(&text, "outbox_relay_batch_duration_seconds_count");
            batch_seconds +=
                RelayProcess::metric_sum(&text, "outbox_relay_batch_duration_seconds_sum");
        }
    }
    for p in procs {
        let id = p.replica_id.clone();
        if let Some(status) = p.stop().await {
            if !status.success() {
                eprintln!("warning: relay replica {id} exited with {status}");
            }
        }
    }
    let (first_at, first_rows) = first.unwrap_or((done, 0.0));
    let retired_after_first = rows as f64 - first_rows;
    let drain_seconds = (done - first_at).as_secs_f64();
    let total_seconds = (done - started).as_secs_f64();
    let records = broker.records().await.unwrap_or(-1);
    let broker_rss = broker.peak_rss();
    broker.stop().await;
    check_retired(db, rows, mode).await?;
    Ok(Drain {
        who: "relay".into(),
        mode: mode.into(),
        replicas,
        rows,
        row_bytes,
        make_rows_seconds: make.as_secs_f64(),
        startup_seconds: (first_at - started).as_secs_f64(),
        total_seconds,
        drain_seconds,
        rows_per_second: if drain_seconds > 0.0 {
            retired_after_first / drain_seconds
        } else {
            0.0
        },
        rows_per_second_with_startup: rows as f64 / total_seconds,
        cpu_seconds: cpu.as_secs_f64(),
        cpu_us_per_row: cpu.as_secs_f64() * 1e6 / rows as f64,
        peak_rss_bytes: rss,
        records_in_kafka: records,
        broker_peak_rss_bytes: broker_rss,
        batches: batches as u64,
        mean_batch_ms: if batches > 0.0 {
            batch_seconds * 1000.0 / batches
        } else {
            0.0
        },
        statements,
        checkpoints_during: Some(checkpoints_during),
        wal_bytes_per_row: Some(wal_per_row(wal_before, wal_after, rows)),
        busy_cores,
        broker_cpu_us_per_row,
    })
}

/// WAL bytes per row of a backlog between two [`Db::wal_position`] readings.
pub fn wal_per_row(before: i64, after: i64, rows: u64) -> f64 {
    (after - before).max(0) as f64 / rows.max(1) as f64
}

async fn check_retired(db: &Db, rows: u64, mode: &str) -> Result<()> {
    let left = db.count("sent_at IS NULL").await?;
    let sent = db.count("sent_at IS NOT NULL").await?;
    let ok = match mode {
        "mark" => left == 0 && sent == rows as i64,
        _ => left == 0 && sent == 0,
    };
    if !ok {
        bail!("after the drain ({mode}): {left} rows unsent, {sent} marked, of {rows}");
    }
    Ok(())
}

/// What bench/peer.py prints as its last line.
#[derive(Debug, Deserialize)]
struct PeerReport {
    rows: u64,
    first_commit_rows: u64,
    seconds_from_first_commit: f64,
    cpu_seconds: f64,
    max_rss_bytes: u64,
    batches: u64,
    seconds_total: f64,
}

/// Where the peer runs: the venv's python and the script.
#[derive(Clone)]
pub struct PeerLauncher {
    pub python: PathBuf,
    pub script: PathBuf,
}

/// Drains `rows` rows with the hand-written peer.
pub async fn peer(
    db: &Db,
    peer: &PeerLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    rows: u64,
    mode: &str,
) -> Result<Drain> {
    db.reset().await?;
    let settled = db.settle().await?;
    let make = db.make_rows(rows, mode).await?;
    let broker = Broker::start(broker_source.0, broker_source.1, work).await?;
    broker.create_topic().await?;
    db.statements_reset().await;
    let log = work.join(format!("peer-{mode}.log"));
    let out = work.join(format!("peer-{mode}.json"));
    let mut command = Command::new(&peer.python);
    command
        .arg(&peer.script)
        .args(["--dsn", &db.url, "--bootstrap", &broker.bootstrap])
        .args(["--topic", TOPIC, "--mode", mode, "--batch", "1000"])
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&log)?);
    let wal_before = db.wal_position().await?;
    let (busy_before, broker_before) = (machine_busy_time(), broker.cpu_time());
    let started = Instant::now();
    let mut child = spawn_tied(command).context("starting the peer")?;
    let deadline = started + drain_timeout(rows);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the peer did not drain {rows} rows in time");
        }
        tokio::time::sleep(POLL).await;
    };
    let total_seconds = started.elapsed().as_secs_f64();
    let busy_cores = busy_cores_since(busy_before, started.elapsed());
    let broker_cpu_us_per_row = broker_cpu_per_row(&broker, broker_before, rows);
    let wal_after = db.wal_position().await?;
    if !status.success() {
        bail!(
            "the peer failed ({status}): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let text = std::fs::read_to_string(&out)?;
    let report: PeerReport = serde_json::from_str(text.lines().last().unwrap_or_default())
        .with_context(|| format!("peer output: {text}"))?;
    if report.rows != rows {
        bail!("the peer retired {} of {rows} rows", report.rows);
    }
    let checkpoints_during = db.checkpoints_since(settled).await?;
    let statements = db.top_statements(6).await;
    let records = broker.records().await.unwrap_or(-1);
    let broker_rss = broker.peak_rss();
    broker.stop().await;
    check_retired(db, rows, mode).await?;
    let drain_seconds = report.seconds_from_first_commit;
    Ok(Drain {
        who: "peer".into(),
        mode: mode.into(),
        replicas: 1,
        rows,
        row_bytes: ONE_KB_ROW,
        make_rows_seconds: make.as_secs_f64(),
        startup_seconds: (total_seconds - drain_seconds).max(0.0),
        total_seconds,
        drain_seconds,
        rows_per_second: (rows - report.first_commit_rows) as f64 / drain_seconds,
        rows_per_second_with_startup: rows as f64 / total_seconds,
        cpu_seconds: report.cpu_seconds,
        cpu_us_per_row: report.cpu_seconds * 1e6 / rows as f64,
        peak_rss_bytes: report.max_rss_bytes,
        records_in_kafka: records,
        broker_peak_rss_bytes: broker_rss,
        batches: report.batches,
        mean_batch_ms: report.seconds_total * 1000.0 / report.batches.max(1) as f64,
        statements,
        checkpoints_during: Some(checkpoints_during),
        wal_bytes_per_row: Some(wal_per_row(wal_before, wal_after, rows)),
        busy_cores,
        broker_cpu_us_per_row,
    })
}
