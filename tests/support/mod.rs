//! Test harness: a throwaway PostgreSQL cluster and a tansu broker, each started once per
//! test binary on free loopback ports (or taken from `DATABASE_URL` / `KAFKA_BOOTSTRAP`),
//! a fresh database and fresh topics per test, and a real Kafka consumer to read back.
//! Child processes die with the test binary (PR_SET_PDEATHSIG from a thread that lives as
//! long as the process).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener as StdTcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use outbox_relay::{App, Settings};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any condition may take before a test fails.
pub const CONDITION_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Processes

/// Spawns `command` so that it is killed when the test process exits, even if the test
/// panics: PR_SET_PDEATHSIG is tied to the spawning thread, so spawn from a thread that
/// never exits.
fn spawn_tied_to_process(mut command: Command, run_as: Option<(u32, u32)>) -> Child {
    static SPAWNER: OnceLock<std::sync::Mutex<std_mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    type SpawnRequest = (
        Command,
        Option<(u32, u32)>,
        std_mpsc::Sender<std::io::Result<Child>>,
    );
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            for (mut command, run_as, reply) in rx {
                unsafe {
                    command.pre_exec(move || {
                        if let Some((uid, gid)) = run_as {
                            if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                        // After setuid: a credential change clears the death signal.
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let _ = reply.send(command.spawn());
            }
            // The channel lives in a static, so this thread (and the death signal's
            // anchor) lasts as long as the process.
        });
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std_mpsc::channel();
    command.stdin(Stdio::null());
    spawner
        .lock()
        .unwrap()
        .send((command, run_as, reply_tx))
        .unwrap();
    reply_rx.recv().unwrap().expect("spawn service process")
}

pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The blocking twin of [`wait_for`], for starting services outside the async runtime.
fn wait_for_blocking(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {CONDITION_TIMEOUT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Waits for `condition` to hold, checking every 50 ms, failing after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

pub fn postgres_bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL is not installed: run scripts/test.sh (it installs it) or set DATABASE_URL",
        )
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .expect("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
}

fn postgres_user() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root needs the `postgres` user (apt-get install postgresql creates it)"
    );
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A PostgreSQL cluster of the harness's own, which a test may stop and start again.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    data: PathBuf,
    pub port: u16,
    run_as: Option<(u32, u32)>,
    child: std::sync::Mutex<Option<Child>>,
    /// Extra `-c name=value` server settings.
    settings: Vec<String>,
    /// Held for the cluster's life: see [`remove_abandoned_clusters`].
    _owner_lock: std::fs::File,
}

const CLUSTER_DIR_PREFIX: &str = "outbox-relay-pg-";
const OWNER_LOCK: &str = "owner.lock";

/// Locks `dir/owner.lock` for as long as the returned file stays open. The lock is taken
/// before the file gets its name, so no other process can see the file unlocked.
fn hold_owner_lock(dir: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let unnamed = dir.join(format!("{OWNER_LOCK}.new"));
    let lock = std::fs::File::create(&unnamed).unwrap();
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0,
        "locking {}",
        unnamed.display()
    );
    std::fs::rename(&unnamed, dir.join(OWNER_LOCK)).unwrap();
    lock
}

