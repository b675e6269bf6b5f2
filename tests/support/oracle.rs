//! The contract oracle: what was read back from Kafka against the database. Every row is
//! present (by event id), first occurrences keep outbox order per aggregate, each aggregate
//! stays on one partition, a row marked sent names the offset its record is at; duplicates
//! are counted for the caller to bound.

use std::collections::HashMap;

use super::kafka::{Consumed, consume};
use super::postgres::{DbRow, TestDb};

/// Checks the contract on what was read back against the database: every row present
/// (by event id), first occurrences in outbox order per aggregate, each aggregate on one
/// partition, and each row marked sent found at the partition and offset its mark names.
/// Returns the number of duplicates.
pub fn assert_contract(rows: &[DbRow], records: &[Consumed]) -> usize {
    let by_event: HashMap<&str, &DbRow> = rows.iter().map(|r| (r.event_id.as_str(), r)).collect();
    let mut first_seen: HashMap<&str, i64> = HashMap::new();
    let mut last_first_id: HashMap<(String, String), i64> = HashMap::new();
    let mut partition_of: HashMap<(String, String), i32> = HashMap::new();
    let mut duplicates = 0;
    // Kafka orders within a partition, so walk each partition in offset order.
    let mut ordered: Vec<&Consumed> = records.iter().collect();
    ordered.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    for record in ordered {
        let event_id = record
            .headers
            .get("id")
            .expect("every record has an id header");
        let row = by_event
            .get(event_id.as_str())
            .unwrap_or_else(|| panic!("record with unknown event id {event_id}"));
        assert_eq!(
            record.key.as_deref(),
            Some(row.aggregate_id.as_str()),
            "key"
        );
        let aggregate = (record.topic.clone(), row.aggregate_id.clone());
        let p = *partition_of
            .entry(aggregate.clone())
            .or_insert(record.partition);
        assert_eq!(
            p, record.partition,
            "aggregate {aggregate:?} spans partitions"
        );
        if first_seen.contains_key(event_id.as_str()) {
            duplicates += 1;
            continue;
        }
        first_seen.insert(&row.event_id, row.id);
        let previous = last_first_id.insert(aggregate.clone(), row.id);
        if let Some(previous) = previous {
            assert!(
                previous < row.id,
                "aggregate {aggregate:?}: row {} arrived after row {previous} (reordered)",
                row.id
            );
        }
    }
    // Marked only after the ack: a row marked sent names where the broker stored it, and
    // the record there is that row (one of its copies when it went out more than once).
    let mut ids_at: HashMap<(i32, i64), Vec<&str>> = HashMap::new();
    for record in records {
        if let Some(id) = record.headers.get("id") {
            ids_at
                .entry((record.partition, record.offset))
                .or_default()
                .push(id.as_str());
        }
    }
    for row in rows {
        if let (true, Some(partition), Some(offset)) =
            (row.sent, row.kafka_partition, row.kafka_offset)
        {
            let found = ids_at.get(&(partition, offset));
            assert!(
                found.is_some_and(|ids| ids.contains(&row.event_id.as_str())),
                "row {} is marked as stored at partition {partition} offset {offset}, but the record there is {:?}",
                row.id,
                found
            );
        }
    }
    let missing: Vec<i64> = rows
        .iter()
        .filter(|r| !first_seen.contains_key(r.event_id.as_str()))
        .map(|r| r.id)
        .collect();
    assert!(
        missing.is_empty(),
        "{} rows never reached Kafka, first ids {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    duplicates
}

/// Reads `topic` back and checks the contract against the rows marked sent (parked rows
/// are left out): none missing, none extra, order kept. Returns how many were sent.
pub async fn assert_sent_rows_in_kafka(db: &TestDb, bootstrap: &str, topic: &str) -> usize {
    let sent: Vec<DbRow> = db.rows().await.into_iter().filter(|r| r.sent).collect();
    let records = consume(bootstrap, topic, sent.len());
    assert_eq!(
        assert_contract(&sent, &records),
        0,
        "no duplicates expected"
    );
    sent.len()
}
