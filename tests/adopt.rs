//! An outbox a team already has, in Debezium's shape (`id uuid`, `aggregatetype`,
//! `aggregateid`, `type`, `payload`, plus `tracingspancontext`): adopted by `migrate`
//! (dry run first) while its writer goes on with the same SQL, then relayed, old rows and
//! new, keyed by `aggregateid` with the row's uuid as the `id` header, in the order the
//! writer wrote each aggregate; its sent rows pruned like the relay's own.

mod support;

use std::process::Output;

use support::*;

const TABLE: &str = "CREATE SCHEMA app; \
     CREATE TABLE app.events ( \
       id uuid PRIMARY KEY, \
       aggregatetype varchar(255) NOT NULL, \
       aggregateid varchar(255) NOT NULL, \
       type varchar(255) NOT NULL, \
       payload jsonb, \
       tracingspancontext text)";

/// The service's insert, byte for byte the same before and after the adoption.
const WRITER: &str = "INSERT INTO app.events (id, aggregatetype, aggregateid, type, payload, tracingspancontext) \
     VALUES (gen_random_uuid(), 'order', $1, 'OrderUpdated', jsonb_build_object('seq', $2::int), $3)";

const MAPPING: &str = "
[outbox]
table = \"app.events\"
[outbox.columns]
event_id = \"id\"
aggregate_type = \"aggregatetype\"
aggregate_id = \"aggregateid\"
event_type = \"type\"
payload = \"payload\"
[outbox.header_columns]
tracingspancontext = \"tracingspancontext\"
";

