//! The command line: `run`, `migrate`, `check`, `status` and `parked`. Exit codes: 0
//! success, 1 runtime failure, 2 bad configuration (named key, nothing connected).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::app::App;
use crate::config::{ConfigError, DEFAULT_CONFIG_PATH, Settings, redact_url};
use crate::kafka::producer::RowProducer;
use crate::store::{self, Store};
use crate::telemetry;

/// Exit code for a configuration the relay refuses.
pub(crate) const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Relays a PostgreSQL outbox table to Kafka: acks=all, idempotent, marked only after the ack."
)]
pub(crate) struct Cli {
    /// TOML configuration file; environment variables OUTBOX_RELAY_<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, value_name = "PATH", help = format!("TOML configuration file [default: {DEFAULT_CONFIG_PATH}, if present]"))]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the relay until SIGTERM or SIGINT, then drain: stop reading, wait for
    /// outstanding acks up to relay.drain_timeout, mark them, exit 0.
    Run,
    /// Create or upgrade the outbox table (the SQL in migrations/).
    Migrate {
        /// Install (`on`) or remove (`off`) the statement-level NOTIFY trigger that wakes
        /// the relay at once. It costs a database-wide lock at each inserting commit.
        #[arg(long, value_name = "on|off")]
        notify_trigger: Option<Toggle>,
    },
    /// Rows that can never be published as they stand: list them, put them back in the
    /// queue once the cause is fixed, or give up on them (kept for audit).
    Parked {
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// Show the backlog and the replicas sharing it: pending and parked rows, the oldest
    /// pending row's age, each replica's shards and lease ages.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration, connect to PostgreSQL and Kafka, and say what the relay
    /// would do (secrets redacted). Exits non-zero if anything is wrong.
    Check {
        /// How long to wait for each side to answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ParkedCommand {
    /// List parked rows, oldest first, with the reason and the error.
    List {
        /// Only this aggregate's rows.
        #[arg(long, value_name = "AGGREGATE_ID")]
        aggregate: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put parked rows back in the queue; they are published in their original order,
    /// ahead of the later rows of their aggregates that waited behind them.
    Replay {
        #[command(flatten)]
        rows: ParkedSelection,
    },
    /// Give up on parked rows. They stay in the table with the reason, for audit, and stop
    /// holding their aggregates back.
    Discard {
        #[command(flatten)]
        rows: ParkedSelection,
        /// Why, recorded with each row.
        #[arg(long, required = true)]
        reason: String,
    },
}

/// Which parked rows an operation touches: exactly one of ids, an aggregate, or all.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct ParkedSelection {
    /// Row ids (the `id` column).
    #[arg(value_name = "ID")]
    ids: Vec<i64>,
    /// Every parked row of this aggregate.
    #[arg(long, value_name = "AGGREGATE_ID")]
    aggregate: Option<String>,
    /// Every parked row.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Toggle {
    On,
    Off,
}

/// Parses the command line, runs the command, returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run) {
        // A one-shot command whose reader went away (`outbox-relay status | head`) ends
        // quietly, as other command-line tools do, instead of panicking in `println!`.
        // The daemon keeps Rust's default (SIGPIPE ignored): a log pipe that closes under
        // it is a write error, never a reason to die between an ack and its mark.
        // SAFETY: called before any other thread starts; it only resets a disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => return config_failure(&err),
    };
    telemetry::init_logging(&settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: Failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let is_daemon = matches!(cli.command, Command::Run);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => run(settings).await,
            Command::Migrate { notify_trigger } => migrate(settings, notify_trigger).await,
            Command::Check { timeout } => check(settings, timeout).await,
            Command::Status { json } => status(settings, json).await,
            Command::Parked { command } => parked(settings, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The daemon logs (journal, Kubernetes); one-shot commands talk to a person.
            if is_daemon {
                error!("{err:#}");
            } else {
                eprintln!("error: {err:#}");
            }
            if err.downcast_ref::<crate::app::MissingGrants>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn config_failure(err: &ConfigError) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(EXIT_CONFIG)
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    // Listen for signals before anything else: a SIGTERM during startup (a slow database,
    // a rollout that changes its mind) is then a clean stop, not the default kill.
    let cancel = CancellationToken::new();
    let signals = match StopSignals::install() {
        Ok(signals) => Some(tokio::spawn(signals.cancel_on_first(cancel.clone()))),
        Err(err) => {
            error!(error = %err, "cannot install signal handlers; stop the relay with SIGKILL");
            None
        }
    };
    let result = async { App::build(settings).await?.run(cancel).await }.await;
    if let Some(signals) = signals {
        signals.abort();
    }
    result
}

/// SIGTERM and SIGINT, registered with the runtime as soon as they are created.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn cancel_on_first(mut self, cancel: CancellationToken) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received; draining"),
            _ = self.int.recv() => info!("SIGINT received; draining"),
        }
        cancel.cancel();
    }
}

