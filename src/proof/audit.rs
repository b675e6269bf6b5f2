//! The daemon's auditor: every `relay.audit_interval` it reads back the records of a sample
//! of the rows of its own shards sent since its last look and counts what it found; it never
//! changes a row or a record, fetches no payload, and its failures only delay it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Outcome;
use crate::config::Settings;
use crate::lease::Ownership;
use crate::store::{PROOF_PAGE_ROWS, Store};
use crate::telemetry::{AUDIT_CHECKED, AUDIT_MISMATCHES, AUDIT_RUNNING, AUDIT_UNCHECKED};

/// Rows audited per look at most: a sample, not a backlog. A look that samples more says so.
const AUDIT_ROWS_PER_LOOK: usize = 5000;
/// Rows marked this recently are left for the next look, so that a mark that commits
/// late with an earlier `sent_at` is not passed by.
const MARK_SETTLING: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// Runs until `cancel`. `settings.relay.audit_sample_rate` must be above 0.
pub(crate) async fn audit_sent_rows(
    store: Store,
    settings: Settings,
    ownership: Arc<Ownership>,
    cancel: CancellationToken,
) {
    let rate = settings.relay.audit_sample_rate;
    let mut encoder = match super::encoder(&settings) {
        Ok(encoder) => encoder,
        Err(err) => {
            warn!(error = %err, "the auditor cannot work out topics; it is off (outbox_relay_audit_running 0)");
            return;
        }
    };
    let reader = match super::reader(&settings) {
        Ok(reader) => Arc::new(reader),
        Err(err) => {
            warn!(error = %err, "the auditor cannot build its consumer; it is off (outbox_relay_audit_running 0)");
            return;
        }
    };
    let stop = reader.stop_flag();
    // A look in progress ends within a fraction of a second of the relay's stop.
    let _stop_on_cancel = {
        let cancel = cancel.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    gauge!(AUDIT_RUNNING).set(1.0);
    let mut since: Option<DateTime<Utc>> = None;
    let mut tick = tokio::time::interval(settings.relay.audit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let until = match store.database_now().await {
            Ok(now) => now - MARK_SETTLING,
            Err(err) => {
                debug!(error = %err, "the auditor could not read the database's clock");
                continue;
            }
        };
        // The first look only sets where the next one starts: rows sent from now on.
        let Some(from) = since else {
            since = Some(until);
            continue;
        };
        // Each replica audits the rows of the shards it holds: one read per row, not one
        // per replica.
        let snapshot = ownership.snapshot();
        if snapshot.is_empty() {
            since = Some(until);
            continue;
        }
        let shards = snapshot.shard_filter();
        let rows = match sample(&store, (from, until), rate, shards.as_deref()).await {
            Ok(rows) => rows,
            Err(err) => {
                debug!(error = %err, "the auditor could not read sent rows; it tries again next time");
                continue;
            }
        };
        since = Some(until);
        if rows.is_empty() {
            continue;
        }
        let reader = reader.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let outcomes = super::check(&reader, &mut encoder, &rows);
            (encoder, outcomes)
        })
        .await;
        let outcomes = match checked {
            Ok((back, outcomes)) => {
                encoder = back;
                outcomes
            }
            Err(err) => {
                warn!(error = %err, "the auditor's check failed; it is off (outbox_relay_audit_running 0)");
                break;
            }
        };
        if stop.load(Ordering::Relaxed) {
            break;
        }
        for outcome in &outcomes {
            count(outcome);
        }
    }
    gauge!(AUDIT_RUNNING).set(0.0);
}

/// The rows sent in `[window.0, window.1)` kept with probability `rate`, a page at a time
/// over the whole window, at most [`AUDIT_ROWS_PER_LOOK`].
async fn sample(
    store: &Store,
    window: (DateTime<Utc>, DateTime<Utc>),
    rate: f64,
    shards: Option<&[i16]>,
) -> Result<Vec<crate::store::SentRow>, crate::store::StoreError> {
    let mut rows = Vec::new();
    let mut after = (window.0, i64::MIN);
    loop {
        let page = store
            .sent_page(after, window.1, rate, shards, PROOF_PAGE_ROWS)
            .await?;
        let full = page.len() as i64 == PROOF_PAGE_ROWS;
        if let Some(last) = page.last() {
            after = (last.sent_at, last.row.id);
        }
        rows.extend(page);
        if !full {
            return Ok(rows);
        }
        if rows.len() >= AUDIT_ROWS_PER_LOOK {
            warn!(
                rows = rows.len(),
                "the auditor's sample of one look is larger than it checks at once; it checks the first {AUDIT_ROWS_PER_LOOK}: lower relay.audit_sample_rate or relay.audit_interval"
            );
            rows.truncate(AUDIT_ROWS_PER_LOOK);
            return Ok(rows);
        }
    }
}

fn count(outcome: &Outcome) {
    match outcome.result {
        "found" | "changed" => counter!(AUDIT_CHECKED).increment(1),
        kind @ ("missing" | "different") => {
            counter!(AUDIT_CHECKED).increment(1);
            counter!(AUDIT_MISMATCHES, "kind" => kind).increment(1);
            warn!(
                row_id = outcome.row_id,
                event_id = %outcome.event_id,
                topic = outcome.topic.as_deref().unwrap_or("-"),
                partition = outcome.partition,
                offset = outcome.offset,
                kind,
                detail = %outcome.detail,
                "audit: a sent row's record is not where its ack said; see `outbox-relay where {}` and the runbook",
                outcome.event_id
            );
        }
        reason => {
            let reason = match reason {
                "expired" => "expired",
                "unreadable" => "unreadable",
                _ => "unverifiable",
            };
            counter!(AUDIT_UNCHECKED, "reason" => reason).increment(1);
            debug!(
                row_id = outcome.row_id,
                result = outcome.result,
                detail = %outcome.detail,
                "audit: row not checked"
            );
        }
    }
}
