//! The relay end to end on one replica: real PostgreSQL, a real Kafka-protocol broker,
//! every check made by reading Kafka back with a consumer and comparing with the database.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_arrives_once_with_key_value_and_headers() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.order");
    create_topic(&bootstrap, &topic, 3).await;

    let mut rows = stream("order", 20, 300);
    rows[0].headers = Some(
        r#"{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#.into(),
    );
    db.insert(&rows).await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "batch_size = 64\n",
    ))
    .await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 300
    })
    .await;
    relay.stop().await;

    let records = consume(&bootstrap, &topic, 300);
    let db_rows = db.rows().await;
    assert_eq!(
        assert_contract(&db_rows, &records),
        0,
        "no duplicates when nothing fails"
    );
    assert_eq!(records.len(), 300);
    for record in &records {
        let row = db_rows
            .iter()
            .find(|r| Some(&r.event_id) == record.headers.get("id"))
            .unwrap();
        assert_eq!(
            record.value, row.payload,
            "value is the payload as JSON text"
        );
        assert_eq!(record.headers.get("event_type"), Some(&row.event_type));
        assert_eq!(
            record.headers.get("aggregate_type"),
            Some(&row.aggregate_type)
        );
        assert_eq!(
            (row.kafka_partition, row.kafka_offset),
            (Some(record.partition), Some(record.offset)),
            "the mark records where the broker stored the row"
        );
    }
    let first = db_rows.first().unwrap();
    let traced = records
        .iter()
        .find(|r| r.headers.get("id") == Some(&first.event_id))
        .unwrap();
    assert_eq!(
        traced.headers.get("traceparent").map(String::as_str),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        "the row's own headers pass through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_aggregate_order_over_10k_rows_and_150_aggregates() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.account");
    create_topic(&bootstrap, &topic, 3).await;

    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "batch_size = 500\n",
    ))
    .await;
    // Insert while the relay runs, in many transactions, so batches interleave with inserts.
    let rows = stream("account", 150, 10_000);
    for chunk in rows.chunks(250) {
        db.insert(chunk).await;
    }
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 10_000
    })
    .await;
    relay.stop().await;

    let records = consume(&bootstrap, &topic, 10_000);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert_eq!(duplicates, 0);
    let partitions: std::collections::HashSet<i32> = records.iter().map(|r| r.partition).collect();
    assert_eq!(partitions.len(), 3, "150 keys spread over all 3 partitions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_id_committed_late_is_still_delivered() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.late");
    create_topic(&bootstrap, &topic, 3).await;
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;

    // Transaction A takes the lower id and stays open while B commits a higher one.
    let mut tx_a = db.pool.begin().await.unwrap();
    let id_a: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('late', 'a', 'Created', '{}') RETURNING id",
    )
    .fetch_one(&mut *tx_a)
    .await
    .unwrap();
    let id_b = db.insert(&[NewRow::new("late", "b", 1)]).await[0];
    assert!(id_a < id_b);
    wait_for("the higher id marked", CONDITION_TIMEOUT, || async {
        db.count(&format!("id = {id_b} AND sent_at IS NOT NULL"))
            .await
            == 1
    })
    .await;
    tx_a.commit().await.unwrap();
    wait_for(
        "the lower id marked after its commit",
        CONDITION_TIMEOUT,
        || async {
            db.count(&format!("id = {id_a} AND sent_at IS NOT NULL"))
                .await
                == 1
        },
    )
    .await;
    relay.stop().await;

    let records = consume(&bootstrap, &topic, 2);
    assert_eq!(assert_contract(&db.rows().await, &records), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_marked_while_the_broker_is_frozen() {
    let db = TestDb::new().await;
    let broker = Tansu::start();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.frozen");
    create_topic(&broker.bootstrap, &topic, 3).await;

    // Warm up: the producer knows the topic before the broker stops answering.
    db.insert(&stream("frozen", 10, 50)).await;
    let relay = RunningRelay::start(settings(
        &db,
        &broker.bootstrap,
        &format!(
            "[relay]\ntopic_template = \"{prefix}.{{aggregate_type}}\"\nbatch_size = 200\nstall_after = \"1s\"\n"
        ),
    ))
    .await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 50
    })
    .await;

    broker.freeze();
    db.insert(&stream("frozen", 10, 1000)).await;
    let health = relay.health.clone();
    wait_for("rows in flight", CONDITION_TIMEOUT, || async {
        health.in_flight() > 0
    })
    .await;
    wait_for("the stall alarm", CONDITION_TIMEOUT, || async {
        health.stalled()
    })
    .await;
    let (status, body) = http_get(relay.http_addr, "/readyz").await;
    assert_eq!(status, 503, "not ready while stalled: {body}");
    // `status`, from another process, says which replica is stalled and why.
    wait_for_status_state(&db, "stalled", "broker acknowledgements have stopped").await;
    assert_eq!(
        db.sent().await,
        50,
        "nothing marked while the broker cannot acknowledge"
    );

    broker.thaw();
    wait_for(
        "all rows marked after recovery",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 1050 },
    )
    .await;
    wait_for("the stall alarm clears", CONDITION_TIMEOUT, || async {
        !health.stalled()
    })
    .await;
    wait_for_status_state(&db, "ready", "").await;
    relay.stop().await;

    let records = consume(&broker.bootstrap, &topic, 1050);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(
        duplicates <= 200,
        "duplicates bounded by one batch, got {duplicates}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_resumes_without_loss() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.resume");
    create_topic(&bootstrap, &topic, 3).await;
    let config =
        format!("[relay]\ntopic_template = \"{prefix}.{{aggregate_type}}\"\nbatch_size = 100\n");

    db.insert(&stream("resume", 40, 3000)).await;
    let first = RunningRelay::start(settings(&db, &bootstrap, &config)).await;
    wait_for("some rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await >= 500
    })
    .await;
    first.stop().await;
    let sent_by_first = db.sent().await;
    assert!(sent_by_first < 3000, "the first relay stopped part-way");

    db.insert(&stream("resume", 40, 1000)).await;
    let second = RunningRelay::start(settings(&db, &bootstrap, &config)).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 4000
    })
    .await;
    second.stop().await;

    let records = consume(&bootstrap, &topic, 4000);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert_eq!(duplicates, 0, "a clean stop marks everything it published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_mode_deletes_acknowledged_rows() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.gone");
    create_topic(&bootstrap, &topic, 3).await;
    db.insert(&stream("gone", 25, 500)).await;
    let before = db.rows().await;
    let relay = RunningRelay::start(settings(
        &db,
        &bootstrap,
        &format!("[relay]\nmode = \"delete\"\ntopic_template = \"{prefix}.{{aggregate_type}}\"\n"),
    ))
    .await;
    wait_for("all rows deleted", CONDITION_TIMEOUT, || async {
        db.count("true").await == 0
    })
    .await;
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 500);
    assert_eq!(assert_contract(&before, &records), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_template_and_per_row_topic() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let (orders, payments, custom) = (
        format!("{prefix}-order-v1"),
        format!("{prefix}-payment-v1"),
        format!("{prefix}.custom"),
    );
    for topic in [&orders, &payments, &custom] {
        create_topic(&bootstrap, topic, 3).await;
    }
    let mut rows = stream("order", 5, 30);
    rows.extend(stream("payment", 5, 20));
    let mut overridden = NewRow::new("order", "agg-0", 999);
    overridden.topic = Some(custom.clone());
    rows.push(overridden);
    db.insert(&rows).await;

    let relay = RunningRelay::start(settings(
        &db,
        &bootstrap,
        &format!(
            "[relay]\ntopic_template = \"{prefix}-{{aggregate_type}}-v1\"\n\
             allowed_topics = [\"{prefix}-*-v1\", \"{custom}\"]\n"
        ),
    ))
    .await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 51
    })
    .await;
    relay.stop().await;

    let db_rows = db.rows().await;
    let mut records = consume(&bootstrap, &orders, 30);
    assert_eq!(records.len(), 30);
    let from_payments = consume(&bootstrap, &payments, 20);
    assert_eq!(from_payments.len(), 20);
    let from_custom = consume(&bootstrap, &custom, 1);
    assert_eq!(from_custom.len(), 1);
    assert_eq!(
        from_custom[0]
            .headers
            .get("aggregate_type")
            .map(String::as_str),
        Some("order")
    );
    records.extend(from_payments);
    records.extend(from_custom);
    assert_eq!(assert_contract(&db_rows, &records), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublishable_rows_are_parked_and_hold_their_aggregate_only() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.mixed");
    create_topic(&bootstrap, &topic, 3).await;
    let mut rows = stream("mixed", 10, 100);
    // agg-3's row gets headers that are not an object of strings.
    let bad = rows.iter().position(|r| r.aggregate_id == "agg-3").unwrap();
    rows[bad].headers = Some(r#"{"retries": 3}"#.into());
    db.insert(&rows).await;
    let agg3_rows = rows.iter().filter(|r| r.aggregate_id == "agg-3").count() as i64;

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    let expected_sent = 100 - agg3_rows;
    wait_for(
        "every other aggregate marked",
        CONDITION_TIMEOUT,
        || async { db.sent().await == expected_sent },
    )
    .await;
    assert_eq!(
        db.count("parked_at IS NOT NULL AND park_reason = 'bad_headers'")
            .await,
        1
    );
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert!(
        metric_value(
            &metrics,
            "outbox_relay_rows_parked_total{reason=\"bad_headers\""
        ) > 0.0,
        "{metrics}"
    );
    relay.stop().await;
    assert_eq!(
        db.pending().await,
        agg3_rows - 1,
        "later rows of agg-3 wait behind the parked one"
    );

    let records = consume(&bootstrap, &topic, expected_sent as usize);
    assert_eq!(records.len() as i64, expected_sent);
    assert!(records.iter().all(|r| r.key.as_deref() != Some("agg-3")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doorbell_wakes_an_idle_relay() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.bell");
    create_topic(&bootstrap, &topic, 3).await;
    sqlx::query("SELECT outbox_enable_notify(true)")
        .execute(&db.pool)
        .await
        .unwrap();
    // The poll interval is far longer than the wait below: only the doorbell can deliver.
    let relay = start_doorbell_only_relay(&db, &bootstrap, &prefix).await;
    let health = relay.health.clone();
    wait_for("relay ready", CONDITION_TIMEOUT, || async {
        http_get(relay.http_addr, "/readyz").await.0 == 200
    })
    .await;
    // Asleep with the doorbell armed: writers ring from now on.
    wait_for_metric(
        relay.http_addr,
        r#"outbox_relay_idle_waits_total{doorbell="armed""#,
    )
    .await;
    let idle_batches = health.batches();
    db.insert(&[NewRow::new("bell", "a", 1)]).await;
    wait_for(
        "the row marked by a doorbell wake-up",
        Duration::from_secs(20),
        || async { db.sent().await == 1 },
    )
    .await;
    assert!(health.batches() > idle_batches);
    relay.stop().await;
    assert_eq!(consume(&bootstrap, &topic, 1).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_doorbell_trigger_an_idle_relay_polls_and_takes_no_doorbell_lock() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.poll");
    create_topic(&bootstrap, &topic, 3).await;
    // The default install: no trigger, the default poll interval (the harness sets 100ms
    // for every test), LISTEN on.
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "poll_interval = \"10ms\"\n",
    ))
    .await;
    // Any advisory lock of the doorbell's (the sleeper's or a waiter's) anyone holds.
    let doorbell_locks = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid IN (1868722808, 1868722809) \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let waits =
        async |series: &str| metric_value(&http_get(relay.http_addr, "/metrics").await.1, series);
    wait_for("the idle relay polling", CONDITION_TIMEOUT, || async {
        waits(r#"outbox_relay_idle_waits_total{doorbell="off""#).await >= 20.0
    })
    .await;
    // No writer can ring, so sleeping on the doorbell's lock would cost two statements a
    // poll for nothing.
    assert_eq!(
        waits(r#"outbox_relay_idle_waits_total{doorbell="armed""#).await,
        0.0
    );
    assert_eq!(doorbell_locks().await, 0);
    db.insert(&[NewRow::new("poll", "a", 1)]).await;
    assert_eq!(consume(&bootstrap, &topic, 1).len(), 1);

    // A trigger installed while the relay runs is found, and the relay sleeps on it; once
    // removed, the relay lets go of the lock.
    sqlx::query("SELECT outbox_enable_notify(true)")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_for(
        "the relay asleep on the doorbell",
        CONDITION_TIMEOUT,
        || async { sleeping_relays(&db, "outbox_relay").await.len() == 1 },
    )
    .await;
    let polled = waits(r#"outbox_relay_idle_waits_total{doorbell="off""#).await;
    sqlx::query("SELECT outbox_enable_notify(false)")
        .execute(&db.pool)
        .await
        .unwrap();
    // It polls again once it has read the catalog (it re-arms until then).
    wait_for("the relay polling again", CONDITION_TIMEOUT, || async {
        waits(r#"outbox_relay_idle_waits_total{doorbell="off""#).await >= polled + 20.0
    })
    .await;
    assert_eq!(doorbell_locks().await, 0);
    db.insert(&[NewRow::new("poll", "a", 2)]).await;
    wait_for("both rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 2
    })
    .await;
    relay.stop().await;
    assert_eq!(consume(&bootstrap, &topic, 2).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_ring_only_while_a_relay_sleeps() {
    let db = TestDb::new().await;
    sqlx::query("SELECT outbox_enable_notify(true)")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen("outbox_relay").await.unwrap();
    let marker = async |text: &str| {
        sqlx::query("SELECT pg_notify('outbox_relay', $1)")
            .bind(text)
            .execute(&db.pool)
            .await
            .unwrap();
    };

    // One row, inserted in a transaction the caller commits.
    let insert_one = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                      VALUES ('ring', 'a', 'Counted', '{}')";
    // How many times one INSERT statement calls the trigger's function, on a new session
    // (a session's counts stay pending across its transactions until flushed).
    let function_calls = async || {
        let mut session = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
            .await
            .unwrap();
        let mut tx = sqlx::Connection::begin(&mut session).await.unwrap();
        sqlx::query("SET LOCAL track_functions = 'pl'")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(insert_one).execute(&mut *tx).await.unwrap();
        let calls: i64 = sqlx::query_scalar(
            "SELECT COALESCE(pg_stat_get_xact_function_calls('outbox_notify()'::regprocedure), 0)",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        calls
    };

    // No relay sleeps: the insert does not notify, so the marker sent after it comes first;
    // nor does it call the trigger's function (its WHEN clause tries the lock).
    assert_eq!(function_calls().await, 0);
    db.insert(&[NewRow::new("ring", "a", 1)]).await;
    marker("after the first insert").await;
    assert_eq!(
        listener.recv().await.unwrap().payload(),
        "after the first insert"
    );

    // A writer that did not ring holds the doorbell lock shared until it commits: a relay
    // cannot fall asleep (take the lock) while that writer's row is not yet visible.
    let mut writer = db.pool.begin().await.unwrap();
    sqlx::query(insert_one).execute(&mut *writer).await.unwrap();
    let mut relay = db.pool.acquire().await.unwrap();
    let try_to_sleep = "SELECT pg_try_advisory_lock(1868722808, hashtext('outbox_relay'))";
    let asleep: bool = sqlx::query_scalar(try_to_sleep)
        .fetch_one(&mut *relay)
        .await
        .unwrap();
    assert!(
        !asleep,
        "the relay fell asleep before an unrung row committed"
    );
    writer.commit().await.unwrap();
    let asleep: bool = sqlx::query_scalar(try_to_sleep)
        .fetch_one(&mut *relay)
        .await
        .unwrap();
    assert!(
        asleep,
        "the relay cannot fall asleep once the writer committed"
    );
    sqlx::query("SELECT pg_advisory_unlock(1868722808, hashtext('outbox_relay'))")
        .execute(&mut *relay)
        .await
        .unwrap();
    drop(relay);

    // A relay sleeps (holds the doorbell lock on its session): the insert notifies.
    let mut sleeper = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(1868722808, hashtext('outbox_relay'))")
        .execute(&mut *sleeper)
        .await
        .unwrap();
    db.insert(&[NewRow::new("ring", "a", 1)]).await;
    marker("after the second insert").await;
    assert_eq!(listener.recv().await.unwrap().payload(), "");
    assert_eq!(
        listener.recv().await.unwrap().payload(),
        "after the second insert"
    );
    assert_eq!(function_calls().await, 1);
    marker("after the counted insert").await;
    assert_eq!(listener.recv().await.unwrap().payload(), "");
    assert_eq!(
        listener.recv().await.unwrap().payload(),
        "after the counted insert"
    );

    // Awake again: silence.
    sqlx::query("SELECT pg_advisory_unlock(1868722808, hashtext('outbox_relay'))")
        .execute(&mut *sleeper)
        .await
        .unwrap();
    db.insert(&[NewRow::new("ring", "a", 1)]).await;
    marker("after the third insert").await;
    assert_eq!(
        listener.recv().await.unwrap().payload(),
        "after the third insert"
    );
    assert_eq!(function_calls().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committing_while_the_relay_falls_asleep_is_published_without_a_ring() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.dusk");
    create_topic(&bootstrap, &topic, 3).await;
    sqlx::query("SELECT outbox_enable_notify(true)")
        .execute(&db.pool)
        .await
        .unwrap();
    // The writer inserts while no relay sleeps, so its trigger does not ring, and commits
    // only after the relay has tried to fall asleep.
    let mut writer = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('dusk', 'a', 'E', '{}')",
    )
    .execute(&mut *writer)
    .await
    .unwrap();
    let relay = start_doorbell_only_relay(&db, &bootstrap, &prefix).await;
    // The relay found the doorbell's lock taken by the writer: it must look again soon,
    // not sleep out its hour-long poll interval.
    wait_for_metric(
        relay.http_addr,
        r#"outbox_relay_idle_waits_total{doorbell="busy""#,
    )
    .await;
    writer.commit().await.unwrap();
    wait_for(
        "the row committed behind the doorbell's lock marked",
        Duration::from_secs(20),
        || async { db.sent().await == 1 },
    )
    .await;
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "outbox_relay_doorbell_notifications_total"),
        0.0,
        "the writer checked the doorbell while the relay was awake: it never rang"
    );
    relay.stop().await;
    assert_eq!(consume(&bootstrap, &topic, 1).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_rung_in_while_a_mark_waits_are_published_and_the_waiting_rows_are_not_resent() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.slowmark");
    create_topic(&bootstrap, &topic, 3).await;
    // The first row is locked before the relay starts, so its mark (in the background:
    // the batch was fully acknowledged) waits on the lock for as long as the test holds it.
    let first = db.insert(&[NewRow::new("slowmark", "a", 1)]).await[0];
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE")
        .bind(first)
        .execute(&mut *lock)
        .await
        .unwrap();
    let relay = start_doorbell_only_relay(&db, &bootstrap, &prefix).await;
    wait_for(
        "the first row's mark waiting on the lock",
        CONDITION_TIMEOUT,
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%UPDATE outbox%'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap()
                == 1
        },
    )
    .await;

    // A doorbell while that mark waits: the relay reads again, skipping the row whose
    // mark is still running, and publishes only the new one.
    db.insert(&[NewRow::new("slowmark", "b", 2)]).await;
    sqlx::query("SELECT pg_notify('outbox_relay', '')")
        .execute(&db.pool)
        .await
        .unwrap();
    let published = consume(&bootstrap, &topic, 2);
    assert_eq!(
        published.len(),
        2,
        "each row published once while the mark waits"
    );
    assert_eq!(
        db.sent().await,
        0,
        "nothing marked while the first mark waits"
    );

    lock.commit().await.unwrap();
    wait_for("both rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 2
    })
    .await;
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 2);
    assert_eq!(
        assert_contract(&db.rows().await, &records),
        0,
        "no duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_goes_out_without_waiting_out_the_linger() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.linger");
    create_topic(&bootstrap, &topic, 3).await;
    // librdkafka alone would hold these records for the whole linger; the wait below is
    // a third of it.
    let mut settings = template_settings(&db, &bootstrap, &prefix, "");
    settings.kafka.linger = Duration::from_secs(60);
    let relay = RunningRelay::start(settings).await;
    let rows: Vec<NewRow> = (0..5).map(|i| NewRow::new("linger", "a", i)).collect();
    db.insert(&rows).await;
    wait_for(
        "the rows marked before the linger is out",
        Duration::from_secs(20),
        || async { db.sent().await == 5 },
    )
    .await;
    relay.stop().await;
    let rows = db.rows().await;
    let records = consume(&bootstrap, &topic, 5);
    assert_eq!(assert_contract(&rows, &records), 0, "no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_report_health_and_metrics() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.m"), 3).await;
    db.insert(&stream("m", 3, 30)).await;
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 30
    })
    .await;
    assert_eq!(http_get(relay.http_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(relay.http_addr, "/readyz").await.0, 200);
    let (status, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "outbox_relay_rows_published_total",
        "outbox_relay_batch_size_rows_count",
        "outbox_relay_end_to_end_latency_seconds_count",
        "outbox_relay_rows_marked_total{mode=\"mark\"",
    ] {
        assert!(
            metric_value(&metrics, name) > 0.0,
            "{name} did not move:\n{metrics}"
        );
    }
    for name in [
        "outbox_relay_pending_rows",
        "outbox_relay_oldest_pending_age_seconds",
        "outbox_relay_build_info",
    ] {
        assert!(
            metrics.contains(&format!("\n{name}")),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    // build_info names what `--version` names.
    let build_info = metrics
        .lines()
        .find(|line| line.starts_with("outbox_relay_build_info{"))
        .unwrap_or_default();
    for label in [
        format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        format!("revision=\"{}\"", outbox_relay::build::GIT_REVISION),
        format!(
            "librdkafka=\"{}\"",
            outbox_relay::build::librdkafka_version()
        ),
    ] {
        assert!(build_info.contains(&label), "{label} not in `{build_info}`");
    }
    // The process's own metrics, for hosts without a container runtime to report them.
    for name in ["process_resident_memory_bytes", "process_open_fds"] {
        assert!(metric_value(&metrics, name) > 0.0, "{name}:\n{metrics}");
    }
    // Every family exposed is described: a # HELP line for each # TYPE line.
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(families.len() > 20, "{metrics}");
    for family in families {
        assert!(
            metrics
                .lines()
                .any(|line| line.starts_with(&format!("# HELP {family} "))),
            "{family} has no # HELP line:\n{metrics}"
        );
    }
    relay.stop().await;
}

/// Each relay has metrics of its own: two relays in one process (as this binary's tests
/// run) count only their own rows, so a test's figures are exact whatever runs beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_relay_counts_only_its_own_rows() {
    let (busy_db, idle_db) = (TestDb::new().await, TestDb::new().await);
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.own"), 3).await;
    busy_db.insert(&stream("own", 4, 30)).await;
    let idle = RunningRelay::start(template_settings(&idle_db, &bootstrap, &prefix, "")).await;
    let busy = RunningRelay::start(template_settings(&busy_db, &bootstrap, &prefix, "")).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        busy_db.sent().await == 30
    })
    .await;
    // The last batch's counters are recorded just after its mark commits.
    wait_for(
        "the busy relay counted its marks",
        CONDITION_TIMEOUT,
        || async {
            let (_, metrics) = http_get(busy.http_addr, "/metrics").await;
            metric_value(&metrics, "outbox_relay_rows_marked_total") == 30.0
        },
    )
    .await;
    let (_, busy_metrics) = http_get(busy.http_addr, "/metrics").await;
    let (_, idle_metrics) = http_get(idle.http_addr, "/metrics").await;
    for (series, busy_value, idle_value) in [
        ("outbox_relay_rows_published_total", 30.0, 0.0),
        ("outbox_relay_rows_marked_total", 30.0, 0.0),
        ("outbox_relay_end_to_end_latency_seconds_count", 30.0, 0.0),
    ] {
        assert_eq!(
            metric_value(&busy_metrics, series),
            busy_value,
            "{series} of the busy relay:\n{busy_metrics}"
        );
        assert_eq!(
            metric_value(&idle_metrics, series),
            idle_value,
            "{series} of the idle relay:\n{idle_metrics}"
        );
    }
    busy.stop().await;
    idle.stop().await;
}

/// A template topic that does not exist yet (a service starts writing a new
/// `aggregate_type`): only its rows wait, in order and unparked, while every other topic
/// keeps flowing; `/readyz` stays ready and names the topic, a gauge counts it, and its
/// rows follow once it is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_template_topic_holds_only_its_own_rows() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let (missing, present) = (format!("{prefix}.missing"), format!("{prefix}.present"));
    create_topic(&bootstrap, &present, 3).await;
    // Aggregates of their own: an aggregate's rows stay in order across topics, so a
    // row of an aggregate that waits holds its later rows of any topic.
    let present_rows = |n| {
        stream("present", 5, n)
            .into_iter()
            .map(|mut r| {
                r.aggregate_id = format!("present-{}", r.aggregate_id);
                r
            })
            .collect::<Vec<_>>()
    };
    let mut rows = stream("missing", 5, 40);
    rows.extend(present_rows(40));
    db.insert(&rows).await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "\
             [kafka.properties]\n\"topic.metadata.propagation.max.ms\" = 500\n",
    ))
    .await;
    wait_for(
        "the present topic's rows marked, the missing one named",
        CONDITION_TIMEOUT,
        || async {
            let (status, body) = http_get(relay.http_addr, "/readyz").await;
            db.sent().await == 40 && status == 200 && body.contains(&missing)
        },
    )
    .await;
    assert_eq!(
        db.count("parked_at IS NOT NULL").await,
        0,
        "a missing topic parks nothing"
    );
    assert_eq!(
        db.count("sent_at IS NULL AND aggregate_type = 'missing'")
            .await,
        40
    );
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "outbox_relay_topics_waiting"),
        1.0,
        "one topic waits:\n{metrics}"
    );

    // Rows keep flowing to the present topic while the other waits.
    db.insert(&present_rows(20)).await;
    wait_for(
        "new rows of the present topic marked",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 60 },
    )
    .await;

    create_topic(&bootstrap, &missing, 3).await;
    wait_for(
        "all rows marked once the topic exists",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 100 },
    )
    .await;
    wait_for("no topic named any more", CONDITION_TIMEOUT, || async {
        http_get(relay.http_addr, "/readyz").await == (200, "ready\n".to_string())
    })
    .await;
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert_eq!(metric_value(&metrics, "outbox_relay_topics_waiting"), 0.0);
    relay.stop().await;
    let all = db.rows().await;
    for (topic, aggregate_type, count) in [(&missing, "missing", 40), (&present, "present", 60)] {
        let rows: Vec<DbRow> = all
            .iter()
            .filter(|r| r.aggregate_type == aggregate_type)
            .cloned()
            .collect();
        // Waiting rows are never produced until their topic exists: none is sent twice.
        assert_eq!(
            assert_contract(&rows, &consume(&bootstrap, topic, count)),
            0,
            "{topic}: no duplicates"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_legal_rows_are_published_without_crashing_the_relay() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.odd");
    create_topic(&bootstrap, &topic, 3).await;
    // A service may write created_at itself, even 'infinity'; a NULL payload is a tombstone;
    // bytea payloads pass through as they are.
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) VALUES \
           ('odd', 'x', 'Far', '{\"a\": 1}', 'infinity'), \
           ('odd', 'x', 'Past', '{\"a\": 2}', '-infinity'), \
           ('odd', 'y', 'Deleted', NULL, now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload_bytes) \
         VALUES ('odd', 'z', 'Avro', '\\x00010203ff')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 4
    })
    .await;
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 4);
    assert_eq!(assert_contract(&db.rows().await, &records), 0);
    let tombstone = records
        .iter()
        .find(|r| r.key.as_deref() == Some("y"))
        .unwrap();
    assert_eq!(tombstone.value, None, "a NULL payload is a tombstone");
    let bytes = records
        .iter()
        .find(|r| r.key.as_deref() == Some("z"))
        .unwrap();
    assert_eq!(
        bytes.value_bytes.as_deref(),
        Some([0u8, 1, 2, 3, 0xff].as_slice())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_skip_policy_lets_an_aggregate_pass_its_parked_row() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.skip");
    create_topic(&bootstrap, &topic, 3).await;
    let mut rows = stream("skip", 5, 50);
    rows[0].headers = Some("[1, 2]".into());
    db.insert(&rows).await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "on_park = \"skip\"\n",
    ))
    .await;
    wait_for("every other row marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 49
    })
    .await;
    assert_eq!(db.count("parked_at IS NOT NULL").await, 1);
    relay.stop().await;
    let records = consume(&bootstrap, &topic, 49);
    assert_eq!(records.len(), 49);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_mixed_into_a_normal_stream_are_parked_and_the_rest_flows() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.mixed");
    create_topic(&bootstrap, &topic, 3).await;
    let mut rows = stream("mixed", 50, 2000);
    // Every 200th row is bad in one of three ways; NULL payloads, headers and topics are
    // fine and flow like any other row.
    let mut bad = 0;
    for (i, row) in rows.iter_mut().enumerate() {
        match i % 200 {
            10 => {
                row.payload = Some(format!("{{\"blob\": \"{}\"}}", "x".repeat(1_100_000)));
                bad += 1;
            }
            20 => {
                row.headers = Some(r#"{"nested": {"a": "b"}}"#.into());
                bad += 1;
            }
            30 => {
                row.topic = Some("bad/topic".into());
                bad += 1;
            }
            40 => row.payload = None,
            _ => {}
        }
    }
    db.insert(&rows).await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "on_park = \"skip\"\n",
    ))
    .await;
    let good = 2000 - bad;
    wait_for("every good row marked", CONDITION_TIMEOUT, || async {
        db.sent().await == good
    })
    .await;
    for reason in ["too_large", "bad_headers", "invalid_topic"] {
        assert_eq!(
            db.count(&format!(
                "parked_at IS NOT NULL AND park_reason = '{reason}'"
            ))
            .await,
            bad / 3,
            "{reason}"
        );
    }
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    for reason in ["too_large", "bad_headers", "invalid_topic"] {
        assert!(
            metric_value(
                &metrics,
                &format!("outbox_relay_rows_parked_total{{reason=\"{reason}\""),
            ) > 0.0,
            "{metrics}"
        );
    }
    relay.stop().await;

    let published = assert_sent_rows_in_kafka(&db, &bootstrap, &topic).await;
    assert_eq!(published, good as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_over_the_topics_own_size_limit_are_parked_before_producing() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.small");
    // Far below the relay's own limit (1 MB), so only the topic's limit can catch them.
    create_topic_with(&bootstrap, &topic, 3, &[("max.message.bytes", "20000")]).await;
    let mut rows = stream("small", 20, 500);
    let mut oversized = 0;
    for row in rows.iter_mut().skip(7).step_by(50) {
        row.payload = Some(format!("{{\"blob\": \"{}\"}}", "y".repeat(30_000)));
        oversized += 1;
    }
    db.insert(&rows).await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "on_park = \"skip\"\n",
    ))
    .await;
    let good = 500 - oversized;
    wait_for("every row marked or parked", CONDITION_TIMEOUT, || async {
        db.sent().await == good && db.count("parked_at IS NOT NULL").await == oversized
    })
    .await;
    let errors: Vec<String> = sqlx::query_scalar(
        "SELECT park_error FROM outbox WHERE parked_at IS NOT NULL AND park_reason = 'too_large'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(errors.len() as i64, oversized);
    for error in &errors {
        assert!(
            error.contains("the topic's max.message.bytes = 20000"),
            "{error}"
        );
    }
    relay.stop().await;

    let published = assert_sent_rows_in_kafka(&db, &bootstrap, &topic).await;
    assert_eq!(published, good as usize);
}

