//! `outbox-relay prune`: sent rows older than a duration deleted on demand, as
//! `relay.retain_sent` does by itself in mark mode; `--dry-run` counts and deletes nothing.

use super::*;
use crate::retention::PRUNE_BATCH;

pub(super) async fn prune(
    settings: Settings,
    older_than: Duration,
    dry_run: bool,
    yes: bool,
) -> anyhow::Result<()> {
    if !dry_run && !yes {
        return Err(BadArguments(format!(
            "prune deletes every sent row older than {}: pass --yes to do it, or --dry-run to count them first",
            humantime::format_duration(older_than)
        ))
        .into());
    }
    let store = Store::open(&settings)
        .context("Failed to configure the database connection from database.url")?;
    store
        .verify_schema()
        .await
        .context("Failed to read the outbox")?;
    let age = humantime::format_duration(older_than);
    if dry_run {
        let rows = store
            .count_prunable(older_than)
            .await
            .context("Failed to count the sent rows")?;
        println!("{rows} sent rows are older than {age}; --dry-run: nothing deleted");
        return Ok(());
    }
    let sweep = store
        .prune_all_sent(older_than, PRUNE_BATCH, || false)
        .await;
    let deleted = sweep.deleted;
    if let Some(err) = sweep.error {
        return Err(err).context(format!(
            "Failed to delete sent rows ({deleted} deleted before the failure)"
        ));
    }
    if sweep.busy {
        anyhow::bail!(
            "another relay or prune is deleting sent rows right now ({deleted} deleted here); run it again later"
        );
    }
    println!("deleted {deleted} sent rows older than {age}");
    store.pool().close().await;
    Ok(())
}
