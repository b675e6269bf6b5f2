//! PostgreSQL: a throwaway cluster started once per test binary (or `DATABASE_URL`), a
//! fresh migrated database per test, clusters and PgBouncers a test owns, and rows to insert.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

use super::process::{
    CONDITION_TIMEOUT, free_port, port_open, signal, spawn_tied_to_process, wait_for_blocking,
};

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

    /// A transaction holding `table` locked in `mode` (`ACCESS SHARE`, `EXCLUSIVE`, ...)
    /// until it is committed, rolled back or dropped.
    pub async fn lock_table(
        &self,
        table: &str,
        mode: &str,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut holder = self.pool.begin().await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN {mode} MODE"))
            .execute(&mut *holder)
            .await
            .unwrap();
        holder
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