async fn migrate(settings: Settings, notify_trigger: Option<Toggle>) -> anyhow::Result<()> {
    let store = Store::connect(&settings.database)
        .context("Failed to configure the database connection from database.url")?;
    store
        .migrate()
        .await
        .context("Failed to apply the migrations")?;
    println!("outbox schema is up to date");
    if let Some(toggle) = notify_trigger {
        let enabled = matches!(toggle, Toggle::On);
        store
            .set_notify_trigger(enabled, &settings.database.listen_channel)
            .await
            .context("Failed to change the notify trigger")?;
        if enabled {
            println!(
                "notify trigger installed (channel {})",
                settings.database.listen_channel
            );
        } else {
            println!("notify trigger removed");
        }
    }
    store.pool().close().await;
    Ok(())
}

async fn parked(settings: Settings, command: ParkedCommand) -> anyhow::Result<()> {
    let store = Store::connect(&settings.database)
        .context("Failed to configure the database connection from database.url")?;
    let result = match command {
        ParkedCommand::List {
            aggregate,
            limit,
            json,
        } => list_parked(&store, aggregate.as_deref(), limit, json).await,
        ParkedCommand::Replay { rows } => {
            let ids = select_parked(&store, &rows).await?;
            let done = in_chunks(&ids, "replaying", |chunk| {
                let store = store.clone();
                async move { store.replay_parked(&chunk).await }
            })
            .await?;
            println!("{done} parked row(s) put back in the queue");
            Ok(())
        }
        ParkedCommand::Discard { rows, reason } => {
            let ids = select_parked(&store, &rows).await?;
            let done = in_chunks(&ids, "discarding", |chunk| {
                let store = store.clone();
                let reason = reason.clone();
                async move { store.discard_parked(&chunk, &reason).await }
            })
            .await?;
            println!("{done} parked row(s) discarded (kept in the table for audit)");
            Ok(())
        }
    };
    store.pool().close().await;
    result
}

async fn list_parked(
    store: &Store,
    aggregate: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let rows = store
        .list_parked(aggregate, limit)
        .await
        .context("Failed to read parked rows")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no parked rows");
        return Ok(());
    }
    println!(
        "{:>10}  {:<16} {:<24} {:<20} {:<20}  error",
        "id", "aggregate_type", "aggregate_id", "event_type", "reason"
    );
    // Every column was written by a service, or quotes what one wrote: escaped and
    // bounded, so a row cannot drive the operator's terminal (`--json` escapes by itself).
    let shown = |text: &str, max| crate::model::printable(text, max);
    for row in &rows {
        println!(
            "{:>10}  {:<16} {:<24} {:<20} {:<20}  {}",
            row.id,
            shown(&row.aggregate_type, 64),
            shown(&row.aggregate_id, 64),
            shown(&row.event_type, 64),
            shown(row.park_reason.as_deref().unwrap_or("-"), 64),
            shown(
                row.park_error.as_deref().unwrap_or("-"),
                crate::model::MAX_REASON_BYTES
            ),
        );
    }
    Ok(())
}

