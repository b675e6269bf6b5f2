//! `outbox-relay parked list|replay|discard`: rows that can never be published as they
//! stand, listed with their reasons, put back in the queue in their order, or given up on
//! (kept for audit). Ids that are not parked are refused, nothing changed; giving up on many
//! rows at once asks for `--yes`, and `--dry-run` says what would change.

use super::*;
use crate::store::ParkedFilter;

pub(super) async fn parked(settings: Settings, command: ParkedCommand) -> anyhow::Result<()> {
    let store = open_outbox(&settings).await?;
    let result = run(&store, command).await;
    store.pool().close().await;
    result
}

async fn run(store: &Store, command: ParkedCommand) -> anyhow::Result<()> {
    match command {
        ParkedCommand::List {
            aggregate,
            filter,
            limit,
            json,
        } => {
            let now = store.database_now().await?;
            let filter = filter.resolve(aggregate.as_deref(), now);
            list_parked(store, &filter, limit, json).await
        }
        ParkedCommand::Replay {
            rows,
            filter,
            dry_run,
        } => {
            let ids = select_parked(store, &rows, &filter).await?;
            if dry_run {
                println!(
                    "--dry-run: would put {} parked row(s) back in the queue{}",
                    ids.len(),
                    listed(&ids)
                );
                return Ok(());
            }
            let done = in_chunks(&ids, "replaying", |chunk| {
                let store = store.clone();
                async move { store.replay_parked(&chunk).await }
            })
            .await?;
            println!("{done} parked row(s) put back in the queue");
            Ok(())
        }
        ParkedCommand::Discard {
            rows,
            filter,
            reason,
            dry_run,
            yes,
        } => {
            let bulk = rows.all || rows.aggregate.is_some();
            if bulk && !yes && !dry_run {
                return Err(BadArguments(
                    "discarding every parked row --all or --aggregate selects gives up on publishing them: pass --yes to do it, or --dry-run to see which rows first".into(),
                )
                .into());
            }
            let ids = select_parked(store, &rows, &filter).await?;
            if dry_run {
                println!(
                    "--dry-run: would discard {} parked row(s){}",
                    ids.len(),
                    listed(&ids)
                );
                return Ok(());
            }
            let done = in_chunks(&ids, "discarding", |chunk| {
                let store = store.clone();
                let reason = reason.clone();
                async move { store.discard_parked(&chunk, &reason).await }
            })
            .await?;
            println!("{done} parked row(s) discarded (kept in the table for audit)");
            Ok(())
        }
    }
}

/// `: 1, 2, 3` for a few ids, `: 1, 2, … 9` for many.
fn listed(ids: &[i64]) -> String {
    const SHOWN: usize = 20;
    if ids.is_empty() {
        return String::new();
    }
    let mut text: Vec<String> = ids.iter().take(SHOWN).map(i64::to_string).collect();
    if ids.len() > SHOWN {
        text.push(format!("… ({} more)", ids.len() - SHOWN));
    }
    format!(": {}", text.join(", "))
}

impl ParkedFilterArgs {
    fn resolve<'a>(
        &'a self,
        aggregate_id: Option<&'a str>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> ParkedFilter<'a> {
        ParkedFilter {
            aggregate_id,
            reason: self.park_reason.as_deref(),
            since: self.parked_since.map(|m| m.resolve(now)),
            until: self.parked_until.map(|m| m.resolve(now)),
        }
    }

    fn is_empty(&self) -> bool {
        self.park_reason.is_none() && self.parked_since.is_none() && self.parked_until.is_none()
    }
}

async fn list_parked(
    store: &Store,
    filter: &ParkedFilter<'_>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let rows = store
        .list_parked(filter, limit)
        .await
        .context("Failed to read parked rows")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        match filter.reason {
            // A reason the relay never gives is likelier a typo than an empty set.
            Some(reason) if !crate::model::PARK_REASONS.contains(&reason) => println!(
                "no parked rows with park reason {reason:?}: the relay parks rows for {}",
                crate::model::PARK_REASONS.join(", ")
            ),
            _ => println!("no parked rows"),
        }
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

/// The parked rows `selection` names. Ids that are not parked (never, or no longer) are
/// refused, naming them, before anything changes.
async fn select_parked(
    store: &Store,
    selection: &ParkedSelection,
    filter: &ParkedFilterArgs,
) -> anyhow::Result<Vec<i64>> {
    if !selection.ids.is_empty() {
        if !filter.is_empty() {
            return Err(BadArguments(
                "--park-reason, --parked-since and --parked-until narrow --aggregate or --all; with row ids, name only the rows you mean".into(),
            )
            .into());
        }
        let mut ids = selection.ids.clone();
        ids.sort_unstable();
        ids.dedup();
        let parked = store
            .parked_among(&ids)
            .await
            .context("Failed to read parked rows")?;
        let not_parked: Vec<i64> = ids
            .iter()
            .filter(|id| !parked.contains(id))
            .copied()
            .collect();
        if !not_parked.is_empty() {
            return Err(BadArguments(format!(
                "not parked (never parked, already replayed or discarded, or no such row): {}; nothing was changed. `outbox-relay parked list` shows the parked rows, `outbox-relay where ID` what became of one",
                not_parked
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into());
        }
        return Ok(ids);
    }
    let aggregate = if selection.all {
        None
    } else {
        selection.aggregate.as_deref()
    };
    let now = store.database_now().await?;
    store
        .parked_ids(&filter.resolve(aggregate, now))
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
