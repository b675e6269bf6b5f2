//! The command line: `run`, `migrate`, `check`, `status`, `parked`, `prune`, and the proof
//! of delivery (`where`, `verify`, `republish`). Exit codes: 0 success, 1 runtime failure
//! (or, for the proofs, a row not where the outbox says), 2 bad configuration or arguments
//! (named, nothing changed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::app::App;
use crate::config::{
    CONFIG_PATH_VARIABLE, ConfigError, DEFAULT_CONFIG_PATH, Needs, SYSTEM_CONFIG_PATH, Settings,
    redact_url,
};
use crate::kafka::producer::RowProducer;
use crate::store::{self, Store, TriggerChange};
use crate::telemetry;

mod check;
mod locate;
mod manual;
mod moment;
mod parked;
mod prune;
mod republish;
mod status;
mod verify;

use check::check;
use locate::locate;
use moment::Moment;
use parked::parked;
use prune::prune;
use republish::{Republish, republish};
use status::{pending_text, status};
use verify::verify;

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
    #[arg(long, short, global = true, value_name = "PATH", help = format!("TOML configuration file [default: ${CONFIG_PATH_VARIABLE}, else {DEFAULT_CONFIG_PATH} or {SYSTEM_CONFIG_PATH}, the first present]"))]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the relay until SIGTERM or SIGINT, then drain: stop reading, wait for
    /// outstanding acks up to relay.drain_timeout, mark them, exit 0.
    Run,
    /// Create or upgrade the relay's own outbox table (the SQL in migrations/), or adopt
    /// the table outbox.table names: add only what the relay needs, nothing its writers
    /// must supply.
    Migrate {
        /// Install (`on`) or remove (`off`, the default) the doorbell: a statement-level
        /// trigger that wakes a sleeping relay at once, so it can poll seldom. It costs
        /// every insert a trigger and an advisory lock, and a NOTIFY (a database-wide lock
        /// at commit) while the relay sleeps; without it the idle relay polls the pending
        /// index every relay.poll_interval (10 ms by default).
        #[arg(long, value_name = "on|off", default_value = "off")]
        notify_trigger: Toggle,
        /// Print every statement it would run, with the lock each takes and whether it
        /// rewrites or scans the table, and the rows that would be published; change
        /// nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Rows that can never be published as they stand: list them, put them back in the
    /// queue once the cause is fixed, or give up on them (kept for audit).
    Parked {
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// Show the backlog and the replicas sharing it: pending and parked rows, the oldest
    /// pending row's age, each replica's state and why, its shards and lease ages.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh in place at this interval until Ctrl-C (e.g. 2s); with --json, one JSON
        /// document per line.
        #[arg(long, value_name = "INTERVAL", value_parser = humantime::parse_duration, num_args = 0..=1, default_missing_value = "2s")]
        watch: Option<Duration>,
    },
    /// Delete sent rows older than a duration, as relay.retain_sent does by itself in mark
    /// mode: oldest first, in batches of 1000. Pending, parked and discarded rows are kept.
    Prune {
        /// Rows sent longer ago than this, e.g. 7d or 12h.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Count the rows it would delete; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Confirm the deletion (without --dry-run).
        #[arg(long)]
        yes: bool,
    },
    /// Where one event is: pending (its shard and the replica that owns it), sent (when,
    /// topic, partition, offset), parked or discarded. With --verify, its record is read
    /// back from Kafka and compared with the row. Exit 0 when it is where the database
    /// says, 1 otherwise.
    Where {
        /// The event id (a UUID, the `id` header of its record) or the row id (an integer).
        #[arg(value_name = "EVENT", value_parser = parse_row_key)]
        event: store::RowKey,
        /// Read the record back at its partition and offset and compare it with the row.
        #[arg(long)]
        verify: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Read back the records of sent rows (a random sample, or all, sent in a time range)
    /// and report how many are where their acks said, missing, different, or expired
    /// (removed by the topic's retention, not lost). Exit 1 on any missing or different
    /// record, or any row that could not be checked.
    Verify {
        /// Rows sent at or after this: an RFC 3339 time, or a duration meaning that long
        /// ago (24h, 30m).
        #[arg(long, value_name = "TIME", default_value = "24h")]
        since: Moment,
        /// Rows sent before this (RFC 3339, or a duration ago) [default: now].
        #[arg(long, value_name = "TIME")]
        until: Option<Moment>,
        /// Check this many rows, drawn at random from the range [default: 1000].
        #[arg(long, value_name = "N", conflicts_with = "all", value_parser = clap::value_parser!(u32).range(1..))]
        sample: Option<u32>,
        /// Check every row sent in the range, in the order they were sent.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send already-sent rows again, in id order, with their key, value and headers and a
    /// header `outbox-relay-republished-at`; their marks do not change. Pending, parked and
    /// discarded rows of the range are skipped and counted. Interrupted (Ctrl-C, or a
    /// failure), it says how to resume.
    Republish(Republish),
    /// Print a shell completion script: `outbox-relay completions bash >
    /// /usr/share/bash-completion/completions/outbox-relay`. Reads no configuration.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `outbox-relay man | man -l -`; with --dir, write it and
    /// one page per subcommand (outbox-relay-run.1, outbox-relay-parked-list.1...) there.
    /// Reads no configuration.
    Man {
        /// Directory to write every page into, instead of printing the main one.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print the JSON Schema of the configuration file, for editors that complete TOML
    /// (config/outbox-relay.schema.json is this output). Reads no configuration.
    ConfigSchema,
    /// Validate the configuration, connect to PostgreSQL and Kafka, and say what the relay
    /// would do (secrets redacted). Exits non-zero if anything is wrong.
    Check {
        /// How long to wait for each side to answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Validate the configuration (file and environment) and stop: connect to nothing,
        /// read no secret file. Exit 0 or 2 naming the key.
        #[arg(long)]
        config_only: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ParkedCommand {
    /// List parked rows, oldest first, with the reason and the error.
    List {
        /// Only this aggregate's rows.
        #[arg(long, value_name = "AGGREGATE_ID")]
        aggregate: Option<String>,
        #[command(flatten)]
        filter: ParkedFilterArgs,
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
        #[command(flatten)]
        filter: ParkedFilterArgs,
        /// Say which rows it would put back; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give up on parked rows. They stay in the table with the reason, for audit, and stop
    /// holding their aggregates back.
    Discard {
        #[command(flatten)]
        rows: ParkedSelection,
        #[command(flatten)]
        filter: ParkedFilterArgs,
        /// Why, recorded with each row.
        #[arg(long, required = true)]
        reason: String,
        /// Say which rows it would give up on; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Confirm giving up on every row --aggregate or --all selects.
        #[arg(long)]
        yes: bool,
    },
}

/// Narrows the parked rows --aggregate or --all (or a listing) selects.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ParkedFilterArgs {
    /// Only rows parked for this reason (as `parked list` shows it, e.g. invalid_topic).
    #[arg(long, value_name = "REASON")]
    park_reason: Option<String>,
    /// Only rows parked at or after this: RFC 3339, or a duration ago (24h).
    #[arg(long, value_name = "TIME")]
    parked_since: Option<Moment>,
    /// Only rows parked before this: RFC 3339, or a duration ago.
    #[arg(long, value_name = "TIME")]
    parked_until: Option<Moment>,
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
    // The version names the git revision and librdkafka, known only once running.
    let version: &'static str = Box::leak(crate::build::version_line().into_boxed_str());
    let cli = match Cli::command()
        .version(version)
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    if !matches!(cli.command, Command::Run) {
        // A one-shot command whose reader went away (`outbox-relay status | head`) ends
        // quietly, as other command-line tools do, instead of panicking in `println!`.
        // The daemon keeps Rust's default (SIGPIPE ignored): a log pipe that closes under
        // it is a write error, never a reason to die between an ack and its mark.
        // SAFETY: called before any other thread starts; it only resets a disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match &cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "outbox-relay", &mut script);
            let mut script = String::from_utf8_lossy(&script).into_owned();
            if *shell == clap_complete::Shell::Bash {
                // clap_complete 4.6 names the bash states of a hyphenated binary's
                // subcommands `outbox__relay__subcmd__x` but matches `outbox__subcmd__relay__
                // subcmd__x`, so no subcommand's options would complete (clap-rs/clap#6421).
                script = script.replace("outbox__subcmd__relay__", "outbox__relay__");
            }
            print!("{script}");
            return ExitCode::SUCCESS;
        }
        Command::ConfigSchema => {
            let schema = schemars::schema_for!(Settings);
            return match serde_json::to_string_pretty(&schema) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: Failed to write the schema: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Man { dir } => {
            // As generate_to builds every page: no help subcommand, whose page it never writes.
            let command = Cli::command()
                .version(version)
                .propagate_version(true)
                .disable_help_subcommand(true);
            let written = match &dir {
                None => manual::write_main_page(command, &mut std::io::stdout()),
                Some(dir) => manual::write_all_pages(command, dir),
            };
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    let into = dir
                        .as_ref()
                        .map_or(String::new(), |dir| format!(" into {}", dir.display()));
                    eprintln!("error: Failed to write the manual pages{into}: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    // Commands that only talk to the database read no Kafka secret file.
    let needs = match &cli.command {
        Command::Status { .. }
        | Command::Parked { .. }
        | Command::Prune { .. }
        | Command::Migrate { .. }
        | Command::Where { verify: false, .. } => Needs::DatabaseOnly,
        Command::Check {
            config_only: true, ..
        } => Needs::Validation,
        _ => Needs::Everything,
    };
    let settings = match Settings::load_for(cli.config.as_deref(), needs) {
        Ok(settings) => settings,
        Err(err) => return config_failure(&err),
    };
    telemetry::init_logging(&settings.log, matches!(cli.command, Command::Run));
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
    // `run` logs them at start and `check` prints them; the other commands warn here, so
    // that a misspelt variable (one underscore) is never ignored in silence.
    if !matches!(cli.command, Command::Run | Command::Check { .. }) {
        for warning in settings.warnings() {
            warn!("{warning}");
        }
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => run(settings).await,
            Command::Migrate {
                notify_trigger,
                dry_run,
            } => migrate(settings, notify_trigger, dry_run).await,
            Command::Check {
                config_only: true, ..
            } => {
                println!(
                    "configuration is valid ({})",
                    settings
                        .config_file
                        .as_ref()
                        .map_or("no file".to_string(), |f| format!("file {}", f.display()))
                );
                for warning in settings.warnings() {
                    println!("warning: {warning}");
                }
                Ok(())
            }
            Command::Check { timeout, .. } => check(settings, timeout).await,
            Command::Status { json, watch } => status(settings, json, watch).await,
            Command::Parked { command } => parked(settings, command).await,
            Command::Prune {
                older_than,
                dry_run,
                yes,
            } => prune(settings, older_than, dry_run, yes).await,
            Command::Where {
                event,
                verify,
                json,
            } => locate(settings, event, verify, json).await,
            Command::Verify {
                since,
                until,
                sample,
                all,
                json,
            } => {
                verify(
                    settings,
                    since,
                    until,
                    (!all).then(|| sample.unwrap_or(1000)),
                    json,
                )
                .await
            }
            Command::Republish(args) => republish(settings, args).await,
            Command::Completions { .. } | Command::Man { .. } | Command::ConfigSchema => Ok(()),
        }
    });
    // A blocking call still waiting on a broker (a metadata round trip, a read-back) is not
    // waited for: everything that mattered has finished.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The daemon logs (journal, Kubernetes); one-shot commands talk to a person.
            if is_daemon {
                error!("{err:#}");
            } else {
                eprintln!("error: {err:#}");
            }
            let misconfigured = err.chain().any(|cause| {
                matches!(
                    cause.downcast_ref::<store::StoreError>(),
                    Some(store::StoreError::Config { .. })
                )
            });
            if misconfigured
                || err.downcast_ref::<crate::app::MissingGrants>().is_some()
                || err.downcast_ref::<BadArguments>().is_some()
            {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Arguments that parse but cannot be honoured together (checked once the command knows
/// more than clap does): exit 2, nothing changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadArguments(pub String);

fn parse_row_key(text: &str) -> Result<store::RowKey, String> {
    if let Ok(event_id) = uuid::Uuid::parse_str(text) {
        return Ok(store::RowKey::EventId(event_id));
    }
    match text.parse::<i64>() {
        Ok(id) => Ok(store::RowKey::RowId(id)),
        Err(_) => Err(format!(
            "`{}` is neither an event id (a UUID) nor a row id (an integer)",
            crate::model::printable(text, 64)
        )),
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

/// SIGTERM and SIGINT, registered with the runtime as soon as they are created, and SIGHUP,
/// whose default action would kill the relay without a drain: it reloads nothing, so it is
/// logged and ignored.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn cancel_on_first(mut self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    info!("SIGTERM received; draining");
                    break;
                }
                _ = self.int.recv() => {
                    info!("SIGINT received; draining");
                    break;
                }
                _ = self.hup.recv() => warn!(
                    "SIGHUP received and ignored: the relay does not reload its configuration; restart it to apply a change (systemctl restart outbox-relay), which drains first"
                ),
            }
        }
        cancel.cancel();
    }
}

async fn migrate(settings: Settings, notify_trigger: Toggle, dry_run: bool) -> anyhow::Result<()> {
    let store = Store::open(&settings)
        .context("Failed to configure the database connection from database.url")?;
    if store.adopts_table() {
        adopt(&store, &settings, notify_trigger, dry_run).await?;
    } else if dry_run {
        let pending = store
            .pending_migrations()
            .await
            .context("Failed to read which migrations are applied")?;
        if pending.is_empty() {
            println!("outbox schema is up to date; --dry-run: nothing to run");
        }
        for (version, description, sql) in pending {
            println!(
                "-- migration {version} ({description}); its comments say what it locks\n{sql}"
            );
        }
        let trigger = store
            .doorbell_trigger()
            .await
            .context("Failed to read the doorbell trigger")?;
        let table = store.table_display();
        match (trigger.is_some(), notify_trigger) {
            (true, Toggle::Off) => println!(
                "-- the doorbell trigger on {table} would be removed (ACCESS EXCLUSIVE on {table} for a moment); `--notify-trigger on` keeps it"
            ),
            (false, Toggle::On) => println!(
                "-- the doorbell trigger would be installed on {table} (ACCESS EXCLUSIVE on {table} for a moment)"
            ),
            _ => {}
        }
        println!("--dry-run: nothing changed");
    } else {
        let pending = store
            .pending_migrations()
            .await
            .context("Failed to read which migrations are applied")?;
        store
            .migrate()
            .await
            .context("Failed to apply the migrations")?;
        if pending.is_empty() {
            println!("outbox schema is up to date: no migration to apply");
        } else {
            println!(
                "applied {} migration(s): {}; the outbox schema is up to date",
                pending.len(),
                pending
                    .iter()
                    .map(|(version, description, _)| format!("{version} ({description})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let enabled = matches!(notify_trigger, Toggle::On);
        let change = store
            .set_notify_trigger(enabled, &settings.database.listen_channel)
            .await
            .context("Failed to change the notify trigger")?;
        print_doorbell(&settings, enabled, change);
    }
    store.pool().close().await;
    Ok(())
}

/// Says where the doorbell trigger stands after this run changed it or not (a second
/// `migrate` finds it in place).
fn print_doorbell(settings: &Settings, installed: bool, change: TriggerChange) {
    let channel = &settings.database.listen_channel;
    let done = match (installed, change) {
        (true, TriggerChange::Changed) => "doorbell trigger installed",
        (true, TriggerChange::Unchanged) => "doorbell trigger already in place",
        (true, TriggerChange::KeptOld) => {
            "doorbell trigger kept as it was: the outbox stayed locked by other transactions for the five 200 ms tries to replace it with the one that tries the relay's lock in its WHEN clause (it works as it is, calling its function at every insert); run `outbox-relay migrate --notify-trigger on` again at a quieter moment"
        }
        (false, TriggerChange::Unchanged) => "no doorbell trigger",
        (false, _) => "doorbell trigger removed",
    };
    match (installed, settings.database.listen) {
        (true, true) => println!(
            "{done} (channel {channel}): inserts wake a sleeping relay at once, so relay.poll_interval (now {:?}) is only the safety net and may be raised (e.g. 500ms) to read an idle outbox seldom",
            settings.relay.poll_interval
        ),
        (true, false) => println!(
            "{done} (channel {channel}); database.listen = false here, so this relay polls every {:?}",
            settings.relay.poll_interval
        ),
        (false, _) => println!(
            "{done}: an idle relay polls for new rows every {:?} (`--notify-trigger on` installs a trigger that wakes it instead)",
            settings.relay.poll_interval
        ),
    }
}

/// The store of the configured outbox, a table `[outbox]` names read from the catalog first
/// (which needs no privilege on it).
async fn open_outbox(settings: &Settings) -> anyhow::Result<Store> {
    let store = Store::open(settings)
        .context("Failed to configure the database connection from database.url")?;
    store
        .resolve_table()
        .await
        .context("Failed to read the outbox table's columns")?;
    Ok(store)
}

/// `migrate` for a table `[outbox]` names: the plan, then (unless a dry run) each step.
async fn adopt(
    store: &Store,
    settings: &Settings,
    notify_trigger: Toggle,
    dry_run: bool,
) -> anyhow::Result<()> {
    let channel =
        matches!(notify_trigger, Toggle::On).then_some(settings.database.listen_channel.as_str());
    let plan = store
        .adoption_plan(channel)
        .await
        .context("Failed to read the table to adopt")?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    writeln!(
        out,
        "{} adoption of {}: {} steps{}",
        if dry_run { "--dry-run:" } else { "migrate:" },
        plan.table,
        plan.steps.len(),
        if dry_run { ", nothing is changed" } else { "" }
    )?;
    for (i, step) in plan.steps.iter().enumerate() {
        writeln!(out, "\n{}. {}", i + 1, step.effect)?;
        writeln!(out, "   lock: {}", step.lock)?;
        for statement in &step.statements {
            writeln!(out, "   {statement};")?;
        }
    }
    writeln!(
        out,
        "\n{} rows already in {} will be published once the relay runs ({} get an ordering number, oldest transaction first, before any new row).",
        plan.existing_rows, plan.table, plan.rows_to_number
    )?;
    drop(out);
    if dry_run {
        return Ok(());
    }
    let kept = store
        .adopt(&plan, |i, step| {
            println!("running step {}: {}", i + 1, step.effect)
        })
        .await
        .context(
            "Failed to adopt the table (steps already run stay; run migrate again to finish)",
        )?;
    let doorbell_change = match notify_trigger {
        Toggle::On if kept => TriggerChange::KeptOld,
        _ if plan.doorbell_changes => TriggerChange::Changed,
        _ => TriggerChange::Unchanged,
    };
    print_doorbell(
        settings,
        matches!(notify_trigger, Toggle::On),
        doorbell_change,
    );
    store
        .verify_schema()
        .await
        .context("The adopted table is still incomplete")?;
    println!("{} is adopted: the relay can run on it", plan.table);
    Ok(())
}
