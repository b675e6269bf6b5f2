//! The pieces every measurement uses: child processes tied to the bench's life, the
//! benchmark database, a Kafka broker (a fresh tansu per measurement, or one given), and
//! the relay run as `target/release/outbox-relay run` subprocesses.

use std::net::TcpListener as StdTcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The topic the relay publishes the benchmark rows to (template
/// `outbox.event.{aggregate_type}`, aggregate type `order`).
pub const TOPIC: &str = "outbox.event.order";
pub const PARTITIONS: i32 = 3;
/// Distinct aggregate ids (record keys) of the generated rows.
pub const AGGREGATES: i64 = 10_000;
/// The outbox's fillfactor as `migrations/` leave it.
const MIGRATED_FILLFACTOR: u32 = 45;

// ---------------------------------------------------------------------------------------
// Processes

/// Spawns `command` so that it receives SIGKILL when the bench exits, even on a panic:
/// PR_SET_PDEATHSIG follows the spawning thread, so every child is spawned from one thread
/// that lives as long as the process.
pub fn spawn_tied(mut command: Command) -> Result<Child> {
    type Request = (Command, std_mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<std_mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut command, reply) in rx {
                // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let _ = reply.send(command.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std_mpsc::channel();
    command.stdin(Stdio::null());
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, reply_tx))
        .context("spawner thread gone")?;
    Ok(reply_rx.recv().context("spawner thread gone")??)
}

pub fn free_port() -> Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a pid this process spawned.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Waits for `child` to exit for at most `timeout`, then kills it.
pub async fn stop_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU time the whole machine has spent busy so far (every state of /proc/stat's `cpu`
/// line but idle and iowait), summed over its cores.
pub fn machine_busy_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    Some(ticks_to_duration(busy))
}

/// Cores the machine kept busy on average since `busy_before` (a [`machine_busy_time`]
/// reading) over `wall`: how close a measurement came to using every core.
pub fn busy_cores_since(busy_before: Option<Duration>, wall: Duration) -> Option<f64> {
    let busy = machine_busy_time()?.checked_sub(busy_before?)?;
    (wall > Duration::ZERO).then(|| busy.as_secs_f64() / wall.as_secs_f64())
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / per_second)
}

/// CPU time (user + system) a live process has used so far, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) are utime and stime; `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ticks_to_duration(utime + stime))
}

/// Peak resident set size (VmHWM) of a live process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kb(&status, "VmHWM:").map(|kb| kb * 1024)
}

