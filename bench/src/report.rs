//! The run's results: the machine, the figures, ratios, the targets met or missed, as
//! Markdown tables (printed, and written next to the JSON) and as JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::ceiling::Ceiling;
use crate::drain::{Drain, human_rows};
use crate::latency::{Latency, NotifyCost};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres_version: String,
    pub postgres_settings: Vec<(String, String)>,
    pub tansu_version: String,
    pub relay_version: String,
    pub git_commit: String,
    /// Debezium's and Kafka Connect's versions when the debezium step ran.
    #[serde(default)]
    pub debezium_version: Option<String>,
}

impl Machine {
    pub fn probe(
        postgres_version: String,
        postgres_settings: Vec<(String, String)>,
        tansu: Option<&Path>,
        relay: &Path,
    ) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel: run(Command::new("uname").arg("-sr")),
            postgres_version,
            postgres_settings,
            tansu_version: tansu.map_or_else(
                || "external broker".into(),
                |t| run(Command::new(t).arg("--version")),
            ),
            relay_version: run(Command::new(relay).arg("--version")),
            debezium_version: None,
            git_commit: {
                let head = run(Command::new("git").args(["rev-parse", "--short", "HEAD"]));
                let dirty = !run(Command::new("git").args(["status", "--porcelain"])).is_empty();
                if dirty {
                    format!("{head} (with uncommitted changes)")
                } else {
                    head
                }
            },
        }
    }
}

/// Mean busy cores, or a dash where the run did not measure them.
fn cores(busy: Option<f64>) -> String {
    busy.map_or("–".into(), |cores| format!("{cores:.2}"))
}

fn run(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    /// None when the run did not measure it.
    pub met: Option<bool>,
}

