//! `outbox-relay where EVENT [--verify]`: one row's state as the outbox knows it and, for a
//! sent row, its record read back from Kafka at the partition and offset of its ack.

use super::*;
use crate::model::printable;
use crate::proof;
use crate::store::{LocatedRow, RowKey};

#[derive(Debug, serde::Serialize)]
struct Report {
    row_id: i64,
    event_id: uuid::Uuid,
    state: &'static str,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    created_at: chrono::DateTime<chrono::Utc>,
    shard: i16,
    owner: Option<String>,
    sent_at: Option<chrono::DateTime<chrono::Utc>>,
    topic: Option<String>,
    partition: Option<i32>,
    offset: Option<i64>,
    parked_at: Option<chrono::DateTime<chrono::Utc>>,
    park_reason: Option<String>,
    park_error: Option<String>,
    discarded_at: Option<chrono::DateTime<chrono::Utc>>,
    discard_reason: Option<String>,
    verified: Option<Verified>,
}

#[derive(Debug, serde::Serialize)]
struct Verified {
    result: &'static str,
    detail: String,
}

fn state(row: &LocatedRow) -> &'static str {
    if row.sent_at.is_some() {
        "sent"
    } else if row.discarded_at.is_some() {
        "discarded"
    } else if row.parked_at.is_some() {
        "parked"
    } else {
        "pending"
    }
}

pub(super) async fn locate(
    settings: Settings,
    key: RowKey,
    verify: bool,
    json: bool,
) -> anyhow::Result<()> {
    let store = open_outbox(&settings).await?;
    let located = store
        .locate(key)
        .await
        .context("Failed to read the outbox")?;
    store.pool().close().await;
    if located.is_empty() {
        let what = match key {
            RowKey::EventId(id) => format!("event id {id}"),
            RowKey::RowId(id) => format!("row id {id}"),
        };
        let gone = match settings.relay.mode {
            crate::model::Mode::Delete => {
                "relay.mode = \"delete\" deletes each row once the broker acknowledged it"
            }
            crate::model::Mode::Mark => {
                "sent rows are deleted after relay.retain_sent, or by `outbox-relay prune`"
            }
        };
        anyhow::bail!(
            "no row in {} has {what}: it was never written, or it was deleted ({gone})",
            store.table_display()
        );
    }
    let mut encoder = proof::encoder(&settings)?;
    let reader = if verify {
        Some(
            proof::reader(&settings)
                .context("Failed to create the Kafka consumer that reads records back")?,
        )
    } else {
        None
    };
    let mut reports = Vec::with_capacity(located.len());
    for row in located {
        let state = state(&row);
        let topic = encoder.topic(&row.row).ok().map(|t| t.to_string());
        let verified = match (&reader, state) {
            (Some(reader), "sent") => {
                let sent = crate::store::SentRow {
                    row: row.row.clone(),
                    sent_at: row.sent_at.unwrap_or_default(),
                    partition: row.partition,
                    offset: row.offset,
                    value: row.value,
                };
                let outcome = tokio::task::block_in_place(|| {
                    proof::check(reader, &mut encoder, std::slice::from_ref(&sent))
                })
                .pop();
                outcome.map(|o| Verified {
                    result: o.result,
                    detail: o.detail,
                })
            }
            (Some(_), _) => Some(Verified {
                result: "unsent",
                detail: format!("the row is {state}: there is no record to read back yet"),
            }),
            (None, _) => None,
        };
        reports.push(Report {
            row_id: row.row.id,
            event_id: row.row.event_id,
            state,
            aggregate_type: row.row.aggregate_type,
            aggregate_id: row.row.aggregate_id,
            event_type: row.row.event_type,
            created_at: row.row.created_at,
            shard: row.row.shard,
            owner: row.owner,
            sent_at: row.sent_at,
            topic,
            partition: row.partition,
            offset: row.offset,
            parked_at: row.parked_at,
            park_reason: row.park_reason,
            park_error: row.park_error,
            discarded_at: row.discarded_at,
            discard_reason: row.discard_reason,
            verified,
        });
    }
    if json {
        if let [only] = reports.as_slice() {
            println!("{}", serde_json::to_string_pretty(only)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
    } else {
        for report in &reports {
            print_report(report);
        }
    }
    let unproven: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            let v = r.verified.as_ref()?;
            // Expired (retention) and changed (the row was rewritten) are not losses.
            (!matches!(v.result, "found" | "unsent" | "expired" | "changed"))
                .then(|| format!("row {}: {} ({})", r.row_id, v.result, v.detail))
        })
        .collect();
    if !unproven.is_empty() {
        anyhow::bail!(
            "the record is not where the outbox says: {}",
            unproven.join("; ")
        );
    }
    Ok(())
}

fn print_report(r: &Report) {
    let shown = |text: &str| printable(text, 128);
    println!("event {} (row {}): {}", r.event_id, r.row_id, r.state);
    println!(
        "  aggregate {} {}, event type {}, created at {}",
        shown(&r.aggregate_type),
        shown(&r.aggregate_id),
        shown(&r.event_type),
        r.created_at.to_rfc3339()
    );
    match r.state {
        "sent" => {
            println!(
                "  sent at {}",
                r.sent_at.map(|t| t.to_rfc3339()).unwrap_or_default()
            );
            let number = |n: Option<String>| n.unwrap_or_else(|| "unrecorded".into());
            println!(
                "  topic {} partition {} offset {}",
                r.topic.as_deref().map(shown).unwrap_or_else(|| "-".into()),
                number(r.partition.map(|p| p.to_string())),
                number(r.offset.map(|o| o.to_string())),
            );
        }
        "pending" => println!(
            "  pending in shard {}, owned by {}",
            r.shard,
            r.owner
                .as_deref()
                .map(|o| format!("replica {}", shown(o)))
                .unwrap_or_else(|| "no replica".into())
        ),
        "parked" => println!(
            "  parked at {}: {}: {}",
            r.parked_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            shown(r.park_reason.as_deref().unwrap_or("-")),
            printable(
                r.park_error.as_deref().unwrap_or("-"),
                crate::model::MAX_REASON_BYTES
            ),
        ),
        _ => println!(
            "  discarded at {}: {}",
            r.discarded_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            shown(r.discard_reason.as_deref().unwrap_or("-")),
        ),
    }
    if let Some(v) = &r.verified {
        match v.result {
            "found" => println!(
                "  verified: the record at {}/{}@{} carries this event (id, key and value match)",
                r.topic.as_deref().map(shown).unwrap_or_default(),
                r.partition.unwrap_or_default(),
                r.offset.unwrap_or_default()
            ),
            "unsent" => println!("  not verified: {}", v.detail),
            "expired" | "changed" => println!("  not verified: {}: {}", v.result, v.detail),
            result => println!("  NOT verified: {result}: {}", v.detail),
        }
    }
}
