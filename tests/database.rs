//! Database faults: a PostgreSQL restart mid-stream, the LISTEN connection killed, a
//! read-only primary after failover (SQLSTATE 25006), statement timeouts and a long open
//! transaction. Each reads Kafka back: nothing marked is lost, nothing unmarked skipped.

mod support;

use std::time::Duration;

use outbox_relay::model::ParkPolicy;
use outbox_relay::store::{ReadLimits, Store};

use support::*;

async fn terminate_relay_sessions(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'outbox-relay' AND datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_stream_loses_and_skips_nothing() {
    let cluster = PgCluster::init();
    let db = TestDb::new_on(&cluster).await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.restart");
    create_topic(&bootstrap, &topic, 3).await;
    db.insert(&stream("restart", 100, 20_000)).await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "batch_size = 500\n",
    ))
    .await;
    wait_for("some rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await >= 2000
    })
    .await;

    cluster.stop();
    wait_for(
        "readiness false while the database is down",
        CONDITION_TIMEOUT,
        || async {
            let (status, body) = http_get(relay.http_addr, "/readyz").await;
            status == 503 && body.contains("database")
        },
    )
    .await;
    cluster.start();
    // The test's own pool lost its connections too; it reconnects on demand.
    wait_for(
        "all rows marked after the restart",
        CONDITION_TIMEOUT,
        || async {
            matches!(
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL"
                )
                .fetch_one(&db.pool)
                .await,
                Ok(20_000)
            )
        },
    )
    .await;
    wait_for("ready again", CONDITION_TIMEOUT, || async {
        http_get(relay.http_addr, "/readyz").await.0 == 200
    })
    .await;
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert!(
        metric_value(&metrics, "outbox_relay_database_errors_total") > 0.0,
        "{metrics}"
    );
    relay.stop().await;

    let records = consume(&bootstrap, &topic, 20_000);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(
        duplicates <= 500,
        "{duplicates} duplicates for one restart with batches of 500"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listen_connection_reconnects() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.bell");
    create_topic(&bootstrap, &topic, 3).await;
    sqlx::query("SELECT outbox_enable_notify(true)")
        .execute(&db.pool)
        .await
        .unwrap();
    // Polling is an hour away: only the doorbell can deliver within the waits below.
    let relay = start_doorbell_only_relay(&db, &bootstrap, &prefix).await;
    wait_for(
        "the relay asleep on the doorbell",
        CONDITION_TIMEOUT,
        || async { sleeping_relays(&db, "outbox_relay").await.len() == 1 },
    )
    .await;
    db.insert(&[NewRow::new("bell", "a", 1)]).await;
    wait_for(
        "first row via the doorbell",
        Duration::from_secs(20),
        || async { db.sent().await == 1 },
    )
    .await;

    wait_for("the relay asleep again", CONDITION_TIMEOUT, || async {
        sleeping_relays(&db, "outbox_relay").await.len() == 1
    })
    .await;
    let pid = sleeping_relays(&db, "outbox_relay").await[0];
    let killed: i64 = sqlx::query_scalar("SELECT count(pg_terminate_backend($1))")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    wait_for(
        "the relay asleep on a new session",
        CONDITION_TIMEOUT,
        || async {
            let sleeping = sleeping_relays(&db, "outbox_relay").await;
            sleeping.len() == 1 && sleeping[0] != pid
        },
    )
    .await;
    db.insert(&[NewRow::new("bell", "a", 2)]).await;
    wait_for(
        "second row via the new doorbell",
        Duration::from_secs(20),
        || async { db.sent().await == 2 },
    )
    .await;
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 2);
    assert_eq!(assert_contract(&db.rows().await, &records), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_primary_is_waited_out() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.ro");
    create_topic(&bootstrap, &topic, 3).await;
    db.insert(&stream("ro", 20, 1000)).await;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // What a client sees after failing over onto a standby: writes fail with 25006.
    sqlx::query(&format!(
        "ALTER DATABASE {database} SET default_transaction_read_only = on"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for(
        "readiness false: marks refused",
        CONDITION_TIMEOUT,
        || async {
            let (status, body) = http_get(relay.http_addr, "/readyz").await;
            status == 503 && body.contains("database")
        },
    )
    .await;
    assert_eq!(db.sent().await, 0, "nothing marked on a read-only primary");
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert!(
        metric_value(
            &metrics,
            "outbox_relay_database_errors_total{kind=\"read_only\""
        ) > 0.0,
        "{metrics}"
    );

    // The test's own pool may have opened read-only sessions meanwhile: make this one
    // writable before turning the database back.
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET default_transaction_read_only = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {database} SET default_transaction_read_only = off"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    terminate_relay_sessions(&db).await;
    wait_for(
        "all rows marked once writable",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 1000 },
    )
    .await;
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 1000);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(duplicates <= 1000, "{duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeouts_are_retried() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.slow");
    create_topic(&bootstrap, &topic, 3).await;
    db.insert(&stream("slow", 20, 500)).await;
    // Hold a lock that lets reads through but blocks the relay's marks past its statement
    // timeout.
    let blocker = db.lock_table("outbox", "EXCLUSIVE").await;
    let relay = RunningRelay::start(settings(
        &db,
        &bootstrap,
        &format!(
            "[database]\nstatement_timeout = \"200ms\"\n[relay]\ntopic_template = \"{prefix}.{{aggregate_type}}\"\n"
        ),
    ))
    .await;
    wait_for_metric(
        relay.http_addr,
        "outbox_relay_database_errors_total{kind=\"statement_timeout\"",
    )
    .await;
    assert_eq!(db.sent().await, 0, "nothing marked while marks time out");
    blocker.commit().await.unwrap();
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 500
    })
    .await;
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 500);
    assert_eq!(assert_contract(&db.rows().await, &records), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_flow_past_a_long_open_transaction() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.long");
    create_topic(&bootstrap, &topic, 3).await;
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    let mut long = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('long', 'held', 'Opened', '{}')",
    )
    .execute(&mut *long)
    .await
    .unwrap();
    for chunk in stream("long", 50, 5000).chunks(500) {
        db.insert(chunk).await;
    }
    wait_for("every committed row marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 5000
    })
    .await;
    long.commit().await.unwrap();
    wait_for(
        "the long transaction's row marked",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 5001 },
    )
    .await;
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 5001);
    assert_eq!(assert_contract(&db.rows().await, &records), 0);
}