async fn select_parked(store: &Store, selection: &ParkedSelection) -> anyhow::Result<Vec<i64>> {
    if !selection.ids.is_empty() {
        let mut ids = selection.ids.clone();
        ids.sort_unstable();
        ids.dedup();
        return Ok(ids);
    }
    let aggregate = if selection.all {
        None
    } else {
        selection.aggregate.as_deref()
    };
    store
        .parked_ids(aggregate)
        .await
        .context("Failed to read parked rows")
}

/// Runs `operation` over `ids` in id order, 1000 at a time, with a progress bar on a
/// terminal when there are many. Returns the rows changed.
async fn in_chunks<F, Fut>(ids: &[i64], verb: &str, mut operation: F) -> anyhow::Result<u64>
where
    F: FnMut(Vec<i64>) -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::store::StoreError>>,
{
    const CHUNK: usize = 1000;
    let progress = if ids.len() > CHUNK {
        let bar = indicatif::ProgressBar::new(ids.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} rows ({eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(verb.to_string());
        Some(bar)
    } else {
        None
    };
    let mut done = 0;
    for chunk in ids.chunks(CHUNK) {
        done += operation(chunk.to_vec())
            .await
            .with_context(|| format!("Failed while {verb} parked rows ({done} done)"))?;
        if let Some(bar) = &progress {
            bar.inc(chunk.len() as u64);
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(done)
}

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
fn pending_text(rows: i64, estimated: bool) -> String {
    if estimated {
        format!(
            "about {rows} (estimated: more than {} pending)",
            crate::store::EXACT_PENDING_UP_TO
        )
    } else {
        rows.to_string()
    }
}

async fn status(settings: Settings, json: bool) -> anyhow::Result<()> {
    let store = Store::connect(&settings.database)
        .context("Failed to configure the database connection from database.url")?;
    let backlog = store
        .backlog_stats()
        .await
        .context("Failed to read the outbox")?;
    let (replicas, unowned) = store
        .replica_status()
        .await
        .context("Failed to read the lease table")?;
    store.pool().close().await;
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
        println!("{}", serde_json::to_string_pretty(&report)?);
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
        "{:<32} {:>5} {:>7} {:>10} {:>14}  started",
        "replica", "live", "shards", "heartbeat", "lease renewed"
    );
    for r in &report.replicas {
        println!(
            "{:<32} {:>5} {:>7} {:>10} {:>14}  {}",
            r.replica_id,
            if r.live { "yes" } else { "no" },
            r.shards,
            format!("{:.1}s ago", r.heartbeat_age_seconds),
            r.oldest_lease_renewal_seconds
                .map_or("-".to_string(), |s| format!("{s:.1}s ago")),
            r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
        );
    }
    if report.replicas.is_empty() {
        println!("(no replica has registered)");
    }
    Ok(())
}

async fn check(settings: Settings, timeout: Duration) -> anyhow::Result<()> {
    println!("configuration is valid:\n");
    println!("{}", settings.redacted());
    for warning in settings.warnings() {
        println!("warning: {warning}");
    }
    let mut failures = Vec::new();

    let mut database = settings.database.clone();
    database.connect_timeout = timeout;
    let store = Store::connect(&database)
        .context("Failed to configure the database connection from database.url")?;
    let url = redact_url(settings.database.url.expose());
    // A direct connection first: the pool would only say that it timed out.
    let reachable = match tokio::time::timeout(timeout, store::probe(&settings.database)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    let schema = match reachable {
        Ok(()) => store.verify_schema().await.map_err(|e| e.to_string()),
        Err(err) => Err(err),
    };
    match schema {
        Ok(version) => {
            println!("PostgreSQL {version} at {url}: outbox table present");
            match store.missing_grants(settings.relay.mode).await {
                Ok(missing) if missing.is_empty() => {
                    println!("  the role holds every privilege the relay needs")
                }
                Ok(missing) => {
                    failures.push(format!("database: {}", crate::app::MissingGrants(missing)))
                }
                Err(err) => failures.push(format!("database: checking privileges: {err}")),
            }
            match store.schema_creators().await {
                Ok(creators) if !creators.is_empty() => println!(
                    "  warning: {} (may create there: {})",
                    crate::app::SCHEMA_CREATORS_ADVICE,
                    creators.join(", ")
                ),
                Ok(_) => println!("  only the schema's owner may create in it"),
                Err(err) => {
                    failures.push(format!("database: checking the schema's privileges: {err}"))
                }
            }
            match store.backlog_stats().await {
                Ok(stats) => println!(
                    "  pending rows: {}, oldest pending: {}, parked rows: {}",
                    pending_text(stats.pending_rows, stats.pending_rows_estimated),
                    stats
                        .oldest_pending_age
                        .map_or("none".to_string(), |d| format!(
                            "{:.1}s ago",
                            d.as_secs_f64()
                        )),
                    stats.parked_rows
                ),
                Err(err) => failures.push(format!("database: {err}")),
            }
        }
        Err(err) => failures.push(format!(
            "database at {url}: {err}; check database.url and that PostgreSQL accepts connections"
        )),
    }
    store.pool().close().await;

    let properties = settings.producer_properties();
    let mut topic_limits = crate::kafka::topics::TopicLimits::new(&properties);
    let bootstrap = settings.kafka.bootstrap_servers.clone();
    // `check` exports no metrics: the producer's statistics go to a recorder of its own.
    let metrics = crate::telemetry::Metrics::new(&[]).map_err(anyhow::Error::msg)?;
    let cluster = tokio::task::spawn_blocking(move || {
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let producer = RowProducer::build(&properties, 0, tx, metrics, false, None)?;
        producer.describe_cluster(timeout)
    })
    .await
    .context("Kafka check panicked")?;
    match cluster {
        Ok(summary) => {
            println!(
                "Kafka at {bootstrap}: brokers {}",
                summary.brokers.join(", ")
            );
            println!("  {} topics visible", summary.topics.len());
            // The size limit of the topics the template names, as the relay learns it.
            let prefix = settings
                .relay
                .topic_template
                .split('{')
                .next()
                .unwrap_or_default();
            let ours = summary
                .topics
                .iter()
                .filter(|t| !prefix.is_empty() && t.starts_with(prefix));
            for topic in ours.take(5) {
                match topic_limits.describe(topic).await {
                    Ok(Some(limit)) => println!("  topic {topic}: max.message.bytes {limit}"),
                    Ok(None) => println!(
                        "  topic {topic}: max.message.bytes not reported; rows are checked against relay.max_message_bytes only"
                    ),
                    Err(err) => println!(
                        "  topic {topic}: max.message.bytes unknown ({err}); grant the relay's principal DescribeConfigs on its topics, or rows over it are refused by the broker instead of parked"
                    ),
                }
            }
        }
        Err(err) => failures.push(format!(
            "Kafka at {bootstrap}: {err}; check kafka.bootstrap_servers and network access"
        )),
    }

    println!(
        "\nwould publish pending rows in batches of {} to `{}` (or each row's topic column), \
         {} rows after the broker's ack, acks=all, idempotent, {} compression",
        settings.relay.batch_size,
        settings.relay.topic_template,
        match settings.relay.mode {
            crate::model::Mode::Mark => "marking",
            crate::model::Mode::Delete => "deleting",
        },
        settings.kafka.compression,
    );
    if failures.is_empty() {
        println!("check passed");
        Ok(())
    } else {
        for failure in &failures {
            eprintln!("FAILED: {failure}");
        }
        anyhow::bail!("{} check(s) failed", failures.len())
    }
}
