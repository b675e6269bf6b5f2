//! `outbox-relay republish`: sent rows sent again in id order on the relay's idempotent
//! producer, one page at a time, each page acknowledged before the next is read; marks never
//! change, and an interruption names the first row not acknowledged, to resume from.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;

use super::*;
use crate::kafka::producer::{ProducerEvent, TopicAnswer};
use crate::store::{PROOF_PAGE_ROWS, RangeCensus, SentRow};
use crate::telemetry::Metrics;

/// The header every re-sent record carries: when the run started (RFC 3339).
pub(crate) const HEADER_REPUBLISHED_AT: &str = "outbox-relay-republished-at";
/// How long the cluster may take to say which topics exist.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub(crate) struct Republish {
    /// The first row id to re-send (inclusive); this or --since is required.
    #[arg(long, value_name = "ID", required_unless_present = "since")]
    from_id: Option<i64>,
    /// The last row id to re-send (inclusive) [default: the last sent row].
    #[arg(long, value_name = "ID")]
    to_id: Option<i64>,
    /// Only rows sent at or after this: an RFC 3339 time, or a duration ago (24h).
    #[arg(long, value_name = "TIME")]
    since: Option<Moment>,
    /// Only rows sent before this (RFC 3339, or a duration ago) [default: now].
    #[arg(long, value_name = "TIME")]
    until: Option<Moment>,
    /// Only this aggregate's rows.
    #[arg(long, value_name = "AGGREGATE_ID")]
    aggregate: Option<String>,
    /// Send every row to this topic (it must exist) instead of the row's own.
    #[arg(long, value_name = "TOPIC")]
    to_topic: Option<String>,
    /// At most this many rows per second [default: as fast as the broker acknowledges].
    #[arg(long, value_name = "ROWS_PER_S", value_parser = clap::value_parser!(u32).range(1..))]
    rate: Option<u32>,
    /// Count the rows it would re-send; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Re-send to the rows' own topics: their consumers will see each event again (the
    /// `id` header lets them drop it).
    #[arg(long)]
    yes: bool,
}

/// The range as resolved: ids in `(after, last]`, sent in `[since, until)` where given.
struct Range {
    after: i64,
    last: i64,
    sent: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
}

