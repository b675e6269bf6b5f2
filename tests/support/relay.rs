//! The relay under test: settings on a test's database and broker, a relay running in this
//! process, its HTTP endpoints and metrics, and the built binary with a clean environment.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use outbox_relay::{App, Settings};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::postgres::TestDb;
use super::process::{CONDITION_TIMEOUT, wait_for};

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
            outbox_relay::telemetry::init_logging(&settings.log, true);
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

/// Waits until `series` (see [`metric_value`]) on the relay at `addr` is above zero.
pub async fn wait_for_metric(addr: std::net::SocketAddr, series: &str) {
    wait_for(&format!("{series} above 0"), CONDITION_TIMEOUT, || async {
        let (_, metrics) = http_get(addr, "/metrics").await;
        metric_value(&metrics, series) > 0.0
    })
    .await;
}

/// Waits until `series` (see [`metric_value`]) on the relay at `addr` equals `value`.
pub async fn wait_for_metric_value(addr: std::net::SocketAddr, series: &str, value: f64) {
    wait_for(
        &format!("{series} = {value}"),
        CONDITION_TIMEOUT,
        || async {
            let (_, metrics) = http_get(addr, "/metrics").await;
            metric_value(&metrics, series) == value
        },
    )
    .await;
}

/// Path of the built relay binary, for tests that need a real process.
pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

/// The relay binary with a clean environment pointed at `db_url` and `bootstrap`.
pub fn relay_command(db_url: &str, bootstrap: &str) -> Command {
    relay_environment(Command::new(relay_bin()), db_url, bootstrap)
}

/// The relay binary with a clean environment and only `db_url`: for the commands that need
/// the database alone (`status`, `parked`, `migrate`...).
pub fn database_command(db_url: &str) -> Command {
    let mut command = Command::new(relay_bin());
    command
        .env_clear()
        .env("OUTBOX_RELAY_DATABASE__URL", db_url);
    command
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

/// Backends of relays asleep on `channel`'s doorbell in `db`: each holds the doorbell's
/// advisory lock on its LISTEN session.
pub async fn sleeping_relays(db: &TestDb, channel: &str) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks \
         WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' AND granted \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND classid = 1868722808 AND objsubid = 2 \
           AND objid = (hashtext($1)::int8 & 4294967295)::oid",
    )
    .bind(channel)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Waits until `outbox-relay status` shows a replica in `state` whose reason contains
/// `reason`, and returns its table.
pub async fn wait_for_status_state(db: &TestDb, state: &str, reason: &str) -> String {
    let mut table = String::new();
    wait_for(
        &format!("status to show a replica {state} ({reason})"),
        CONDITION_TIMEOUT,
        || {
            let output = database_command(&db.url).arg("status").output().unwrap();
            assert!(
                output.status.success(),
                "{}",
                super::process::output_text(&output)
            );
            table = String::from_utf8_lossy(&output.stdout).into_owned();
            let found = table
                .lines()
                .skip_while(|l| !l.starts_with("replica "))
                .skip(1)
                .any(|line| line.split_whitespace().nth(1) == Some(state) && line.contains(reason));
            async move { found }
        },
    )
    .await;
    table
}