/// Reading ahead skips exactly the rows whose mark is in flight, by id, never everything
/// below the highest of them: the rows between and after them are read, in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_ahead_skips_exactly_the_rows_in_flight() {
    let db = TestDb::new().await;
    let ids = db.insert(&stream("ahead", 4, 12)).await;
    let store = Store::new(db.pool.clone());
    let in_flight: Vec<i64> = vec![ids[2], ids[3], ids[7]];

    let read = store
        .read_pending(rows(100), ParkPolicy::Hold, None, &in_flight)
        .await
        .unwrap();
    let read_ids: Vec<i64> = read.iter().map(|r| r.id).collect();
    let expected: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !in_flight.contains(id))
        .collect();
    assert_eq!(
        read_ids, expected,
        "in id order, without the rows in flight"
    );

    let limited = store
        .read_pending(rows(3), ParkPolicy::Hold, None, &in_flight)
        .await
        .unwrap();
    let limited_ids: Vec<i64> = limited.iter().map(|r| r.id).collect();
    assert_eq!(limited_ids, vec![ids[0], ids[1], ids[4]]);

    // A backlog's shape: the two batches in flight are the first rows, one id run, and
    // a row in flight on its own further on.
    let in_flight: Vec<i64> = ids[..6].iter().chain([&ids[9]]).copied().collect();
    let read = store
        .read_pending(rows(100), ParkPolicy::Hold, None, &in_flight)
        .await
        .unwrap();
    let read_ids: Vec<i64> = read.iter().map(|r| r.id).collect();
    assert_eq!(read_ids, vec![ids[6], ids[7], ids[8], ids[10], ids[11]]);
}