fn status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn wait_port(port: u16, what: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// The benchmark database: its own database in the cluster run.sh started.
pub struct Db {
    pub url: String,
    pub pool: PgPool,
}

impl Db {
    /// Drops and creates `name` next to the maintenance database of `admin_url`.
    pub async fn create(admin_url: &str, name: &str) -> Result<Db> {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let url = url_with_path(admin_url, name)?;
        let pool = Self::pool(&url, 4).await?;
        // Statement timings for the diagnostics; absent unless the server preloads it.
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await;
        Ok(Db { url, pool })
    }

    /// Forgets the statement timings gathered so far (no-op without pg_stat_statements).
    pub async fn statements_reset(&self) {
        let _ = sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&self.pool)
            .await;
    }

    /// The statements that took the most time in this database since the last reset.
    pub async fn top_statements(&self, limit: i64) -> Vec<Statement> {
        sqlx::query_as::<_, (i64, f64, f64, i64, i64, i64, String)>(
            "SELECT calls, total_exec_time, mean_exec_time, rows, shared_blks_hit, shared_blks_read, \
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 200) \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query NOT LIKE '%pg_stat_statements%' \
             ORDER BY total_exec_time DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(
            |(calls, total_ms, mean_ms, rows, shared_blks_hit, shared_blks_read, query)| Statement {
                calls,
                total_ms,
                mean_ms,
                rows,
                shared_blks_hit,
                shared_blks_read,
                query,
            },
        )
        .collect()
    }

    /// A pool of `size` connections to the benchmark database.
    pub async fn pool(url: &str, size: u32) -> Result<PgPool> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.application_name("outbox-relay-bench");
        Ok(PgPoolOptions::new()
            .max_connections(size)
            .min_connections(size.min(64))
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options)
            .await?)
    }

    /// Empties the outbox and the lease tables, as a fresh installation has them.
    pub async fn reset(&self) -> Result<()> {
        sqlx::query("TRUNCATE outbox RESTART IDENTITY")
            .execute(&self.pool)
            .await?;
        self.set_fillfactor(MIGRATED_FILLFACTOR).await?;
        sqlx::query(
            "UPDATE outbox_shard_lease SET owner = NULL, epoch = 0, expires_at = NULL, \
             acquired_at = NULL, renewed_at = NULL",
        )
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM outbox_replica")
            .execute(&self.pool)
            .await?;
        // Dead rows of the previous step would otherwise be vacuumed during this one.
        sqlx::query("VACUUM outbox_shard_lease, outbox_replica")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_fillfactor(&self, fillfactor: u32) -> Result<()> {
        sqlx::query(&format!(
            "ALTER TABLE outbox SET (fillfactor = {fillfactor})"
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The make-rows step: `rows` pending 1 KB rows over [`AGGREGATES`] keys in one
    /// INSERT ... SELECT generate_series, then VACUUM ANALYZE. In delete mode, which never
    /// rewrites a row, the pages are filled to 90 % as docs/design.md (fillfactor) advises, not to the 45 %
    /// that leaves room to mark each row on its page. Returns how long it took.
    pub async fn make_rows(&self, rows: u64, mode: &str) -> Result<Duration> {
        self.make_rows_of(rows, mode, ONE_KB_ROW).await
    }

    /// [`Db::make_rows`] with rows of about `row_bytes` each: above [`ONE_KB_ROW`], the
    /// 1 KB event's fields plus a `pad` of hex digits that differ per row (lz4 and TOAST
    /// compress them about twofold, as they would real text).
    pub async fn make_rows_of(&self, rows: u64, mode: &str, row_bytes: u64) -> Result<Duration> {
        if mode == "delete" {
            self.set_fillfactor(90).await?;
        }
        let started = Instant::now();
        let pad_digits = row_bytes.saturating_sub(ONE_KB_ROW);
        let payload = if pad_digits == 0 {
            PAYLOAD_SQL.to_string()
        } else {
            format!(
                "{PAYLOAD_SQL} || jsonb_build_object('pad', (SELECT string_agg(md5(g::text || '/' || i::text), '') \
                 FROM generate_series(1, {}) AS i))",
                pad_digits.div_ceil(32)
            )
        };
        sqlx::query(&format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'agg-' || (g % {AGGREGATES}), 'OrderUpdated', {payload} \
             FROM generate_series(1::bigint, $1::bigint) AS g"
        ))
        .bind(rows as i64)
        .execute(&self.pool)
        .await
        .context("make-rows")?;
        sqlx::query("VACUUM ANALYZE outbox")
            .execute(&self.pool)
            .await?;
        let made = started.elapsed();
        // The backlog's pages sit dirty in the OS cache: written back during the
        // measurement, they would share the disk with its WAL flushes.
        tokio::task::spawn_blocking(|| {
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() }
        })
        .await?;
        Ok(made)
    }

    /// Starts a measurement from a checkpoint just taken (CHECKPOINT), and returns the
    /// server's checkpoint count for [`Db::checkpoints_since`]. Called before the backlog
    /// is made: its pages are then all new since the last checkpoint, and changing them logs
    /// no full-page images, unless a checkpoint comes before the measurement ends (run.sh
    /// spaces them so none does). Without it, where checkpoints fell depended on the WAL
    /// of the steps before.
    pub async fn settle(&self) -> Result<i64> {
        sqlx::query("CHECKPOINT")
            .execute(&self.pool)
            .await
            .context("CHECKPOINT before a measurement (needs a superuser or pg_checkpoint)")?;
        self.checkpoints().await
    }

    /// Checkpoints the server began since `settled` (a [`Db::settle`] count).
    pub async fn checkpoints_since(&self, settled: i64) -> Result<i64> {
        Ok(self.checkpoints().await? - settled)
    }

    async fn checkpoints(&self) -> Result<i64> {
        // PostgreSQL 17 moved the counters from pg_stat_bgwriter to pg_stat_checkpointer.
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
            .fetch_one(&self.pool)
            .await?;
        let sql = if version >= 170000 {
            "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
        } else {
            "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        };
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    /// Whether any row is still pending (the relay's predicate, on its partial index).
    pub async fn any_pending(&self) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn count(&self, sql_where: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar(&format!("SELECT count(*) FROM outbox WHERE {sql_where}"))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The server's WAL insert position, in bytes from the start of the WAL: two readings
    /// apart are the WAL written in between, by anyone.
    pub async fn wal_position(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn show(&self, setting: &str) -> Result<String> {
        Ok(sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&self.pool)
            .await?)
    }
}

/// One line of pg_stat_statements.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Statement {
    pub calls: i64,
    pub total_ms: f64,
    pub mean_ms: f64,
    pub rows: i64,
    /// Pages found in shared_buffers, and pages read from the OS (its cache or the disk).
    /// Absent from results recorded before they were collected.
    #[serde(default)]
    pub shared_blks_hit: i64,
    #[serde(default)]
    pub shared_blks_read: i64,
    pub query: String,
}

impl Statement {
    /// Mean pages per call: (found in shared_buffers, read from the OS).
    pub fn pages_per_call(&self) -> (f64, f64) {
        let calls = self.calls.max(1) as f64;
        (
            self.shared_blks_hit as f64 / calls,
            self.shared_blks_read as f64 / calls,
        )
    }
}

/// The size of the event [`PAYLOAD_SQL`] makes, as jsonb prints it.
pub const ONE_KB_ROW: u64 = 1000;

/// A 1 KB JSON event (about 1000 bytes as jsonb prints it): an order with a few fields,
/// some fixed text and 384 hex digits that differ per row, so lz4 compresses it about as
/// much as real events, not a hundredfold. Built as text and cast once (jsonb_build_object
/// is twice as slow). `g` is the row's sequence number.
pub const PAYLOAD_SQL: &str = "format(\
    '{\"seq\": %s, \"order_id\": \"agg-%s\", \"status\": \"placed\", \"currency\": \"EUR\", \
    \"total\": %s, \"customer\": \"%s\", \
    \"note\": \"Deliver to the back door; ring twice. Fragile: glassware, keep upright.\", \
    \"lines\": [{\"sku\": \"A-100\", \"qty\": 2, \"price\": 19.99, \"name\": \"Water glass, 6 pack\"}, \
    {\"sku\": \"B-220\", \"qty\": 1, \"price\": 4.5, \"name\": \"Gift wrap\"}, \
    {\"sku\": \"C-310\", \"qty\": 4, \"price\": 12.0, \"name\": \"Coaster, cork\"}], \
    \"description\": \"Order placed through the web shop; payment authorised by card; \
    items reserved in warehouse 3; expected dispatch within two working days.\", \
    \"blob\": \"%s\"}', \
    g, g % 10000, (g % 100000) * 0.07, md5(g::text), \
    encode(sha512(g::text::bytea) || sha512((-g)::text::bytea) || \
           sha256((g * 3)::text::bytea) || sha256((g * 5)::text::bytea), 'hex'))::jsonb";

/// The same event built client-side, for the latency and NOTIFY steps whose rows an
/// application inserts a few at a time. `seq` is first once jsonb has ordered the keys.
pub fn payload_json(seq: u64) -> String {
    let mut hex = String::with_capacity(416);
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while hex.len() < 416 {
        // xorshift64*: cheap, different per row, incompressible enough.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        hex.push_str(&format!("{:016x}", x.wrapping_mul(0x2545_F491_4F6C_DD1D)));
    }
    format!(
        "{{\"seq\": {seq}, \"order_id\": \"agg-{}\", \"status\": \"placed\", \"currency\": \"EUR\", \
         \"total\": {}.{:02}, \"customer\": \"{}\", \
         \"note\": \"Deliver to the back door; ring twice. Fragile: glassware, keep upright.\", \
         \"lines\": [{{\"sku\": \"A-100\", \"qty\": 2, \"price\": 19.99, \"name\": \"Water glass, 6 pack\"}}, \
         {{\"sku\": \"B-220\", \"qty\": 1, \"price\": 4.5, \"name\": \"Gift wrap\"}}, \
         {{\"sku\": \"C-310\", \"qty\": 4, \"price\": 12.0, \"name\": \"Coaster, cork\"}}], \
         \"description\": \"Order placed through the web shop; payment authorised by card; \
         items reserved in warehouse 3; expected dispatch within two working days.\", \
         \"blob\": \"{}\"}}",
        seq % AGGREGATES as u64,
        seq % 10_000,
        seq % 100,
        &hex[0..32],
        &hex[32..416],
    )
}

fn url_with_path(url: &str, database: &str) -> Result<String> {
    // postgres://user@host:port/db?query
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").context("database URL without scheme")? + 3;
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..path_start], database);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Kafka

/// A broker for one measurement: a fresh in-memory tansu (so earlier steps' records
/// neither take memory nor slow it down), or a broker given on the command line.
pub struct Broker {
    pub bootstrap: String,
    child: Option<Child>,
}

impl Broker {
    pub async fn start(
        tansu: Option<&Path>,
        external: Option<&str>,
        work: &Path,
    ) -> Result<Broker> {
        let broker = match (external, tansu) {
            (Some(bootstrap), _) => Broker {
                bootstrap: bootstrap.to_string(),
                child: None,
            },
            (None, Some(tansu)) => {
                let port = free_port()?;
                let url = format!("tcp://127.0.0.1:{port}");
                let log = work.join(format!("tansu-{port}.log"));
                let mut command = Command::new(tansu);
                command
                    .args(["broker", "--listener-url", &url])
                    .args(["--advertised-listener-url", &url])
                    .args(["--storage-engine", "memory://tansu/"])
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?);
                let child = spawn_tied(command).context("starting tansu")?;
                wait_port(port, "tansu", Duration::from_secs(30)).await?;
                Broker {
                    bootstrap: format!("127.0.0.1:{port}"),
                    child: Some(child),
                }
            }
            (None, None) => bail!("give --tansu-bin or --bootstrap"),
        };
        Ok(broker)
    }

    /// Creates the benchmark topic with [`PARTITIONS`] partitions. With an external
    /// broker the topic may exist from an earlier step: it is deleted first.
    pub async fn create_topic(&self) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        if self.child.is_none() {
            let _ = admin.delete_topics(&[TOPIC], &options).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let result = admin
                .create_topics(
                    &[NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1))],
                    &options,
                )
                .await;
            match result {
                Ok(results) if results.iter().all(|r| r.is_ok()) => return Ok(()),
                other if Instant::now() > deadline => bail!("create topic {TOPIC}: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Records in the topic. tansu 0.6's high watermark lags (it stops at the start of
    /// the last batch), so each partition is read from there to its real end.
    pub async fn records(&self) -> Result<i64> {
        let bootstrap = self.bootstrap.clone();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "outbox-relay-bench-count")
                .set("enable.auto.commit", "false")
                .create()?;
            let mut ends = Vec::new();
            let mut assignment = TopicPartitionList::new();
            for p in 0..PARTITIONS {
                let (low, high) = consumer.fetch_watermarks(TOPIC, p, Duration::from_secs(10))?;
                ends.push((low, high));
                assignment.add_partition_offset(TOPIC, p, Offset::Offset((high - 1).max(low)))?;
            }
            consumer.assign(&assignment)?;
            let mut last_seen = Instant::now();
            while last_seen.elapsed() < Duration::from_millis(1500) {
                let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let message = message?;
                last_seen = Instant::now();
                let end = &mut ends[message.partition() as usize].1;
                *end = (*end).max(message.offset() + 1);
            }
            Ok(ends.iter().map(|(low, high)| high - low).sum())
        })
        .await?
    }

    pub fn peak_rss(&self) -> Option<u64> {
        self.child.as_ref().and_then(|c| peak_rss(c.id()))
    }

    /// CPU time the broker's process has used so far (None for an external broker).
    pub fn cpu_time(&self) -> Option<Duration> {
        self.child.as_ref().and_then(|c| cpu_time(c.id()))
    }

    pub async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = None;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// librdkafka producer properties exactly as the relay builds them from its defaults