/// The cluster every test of a binary shares lives in a static, which is never dropped,
/// so its directory (about 160 MB) outlives the test process. Each cluster directory holds
/// a lock its owner keeps until it exits; a directory whose lock can be taken belongs to
/// a process that is gone, and is removed here.
fn remove_abandoned_clusters() {
    use std::os::fd::AsRawFd;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(CLUSTER_DIR_PREFIX)
        {
            continue;
        }
        // No lock file: not one of ours, or still being created.
        let Ok(lock) = std::fs::File::open(entry.path().join(OWNER_LOCK)) else {
            continue;
        };
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl PgCluster {
    /// Runs initdb in a temporary directory and starts the server on a free port.
    pub fn init() -> PgCluster {
        PgCluster::init_with(|_| Vec::new())
    }

    /// Like [`PgCluster::init`], with extra server settings made from the cluster's own
    /// directory (which the server's user owns), e.g. TLS files placed there.
    pub fn init_with(settings: impl FnOnce(&Path) -> Vec<String>) -> PgCluster {
        let bin = postgres_bin_dir();
        remove_abandoned_clusters();
        let dir = tempfile::Builder::new()
            .prefix(CLUSTER_DIR_PREFIX)
            .tempdir()
            .unwrap();
        let owner_lock = hold_owner_lock(dir.path());
        let run_as = postgres_user();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let status = spawn_tied_to_process(initdb, run_as)
            .wait_with_output()
            .unwrap();
        assert!(
            status.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let settings = settings(dir.path());
        if let Some((uid, gid)) = run_as {
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                std::os::unix::fs::chown(entry.unwrap().path(), Some(uid), Some(gid)).unwrap();
            }
        }
        let cluster = PgCluster {
            bin,
            dir,
            data,
            port: free_port(),
            run_as,
            child: std::sync::Mutex::new(None),
            settings,
            _owner_lock: owner_lock,
        };
        cluster.start();
        cluster
    }

    /// The cluster's own directory (beside its data directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        let log_path = self.dir.path().join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&log_path, Some(uid), Some(gid)).unwrap();
        }
        let mut server = Command::new(self.bin.join("postgres"));
        server
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=400",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=256MB",
                "-c",
                "log_lock_waits=on",
                "-c",
                "deadlock_timeout=200ms",
                "-c",
                "log_min_duration_statement=1000",
            ])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_tied_to_process(server, self.run_as);
        *self.child.lock().unwrap() = Some(child);
        wait_for_blocking(
            &format!("PostgreSQL to start (log: {})", log_path.display()),
            || self.accepts_connections(),
        );
    }

    fn accepts_connections(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Fast shutdown (SIGINT): open sessions are cut off, as in a restart or failover.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            signal(child.id(), libc::SIGINT);
            child.wait().unwrap();
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Postgres {
    /// URL of the maintenance database; tests get their own databases beside it.
    admin_url: String,
    _cluster: Option<PgCluster>,
}

fn start_postgres() -> Postgres {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Postgres {
            admin_url: url,
            _cluster: None,
        };
    }
    let cluster = PgCluster::init();
    Postgres {
        admin_url: cluster.admin_url(),
        _cluster: Some(cluster),
    }
}

fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(start_postgres)
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// A fresh database with the outbox migrations applied.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        outbox_relay::store::MIGRATOR.run(&db.pool).await.unwrap();
        db
    }

    /// A fresh, migrated database on a cluster of the test's own.
    pub async fn new_on(cluster: &PgCluster) -> TestDb {
        let db = TestDb::create(&cluster.admin_url()).await;
        outbox_relay::store::MIGRATOR.run(&db.pool).await.unwrap();
        db
    }

    /// A fresh database without the outbox table.
    pub async fn empty() -> TestDb {
        TestDb::create(&postgres().admin_url).await
    }

    /// A fresh, migrated database whose text is bytes (SQL_ASCII), as older installations
    /// have: it stores text that is not UTF-8.
    pub async fn new_sql_ascii() -> TestDb {
        let db = TestDb::create_with(
            &postgres().admin_url,
            "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .await;
        outbox_relay::store::MIGRATOR.run(&db.pool).await.unwrap();
        db
    }

    async fn create(admin_url: &str) -> TestDb {
        TestDb::create_with(admin_url, "").await
    }

    async fn create_with(admin_url: &str, options: &str) -> TestDb {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let deadline = Instant::now() + CONDITION_TIMEOUT;
        let admin = loop {
            match PgPoolOptions::new()
                .max_connections(1)
                .connect(admin_url)
                .await
            {
                Ok(pool) => break pool,
                Err(err) => {
                    assert!(Instant::now() < deadline, "PostgreSQL unreachable: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        sqlx::query(&format!("CREATE DATABASE {name} {options}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let mut url = url::Url::parse(admin_url).unwrap();
        url.set_path(&name);
        let url = url.to_string();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap();
        TestDb { url, pool }
    }

    pub async fn count(&self, sql_where: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM outbox WHERE {sql_where}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The `park_error` of the one parked row.
    pub async fn park_error(&self) -> String {
        sqlx::query_scalar("SELECT park_error FROM outbox WHERE parked_at IS NOT NULL")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn pending(&self) -> i64 {
        self.count("sent_at IS NULL AND parked_at IS NULL").await
    }

    pub async fn sent(&self) -> i64 {
        self.count("sent_at IS NOT NULL").await
    }

    /// Inserts `rows` in one statement and returns their ids, in order.
    pub async fn insert(&self, rows: &[NewRow]) -> Vec<i64> {
        let mut ids = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(5000) {
            let types: Vec<&str> = chunk.iter().map(|r| r.aggregate_type.as_str()).collect();
            let aggs: Vec<&str> = chunk.iter().map(|r| r.aggregate_id.as_str()).collect();
            let events: Vec<&str> = chunk.iter().map(|r| r.event_type.as_str()).collect();
            let payloads: Vec<Option<String>> = chunk.iter().map(|r| r.payload.clone()).collect();
            let headers: Vec<Option<String>> = chunk.iter().map(|r| r.headers.clone()).collect();
            let topics: Vec<Option<String>> = chunk.iter().map(|r| r.topic.clone()).collect();
            let rows = sqlx::query(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers, topic) \
                 SELECT t, a, e, p::jsonb, h::jsonb, tp \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
                      WITH ORDINALITY AS x(t, a, e, p, h, tp, n) \
                 ORDER BY n RETURNING id",
            )
            .bind(&types)
            .bind(&aggs)
            .bind(&events)
            .bind(&payloads)
            .bind(&headers)
            .bind(&topics)
            .fetch_all(&self.pool)
            .await
            .unwrap();
            ids.extend(rows.iter().map(|r| r.get::<i64, _>("id")));
        }
        ids
    }

    /// Event ids of rows by id, to compare with the `id` header read back.
    pub async fn rows(&self) -> Vec<DbRow> {
        sqlx::query(
            "SELECT id, aggregate_type, aggregate_id, event_type, payload::text AS payload, \
                    event_id::text AS event_id, sent_at IS NOT NULL AS sent, \
                    kafka_partition, kafka_offset \
             FROM outbox ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| DbRow {
            id: r.get("id"),
            aggregate_type: r.get("aggregate_type"),
            aggregate_id: r.get("aggregate_id"),
            event_type: r.get("event_type"),
            payload: r.get("payload"),
            event_id: r.get("event_id"),
            sent: r.get("sent"),
            kafka_partition: r.get("kafka_partition"),
            kafka_offset: r.get("kafka_offset"),
        })
        .collect()
    }
}

#[derive(Debug, Clone)]
pub struct DbRow {
    pub id: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: Option<String>,
    pub event_id: String,
    pub sent: bool,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct NewRow {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: Option<String>,
    pub headers: Option<String>,
    pub topic: Option<String>,
}

impl NewRow {
    pub fn new(aggregate_type: &str, aggregate_id: &str, seq: usize) -> Self {
        Self {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: "Updated".into(),
            payload: Some(format!(
                r#"{{"aggregate": "{aggregate_id}", "seq": {seq}}}"#
            )),
            headers: None,
            topic: None,
        }
    }
}

/// `rows` rows spread round-robin over `aggregates` aggregates of one type; each payload
/// carries its per-aggregate sequence number.
pub fn stream(aggregate_type: &str, aggregates: usize, rows: usize) -> Vec<NewRow> {
    let mut seq = vec![0usize; aggregates];
    (0..rows)
        .map(|i| {
            let a = (i * 7919) % aggregates;
            seq[a] += 1;
            NewRow::new(aggregate_type, &format!("agg-{a}"), seq[a])
        })
        .collect()
}

/// A PgBouncer in transaction mode in front of the test PostgreSQL, with a small server
/// pool so that consecutive transactions of one client land on different connections.
pub struct PgBouncer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    pub fn start(server_pool_size: u32) -> PgBouncer {
        let admin = url::Url::parse(&postgres().admin_url).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pgbouncer-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let run_as = postgres_user();
        std::fs::write(
            dir.path().join("userlist.txt"),
            format!("\"{}\" \"\"\n", admin.username()),
        )
        .unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host={host} port={pg_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                 pool_mode = transaction\ndefault_pool_size = {server_pool_size}\n\
                 max_client_conn = 200\nignore_startup_parameters = extra_float_digits\n\
                 logfile = {log}\n",
                host = admin.host_str().unwrap(),
                pg_port = admin.port().unwrap_or(5432),
                users = dir.path().join("userlist.txt").display(),
                log = dir.path().join("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        if let Some((uid, gid)) = run_as {
            for path in [
                dir.path().to_path_buf(),
                ini.clone(),
                dir.path().join("userlist.txt"),
            ] {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("pgbouncer is not installed: run scripts/test.sh (it installs it)");
        let mut command = Command::new(binary);
        command
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied_to_process(command, run_as);
        wait_for_blocking(&format!("pgbouncer to listen on port {port}"), || {
            port_open(port)
        });
        PgBouncer {
            port,
            child,
            _dir: dir,
        }
    }

    /// `url` rewritten to go through this PgBouncer.
    pub fn url_for(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Kafka

pub fn tansu_bin() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = Path::new(&home).join(".cache/outbox-relay/tansu-0.6.0/bin/tansu");
    assert!(
        path.exists(),
        "tansu 0.6.0 not found at {}: run scripts/test.sh (it installs it), set TANSU_BIN, or set KAFKA_BOOTSTRAP",
        path.display()
    );
    path
}

/// A tansu broker process.
pub struct Tansu {
    pub bootstrap: String,
    pub port: u16,
    child: Child,
}

impl Tansu {
    /// Starts a broker that belongs to the caller (for tests that freeze or kill it).
    pub fn start() -> Tansu {
        Tansu::start_with(&[], None)
    }

    /// A broker with extra arguments (`--authentication`), advertising `advertised_port`
    /// instead of its own (where a TLS proxy listens in front of it).
    pub fn start_with(extra_args: &[&str], advertised_port: Option<u16>) -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{}", advertised_port.unwrap_or(port));
        let mut command = Command::new(tansu_bin());
        command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied_to_process(command, None);
        wait_for_blocking(&format!("tansu to listen on port {port}"), || {
            port_open(port)
        });
        Tansu {
            bootstrap: format!("127.0.0.1:{port}"),
            port,
            child,
        }
    }

    pub fn freeze(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, sig: i32) {
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// The broker shared by the tests of this binary.
pub fn kafka_bootstrap() -> String {
    static SHARED: OnceLock<(String, Option<Tansu>)> = OnceLock::new();
    SHARED
        .get_or_init(|| match std::env::var("KAFKA_BOOTSTRAP") {
            Ok(bootstrap) => (bootstrap, None),
            Err(_) => {
                let tansu = Tansu::start();
                (tansu.bootstrap.clone(), Some(tansu))
            }
        })
        .0
        .clone()
}

/// A topic-name prefix unique to one test.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    create_topic_with(bootstrap, name, partitions, &[]).await;
}

/// Creates a topic through a client with extra properties (TLS, SASL).
pub async fn create_topic_with_client(
    bootstrap: &str,
    properties: &[(&str, &str)],
    name: &str,
    partitions: i32,
) {
    let mut config = ClientConfig::new();
    for (key, value) in properties {
        config.set(*key, *value);
    }
    let admin: AdminClient<DefaultClientContext> =
        config.set("bootstrap.servers", bootstrap).create().unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(topic, err)| panic!("create topic {topic}: {err:?}"));
    }
}

/// Creates a topic with topic-level configs such as `max.message.bytes`.
pub async fn create_topic_with(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(topic, err)| panic!("create topic {topic}: {err:?}"));
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub value_bytes: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the beginning of every partition until `expected` records arrived
/// (plus a short quiet period to catch duplicates), failing after CONDITION_TIMEOUT.
pub fn consume(bootstrap: &str, topic: &str, expected: usize) -> Vec<Consumed> {
    consume_with(bootstrap, &[], topic, expected)
}

/// [`consume`] with extra client properties (TLS, SASL).
pub fn consume_with(
    bootstrap: &str,
    properties: &[(&str, &str)],
    topic: &str,
    expected: usize,
) -> Vec<Consumed> {
    let mut config = ClientConfig::new();
    for (key, value) in properties {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("verify-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut out: Vec<Consumed> = Vec::new();
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    // Once the expected count is reached, keep reading briefly so that duplicates beyond
    // it would be seen.
    let mut quiet_until: Option<Instant> = None;
    loop {
        if let Some(until) = quiet_until {
            if Instant::now() >= until {
                break;
            }
        }
        if Instant::now() >= deadline {
            let mut per_partition: std::collections::BTreeMap<i32, (usize, i64)> =
                std::collections::BTreeMap::new();
            for record in &out {
                let entry = per_partition.entry(record.partition).or_insert((0, -1));
                entry.0 += 1;
                entry.1 = entry.1.max(record.offset);
            }
            panic!(
                "read {} of {expected} records from {topic} before timing out; \
                 per partition (count, last offset): {per_partition:?}",
                out.len()
            );
        }
        if let Some(result) = consumer.poll(Duration::from_millis(100)) {
            let message = result.expect("consume");
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Consumed {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                key: message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                value: message
                    .payload()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
                value_bytes: message.payload().map(<[u8]>::to_vec),
                headers,
            });
            if out.len() >= expected && quiet_until.is_none() {
                quiet_until = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }
    out
}

/// Checks the contract on what was read back against the database: every row present
/// (by event id), first occurrences in outbox order per aggregate, each aggregate on one
/// partition. Returns the number of duplicates.
pub fn assert_contract(rows: &[DbRow], records: &[Consumed]) -> usize {
    let by_event: HashMap<&str, &DbRow> = rows.iter().map(|r| (r.event_id.as_str(), r)).collect();
    let mut first_seen: HashMap<&str, i64> = HashMap::new();
    let mut last_first_id: HashMap<(String, String), i64> = HashMap::new();
    let mut partition_of: HashMap<(String, String), i32> = HashMap::new();
    let mut duplicates = 0;
    // Kafka orders within a partition, so walk each partition in offset order.
    let mut ordered: Vec<&Consumed> = records.iter().collect();
    ordered.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    for record in ordered {
        let event_id = record
            .headers
            .get("id")
            .expect("every record has an id header");
        let row = by_event
            .get(event_id.as_str())
            .unwrap_or_else(|| panic!("record with unknown event id {event_id}"));
        assert_eq!(
            record.key.as_deref(),
            Some(row.aggregate_id.as_str()),
            "key"
        );
        let aggregate = (record.topic.clone(), row.aggregate_id.clone());
        let p = *partition_of
            .entry(aggregate.clone())
            .or_insert(record.partition);
        assert_eq!(
            p, record.partition,
            "aggregate {aggregate:?} spans partitions"
        );
        if first_seen.contains_key(event_id.as_str()) {
            duplicates += 1;
            continue;
        }
        first_seen.insert(&row.event_id, row.id);
        let previous = last_first_id.insert(aggregate.clone(), row.id);
        if let Some(previous) = previous {
            assert!(
                previous < row.id,
                "aggregate {aggregate:?}: row {} arrived after row {previous} (reordered)",
                row.id
            );
        }
    }
    let missing: Vec<i64> = rows
        .iter()
        .filter(|r| !first_seen.contains_key(r.event_id.as_str()))
        .map(|r| r.id)
        .collect();
    assert!(
        missing.is_empty(),
        "{} rows never reached Kafka, first ids {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    duplicates
}

// ---------------------------------------------------------------------------------------
// The relay

/// Settings for a relay on `db` and `bootstrap`, with `extra` TOML merged over them.
pub fn settings(db: &TestDb, bootstrap: &str, extra: &str) -> Settings {
    let base = format!(
        r#"
[database]
url = "{url}"
[kafka]
bootstrap_servers = "{bootstrap}"
[http]
listen = "127.0.0.1:0"
[relay]
poll_interval = "100ms"
stats_interval = "200ms"
"#,
        url = db.url
    );
    Settings::from_figment(
        Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(&base))
            .merge(Toml::string(extra)),
    )
    .expect("test settings are valid")
}

/// [`settings`] for a relay publishing to `<prefix>.<aggregate_type>`, the topics a test
/// creates for itself. `relay_keys` are more lines of the `[relay]` table; tables after it may
/// follow them.
pub fn template_settings(db: &TestDb, bootstrap: &str, prefix: &str, relay_keys: &str) -> Settings {
    settings(
        db,
        bootstrap,
        &format!("[relay]\ntopic_template = \"{prefix}.{{aggregate_type}}\"\n{relay_keys}"),
    )
}

/// A relay running in this process.
pub struct RunningRelay {
    pub cancel: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
    pub http_addr: std::net::SocketAddr,
    pub health: std::sync::Arc<outbox_relay::telemetry::Health>,
}

impl RunningRelay {
    pub async fn start(settings: Settings) -> RunningRelay {
        if std::env::var("TEST_LOG").is_ok() {
            outbox_relay::telemetry::init_logging(&settings.log);
        }
        let app = App::build(settings).await.expect("build the relay");
        let http_addr = app.http_addr();
        let health = app.health();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(app.run(cancel.clone()));
        RunningRelay {
            cancel,
            handle,
            http_addr,
            health,
        }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.handle
            .await
            .expect("relay task")
            .expect("relay stopped cleanly");
    }
}

/// A relay whose poll is an hour away: within a test, only the doorbell (the notify
/// trigger or a `pg_notify` on its channel) wakes it once it has gone idle.
pub async fn start_doorbell_only_relay(db: &TestDb, bootstrap: &str, prefix: &str) -> RunningRelay {
    RunningRelay::start(template_settings(
        db,
        bootstrap,
        prefix,
        "poll_interval = \"1h\"\n",
    ))
    .await
}

/// A minimal HTTP/1.0 GET against the relay, returning (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Path of the built relay binary, for tests that need a real process.
/// Sum of every sample of `series` in Prometheus text: `series` is a metric name, or a
/// name with a label selector fragment such as `name{kind="read_only"`. 0 when absent.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(series).is_some_and(|rest| {
                rest.starts_with(' ')
                    || rest.starts_with('{')
                    || rest.starts_with(',')
                    || rest.starts_with('}')
            })
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads `topic` back and checks the contract against the rows marked sent (parked rows
/// are left out): none missing, none extra, order kept. Returns how many were sent.
pub async fn assert_sent_rows_in_kafka(db: &TestDb, bootstrap: &str, topic: &str) -> usize {
    let sent: Vec<DbRow> = db.rows().await.into_iter().filter(|r| r.sent).collect();
    let records = consume(bootstrap, topic, sent.len());
    assert_eq!(
        assert_contract(&sent, &records),
        0,
        "no duplicates expected"
    );
    sent.len()
}

/// Waits until `series` (see [`metric_value`]) on the relay at `addr` is above zero.
pub async fn wait_for_metric(addr: std::net::SocketAddr, series: &str) {
    wait_for(&format!("{series} above 0"), CONDITION_TIMEOUT, || async {
        let (_, metrics) = http_get(addr, "/metrics").await;
        metric_value(&metrics, series) > 0.0
    })
    .await;
}

pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

/// The relay binary with a clean environment pointed at `db_url` and `bootstrap`.
pub fn relay_command(db_url: &str, bootstrap: &str) -> Command {
    relay_environment(Command::new(relay_bin()), db_url, bootstrap)
}

/// `sh` with the relay's environment, for a test that must wrap the relay (`exec`).
pub fn relay_shell(db_url: &str, bootstrap: &str) -> Command {
    relay_environment(Command::new("sh"), db_url, bootstrap)
}

fn relay_environment(mut command: Command, db_url: &str, bootstrap: &str) -> Command {
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OUTBOX_RELAY_DATABASE__URL", db_url)
        .env("OUTBOX_RELAY_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
        .env("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0")
        .env("OUTBOX_RELAY_LOG__FORMAT", "text")
        .stdin(Stdio::null());
    command
}

pub fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Waits for a child to exit, failing the test after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the relay did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A throwaway certificate authority and a server certificate for `localhost` and
/// 127.0.0.1, made with the `openssl` command: `ca.crt`, `server.crt`, `server.key`, and
/// `server.pem` (certificate and key in one file).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> Certs {
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("the openssl command (apt-get install openssl)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let days = ["-days", "2"];
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=outbox-relay test CA",
            days[0],
            days[1],
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("san.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-extfile",
            "san.cnf",
            days[0],
            days[1],
        ]);
        let pem = [
            std::fs::read(dir.join("server.crt")).unwrap(),
            std::fs::read(dir.join("server.key")).unwrap(),
        ]
        .concat();
        std::fs::write(dir.join("server.pem"), pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for key in ["server.key", "server.pem", "ca.key"] {
            std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// TLS in front of a plaintext port (socat), for brokers that cannot serve TLS themselves.
pub struct TlsProxy {
    pub port: u16,
    child: Child,
}

impl TlsProxy {
    pub fn start(port: u16, target_port: u16, certs: &Certs) -> TlsProxy {
        let mut command = Command::new("socat");
        command
            .arg(format!(
                "openssl-listen:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={}",
                certs.path("server.pem")
            ))
            .arg(format!("tcp:127.0.0.1:{target_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied_to_process(command, None);
        wait_for_blocking(&format!("socat to listen on port {port}"), || {
            port_open(port)
        });
        TlsProxy { port, child }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