/// What an idle relay asks before it reads: whether any row of its shards is pending.
/// Sent and parked rows are not, nor are rows of other shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_pending_sees_exactly_the_pending_rows_of_the_shards_asked() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    assert!(!store.any_pending(None).await.unwrap(), "an empty outbox");
    let id = db.insert(&[NewRow::new("probe", "a", 1)]).await[0];
    let shard: i16 = sqlx::query_scalar("SELECT shard FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let other = (shard + 1) % 256;
    assert!(store.any_pending(None).await.unwrap());
    assert!(store.any_pending(Some(&[shard])).await.unwrap());
    assert!(!store.any_pending(Some(&[other])).await.unwrap());
    sqlx::query("UPDATE outbox SET parked_at = now(), park_error = 'test' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(!store.any_pending(None).await.unwrap(), "a parked row");
    sqlx::query("UPDATE outbox SET parked_at = NULL, sent_at = now() WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(!store.any_pending(None).await.unwrap(), "a sent row");
}

/// The table's fillfactor leaves room on each page for every row on it to be marked in
/// place: the new version of a marked row stays on its page, so only the changed bytes
/// go to WAL and the mark never competes with inserts for the table's last page. Checked
/// for 1 KB rows (the benchmark's) and for small ones (many more rows per page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_rewrites_each_row_on_its_own_page() {
    use outbox_relay::store::{Ack, Store};

    for (what, payload_chars) in [("1 KB rows", 1000), ("60-byte rows", 20)] {
        let db = TestDb::new().await;
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'page', 'agg-' || (g % 50), 'Updated', \
                    jsonb_build_object('pad', repeat(md5(g::text), $1 / 32 + 1)) \
             FROM generate_series(1, 3000) AS g",
        )
        .bind(payload_chars)
        .execute(&db.pool)
        .await
        .unwrap();
        let page_of_rows = "SELECT id, (ctid::text::point)[0]::bigint FROM outbox ORDER BY id";
        let before: Vec<(i64, i64)> = sqlx::query_as(page_of_rows)
            .fetch_all(&db.pool)
            .await
            .unwrap();
        let pages: std::collections::HashSet<i64> = before.iter().map(|r| r.1).collect();
        assert!(
            pages.len() * 2 <= before.len(),
            "{what}: the test needs several rows per page, got {} pages for {} rows",
            pages.len(),
            before.len()
        );

        let store = Store::new(db.pool.clone());
        let all_shards: Vec<i16> = (0..256).collect();
        let leases = store
            .acquire_leases("pages", &all_shards, Duration::from_secs(60))
            .await
            .unwrap();
        let epoch_of: std::collections::HashMap<i16, i64> = leases.into_iter().collect();
        let shards: Vec<(i64, i16)> = sqlx::query_as("SELECT id, shard FROM outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        let acks: Vec<Ack> = shards
            .iter()
            .map(|&(id, shard)| Ack {
                id,
                partition: 0,
                offset: id,
                shard,
                epoch: epoch_of[&shard],
            })
            .collect();
        // One statement per 1000 rows, as the relay marks.
        for batch in acks.chunks(1000) {
            assert_eq!(
                store.mark_sent("pages", batch).await.unwrap(),
                batch.len() as u64
            );
        }

        let after: Vec<(i64, i64)> = sqlx::query_as(page_of_rows)
            .fetch_all(&db.pool)
            .await
            .unwrap();
        let moved: Vec<_> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b.1 != a.1)
            .map(|(b, a)| (b.0, b.1, a.1))
            .collect();
        assert_eq!(db.sent().await, 3000);
        assert!(
            moved.is_empty(),
            "{what}: {} of 3000 marked rows left their page, e.g. (id, page before, page after) {:?}",
            moved.len(),
            &moved[..moved.len().min(5)]
        );
    }
}

