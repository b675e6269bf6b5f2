//! The daemon's auditor: every `relay.audit_interval` it reads back the records of a sample
//! of the rows sent since its last look and counts what it found; it never changes a row or
//! a record, and its failures only delay it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::counter;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Outcome, RecordReader};
use crate::config::Settings;
use crate::store::Store;
use crate::telemetry::{AUDIT_CHECKED, AUDIT_MISMATCHES};

/// Rows audited per look at most: a sample, not a backlog.
const AUDIT_ROWS_PER_LOOK: i64 = 1000;
/// Rows marked this recently are left for the next look, so that a mark that commits
/// late with an earlier `sent_at` is not passed by.
const MARK_SETTLING: chrono::TimeDelta = chrono::TimeDelta::seconds(5);
/// How long one broker call of the auditor waits.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until `cancel`. `settings.relay.audit_sample_rate` must be above 0.
pub(crate) async fn audit_sent_rows(store: Store, settings: Settings, cancel: CancellationToken) {
    let rate = settings.relay.audit_sample_rate;
    let mut encoder = match super::encoder(&settings) {
        Ok(encoder) => encoder,
        Err(err) => {
            warn!(error = %err, "the auditor cannot encode rows; it is off");
            return;
        }
    };
    let reader = match RecordReader::new(&settings.producer_properties(), READ_TIMEOUT) {
        Ok(reader) => Arc::new(reader),
        Err(err) => {
            warn!(error = %err, "the auditor cannot build its consumer; it is off");
            return;
        }
    };
    let mut since: Option<DateTime<Utc>> = None;
    let mut tick = tokio::time::interval(settings.relay.audit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
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
        let Some(from) = since.replace(until) else {
            continue;
        };
        let rows = match store
            .sent_page((from, i64::MIN), until, rate, AUDIT_ROWS_PER_LOOK)
            .await
        {
            Ok(rows) => rows,
            Err(err) => {
                debug!(error = %err, "the auditor could not read sent rows; it tries again next time");
                since = Some(from);
                continue;
            }
        };
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
                warn!(error = %err, "the auditor's check failed; it is off");
                return;
            }
        };
        for outcome in &outcomes {
            count(outcome);
        }
    }
}

fn count(outcome: &Outcome) {
    match outcome.result {
        "found" => counter!(AUDIT_CHECKED).increment(1),
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
        _ => debug!(
            row_id = outcome.row_id,
            result = outcome.result,
            detail = %outcome.detail,
            "audit: row not checked"
        ),
    }
}