/// (src/config.rs `producer_properties`): lz4, linger 5 ms, idempotent, acks=all, no
/// message timeout, gap-less, murmur2_random.
pub fn relay_producer_properties(bootstrap: &str) -> Vec<(&'static str, String)> {
    vec![
        ("bootstrap.servers", bootstrap.to_string()),
        ("compression.type", "lz4".into()),
        ("linger.ms", "5".into()),
        ("enable.idempotence", "true".into()),
        ("acks", "all".into()),
        ("message.timeout.ms", "0".into()),
        ("enable.gapless.guarantee", "true".into()),
        ("message.max.bytes", (1_000_000 + 4096).to_string()),
        ("partitioner", "murmur2_random".into()),
        ("client.id", "outbox-relay-bench".into()),
        ("enable.metrics.push", "false".into()),
    ]
}

// ---------------------------------------------------------------------------------------
// The relay

/// One `outbox-relay run` replica.
pub struct RelayProcess {
    pub child: Child,
    pub http_port: u16,
    pub replica_id: String,
    pub log: PathBuf,
}

/// How the relay is started: its binary, an empty config file (so nothing in the
/// checkout's config/ applies) and a directory for logs.
#[derive(Clone)]
pub struct RelayLauncher {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub work: PathBuf,
}

impl RelayLauncher {
    pub fn new(binary: PathBuf, work: &Path) -> Result<Self> {
        let config = work.join("relay-empty.toml");
        std::fs::write(&config, "# every setting from OUTBOX_RELAY_* variables\n")?;
        Ok(Self {
            binary,
            config,
            work: work.to_path_buf(),
        })
    }