/// The mark is a scan of `outbox` by id with no join, whatever the statistics say. The
/// case that matters: most rows are sent, so `sent_at IS NULL` looks rare to the planner.
/// Joined with the acks, the mark then rescanned all 1000 acks for every row it marked.
/// Also checks each row gets its own partition and offset when the acks come unsorted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mark_joins_nothing_when_statistics_say_nothing_is_pending() {
    use outbox_relay::store::{Ack, Store};

    let db = TestDb::new().await;
    let insert = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                  SELECT 'plan', 'agg-' || (g % 97), 'Updated', jsonb_build_object('g', g) \
                  FROM generate_series(1, $1) AS g";
    sqlx::query(insert)
        .bind(20_000)
        .execute(&db.pool)
        .await
        .unwrap();
    for sql in ["UPDATE outbox SET sent_at = now()", "VACUUM ANALYZE outbox"] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    sqlx::query(insert)
        .bind(1000)
        .execute(&db.pool)
        .await
        .unwrap();
    let pending: Vec<(i64, i16)> =
        sqlx::query_as("SELECT id, shard FROM outbox WHERE sent_at IS NULL ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(pending.len(), 1000);

    let store = Store::new(db.pool.clone());
    let all_shards: Vec<i16> = (0..256).collect();
    let epoch_of: std::collections::HashMap<i16, i64> = store
        .acquire_leases("planner", &all_shards, Duration::from_secs(60))
        .await
        .unwrap()
        .into_iter()
        .collect();
    let ids: Vec<i64> = pending.iter().map(|p| p.0).collect();
    let shards: Vec<i16> = pending.iter().map(|p| p.1).collect();
    let epochs: Vec<i64> = shards.iter().map(|s| epoch_of[s]).collect();
    let partitions: Vec<i32> = ids.iter().map(|id| (id % 3) as i32).collect();
    let offsets: Vec<i64> = ids.iter().map(|id| id * 10).collect();
    let mark_sent = Store::new(db.pool.clone()).mark_sent_statement().unwrap();
    let plan: serde_json::Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {mark_sent}"))
        .bind(&ids)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&shards)
        .bind(&epochs)
        .bind("planner")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let update = &plan[0]["Plan"];
    assert_eq!(update["Node Type"], "ModifyTable", "{plan:#}");
    let outer: Vec<&serde_json::Value> = update["Plans"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["Parent Relationship"] == "Outer")
        .collect();
    assert_eq!(outer.len(), 1, "{plan:#}");
    let node = outer[0]["Node Type"].as_str().unwrap();
    assert!(
        node.ends_with("Scan") && outer[0]["Relation Name"] == "outbox",
        "the rows to mark should come from one scan of outbox, got {node}: {plan:#}"
    );

    let mut acks: Vec<Ack> = pending
        .iter()
        .map(|&(id, shard)| Ack {
            id,
            partition: (id % 3) as i32,
            offset: id * 10,
            shard,
            epoch: epoch_of[&shard],
        })
        .collect();
    acks.reverse();
    assert_eq!(store.mark_sent("planner", &acks).await.unwrap(), 1000);
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE id = ANY($1) \
         AND (sent_at IS NULL OR kafka_partition IS DISTINCT FROM (id % 3)::int \
              OR kafka_offset IS DISTINCT FROM id * 10)",
    )
    .bind(&ids)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        wrong, 0,
        "rows marked with another row's partition or offset"
    );
}

/// Pending rows are counted exactly up to a bound and estimated beyond it from the span of
/// pending ids, capped by the pending index's analyzed size; parked rows count as parked,
/// not pending, either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_is_estimated_from_the_pending_ids() {
    use outbox_relay::store::Store;

    let db = TestDb::new().await;
    let ids = db.insert(&stream("backlog", 5, 300)).await;
    // Retired at the front, as the relay retires rows; one parked row in the middle.
    sqlx::query("UPDATE outbox SET sent_at = now() WHERE id < $1")
        .bind(ids[100])
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox SET parked_at = now(), park_reason = 'test' WHERE id = $1")
        .bind(ids[150])
        .execute(&db.pool)
        .await
        .unwrap();
    let store = Store::new(db.pool.clone());

    let exact = store.backlog_stats_counting_up_to(1000).await.unwrap();
    assert_eq!(
        (
            exact.pending_rows,
            exact.pending_rows_estimated,
            exact.parked_rows
        ),
        (199, false, 1)
    );

    // 200 ids from the oldest pending row to the newest: the parked row between them is
    // the estimate's error.
    let estimated = store.backlog_stats_counting_up_to(50).await.unwrap();
    assert_eq!(
        (
            estimated.pending_rows,
            estimated.pending_rows_estimated,
            estimated.parked_rows
        ),
        (200, true, 1)
    );
    assert!(estimated.oldest_pending_age.is_some());

    // Exactly at the bound is still a count.
    let at_bound = store.backlog_stats_counting_up_to(199).await.unwrap();
    assert_eq!(
        (at_bound.pending_rows, at_bound.pending_rows_estimated),
        (199, false)
    );

    // One row stuck at the front while everything after it but the last ten is retired:
    // the span still says 200, the pending index (as ANALYZE sized it) says 11.
    sqlx::query(
        "UPDATE outbox SET sent_at = now() WHERE id > $1 AND id < $2 AND parked_at IS NULL",
    )
    .bind(ids[100])
    .bind(ids[290])
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    let stuck = store.backlog_stats_counting_up_to(5).await.unwrap();
    assert_eq!(
        (stuck.pending_rows, stuck.pending_rows_estimated),
        (11, true)
    );
}