pub(super) async fn republish(settings: Settings, args: Republish) -> anyhow::Result<()> {
    if let (Some(from), Some(to)) = (args.from_id, args.to_id) {
        if to < from {
            return Err(BadArguments(format!("--to-id {to} is below --from-id {from}")).into());
        }
    }
    if let Some(topic) = &args.to_topic {
        crate::model::validate_topic(topic)
            .map_err(|e| BadArguments(format!("--to-topic: {e}")))?;
    }
    if args.to_topic.is_none() && !args.yes && !args.dry_run {
        return Err(BadArguments(
            "without --to-topic the rows go back to their own topics, where every consumer sees them a second time (duplicates it can drop by the `id` header) after the newer events of their aggregates, and on a compacted topic a re-sent record becomes the latest for its key: pass --yes to do that, or --to-topic TOPIC to send them elsewhere; --dry-run counts them first"
                .into(),
        )
        .into());
    }
    let store = open_outbox(&settings).await?;
    let now = store
        .database_now()
        .await
        .context("Failed to read the database's clock")?;
    let since = args.since.map(|m| m.resolve(now));
    let until = args.until.map(|m| m.resolve(now));
    let Some(range) = resolve_range(&store, &args, since, until, now).await? else {
        println!("no rows were sent in that range; nothing to re-send");
        return Ok(());
    };
    let aggregate = args.aggregate.as_deref();
    let total = store
        .count_republishable(range.after, range.last, range.sent, aggregate)
        .await
        .context("Failed to count the rows to re-send")?;
    let census = store
        .range_census(range.after.saturating_add(1), range.last, aggregate)
        .await
        .context("Failed to count the rows of the range")?;
    let skipped = skipped_text(&census);
    if args.dry_run {
        store.pool().close().await;
        println!(
            "--dry-run: would re-send {total} rows (ids {}..={}) to {}; {skipped}",
            range.after.saturating_add(1),
            range.last,
            destination(&args)
        );
        return Ok(());
    }
    let mut run = Run::start(&settings, &args)?;
    let progress = indicatif::ProgressBar::new(u64::try_from(total).unwrap_or_default());
    progress.set_style(
        indicatif::ProgressStyle::with_template("re-sending {bar:40} {pos}/{len} rows ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let outcome = run.send_pages(&store, &range, aggregate, &progress).await;
    progress.finish_and_clear();
    store.pool().close().await;
    let resent = outcome.acknowledged;
    let unencodable = if outcome.unencodable.is_empty() {
        String::new()
    } else {
        format!(
            "; left out {} row(s) that no longer encode (fix them and re-send with --from-id/--to-id): {}",
            outcome.unencodable.len(),
            outcome
                .unencodable
                .iter()
                .map(|(id, why)| format!("{id} ({why})"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match outcome.stopped {
        None => {
            println!(
                "re-sent {resent} rows (ids {}..={}) to {}; {skipped}{unencodable}",
                range.after.saturating_add(1),
                range.last,
                destination(&args)
            );
            Ok(())
        }
        Some(why) => {
            let resume = match outcome.first_unacknowledged {
                Some(id) => format!(
                    "; resume with: outbox-relay republish {}",
                    resume_arguments(&args, id, range.last, since, until)
                ),
                None => String::new(),
            };
            anyhow::bail!("{why}: re-sent {resent} rows before stopping{resume}")
        }
    }
}

async fn resolve_range(
    store: &Store,
    args: &Republish,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<Range>> {
    let mut after = args.from_id.map_or(i64::MIN, |id| id.saturating_sub(1));
    let mut last = args.to_id.unwrap_or(i64::MAX);
    if since.is_some() || until.is_some() {
        let from = since.unwrap_or(DateTime::UNIX_EPOCH);
        let to = until.unwrap_or(now);
        if from >= to {
            return Err(BadArguments(format!(
                "--since ({}) must be before --until ({})",
                from.to_rfc3339(),
                to.to_rfc3339()
            ))
            .into());
        }
        let Some((low, high)) = store
            .sent_id_bounds(from, to)
            .await
            .context("Failed to find the rows sent in that time range")?
        else {
            return Ok(None);
        };
        after = after.max(low.saturating_sub(1));
        last = last.min(high);
    } else if args.to_id.is_none() {
        // The last row sent so far: rows sent while this runs are not part of the range.
        let Some((_, high)) = store
            .sent_id_bounds(DateTime::UNIX_EPOCH, now)
            .await
            .context("Failed to find the last sent row")?
        else {
            return Ok(None);
        };
        last = high;
    }
    if after >= last {
        return Ok(None);
    }
    Ok(Some(Range {
        after,
        last,
        sent: (since, until),
    }))
}

fn destination(args: &Republish) -> String {
    match &args.to_topic {
        Some(topic) => format!("topic {topic}"),
        None => "their own topics".into(),
    }
}

fn skipped_text(census: &RangeCensus) -> String {
    format!(
        "skipped {} pending, {} parked, {} discarded rows of the range (never sent)",
        census.pending, census.parked, census.discarded
    )
}

/// The same command from `next_id` on, with times written out so that it names the same rows.
fn resume_arguments(
    args: &Republish,
    next_id: i64,
    last_id: i64,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> String {
    // The range as resolved: rows sent since the first run began are not part of it.
    let mut words = vec![format!("--from-id {next_id}"), format!("--to-id {last_id}")];
    if let Some(since) = since {
        words.push(format!("--since {}", since.to_rfc3339()));
    }
    if let Some(until) = until {
        words.push(format!("--until {}", until.to_rfc3339()));
    }
    if let Some(aggregate) = &args.aggregate {
        words.push(format!(
            "--aggregate '{}'",
            aggregate.replace('\'', "'\\''")
        ));
    }
    if let Some(topic) = &args.to_topic {
        words.push(format!("--to-topic {topic}"));
    }
    if let Some(rate) = args.rate {
        words.push(format!("--rate {rate}"));
    }
    if args.yes {
        words.push("--yes".into());
    }
    words.join(" ")
}

/// How far a run got.
#[derive(Default)]
struct Outcome {
    acknowledged: u64,
    /// Why it stopped before the end of the range.
    stopped: Option<String>,
    /// The lowest id not acknowledged when it stopped: where to resume.
    first_unacknowledged: Option<i64>,
    /// Rows left out because they no longer encode (id, why); the rest went on.
    unencodable: Vec<(i64, String)>,
}

/// How long an interrupted run waits for the records in flight before it purges them.
const INTERRUPTED_DRAIN: Duration = Duration::from_secs(10);

/// One run of re-sending: the producer, its reports, and the pacing.
struct Run {
    producer: RowProducer,
    events: mpsc::Receiver<ProducerEvent>,
    encoder: crate::encode::Encoder,
    to_topic: Option<Arc<str>>,
    republished_at: String,
    known_topics: HashSet<Arc<str>>,
    rate: Option<u32>,
    started: tokio::time::Instant,
    sent: u64,
    page_bytes: usize,
    /// The first Ctrl-C: send nothing more, wait for what is in flight.
    interrupt: CancellationToken,
    /// The second: purge what is in flight now.
    force: CancellationToken,
}

/// Delivery reports awaited for one page.
#[derive(Default)]
struct InFlight {
    ids: HashSet<i64>,
    failed: Vec<i64>,
}

impl Run {
    fn start(settings: &Settings, args: &Republish) -> anyhow::Result<Self> {
        let (events_tx, events) = mpsc::channel(PROOF_PAGE_ROWS as usize * 2);
        let metrics = Metrics::new(&[]).map_err(anyhow::Error::msg)?;
        let producer = RowProducer::build(
            &settings.producer_properties(),
            1,
            events_tx,
            metrics,
            false,
            None,
        )
        .context("Failed to create the Kafka producer")?;
        let (interrupt, force) = (CancellationToken::new(), CancellationToken::new());
        // Registered before the first record is sent, so no Ctrl-C falls between two waits.
        let mut ctrl_c = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("Failed to listen for Ctrl-C")?;
        let (first, second) = (interrupt.clone(), force.clone());
        tokio::spawn(async move {
            while ctrl_c.recv().await.is_some() {
                if first.is_cancelled() {
                    second.cancel();
                    return;
                }
                first.cancel();
            }
        });
        Ok(Self {
            producer,
            events,
            encoder: crate::proof::encoder(settings)?,
            to_topic: args.to_topic.as_deref().map(Arc::from),
            republished_at: Utc::now().to_rfc3339(),
            known_topics: HashSet::new(),
            rate: args.rate,
            started: tokio::time::Instant::now(),
            sent: 0,
            page_bytes: settings.relay.batch_max_bytes,
            interrupt,
            force,
        })
    }

    async fn send_pages(
        &mut self,
        store: &Store,
        range: &Range,
        aggregate: Option<&str>,
        progress: &indicatif::ProgressBar,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let mut after = range.after;
        loop {
            let page = match store
                .republish_page(
                    after,
                    range.last,
                    range.sent,
                    aggregate,
                    PROOF_PAGE_ROWS,
                    self.page_bytes,
                )
                .await
            {
                Ok(page) => page,
                Err(err) => {
                    outcome.stopped = Some(format!("Failed to read the rows to re-send: {err}"));
                    outcome.first_unacknowledged = Some(after.saturating_add(1));
                    return outcome;
                }
            };
            let Some(last) = page.last() else {
                return outcome;
            };
            let last_id = last.row.id;
            let page_outcome = self.send_page(&page, progress).await;
            outcome.acknowledged += page_outcome.acknowledged;
            outcome.unencodable.extend(page_outcome.unencodable);
            if page_outcome.stopped.is_some() {
                outcome.stopped = page_outcome.stopped;
                outcome.first_unacknowledged = page_outcome.first_unacknowledged;
                return outcome;
            }
            after = last_id;
        }
    }

    /// Sends one page in id order and waits for every report of what it sent.
    async fn send_page(&mut self, page: &[SentRow], progress: &indicatif::ProgressBar) -> Outcome {
        let interrupt = self.interrupt.clone();
        let mut outcome = Outcome::default();
        let mut in_flight = InFlight::default();
        let mut unsent_from = None;
        for sent in page {
            if let Some(why) = self.check_topic(sent) {
                outcome.stopped = Some(why);
                unsent_from = Some(sent.row.id);
                break;
            }
            if let Some(rate) = self.rate {
                let due =
                    self.started + Duration::from_secs_f64(self.sent as f64 / f64::from(rate));
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = interrupt.cancelled() => {}
                }
            }
            if interrupt.is_cancelled() {
                outcome.stopped = Some("interrupted".to_string());
                unsent_from = Some(sent.row.id);
                break;
            }
            match self.send_one(sent, &mut in_flight, progress).await {
                Ok(true) => {
                    in_flight.ids.insert(sent.row.id);
                    self.sent += 1;
                }
                Ok(false) => {
                    outcome
                        .unencodable
                        .push((sent.row.id, self.unencodable_reason(sent)));
                }
                Err(why) => {
                    outcome.stopped = Some(why);
                    unsent_from = Some(sent.row.id);
                    break;
                }
            }
        }
        self.producer.send_queued_now();
        self.drain(&mut in_flight, &mut outcome, progress).await;
        let sent_rows = page
            .iter()
            .take_while(|s| Some(s.row.id) != unsent_from)
            .count()
            - outcome.unencodable.len();
        outcome.acknowledged = (sent_rows - in_flight.failed.len()) as u64;
        if outcome.stopped.is_none() && !in_flight.failed.is_empty() {
            outcome.stopped = Some("the broker refused a row".into());
        }
        let first_failed = in_flight.failed.iter().min().copied();
        outcome.first_unacknowledged = match (first_failed, unsent_from) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        outcome
    }

    /// Waits for every report of `in_flight`. Interrupted, it waits [`INTERRUPTED_DRAIN`]
    /// (or until a second Ctrl-C) and then purges what librdkafka still retries, which is
    /// then reported failed.
    async fn drain(
        &mut self,
        in_flight: &mut InFlight,
        outcome: &mut Outcome,
        progress: &indicatif::ProgressBar,
    ) {
        let (interrupt, force) = (self.interrupt.clone(), self.force.clone());
        let mut purged = false;
        let mut deadline = None;
        while !in_flight.ids.is_empty() {
            if interrupt.is_cancelled() && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + INTERRUPTED_DRAIN);
                outcome
                    .stopped
                    .get_or_insert_with(|| "interrupted".to_string());
                progress.suspend(|| {
                    eprintln!(
                        "interrupted: waiting up to {INTERRUPTED_DRAIN:?} for {} record(s) in flight (Ctrl-C again to stop now)",
                        in_flight.ids.len()
                    )
                });
            }
            let purge_at = deadline.filter(|_| !purged);
            tokio::select! {
                _ = self.receive(in_flight, progress) => {}
                _ = interrupt.cancelled(), if deadline.is_none() => {}
                _ = force.cancelled(), if !purged => {
                    self.producer.purge_all();
                    purged = true;
                }
                _ = async { tokio::time::sleep_until(purge_at.unwrap_or_else(tokio::time::Instant::now)).await }, if purge_at.is_some() => {
                    self.producer.purge_all();
                    purged = true;
                }
            }
        }
    }

    /// Whether the row's topic exists; the reason to stop when it does not.
    fn check_topic(&mut self, sent: &SentRow) -> Option<String> {
        let topic: Arc<str> = match &self.to_topic {
            Some(topic) => topic.clone(),
            None => match self.encoder.topic(&sent.row) {
                Ok(topic) => topic,
                Err(_) => return None,
            },
        };
        if self.known_topics.contains(&topic) {
            return None;
        }
        match self.producer.cluster_topics(METADATA_TIMEOUT) {
            Ok(topics) => match topics.about(&topic) {
                TopicAnswer::Known => {
                    self.known_topics.insert(topic);
                    None
                }
                TopicAnswer::Unknown => Some(format!(
                    "topic {topic} does not exist (the relay never creates topics): create it, or name another with --to-topic"
                )),
                TopicAnswer::Refused(why) | TopicAnswer::Unanswered(why) => {
                    Some(format!("the cluster did not describe topic {topic}: {why}"))
                }
            },
            Err(why) => Some(format!(
                "the cluster did not answer for topic {topic}: {why}"
            )),
        }
    }

    fn unencodable_reason(&mut self, sent: &SentRow) -> String {
        match self.encoder.encode(&sent.row) {
            Ok(_) => "encodes now".into(),
            Err(reason) => reason.to_string(),
        }
    }

    /// Hands one row to the producer, waiting for room in its queue: `Ok(false)` when the
    /// row no longer encodes (it is left out), `Err` when it was refused.
    async fn send_one(
        &mut self,
        sent: &SentRow,
        in_flight: &mut InFlight,
        progress: &indicatif::ProgressBar,
    ) -> Result<bool, String> {
        let Ok(record) = self.encoder.encode(&sent.row) else {
            return Ok(false);
        };
        let mut record = record.with_header(HEADER_REPUBLISHED_AT, self.republished_at.clone());
        if let Some(topic) = &self.to_topic {
            record.topic = topic.clone();
        }
        let interrupt = self.interrupt.clone();
        loop {
            match self.producer.send(sent.row.id, &record) {
                Ok(()) => return Ok(true),
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                    if !in_flight.ids.is_empty() =>
                {
                    self.producer.send_queued_now();
                    tokio::select! {
                        _ = self.receive(in_flight, progress) => {}
                        _ = interrupt.cancelled() => {
                            return Err("interrupted".to_string());
                        }
                    }
                }
                Err(error) => return Err(format!("row {} was not sent: {error}", sent.row.id)),
            }
        }
    }

    /// Waits for one delivery report.
    async fn receive(&mut self, in_flight: &mut InFlight, progress: &indicatif::ProgressBar) {
        match self.events.recv().await {
            Some(ProducerEvent::Delivered { row_id, result, .. }) => {
                if in_flight.ids.remove(&row_id) {
                    match result {
                        Ok(_) => progress.inc(1),
                        Err(error) => {
                            progress.suspend(|| {
                                eprintln!("row {row_id} was refused: {error}");
                            });
                            in_flight.failed.push(row_id);
                        }
                    }
                }
            }
            Some(ProducerEvent::Fatal { reason, .. }) => {
                // Idempotence broke: what is in flight is reported failed by the purge.
                progress.suspend(|| eprintln!("the producer failed: {reason}"));
                self.producer.purge_all();
            }
            Some(ProducerEvent::Global { reason, .. }) => {
                progress.suspend(|| eprintln!("Kafka: {reason}"));
            }
            None => {
                in_flight.failed.extend(in_flight.ids.drain());
            }
        }
    }
}