/// Retention in mark mode: sent rows older than `relay.retain_sent` are deleted, the ones
/// the relay sends itself too once they are that old (the sweeper keeps running), while
/// pending, parked and discarded rows stay however old they are; the count is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_rows_past_the_retention_are_deleted_and_the_others_kept() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.kept");
    create_topic(&bootstrap, &topic, 3).await;
    // Rows as a relay left them a month ago: 20 sent, one parked, one discarded; and five
    // rows for a topic that does not exist, which stay pending.
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at, \
                             sent_at, kafka_partition, kafka_offset) \
         SELECT 'kept', 'old-' || n, 'E', '{}', now() - interval '30 days', \
                now() - interval '30 days', 0, n \
         FROM generate_series(1, 20) AS n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at, \
                             parked_at, park_reason, park_error, discarded_at, discard_reason) \
         VALUES ('kept', 'parked', 'E', '{}', now() - interval '30 days', \
                 now() - interval '30 days', 'bad_headers', 'test', NULL, NULL), \
                ('kept', 'discarded', 'E', '{}', now() - interval '30 days', \
                 now() - interval '30 days', 'bad_headers', 'test', \
                 now() - interval '29 days', 'test')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Aggregates of their own: a waiting row holds its aggregate's later rows of any topic.
    let waiting: Vec<NewRow> = stream("missing", 5, 5)
        .into_iter()
        .map(|mut r| {
            r.aggregate_id = format!("waiting-{}", r.aggregate_id);
            r
        })
        .collect();
    db.insert(&waiting).await;
    let fresh = stream("kept", 4, 10);
    db.insert(&fresh).await;
    let fresh_rows: Vec<DbRow> = db
        .rows()
        .await
        .into_iter()
        .filter(|r| r.aggregate_type == "kept" && r.aggregate_id.starts_with("agg-"))
        .collect();
    assert_eq!(fresh_rows.len(), 10);

    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "retain_sent = \"2s\"\n",
    ))
    .await;
    // The 20 old rows at the first sweep, the 10 the relay sends about 2 s after it sent them.
    wait_for_metric_value(relay.http_addr, "outbox_relay_rows_pruned_total", 30.0).await;
    assert_eq!(
        db.count("sent_at IS NOT NULL").await,
        0,
        "every sent row deleted"
    );
    assert_eq!(
        db.count("parked_at IS NOT NULL AND discarded_at IS NULL")
            .await,
        1,
        "the parked row is kept"
    );
    assert_eq!(
        db.count("discarded_at IS NOT NULL").await,
        1,
        "the discarded row is kept"
    );
    assert_eq!(
        db.pending().await,
        5,
        "rows waiting for their topic are kept"
    );
    relay.stop().await;
    // The rows it sent reached Kafka before they were deleted.
    assert_eq!(
        assert_contract(&fresh_rows, &consume(&bootstrap, &topic, fresh_rows.len())),
        0
    );
}