/// `database.listen_channel` is honoured at both ends: `migrate --notify-trigger on` makes
/// the trigger notify that channel, and the relay listens there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doorbell_rings_on_the_configured_channel() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.chan");
    create_topic(&bootstrap, &topic, 3).await;
    let output = relay_command(&db.url, &bootstrap)
        .env("OUTBOX_RELAY_DATABASE__LISTEN_CHANNEL", "orders_bell")
        .args(["migrate", "--notify-trigger", "on"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", output_text(&output));
    // Polling is an hour away: only the doorbell can deliver within the waits below.
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "poll_interval = \"1h\"\n[database]\nlisten_channel = \"orders_bell\"\n",
    ))
    .await;
    wait_for(
        "the relay asleep on orders_bell",
        CONDITION_TIMEOUT,
        || async { sleeping_relays(&db, "orders_bell").await.len() == 1 },
    )
    .await;
    db.insert(&[NewRow::new("chan", "a", 1)]).await;
    wait_for(
        "the row via the doorbell",
        Duration::from_secs(20),
        || async { db.sent().await == 1 },
    )
    .await;
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 1);
    assert_eq!(assert_contract(&db.rows().await, &records), 0);
}

/// A read of `n` rows at most, unbounded in bytes.
fn rows(n: u32) -> ReadLimits {
    ReadLimits {
        rows: n,
        batch_bytes: usize::MAX,
        row_bytes: 1_000_000,
    }
}