    fn command(&self, database_url: &str, env: &[(&str, String)]) -> Command {
        let mut command = Command::new(&self.binary);
        for (key, _) in std::env::vars() {
            if key.starts_with("OUTBOX_RELAY_") {
                command.env_remove(key);
            }
        }
        command
            .arg("--config")
            .arg(&self.config)
            .env("OUTBOX_RELAY_DATABASE__URL", database_url)
            .env("OUTBOX_RELAY_LOG__FORMAT", "json")
            .env_remove("RUST_LOG");
        for (key, value) in env {
            command.env(key, value);
        }
        command
    }

    /// `outbox-relay migrate [--notify-trigger on|off]`.
    pub fn migrate(&self, database_url: &str, notify_trigger: Option<bool>) -> Result<()> {
        let mut command = self.command(database_url, &[]);
        command.arg("migrate");
        if let Some(on) = notify_trigger {
            command.args(["--notify-trigger", if on { "on" } else { "off" }]);
        }
        let output = command.stdin(Stdio::null()).output()?;
        if !output.status.success() {
            bail!(
                "outbox-relay migrate failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Starts one replica with env configuration (`OUTBOX_RELAY_<SECTION>__<KEY>`).
    pub fn spawn(
        &self,
        database_url: &str,
        bootstrap: &str,
        mode: &str,
        replica_id: &str,
        extra: &[(&str, String)],
    ) -> Result<RelayProcess> {
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let http_port = free_port()?;
        let log = self.work.join(format!("relay-{run:03}-{replica_id}.log"));
        let mut env: Vec<(&str, String)> = vec![
            ("OUTBOX_RELAY_KAFKA__BOOTSTRAP_SERVERS", bootstrap.into()),
            ("OUTBOX_RELAY_RELAY__MODE", mode.into()),
            ("OUTBOX_RELAY_RELAY__REPLICA_ID", replica_id.into()),
            (
                "OUTBOX_RELAY_HTTP__LISTEN",
                format!("127.0.0.1:{http_port}"),
            ),
        ];
        env.extend(extra.iter().cloned());
        let mut command = self.command(database_url, &env);
        command
            .arg("run")
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?);
        let child = spawn_tied(command).context("starting outbox-relay run")?;
        Ok(RelayProcess {
            child,
            http_port,
            replica_id: replica_id.to_string(),
            log,
        })
    }
}

impl RelayProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The relay's /metrics text, or None while it does not answer.
    pub async fn metrics(&self) -> Option<String> {
        http_get(self.http_port, "/metrics").await
    }

    /// Sum of a metric's samples over all label sets, from the /metrics text.
    pub fn metric_sum(text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with(name)
                    && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Cumulative buckets `(le, count)` of a Prometheus histogram, summed over label sets.
    pub fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let Some(le) = line
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            let count: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some(entry) => entry.1 += count,
                None => buckets.push((le, count)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub async fn stop(mut self) -> Option<std::process::ExitStatus> {
        stop_child(&mut self.child, Duration::from_secs(20)).await
    }
}

/// A minimal HTTP/1.1 GET on loopback (the relay's metrics endpoint).
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .ok()?;
        let mut buf = Vec::with_capacity(64 * 1024);
        stream.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.") || head.split(' ').nth(1) != Some("200") {
            return None;
        }
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Some(dechunk(body));
        }
        Some(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_payload_is_one_kilobyte_of_json() {
        let text = payload_json(12345);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["seq"], 12345);
        assert!((950..1100).contains(&text.len()), "{} bytes", text.len());
    }

    #[test]
    fn database_url_gets_the_bench_database() {
        assert_eq!(
            url_with_path("postgres://u@h:5/postgres?sslmode=disable", "b").unwrap(),
            "postgres://u@h:5/b?sslmode=disable"
        );
        assert_eq!(
            url_with_path("postgres://u@h:5", "b").unwrap(),
            "postgres://u@h:5/b"
        );
    }
}
