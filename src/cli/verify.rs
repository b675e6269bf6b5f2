//! `outbox-relay verify`: the records of sent rows (a sample, or every row of a time range)
//! read back from Kafka and counted as found, missing, different, expired or unverifiable.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::*;
use crate::proof::{self, Outcome, Tally};
use crate::store::{PROOF_PAGE_ROWS, SentRow};

/// Problem rows named in the text report; JSON lists up to [`PROBLEMS_KEPT`].
const PROBLEMS_SHOWN: usize = 20;
const PROBLEMS_KEPT: usize = 1000;

#[derive(Debug, serde::Serialize)]
struct Report {
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    /// `all`, or `sample` of at most `sample_size` rows.
    selection: &'static str,
    #[serde(flatten)]
    tally: Tally,
    problems: Vec<Outcome>,
}

pub(super) async fn verify(
    settings: Settings,
    since: Moment,
    until: Option<Moment>,
    sample: Option<u32>,
    json: bool,
) -> anyhow::Result<()> {
    let store = open_outbox(&settings).await?;
    let now = store
        .database_now()
        .await
        .context("Failed to read the database's clock")?;
    let (since, until) = (since.resolve(now), until.map_or(now, |u| u.resolve(now)));
    if since >= until {
        return Err(BadArguments(format!(
            "--since ({}) must be before --until ({})",
            since.to_rfc3339(),
            until.to_rfc3339()
        ))
        .into());
    }
    let mut encoder = proof::encoder(&settings)?;
    let reader = Arc::new(
        proof::reader(&settings)
            .context("Failed to create the Kafka consumer that reads records back")?,
    );
    let mut report = Report {
        since,
        until,
        selection: if sample.is_some() { "sample" } else { "all" },
        tally: Tally::default(),
        problems: Vec::new(),
    };
    let mut pages = Pages::new(&store, since, until, sample).await?;
    let progress = progress_bar(pages.total);
    while let Some(rows) = pages.next(&store).await? {
        let checked = {
            let reader = reader.clone();
            tokio::task::spawn_blocking(move || {
                let outcomes = proof::check(&reader, &mut encoder, &rows);
                (encoder, outcomes)
            })
            .await
            .context("The check of a page of rows failed")?
        };
        encoder = checked.0;
        for outcome in checked.1 {
            report.tally.add(&outcome);
            if outcome.result != "found" && report.problems.len() < PROBLEMS_KEPT {
                report.problems.push(outcome);
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    store.pool().close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    let t = &report.tally;
    if t.failed() {
        anyhow::bail!(
            "{} of {} rows are not where the outbox says or could not be checked ({} missing, {} different, {} unverifiable)",
            t.missing + t.different + t.unverifiable,
            t.checked,
            t.missing,
            t.different,
            t.unverifiable
        );
    }
    Ok(())
}

fn print_report(report: &Report) {
    let t = &report.tally;
    println!(
        "checked {} sent rows ({}, sent from {} to {}): {} found where recorded, {} missing, {} different, {} expired (removed by the topic's retention), {} unverifiable, {} changed since sent",
        t.checked,
        if report.selection == "all" {
            "all"
        } else {
            "a random sample"
        },
        report.since.to_rfc3339(),
        report.until.to_rfc3339(),
        t.found,
        t.missing,
        t.different,
        t.expired,
        t.unverifiable,
        t.changed
    );
    for p in report.problems.iter().take(PROBLEMS_SHOWN) {
        println!(
            "  {:<12} row {} event {} at {}/{}@{}: {}",
            p.result,
            p.row_id,
            p.event_id,
            p.topic
                .as_deref()
                .map(|t| crate::model::printable(t, 128))
                .unwrap_or_else(|| "-".into()),
            p.partition.map_or("-".into(), |v| v.to_string()),
            p.offset.map_or("-".into(), |v| v.to_string()),
            p.detail
        );
    }
    let more = report.problems.len().saturating_sub(PROBLEMS_SHOWN) as u64;
    let unlisted = t.checked - t.found - report.problems.len() as u64;
    if more + unlisted > 0 {
        println!(
            "  … and {} more (--json lists up to {PROBLEMS_KEPT})",
            more + unlisted
        );
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("verifying {bar:40} {pos}/{len} rows ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The rows to check, a page at a time: a random sample's ids fetched in pages, or every
/// row of the range in (sent_at, id) order.
struct Pages {
    sample: Option<std::vec::IntoIter<i64>>,
    after: (DateTime<Utc>, i64),
    until: DateTime<Utc>,
    done: bool,
    total: u64,
}

impl Pages {
    async fn new(
        store: &Store,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        sample: Option<u32>,
    ) -> anyhow::Result<Self> {
        let (sample, total) = match sample {
            Some(n) => {
                let ids = store
                    .sample_sent_ids(since, until, i64::from(n))
                    .await
                    .context("Failed to draw the sample of sent rows")?;
                let total = ids.len() as u64;
                (Some(ids.into_iter()), total)
            }
            None => {
                let total = store
                    .count_sent_between(since, until)
                    .await
                    .context("Failed to count the sent rows")?;
                (None, u64::try_from(total).unwrap_or_default())
            }
        };
        Ok(Self {
            sample,
            after: (since, i64::MIN),
            until,
            done: false,
            total,
        })
    }

    async fn next(&mut self, store: &Store) -> anyhow::Result<Option<Vec<SentRow>>> {
        if self.done {
            return Ok(None);
        }
        let rows = match &mut self.sample {
            Some(ids) => {
                let page: Vec<i64> = ids.by_ref().take(PROOF_PAGE_ROWS as usize).collect();
                if page.is_empty() {
                    return Ok(None);
                }
                store.sent_by_ids(&page).await
            }
            None => {
                store
                    .sent_page(self.after, self.until, 1.0, None, PROOF_PAGE_ROWS)
                    .await
            }
        }
        .context("Failed to read sent rows")?;
        if self.sample.is_none() {
            match rows.last() {
                Some(last) if rows.len() as i64 == PROOF_PAGE_ROWS => {
                    self.after = (last.sent_at, last.row.id);
                }
                _ => self.done = true,
            }
        }
        if rows.is_empty() && self.sample.is_none() {
            return Ok(None);
        }
        Ok(Some(rows))
    }
}