/// A read stops at its byte budget, and a payload (jsonb or bytea) or headers object over
/// the per-row limit is measured in SQL, never fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_bounded_by_bytes_and_never_fetches_an_oversized_value() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'bytes', 'agg-' || g, 'E', jsonb_build_object('blob', repeat('x', 10000)) \
         FROM generate_series(1, 10) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let store = Store::new(db.pool.clone());
    let limits = ReadLimits {
        rows: 100,
        batch_bytes: 25_000,
        row_bytes: 1_000_000,
    };
    let read = store
        .read_pending(limits, ParkPolicy::Hold, None, &[])
        .await
        .unwrap();
    assert_eq!(
        read.len(),
        3,
        "10 KB rows, 25 KB budget: the third row reaches it"
    );
    // The connection the cut-short read used works on.
    let again = store
        .read_pending(rows(100), ParkPolicy::Hold, None, &[])
        .await
        .unwrap();
    assert_eq!(again.len(), 10);

    sqlx::query("DELETE FROM outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, payload_bytes, headers) VALUES \
         ('big', 'json', 'E', jsonb_build_object('blob', repeat(md5('a'), 100000)), NULL, NULL), \
         ('big', 'bytes', 'E', NULL, convert_to(repeat(md5('b'), 100000), 'UTF8'), NULL), \
         ('big', 'headers', 'E', '{}', NULL, jsonb_build_object('h', repeat(md5('c'), 100000))), \
         ('big', 'small', 'E', '{\"ok\": true}', NULL, NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let limits = ReadLimits {
        rows: 100,
        batch_bytes: usize::MAX,
        row_bytes: 1_000_000,
    };
    let read = store
        .read_pending(limits, ParkPolicy::Hold, None, &[])
        .await
        .unwrap();
    assert_eq!(read.len(), 4);
    for row in &read[..3] {
        let withheld = row.withheld_bytes.expect("measured, not fetched");
        assert!(withheld >= 3_200_000, "{}: {withheld}", row.aggregate_id);
        assert!(row.approximate_bytes() < 1000, "{}", row.aggregate_id);
    }
    assert!(read[0].payload_json.is_none());
    assert!(read[1].payload_bytes.is_none());
    assert!(read[2].headers_json.is_none());
    assert_eq!(read[3].withheld_bytes, None);
    assert_eq!(read[3].payload_json.as_deref(), Some(r#"{"ok": true}"#));
}

/// A row whose text is not UTF-8 (a SQL_ASCII database stores any bytes) is parked with
/// the column named; rows before it, and other aggregates, flow; its aggregate's later
/// rows wait behind it. The read does not fail, so the relay does not stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_is_not_utf8_is_parked_and_the_rest_flows() {
    let db = TestDb::new_sql_ascii().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.latin");
    create_topic(&bootstrap, &topic, 3).await;
    db.insert(&[NewRow::new("latin", "a", 1)]).await;
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
         VALUES ('latin', 'a', 'E', '{}', E'caf\\xe9')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    db.insert(&[
        NewRow::new("latin", "a", 3),
        NewRow::new("latin", "b", 1),
        NewRow::new("latin", "b", 2),
    ])
    .await;
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("the row parked", CONDITION_TIMEOUT, || async {
        db.count("parked_at IS NOT NULL AND park_reason = 'undecodable'")
            .await
            == 1
    })
    .await;
    wait_for("the other rows sent", CONDITION_TIMEOUT, || async {
        db.sent().await == 3
    })
    .await;
    let error = db.park_error().await;
    assert!(error.contains("column topic"), "{error}");
    assert_eq!(
        db.count("sent_at IS NULL AND parked_at IS NULL AND aggregate_id = 'a'")
            .await,
        1,
        "a's later row waits behind the parked one"
    );
    assert!(!relay.handle.is_finished(), "the relay runs on");
    relay.stop().await;
    assert_eq!(assert_sent_rows_in_kafka(&db, &bootstrap, &topic).await, 3);
}

/// A park the database refuses for one row (here a trigger of the table's owner refuses
/// that row's update) parks the others and leaves that row pending: a failed park is the
/// row's problem, never the relay's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_park_refused_for_one_row_parks_the_others() {
    use outbox_relay::store::Parking;
    let db = TestDb::new().await;
    let ids = db.insert(&stream("refuse", 3, 3)).await;
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_park() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.id = {} THEN RAISE EXCEPTION 'no' USING ERRCODE = '54000'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER refuse_park BEFORE UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION refuse_park()",
        ids[1]
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let store = Store::new(db.pool.clone());
    let parkings: Vec<Parking> = ids
        .iter()
        .map(|&id| Parking {
            id,
            reason: "bad_headers",
            error: "bad headers: not an object".into(),
        })
        .collect();
    let parked = store
        .park(&parkings)
        .await
        .expect("a refused row is not an error");
    assert_eq!(parked, vec![ids[0], ids[2]]);
    assert_eq!(db.count("parked_at IS NOT NULL").await, 2);
    assert_eq!(db.pending().await, 1);
}

/// With nothing pending (an empty outbox, or every row sent) the oldest pending row has no
/// age and the gauge reads 0: an idle relay must not look decades behind to
/// OutboxRelayLagHigh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_backlog_has_no_oldest_pending_age() {
    use outbox_relay::store::Store;

    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let age = |stats: outbox_relay::store::BacklogStats| stats.oldest_pending_age;
    assert_eq!(
        age(store.backlog_stats_counting_up_to(1000).await.unwrap()),
        None
    );
    db.insert(&stream("aged", 1, 2)).await;
    sqlx::query("UPDATE outbox SET sent_at = now()")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        age(store.backlog_stats_counting_up_to(1000).await.unwrap()),
        None,
        "every row sent"
    );
    db.insert(&stream("aged", 1, 1)).await;
    let pending = age(store.backlog_stats_counting_up_to(1000).await.unwrap());
    assert!(
        pending.is_some_and(|a| a < std::time::Duration::from_secs(60)),
        "{pending:?}"
    );
}