/// The median of `values` (NaN for none).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub started_at: String,
    pub command: String,
    pub quick: bool,
    pub wall_seconds: f64,
    pub machine: Machine,
    pub ceilings: Vec<Ceiling>,
    pub peers: Vec<Drain>,
    /// Debezium's drains and latencies (absent from older results).
    #[serde(default)]
    pub debezium: Vec<Drain>,
    #[serde(default)]
    pub debezium_latency: Vec<Latency>,
    pub drains: Vec<Drain>,
    pub latency: Vec<Latency>,
    /// The trigger's cost as older runs measured it (no relay running).
    #[serde(default)]
    pub notify: Vec<NotifyCost>,
    /// The application's commit rate with each way of waking the relay (absent from older
    /// results).
    #[serde(default)]
    pub wakeup_costs: Vec<crate::latency::WakeupCost>,
    /// The doorbell trigger's cost in pairs of windows on one running relay (absent from
    /// older results).
    #[serde(default)]
    pub wakeup_paired: Vec<crate::latency::PairedWakeupCost>,
    /// What an idle relay costs the database (absent from older results).
    #[serde(default)]
    pub idle: Vec<crate::idle::IdleCost>,
    /// Table size with rows flowing, retention on and off (absent from older results).
    #[serde(default)]
    pub retention: Vec<crate::retention::RetentionRun>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn db_ceiling(&self, mode: &str, rows: u64) -> Option<&Ceiling> {
        // The ceiling measured on the same backlog size, else the nearest smaller one.
        self.ceilings
            .iter()
            .filter(|c| c.kind == "database" && c.mode == mode && c.rows <= rows)
            .max_by_key(|c| c.rows)
            .or_else(|| {
                self.ceilings
                    .iter()
                    .filter(|c| c.kind == "database" && c.mode == mode)
                    .min_by_key(|c| c.rows)
            })
    }

    pub fn broker_ceiling(&self, rows: u64) -> Option<&Ceiling> {
        self.ceilings
            .iter()
            .filter(|c| c.kind == "broker" && c.rows <= rows)
            .max_by_key(|c| c.rows)
            .or_else(|| {
                self.ceilings
                    .iter()
                    .filter(|c| c.kind == "broker")
                    .min_by_key(|c| c.rows)
            })
    }

    /// The peer on the same backlog in the same mode: a peer measured on another size is
    /// not a comparison (both slow down as the table grows).
    pub fn peer(&self, mode: &str, rows: u64) -> Option<&Drain> {
        self.peers.iter().find(|p| p.mode == mode && p.rows == rows)
    }

    /// The relay's steady single-replica drain rate in mark mode: the "max" the
    /// latency loads are fractions of (the largest regular backlog measured).
    pub fn max_drain_rate(&self, big_rows: u64) -> Option<f64> {
        self.drains
            .iter()
            .filter(|d| {
                d.of_one_kb_rows() && d.mode == "mark" && d.replicas == 1 && d.rows != big_rows
            })
            .max_by_key(|d| d.rows)
            .map(|d| d.rows_per_second)
    }

    pub fn evaluate_targets(&mut self, big_rows: u64) {
        let mut targets = Vec::new();
        // Drain >= 0.9 of the database ceiling: every relay configuration.
        let one_kb = || self.drains.iter().filter(|d| d.of_one_kb_rows());
        let ratios: Vec<(String, f64)> = one_kb()
            .filter_map(|d| {
                let c = self.db_ceiling(&d.mode, d.rows)?;
                Some((d.label(), d.rows_per_second / c.rows_per_second))
            })
            .collect();
        let worst = ratios.iter().min_by(|a, b| a.1.total_cmp(&b.1)).cloned();
        let single: Vec<String> = one_kb()
            .filter(|d| d.replicas == 1)
            .filter_map(|d| {
                let c = self.db_ceiling(&d.mode, d.rows)?;
                Some(format!(
                    "{} {:.2}",
                    d.label(),
                    d.rows_per_second / c.rows_per_second
                ))
            })
            .collect();
        targets.push(Target {
            name: "drain vs database ceiling".into(),
            goal: ">= 0.9 of the database ceiling (same mode, same backlog)".into(),
            measured: match &worst {
                Some((label, r)) => format!(
                    "worst {r:.2} ({label}); met by {} of {}; single replica: {}",
                    ratios.iter().filter(|(_, r)| *r >= 0.9).count(),
                    ratios.len(),
                    single.join(", ")
                ),
                None => "not measured".into(),
            },
            met: worst.map(|(_, r)| r >= 0.9),
        });
        let at = |load: &str| {
            self.latency
                .iter()
                .find(|l| l.is_default_install() && l.load == load)
                .cloned()
        };
        for (load, goal_ms) in [("1k", 10.0), ("50%", 50.0)] {
            let found = at(load);
            let within = |l: &Latency| {
                if goal_ms <= 10.0 {
                    l.relay_ack_within_10ms
                } else {
                    l.relay_ack_within_50ms
                }
            };
            targets.push(Target {
                name: format!("p99 commit → ack, {load} load, default install"),
                goal: format!("p99 <= {goal_ms} ms"),
                measured: found.as_ref().map_or("not measured".into(), |l| {
                    format!(
                        "commit → marked sent p99 {5}; commit → consumer p99 {2:.1} ms; relay \
                         created_at → ack {0} within {goal_ms} ms (p99 bucket <= {1} ms); at {3:.0} \
                         rows/s (target {4:.0})",
                        within(l).map_or("–".into(), |f| format!("{:.1}%", f * 100.0)),
                        l.relay_ack_p99_bucket_ms
                            .map_or("–".into(), |v| format!("{v}")),
                        l.p99_ms,
                        l.achieved_rows_per_second,
                        l.target_rows_per_second,
                        l.ack
                            .as_ref()
                            .map_or("–".into(), |a| format!("{:.1} ms", a.p99_ms)),
                    )
                }),
                // Every figure bounds commit → ack from above: the mark starts after the
                // ack, the consumer reads a record only after the broker has it, and
                // created_at is taken before the commit. The target is met when one does.
                met: found.map(|l| {
                    (l.ack.as_ref().is_some_and(|a| a.p99_ms <= goal_ms)
                        || l.p99_ms <= goal_ms
                        || within(&l).is_some_and(|f| f >= 0.99))
                        && l.missing_rows == 0
                        && l.achieved_rows_per_second >= 0.95 * l.target_rows_per_second
                }),
            });
        }
        let floor = self.latency.iter().find(|l| l.load == "broker only");
        let default_1k = at("1k");
        targets.push(Target {
            name: "latency over the broker's floor, 1k rows/s, default install".into(),
            goal: "commit → consumer p50 <= floor + 3 ms, p99 <= floor + 5 ms".into(),
            measured: match (floor, &default_1k) {
                (Some(f), Some(l)) => format!(
                    "p50 {:.1} ms ({:+.1}), p99 {:.1} ms ({:+.1}) against the floor's {:.1} / {:.1} ms; \
                     {} connections, {} row(s) per transaction, {:.0} rows/s",
                    l.p50_ms,
                    l.p50_ms - f.p50_ms,
                    l.p99_ms,
                    l.p99_ms - f.p99_ms,
                    f.p50_ms,
                    f.p99_ms,
                    l.connections,
                    l.rows_per_transaction,
                    l.achieved_rows_per_second
                ),
                _ => "not measured".into(),
            },
            met: match (floor, &default_1k) {
                (Some(f), Some(l)) => Some(
                    l.p50_ms - f.p50_ms <= 3.0
                        && l.p99_ms - f.p99_ms <= 5.0
                        && l.missing_rows == 0,
                ),
                _ => None,
            },
        });
        let medians = self.wakeup_cost_medians();
        let cost_at = |connections: u32, wakeup: crate::latency::Wakeup| {
            medians
                .iter()
                .find(|(c, _, _)| {
                    c.connections == connections && c.relay_running && c.wakeup == Some(wakeup)
                })
                .map(|(_, median, _)| *median)
        };
        let (default_16, polling_16) = (
            cost_at(16, crate::latency::Wakeup::Default),
            cost_at(16, crate::latency::Wakeup::Polling),
        );
        let change = default_16.zip(polling_16).map(|(d, p)| d / p - 1.0);
        targets.push(Target {
            name: "what waking the relay costs the application, 16 connections".into(),
            goal: "commit rate >= 95 % of the same relay's polling every 500 ms without a trigger (medians)".into(),
            measured: match (default_16, polling_16, change) {
                (Some(d), Some(p), Some(change)) => format!(
                    "{d:.0} commits/s with the default install, {p:.0} polling every 500 ms ({:+.1}%)",
                    change * 100.0
                ),
                _ => "not measured".into(),
            },
            met: change.map(|c| c >= -0.05),
        });
        if let Some(paired) = self
            .wakeup_paired
            .iter()
            .find(|p| p.connections == 16 && p.against == crate::latency::PairedBaseline::None)
        {
            let change = median(&paired.changes());
            targets.push(Target {
                name: "what the opt-in doorbell costs the application, 16 connections, in pairs of windows"
                    .into(),
                goal: "commit rate >= 95 % of the same relay's without the trigger (median of the pairs)"
                    .into(),
                measured: format!(
                    "{:+.1}% (median of {} pairs of {:.0} s; {:.0} notifications)",
                    change * 100.0,
                    paired.with_trigger.len(),
                    paired.window_seconds,
                    paired.notifications
                ),
                met: change.is_finite().then_some(change >= -0.05),
            });
        }
        let worst_cpu = one_kb().max_by(|a, b| a.cpu_us_per_row.total_cmp(&b.cpu_us_per_row));
        targets.push(Target {
            name: "relay CPU per row".into(),
            goal: "<= 10 µs/row (utime+stime, all replicas)".into(),
            measured: worst_cpu.map_or("not measured".into(), |d| {
                format!(
                    "worst {:.1} µs/row ({}){}",
                    d.cpu_us_per_row,
                    d.label(),
                    self.drains
                        .iter()
                        .find(|d| d.of_one_kb_rows() && d.rows == big_rows)
                        .map(|b| format!("; {}: {:.1} µs/row", b.label(), b.cpu_us_per_row))
                        .unwrap_or_default()
                )
            }),
            met: worst_cpu.map(|d| d.cpu_us_per_row <= 10.0),
        });
        let worst_rss = one_kb().max_by_key(|d| d.peak_rss_bytes);
        targets.push(Target {
            name: "relay peak RSS".into(),
            goal: "<= 64 MiB (VmHWM of one replica)".into(),
            measured: worst_rss.map_or("not measured".into(), |d| {
                format!("worst {:.1} MiB ({})", mib(d.peak_rss_bytes), d.label())
            }),
            met: worst_rss.map(|d| d.peak_rss_bytes <= 64 * 1024 * 1024),
        });
        let worst_wide = self
            .drains
            .iter()
            .filter(|d| !d.of_one_kb_rows())
            .max_by_key(|d| d.peak_rss_bytes);
        targets.push(Target {
            name: "relay peak RSS, wide rows".into(),
            goal: "<= 128 MiB (the memory limit of deploy/kubernetes)".into(),
            measured: worst_wide.map_or("not measured".into(), |d| {
                format!("worst {:.1} MiB ({})", mib(d.peak_rss_bytes), d.label())
            }),
            met: worst_wide.map(|d| d.peak_rss_bytes <= 128 * 1024 * 1024),
        });
        self.targets = targets;
    }

    /// The commit-rate measurements grouped by way of waking the relay (in the order first
    /// measured): the first of each group, the median of its commits/s, and all of them.
    pub fn wakeup_cost_medians(&self) -> Vec<(&crate::latency::WakeupCost, f64, Vec<f64>)> {
        let mut groups: Vec<(&crate::latency::WakeupCost, Vec<f64>)> = Vec::new();
        for c in &self.wakeup_costs {
            match groups.iter_mut().find(|(g, _)| {
                g.connections == c.connections
                    && g.wakeup == c.wakeup
                    && g.relay_running == c.relay_running
            }) {
                Some((_, rates)) => rates.push(c.commits_per_second),
                None => groups.push((c, vec![c.commits_per_second])),
            }
        }
        groups
            .into_iter()
            .map(|(first, rates)| {
                let median = median(&rates);
                (first, median, rates)
            })
            .collect()
    }

    /// The tables, in Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "### Machine\n");
        let _ = writeln!(out, "| | |\n|---|---|");
        let _ = writeln!(out, "| CPU | {} × {} |", m.nproc, m.cpu_model);
        let _ = writeln!(out, "| memory | {:.1} GiB |", m.memory_gib);
        let _ = writeln!(out, "| kernel | {} |", m.kernel);
        let _ = writeln!(out, "| PostgreSQL | {} |", m.postgres_version);
        let settings: Vec<String> = m
            .postgres_settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "| PostgreSQL settings | {} |", settings.join(", "));
        let _ = writeln!(out, "| broker | {} (in-memory storage) |", m.tansu_version);
        let _ = writeln!(out, "| relay | {} at {} |", m.relay_version, m.git_commit);
        if let Some(debezium) = &m.debezium_version {
            let _ = writeln!(
                out,
                "| Debezium | {debezium} (PostgresConnector, pgoutput, outbox EventRouter; Kafka Connect standalone) |"
            );
        }
        let _ = writeln!(out, "| command | `{}` |", self.command);
        let _ = writeln!(
            out,
            "| run | {} , {:.0} s{} |",
            self.started_at,
            self.wall_seconds,
            if self.quick { ", quick" } else { "" }
        );

        if !self.ceilings.is_empty() {
            let _ = writeln!(out, "\n### Ceilings\n");
            let _ = writeln!(
                out,
                "| ceiling | rows | rows/s | seconds | make-rows s | busy cores | every measurement, rows/s |\n|---|---:|---:|---:|---:|---:|---|"
            );
            for c in &self.ceilings {
                let name = match c.kind.as_str() {
                    "database" => format!(
                        "database, {} (UPDATE/DELETE … RETURNING, 1000 per statement)",
                        c.mode
                    ),
                    _ => "broker (idempotent acks=all lz4 producer, no database)".into(),
                };
                let measured = if c.measured_rows_per_second.len() > 1 {
                    let each: Vec<String> = c
                        .measured_rows_per_second
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect();
                    format!("{} (fastest counts)", each.join(", "))
                } else {
                    "–".into()
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.2} | {:.1} | {} | {} |",
                    name,
                    human_rows(c.rows),
                    c.rows_per_second,
                    c.seconds,
                    c.make_rows_seconds,
                    cores(c.busy_cores),
                    measured
                );
            }
        }

        if !self.drains.is_empty() || !self.peers.is_empty() || !self.debezium.is_empty() {
            let _ = writeln!(out, "\n### Draining a backlog of 1 KB rows\n");
            let _ = writeln!(
                out,
                "Rows/s from the first retirement until nothing is pending (start-up apart); Debezium's \
                 (mode `wal`: it reads the inserts from the WAL and leaves the rows) from the first record \
                 a consumer reads to the last. Ratios against the ceilings and the peer of the same mode \
                 and backlog. WAL: bytes the server wrote during the drain, per row. Busy cores: the \
                 whole machine's mean from start to drained (PostgreSQL, broker, contender and bench).\n"
            );
            let _ = writeln!(
                out,
                "| who | mode | rows | replicas | rows/s | × DB ceiling | × broker ceiling | × peer | start-up s | total s | CPU µs/row | broker CPU µs/row | busy cores | peak RSS MiB | WAL B/row | mean batch ms | records in Kafka |\n\
                 |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for d in self
                .peers
                .iter()
                .chain(self.debezium.iter())
                .chain(self.drains.iter())
            {
                // Ceilings and peers are measured on 1 KB rows only.
                let one_kb = d.of_one_kb_rows();
                let ratio = |base: Option<f64>| match base {
                    Some(base) if one_kb => format!("{:.2}", d.rows_per_second / base),
                    _ => "–".into(),
                };
                let db = ratio(self.db_ceiling(&d.mode, d.rows).map(|c| c.rows_per_second));
                let broker = ratio(self.broker_ceiling(d.rows).map(|c| c.rows_per_second));
                let peer = if d.who == "peer" {
                    "1.00".into()
                } else {
                    ratio(self.peer(&d.mode, d.rows).map(|p| p.rows_per_second))
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {} | {} | {:.1} | {} | {} | {} |",
                    d.who,
                    d.mode,
                    d.backlog(),
                    d.replicas,
                    d.rows_per_second,
                    db,
                    broker,
                    peer,
                    d.startup_seconds,
                    d.total_seconds,
                    d.cpu_us_per_row,
                    d.broker_cpu_us_per_row
                        .map_or("–".into(), |us| format!("{us:.1}")),
                    cores(d.busy_cores),
                    mib(d.peak_rss_bytes),
                    d.wal_bytes_per_row.map_or("–".into(), wal_bytes),
                    if d.batches > 0 {
                        format!("{:.1}", d.mean_batch_ms)
                    } else {
                        "–".into()
                    },
                    d.records_in_kafka
                );
            }
        }

        let with_statements: Vec<&Drain> = self
            .peers
            .iter()
            .chain(self.debezium.iter())
            .chain(self.drains.iter())
            .filter(|d| !d.statements.is_empty())
            .collect();
        if !with_statements.is_empty() {
            let _ = writeln!(
                out,
                "\n### Where the database time went (pg_stat_statements, top 3 per drain)\n"
            );
            let _ = writeln!(
                out,
                "| drain | calls | mean ms | total s | pages hit / read per call | statement |\n|---|---:|---:|---:|---:|---|"
            );
            for d in with_statements {
                for st in d.statements.iter().take(3) {
                    let text: String = st.query.chars().take(90).collect();
                    let (hit, read) = st.pages_per_call();
                    let _ = writeln!(
                        out,
                        "| {} | {} | {:.2} | {:.1} | {:.0} / {:.0} | `{}…` |",
                        d.label(),
                        st.calls,
                        st.mean_ms,
                        st.total_ms / 1000.0,
                        hit,
                        read,
                        text.replace('|', "\\|")
                    );
                }
            }
        }

        if !self.latency.is_empty() {
            let _ = writeln!(
                out,
                "\n### End-to-end latency: insert commit → record read by a consumer\n"
            );
            let _ = writeln!(
                out,
                "Percentiles from commit to the consumer's receipt (hdrhistogram), then from commit to the row's \
                 `sent_at` (the relay's mark, which starts after the ack: an upper bound on commit → ack; for the \
                 broker-only row, from the produce call to the delivery report). The relay-ack columns are the relay's own \
                 created_at → ack histogram over the same window (bucketed: share within 10 ms, upper bound of the p99 bucket).\n\n\
                 | wake-up | load | conns | rows/tx | target rows/s | achieved rows/s | rows | missing | p50 ms | p99 ms | p99.9 ms | max ms | → ack p50 ms | → ack p99 ms | → ack p99.9 ms | relay ack ≤ 10 ms | relay ack p99 ≤ ms | relay batches: rows, ms | commit p50 ms | commit p99 ms |\n\
                 |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for l in &self.latency {
                let ack = |pick: fn(&crate::latency::Percentiles) -> f64| {
                    l.ack
                        .as_ref()
                        .map_or("–".into(), |a| format!("{:.1}", pick(a)))
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    l.wakeup_label(),
                    l.load,
                    l.connections,
                    l.rows_per_transaction,
                    l.target_rows_per_second,
                    l.achieved_rows_per_second,
                    l.measured_rows,
                    l.missing_rows,
                    l.p50_ms,
                    l.p99_ms,
                    l.p999_ms,
                    l.max_ms,
                    ack(|a| a.p50_ms),
                    ack(|a| a.p99_ms),
                    ack(|a| a.p999_ms),
                    l.relay_ack_within_10ms
                        .map_or("–".into(), |f| format!("{:.1}%", f * 100.0)),
                    l.relay_ack_p99_bucket_ms
                        .map_or("–".into(), |v| format!("{v}")),
                    match (l.relay_mean_batch_rows, l.relay_mean_batch_ms) {
                        (Some(rows), Some(ms)) => format!("{rows:.0}, {ms:.1}"),
                        _ => "–".into(),
                    },
                    l.commit
                        .as_ref()
                        .map_or("–".into(), |c| format!("{:.2}", c.p50_ms)),
                    l.commit
                        .as_ref()
                        .map_or("–".into(), |c| format!("{:.2}", c.p99_ms)),
                );
            }
            if let Some(floor) = self.latency.iter().find(|l| l.load == "broker only") {
                let _ = writeln!(
                    out,
                    "\nOver the broker's own floor (p50 {:.1} ms, p99 {:.1} ms), commit → consumer:\n\n\
                     | wake-up | load | + p50 ms | + p99 ms |\n|---|---|---:|---:|",
                    floor.p50_ms, floor.p99_ms
                );
                for l in self.latency.iter().filter(|l| l.load != "broker only") {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {:+.1} | {:+.1} |",
                        l.wakeup_label(),
                        l.load,
                        l.p50_ms - floor.p50_ms,
                        l.p99_ms - floor.p99_ms
                    );
                }
            }
        }

        if !self.debezium_latency.is_empty() {
            let _ = writeln!(
                out,
                "\n### Debezium's end-to-end latency: insert commit → record read by a consumer\n"
            );
            let _ = writeln!(
                out,
                "The same inserting clients and consumer as the relay's, with Debezium streaming from its slot \
                 before the first insert; the relay's figures at the same load (default install) beside them.\n\n\
                 | load | rows/tx | target rows/s | achieved rows/s | rows | missing | p50 ms | p99 ms | p99.9 ms | max ms | relay p50 ms | relay p99 ms |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for l in &self.debezium_latency {
                let relay = self
                    .latency
                    .iter()
                    .find(|r| r.is_default_install() && r.load == l.load);
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
                    l.load,
                    l.rows_per_transaction,
                    l.target_rows_per_second,
                    l.achieved_rows_per_second,
                    l.measured_rows,
                    l.missing_rows,
                    l.p50_ms,
                    l.p99_ms,
                    l.p999_ms,
                    l.max_ms,
                    relay.map_or("–".into(), |r| format!("{:.1}", r.p50_ms)),
                    relay.map_or("–".into(), |r| format!("{:.1}", r.p99_ms)),
                );
            }
        }

        if !self.notify.is_empty() {
            let _ = writeln!(
                out,
                "\n### Cost of the NOTIFY trigger on the application's inserts\n"
            );
            let _ = writeln!(
                out,
                "Single-row INSERT transactions, autocommit, no relay running.\n\n\
                 | connections | seconds | commits/s trigger off | commits/s trigger on | change |\n\
                 |---:|---:|---:|---:|---:|"
            );
            for n in &self.notify {
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {:.0} | {:.0} | {:+.1}% |",
                    n.connections,
                    n.seconds,
                    n.commits_per_second_trigger_off,
                    n.commits_per_second_trigger_on,
                    n.change * 100.0
                );
            }
        }

        if !self.wakeup_costs.is_empty() {
            let _ = writeln!(
                out,
                "\n### What waking the relay costs the application\n\n\
                 Single-row INSERT transactions, autocommit, as fast as they go: first without the relay (the \
                 application alone, then with the doorbell's trigger in place), then with the relay running and \
                 publishing them under each way of waking it. With the relay running, the change is against the same \
                 relay with no trigger (polling), which costs the writers only the relay's own work on the shared \
                 cores; without it, against the application alone.\n\n\
                 | connections | seconds | relay | wake-up | commits/s, median | each measurement | change of the median | rows the relay published, notifications it received (first measurement) |\n\
                 |---:|---:|---|---|---:|---|---:|---:|"
            );
            let groups = self.wakeup_cost_medians();
            for (c, median, all) in &groups {
                let base = groups.iter().find(|(p, _, _)| {
                    p.connections == c.connections
                        && if c.relay_running {
                            p.relay_running && p.wakeup == Some(crate::latency::Wakeup::Polling)
                        } else {
                            p.wakeup.is_none()
                        }
                });
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {} | {} | {:.0} | {} | {} | {:.0}, {:.0} |",
                    c.connections,
                    c.seconds,
                    if c.relay_running { "running" } else { "none" },
                    c.wakeup.map_or("no trigger", crate::latency::Wakeup::label),
                    median,
                    all.iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    base.filter(|(b, _, _)| !std::ptr::eq(*b, *c)).map_or(
                        "–".into(),
                        |(_, base, _)| format!("{:+.1}%", (median / base - 1.0) * 100.0)
                    ),
                    c.rows_published,
                    c.notifications
                );
            }
        }

        if !self.wakeup_paired.is_empty() {
            let _ = writeln!(
                out,
                "\n### What the doorbell costs the application, in pairs of windows\n\n\
                 One relay runs and publishes throughout while the writers commit single-row INSERT transactions \
                 as fast as they go; the doorbell trigger is installed for one window and removed for the next, \
                 in the order ABBA, so that drift falls on both. The change is each pair's commits/s with the \
                 trigger against the other window: no trigger, or the trigger before migration 11 (no WHEN \
                 clause: its function called at every insert).\n\n\
                 | connections | against | pairs × seconds | with the trigger, median commits/s | against, median | change per pair: median | middle half | min … max | notifications, rows published |\n\
                 |---:|---|---:|---:|---:|---:|---:|---:|---:|"
            );
            for p in &self.wakeup_paired {
                let mut changes = p.changes();
                changes.sort_by(f64::total_cmp);
                let at = |q: f64| {
                    changes
                        .get(((changes.len() as f64 - 1.0) * q).round() as usize)
                        .map_or(f64::NAN, |c| c * 100.0)
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} × {:.0} | {:.0} | {:.0} | {:+.1} % | {:+.1} … {:+.1} % | {:+.1} … {:+.1} % | {:.0}, {:.0} |",
                    p.connections,
                    match p.against {
                        crate::latency::PairedBaseline::None => "no trigger",
                        crate::latency::PairedBaseline::TriggerWithoutWhen =>
                            "trigger without WHEN",
                    },
                    changes.len(),
                    p.window_seconds,
                    median(&p.with_trigger),
                    median(&p.without_trigger),
                    median(&changes) * 100.0,
                    at(0.25),
                    at(0.75),
                    at(0.0),
                    at(1.0),
                    p.notifications,
                    p.rows_published
                );
            }
        }

        if !self.idle.is_empty() {
            let _ = writeln!(
                out,
                "\n### What an idle relay costs the database\n\n\
                 One relay (mark mode) on an empty outbox, measured once it first waited for rows: the \
                 statements the database ran (pg_stat_statements), the relay's waits for rows, the relay's \
                 CPU and that of the PostgreSQL backends serving it, per second.\n\n\
                 | wake-up | seconds | statements/s | waits/s | relay CPU ms/s | its PostgreSQL backends' CPU ms/s (backends) |\n\
                 |---|---:|---:|---:|---:|---:|"
            );
            for i in &self.idle {
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} ({}) |",
                    i.wakeup.label(),
                    i.seconds,
                    i.statements_per_second,
                    i.waits_per_second,
                    i.relay_cpu_ms_per_second,
                    i.postgres_cpu_ms_per_second,
                    i.backends
                );
            }
        }

        if !self.retention.is_empty() {
            let _ = writeln!(out, "\n### Table size with rows flowing (mark mode)\n");
            let _ = writeln!(
                out,
                "| relay.retain_sent | rows/s | rows | peak MiB | MiB at the end | rows left |\n|---|---|---|---|---|---|"
            );
            for r in &self.retention {
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {} | {:.1} | {:.1} | {} |",
                    if r.retain_sent == "0s" {
                        "0s (off)"
                    } else {
                        &r.retain_sent
                    },
                    r.rows_per_second,
                    r.rows,
                    mib(r.peak_bytes().max(0) as u64),
                    mib(r.final_bytes.max(0) as u64),
                    r.rows_left
                );
            }
        }

        if !self.targets.is_empty() {
            let _ = writeln!(out, "\n### Targets\n");
            let _ = writeln!(out, "| target | goal | measured | |\n|---|---|---|---|");
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    t.name,
                    t.goal,
                    t.measured,
                    match t.met {
                        Some(true) => "met",
                        Some(false) => "**missed**",
                        None => "not measured",
                    }
                );
            }
        }
        let notes: Vec<String> = self
            .notes
            .iter()
            .cloned()
            .chain(self.checkpoints_note())
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(out, "\n### Notes\n");
            for n in &notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    /// Which measurements a checkpoint fell into (each takes one first); nothing for runs
    /// recorded before the bench counted them.
    fn checkpoints_note(&self) -> Option<String> {
        let ceilings = self.ceilings.iter().filter_map(|c| {
            let name = format!("database ceiling {} {}", c.mode, human_rows(c.rows));
            Some((name, c.checkpoints_during?))
        });
        let drains = self
            .peers
            .iter()
            .chain(&self.debezium)
            .chain(&self.drains)
            .filter_map(|d| Some((d.label(), d.checkpoints_during?)));
        let latency = self.latency.iter().filter_map(|l| {
            let name = format!("latency {} {}", l.load, l.wakeup_label());
            Some((name, l.checkpoints_during?))
        });
        let debezium_latency = self.debezium_latency.iter().filter_map(|l| {
            Some((
                format!("Debezium latency {}", l.load),
                l.checkpoints_during?,
            ))
        });
        let counted: Vec<(String, i64)> = ceilings
            .chain(drains)
            .chain(latency)
            .chain(debezium_latency)
            .collect();
        if counted.is_empty() {
            return None;
        }
        let during: Vec<String> = counted
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} ({n})"))
            .collect();
        Some(format!(
            "Each measurement takes a CHECKPOINT before it makes its backlog or starts its \
             inserts, and the OS writes the backlog out before the clock starts: the rows are \
             then retired without full-page images in the WAL unless a checkpoint comes in \
             between. Checkpoints begun while a backlog was made or measured: {}.",
            if during.is_empty() {
                "none".to_string()
            } else {
                during.join(", ")
            }
        ))
    }
}

/// WAL bytes per row: whole bytes, or two decimals below 10 (Debezium's reads write
/// almost nothing).
pub fn wal_bytes(per_row: f64) -> String {
    if per_row < 10.0 {
        format!("{per_row:.2}")
    } else {
        format!("{per_row:.0}")
    }
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}
