//! Rows written by services the relay does not trust, and neighbours in the same database:
//! whatever a row holds, the relay keeps running, parks it with a reason an operator can
//! read, and keeps every other aggregate flowing. Checked by reading Kafka back.

mod support;

use support::*;

/// A row whose aggregate id is far larger than a btree entry may be, with a reason to be
/// parked: parking it must not fail (once, the parked-rows index took the id itself and
/// the park failed with SQLSTATE 54000, which stopped the relay before it marked the acked
/// rows of the batch, on every replica in turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_a_huge_aggregate_id_is_parked_and_the_rest_flows() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.huge");
    create_topic(&bootstrap, &topic, 3).await;
    let huge = incompressible_text(12_000);
    let mut rows = stream("huge", 10, 60);
    let mut hostile = NewRow::new("huge", &huge, 1);
    hostile.headers = Some("[1, 2]".into());
    rows.insert(20, hostile);
    rows.insert(40, NewRow::new("huge", &huge, 2));
    db.insert(&rows).await;

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for(
        "every other aggregate marked",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 60 },
    )
    .await;
    wait_for("the hostile row parked", CONDITION_TIMEOUT, || async {
        db.count("parked_at IS NOT NULL AND park_reason = 'bad_headers'")
            .await
            == 1
    })
    .await;
    assert!(!relay.handle.is_finished(), "the relay is still running");
    relay.stop().await;
    assert_eq!(
        db.count(&format!(
            "sent_at IS NULL AND parked_at IS NULL AND aggregate_id = '{huge}'"
        ))
        .await,
        1,
        "the huge aggregate's next row waits behind the parked one"
    );

    let sent: Vec<DbRow> = db.rows().await.into_iter().filter(|r| r.sent).collect();
    let records = consume(&bootstrap, &topic, sent.len());
    let duplicates = assert_contract(&sent, &records);
    assert_eq!(duplicates, 0);
    assert!(
        records
            .iter()
            .all(|r| r.key.as_deref() != Some(huge.as_str()))
    );
}

/// `len` letters and digits that neither pglz nor lz4 can shrink much (an index entry is
/// compressed before its size is checked, so a repeated letter would slip through).
fn incompressible_text(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ALPHABET[(state % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}
