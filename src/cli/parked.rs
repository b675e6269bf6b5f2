//! `outbox-relay parked list|replay|discard`: rows that can never be published as they
//! stand, listed with their reasons, put back in the queue in their order, or given up on
//! (kept for audit).

use super::*;

pub(super) async fn parked(settings: Settings, command: ParkedCommand) -> anyhow::Result<()> {
    let store = open_outbox(&settings).await?;
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