/// Each insert in its own transaction, as a service writes: `aggregates` aggregates,
/// `seq` counting on from `first_seq` within each.
async fn write(db: &TestDb, aggregates: usize, per_aggregate: usize, first_seq: usize) {
    for seq in first_seq..first_seq + per_aggregate {
        for a in 0..aggregates {
            sqlx::query(WRITER)
                .bind(format!("order-{a}"))
                .bind(seq as i32)
                .bind(format!("00-trace{a}-span{seq}-01"))
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }
}

/// `outbox-relay --config CONFIG ARGS...` against the test's database and broker.
fn outbox_relay(db: &TestDb, config: &std::path::Path, args: &[&str]) -> Output {
    relay_command(&db.url, &kafka_bootstrap())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn migrate(db: &TestDb, config: &std::path::Path, args: &[&str]) -> Output {
    outbox_relay(db, config, &[&["migrate"], args].concat())
}

/// `migrate` with `args`, which must succeed and say `said`.
fn migrate_saying(db: &TestDb, config: &std::path::Path, args: &[&str], said: &str) {
    let output = migrate(db, config, args);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains(said),
        "{args:?} should say {said:?}: {}",
        output_text(&output)
    );
}

async fn columns(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = 'app' AND table_name = 'events' ORDER BY ordinal_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// The rows as the oracle compares them: `relay_seq` orders them as the relay does.
async fn rows(db: &TestDb) -> Vec<DbRow> {
    sqlx::query_as::<
        _,
        (
            i64,
            String,
            String,
            String,
            Option<String>,
            String,
            bool,
            Option<i32>,
            Option<i64>,
        ),
    >(
        "SELECT relay_seq, aggregatetype::text, aggregateid::text, type::text, payload::text, \
                id::text, sent_at IS NOT NULL, kafka_partition, kafka_offset \
         FROM app.events ORDER BY relay_seq",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(
        |(
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            event_id,
            sent,
            kafka_partition,
            kafka_offset,
        )| DbRow {
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            event_id,
            sent,
            kafka_partition,
            kafka_offset,
        },
    )
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_shaped_outbox_is_adopted_and_relayed_old_rows_and_new_in_order() {
    let db = TestDb::empty().await;
    sqlx::raw_sql(TABLE).execute(&db.pool).await.unwrap();
    write(&db, 5, 10, 1).await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.order");
    create_topic(&bootstrap, &topic, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, MAPPING).unwrap();

    // The dry run says what it would do, and does nothing.
    let before = columns(&db).await;
    let dry = migrate(&db, &config, &["--dry-run"]);
    assert!(dry.status.success(), "{}", output_text(&dry));
    let plan = String::from_utf8_lossy(&dry.stdout).into_owned();
    for expected in [
        "adoption of app.events",
        "lock: ACCESS EXCLUSIVE on app.events for a moment",
        "no rewrite, no scan",
        "CREATE INDEX CONCURRENTLY",
        "scans the table",
        "50 rows already in app.events will be published",
    ] {
        assert!(
            plan.contains(expected),
            "`{expected}` missing from:\n{plan}"
        );
    }
    assert_eq!(columns(&db).await, before, "a dry run changes nothing");
    let lease_table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('outbox_shard_lease')::text")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(lease_table, None, "a dry run creates nothing");

    // Before the adoption, the relay refuses the table and says what to do.
    let check = outbox_relay(&db, &config, &["check"]);
    assert!(!check.status.success());
    assert!(
        output_text(&check).contains("outbox-relay migrate"),
        "{}",
        output_text(&check)
    );

    let adopted = migrate(&db, &config, &[]);
    assert!(adopted.status.success(), "{}", output_text(&adopted));
    assert!(
        String::from_utf8_lossy(&adopted.stdout).contains("app.events is adopted"),
        "{}",
        output_text(&adopted)
    );
    let after = columns(&db).await;
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "the writer's columns are unchanged"
    );
    // Adopting twice is harmless: nothing to add takes no lock on the replica table, and
    // no doorbell trigger is added unasked.
    let again = migrate(&db, &config, &[]);
    assert!(again.status.success(), "{}", output_text(&again));
    let again = output_text(&again);
    assert!(!again.contains("ALTER TABLE outbox_replica"), "{again}");
    assert!(
        again.contains("no doorbell trigger: an idle relay polls"),
        "{again}"
    );
    // A replica table from an adoption by an earlier version gets the state columns.
    sqlx::query("ALTER TABLE outbox_replica DROP COLUMN state, DROP COLUMN state_reason")
        .execute(&db.pool)
        .await
        .unwrap();
    let upgraded = migrate(&db, &config, &[]);
    let upgraded = output_text(&upgraded);
    assert!(
        upgraded.contains("ALTER TABLE outbox_replica ADD COLUMN IF NOT EXISTS state text"),
        "{upgraded}"
    );
    let state_columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'outbox_replica'::regclass \
         AND attname IN ('state', 'state_reason') AND NOT attisdropped",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(state_columns, 2, "{upgraded}");

    // Half-adopted (rows not proven numbered), the table is refused until migrate is run
    // again, which finishes the job.
    sqlx::query("ALTER TABLE app.events DROP CONSTRAINT events_relay_seq_check")
        .execute(&db.pool)
        .await
        .unwrap();
    let refused = outbox_relay(&db, &config, &["check"]);
    assert!(!refused.status.success());
    assert!(
        output_text(&refused).contains("half-way"),
        "{}",
        output_text(&refused)
    );
    let repaired = migrate(&db, &config, &[]);
    assert!(repaired.status.success(), "{}", output_text(&repaired));

    // The writer goes on, same SQL, as a role that owns nothing and was granted nothing new:
    // the ordering number is taken for it.
    let writer = format!("writer_{}", unique_prefix());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {writer}; GRANT USAGE ON SCHEMA app TO {writer}; \
         GRANT INSERT ON app.events TO {writer}"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut as_writer = db.pool.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL ROLE {writer}"))
        .execute(&mut *as_writer)
        .await
        .unwrap();
    for a in 0..5 {
        sqlx::query(WRITER)
            .bind(format!("order-{a}"))
            .bind(11)
            .bind(format!("00-trace{a}-span11-01"))
            .execute(&mut *as_writer)
            .await
            .expect("a writer without privileges on the relay's sequence inserts");
    }
    as_writer.commit().await.unwrap();
    write(&db, 5, 5, 12).await;
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, MAPPING)).await;
    wait_for("all 80 rows sent", CONDITION_TIMEOUT, || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM app.events WHERE sent_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 80
    })
    .await;
    relay.stop().await;

    let rows = rows(&db).await;
    assert_eq!(rows.len(), 80);
    let records = consume(&bootstrap, &topic, rows.len());
    assert_eq!(assert_contract(&rows, &records), 0, "no duplicates");
    // In the order the writer wrote each aggregate: seq 1, 2, … 16, old rows and new.
    let mut ordered = records.clone();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    for a in 0..5 {
        let aggregate = format!("order-{a}");
        let seqs: Vec<i64> = ordered
            .iter()
            .filter(|r| r.key.as_deref() == Some(aggregate.as_str()))
            .map(|r| {
                let value: serde_json::Value =
                    serde_json::from_str(r.value.as_deref().unwrap()).unwrap();
                value["seq"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(seqs, (1..=16).collect::<Vec<i64>>(), "{aggregate}");
    }
    for record in &records {
        let seq = serde_json::from_str::<serde_json::Value>(record.value.as_deref().unwrap())
            .unwrap()["seq"]
            .as_i64()
            .unwrap();
        let aggregate = record.key.as_deref().unwrap().trim_start_matches("order-");
        assert_eq!(
            record.headers.get("tracingspancontext").map(String::as_str),
            Some(format!("00-trace{aggregate}-span{seq}-01").as_str()),
            "the header column travels as a header"
        );
        assert_eq!(
            record.headers.get("aggregate_type").map(String::as_str),
            Some("order")
        );
        assert_eq!(
            record.headers.get("event_type").map(String::as_str),
            Some("OrderUpdated")
        );
    }

    // Its sent rows are pruned like the relay's own.
    let prune = outbox_relay(&db, &config, &["prune", "--older-than", "0s", "--yes"]);
    assert!(prune.status.success(), "{}", output_text(&prune));
    assert!(
        String::from_utf8_lossy(&prune.stdout).contains("deleted 80 sent rows"),
        "{}",
        output_text(&prune)
    );
}

/// A mapping that names a missing column, or a column of the wrong type, is a
/// configuration error: `check` and `run` exit 2 naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_that_is_missing_or_of_the_wrong_type_exits_2_naming_the_key() {
    let db = TestDb::empty().await;
    sqlx::raw_sql(TABLE).execute(&db.pool).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (mistake, key) in [
        (
            "aggregate_id = \"aggregate_id\"",
            "outbox.columns.aggregate_id",
        ),
        ("event_id = \"type\"", "outbox.columns.event_id"),
    ] {
        let config = dir.path().join("relay.toml");
        let mapping = MAPPING
            .lines()
            .filter(|line| !line.starts_with(mistake.split(' ').next().unwrap()))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("[outbox.columns]", &format!("[outbox.columns]\n{mistake}"));
        std::fs::write(&config, mapping).unwrap();
        for command in ["check", "run"] {
            let output = outbox_relay(&db, &config, &[command]);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{command}: {}",
                output_text(&output)
            );
            assert!(
                output_text(&output).contains(key),
                "{command}: {}",
                output_text(&output)
            );
        }
    }
}