/// The auditor reads every sampled row's record back from Kafka: rows whose marks recorded
/// a wrong offset (a trigger moves it as the mark writes it) are counted as missing (past
/// the partition's end) or different (another row's record is there); the rest are found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_counts_rows_whose_records_are_not_where_their_marks_say() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.audit");
    create_topic(&bootstrap, &topic, 1).await;
    sqlx::raw_sql(
        "CREATE FUNCTION misrecord() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.aggregate_id = 'shifted' THEN
                 NEW.kafka_offset := NEW.kafka_offset + 1000000;
             ELSIF NEW.aggregate_id = 'swapped' THEN
                 NEW.kafka_offset := NEW.kafka_offset - 1;
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER misrecord BEFORE UPDATE OF kafka_offset ON outbox
             FOR EACH ROW WHEN (OLD.kafka_offset IS NULL AND NEW.kafka_offset IS NOT NULL)
             EXECUTE FUNCTION misrecord();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "audit_sample_rate = 1.0\naudit_interval = \"200ms\"\n",
    ))
    .await;
    // One partition: the healthy rows take offsets 0 to 19, so every swapped row's offset
    // minus one holds another row's record.
    let mut rows = stream("audit", 4, 20);
    rows.extend((0..5).map(|seq| NewRow::new("audit", "swapped", seq)));
    rows.extend((0..5).map(|seq| NewRow::new("audit", "shifted", seq)));
    db.insert(&rows).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 30
    })
    .await;
    wait_for("30 rows audited", CONDITION_TIMEOUT, || async {
        let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
        metric_value(&metrics, "outbox_relay_audit_checked_total") >= 30.0
    })
    .await;
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    relay.stop().await;
    let value = |series: &str| metric_value(&metrics, series);
    assert_eq!(value("outbox_relay_audit_checked_total"), 30.0, "{metrics}");
    assert_eq!(
        value(r#"outbox_relay_audit_mismatches_total{kind="missing""#),
        5.0,
        "the shifted rows' offsets are past the partition's end"
    );
    assert_eq!(
        value(r#"outbox_relay_audit_mismatches_total{kind="different""#),
        5.0,
        "the swapped rows' offsets hold other rows' records"
    );
    // The broker has every row, whatever the marks say.
    let records = consume(&bootstrap, &topic, 30);
    let delivered: std::collections::HashSet<&String> =
        records.iter().filter_map(|r| r.headers.get("id")).collect();
    for row in db.rows().await {
        assert!(
            delivered.contains(&row.event_id),
            "row {} not in Kafka",
            row.id
        );
    }
}

/// An idle relay pointed at an address where no broker listens is not ready and says why,
/// and counts the transport errors, though it has nothing to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_whose_brokers_do_not_answer_is_not_ready() {
    let db = TestDb::new().await;
    let nowhere = format!("127.0.0.1:{}", free_port());
    let relay = RunningRelay::start(settings(&db, &nowhere, "")).await;
    // Never ready, not even in the seconds before the first metadata request times out.
    wait_for(
        "readiness to name the brokers",
        CONDITION_TIMEOUT,
        || async {
            let (status, body) = http_get(relay.http_addr, "/readyz").await;
            assert_eq!(status, 503, "ready before any broker answered: {body}");
            body.contains("brokers unreachable")
        },
    )
    .await;
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert_eq!(metric_value(&metrics, "outbox_relay_ready"), 0.0);
    assert!(
        metric_value(
            &metrics,
            r#"outbox_relay_publish_errors_total{kind="transport""#
        ) > 0.0,
        "{metrics}"
    );
    relay.stop().await;
}