/// Another shape, another writer: a `bytea` payload sent as is, the row's topic in a
/// column, a `jsonb` headers object, the event id from a column default; a row with bad
/// headers is parked, and `status` and `parked list` work on the table too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_shape_with_bytes_a_topic_column_and_headers_is_relayed() {
    let db = TestDb::empty().await;
    sqlx::raw_sql(
        "CREATE TABLE public.my_outbox ( \
           seq bigserial PRIMARY KEY, \
           event_uuid uuid NOT NULL DEFAULT gen_random_uuid(), \
           kind text NOT NULL, entity text NOT NULL, name text NOT NULL, \
           body bytea, dest text, hdrs jsonb)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let (template_topic, own_topic) = (format!("{prefix}.thing"), format!("{prefix}.custom"));
    create_topic(&bootstrap, &template_topic, 3).await;
    create_topic(&bootstrap, &own_topic, 3).await;
    let insert = "INSERT INTO my_outbox (kind, entity, name, body, dest, hdrs) VALUES ($1, $2, $3, $4, $5, $6::jsonb)";
    for i in 0..10u8 {
        let dest = (i % 2 == 0).then(|| own_topic.clone());
        let headers = if i == 7 {
            "[1]".to_string()
        } else {
            format!(r#"{{"traceparent": "00-row{i}"}}"#)
        };
        sqlx::query(insert)
            .bind("thing")
            .bind(format!("entity-{}", i % 3))
            .bind("Changed")
            .bind(vec![0u8, 159, 146, i])
            .bind(dest)
            .bind(headers)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let mapping = "
[outbox]
table = \"my_outbox\"
[outbox.columns]
event_id = \"event_uuid\"
aggregate_type = \"kind\"
aggregate_id = \"entity\"
event_type = \"name\"
payload = \"body\"
headers = \"hdrs\"
topic = \"dest\"
";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, mapping).unwrap();
    let adopted = migrate(&db, &config, &["--notify-trigger", "on"]);
    assert!(adopted.status.success(), "{}", output_text(&adopted));
    // The doorbell tries the sleeper's lock before it calls a function.
    let doorbell_definition = async || -> String {
        sqlx::query_scalar(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'outbox_relay_notify'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let doorbell = doorbell_definition().await;
    assert!(
        doorbell.contains("WHEN ((NOT pg_try_advisory_xact_lock_shared(1868722808"),
        "{doorbell}"
    );
    // A doorbell from before migration 11 (no WHEN clause) is replaced, but not while a
    // transaction holds the table: migrate keeps it then rather than queue the writers.
    let without_when = "DROP TRIGGER outbox_relay_notify ON my_outbox; \
         CREATE TRIGGER outbox_relay_notify AFTER INSERT ON my_outbox FOR EACH STATEMENT \
         EXECUTE FUNCTION outbox_relay_notify('outbox_relay')";
    sqlx::raw_sql(without_when).execute(&db.pool).await.unwrap();
    let reader = db.lock_table("my_outbox", "ACCESS SHARE").await;
    migrate_saying(
        &db,
        &config,
        &["--notify-trigger", "on"],
        "doorbell trigger kept as it was",
    );
    reader.rollback().await.unwrap();
    let quiet = migrate(&db, &config, &["--notify-trigger", "on"]);
    assert!(quiet.status.success(), "{}", output_text(&quiet));
    let doorbell = doorbell_definition().await;
    assert!(
        doorbell.contains("WHEN ((NOT pg_try_advisory"),
        "{doorbell}"
    );
    // The doorbell rings on the adopted table too, while a relay sleeps (holds its lock).
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("outbox_relay").await.unwrap();
    let mut sleeper = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(1868722808, hashtext('outbox_relay'))")
        .execute(&mut *sleeper)
        .await
        .unwrap();
    sqlx::query(insert)
        .bind("thing")
        .bind("entity-rung")
        .bind("Changed")
        .bind(vec![0u8, 159, 146, 11])
        .bind(None::<String>)
        .bind(r#"{"traceparent": "00-row11"}"#)
        .execute(&db.pool)
        .await
        .unwrap();
    let rung = tokio::time::timeout(CONDITION_TIMEOUT, listener.recv())
        .await
        .expect("a notification within the timeout")
        .unwrap();
    assert_eq!(rung.channel(), "outbox_relay");
    drop(listener);
    drop(sleeper);

    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        &format!("on_park = \"skip\"\n{mapping}"),
    ))
    .await;
    let count = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    wait_for("10 rows sent, 1 parked", CONDITION_TIMEOUT, || async {
        count("SELECT count(*) FROM my_outbox WHERE sent_at IS NOT NULL").await == 10
            && count("SELECT count(*) FROM my_outbox WHERE parked_at IS NOT NULL").await == 1
    })
    .await;
    relay.stop().await;

    let mut records = consume(&bootstrap, &template_topic, 5);
    records.extend(consume(&bootstrap, &own_topic, 5));
    assert_eq!(records.len(), 10);
    let uuids: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT event_uuid::text, body FROM my_outbox WHERE sent_at IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for record in &records {
        let id = record.headers.get("id").expect("an id header");
        let (_, body) = uuids
            .iter()
            .find(|(uuid, _)| uuid == id)
            .expect("the id header is the row's event_uuid");
        assert_eq!(
            record.value_bytes.as_deref(),
            Some(body.as_slice()),
            "bytes as they are"
        );
        let i = body[3];
        assert_eq!(
            record.topic,
            if i % 2 == 0 {
                own_topic.as_str()
            } else {
                template_topic.as_str()
            },
            "the row's own topic column, else the template"
        );
        assert_eq!(
            record.headers.get("traceparent").map(String::as_str),
            Some(format!("00-row{i}").as_str())
        );
    }

    let status = outbox_relay(&db, &config, &["status"]);
    assert!(status.status.success(), "{}", output_text(&status));
    let parked = outbox_relay(&db, &config, &["parked", "list"]);
    assert!(parked.status.success(), "{}", output_text(&parked));
    assert!(
        output_text(&parked).contains("bad_headers"),
        "{}",
        output_text(&parked)
    );

    // A plain migrate removes the doorbell; its dry run says so first and changes nothing.
    let doorbells = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'my_outbox'::regclass \
             AND tgname = 'outbox_relay_notify'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    migrate_saying(&db, &config, &["--dry-run"], "removes the doorbell trigger");
    assert_eq!(doorbells().await, 1, "a dry run changes nothing");
    migrate_saying(&db, &config, &[], "doorbell trigger removed");
    assert_eq!(doorbells().await, 0, "a plain migrate removes the doorbell");
}
