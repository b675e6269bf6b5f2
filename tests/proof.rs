//! Proof of delivery, as an operator runs it: `where` says what became of one row and reads
//! its record back, `verify` reads back the records of the sent rows of a time range, and
//! `republish` sends sent rows again. Each is checked against PostgreSQL and what a real
//! consumer reads back from Kafka, never against the relay's own word.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;
use support::*;

/// The header `republish` adds to each record it sends again.
const REPUBLISHED_HEADER: &str = "outbox-relay-republished-at";

/// What one run of the binary printed and how it exited.
struct Ran {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Everything it printed, for failure messages and for messages on either stream.
    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Asserts the exit code, naming the command and its output if it differs.
    fn expect_code(&self, code: i32) -> &Ran {
        assert_eq!(
            self.code,
            Some(code),
            "{:?} exited {:?}, expected {code}:\n{}",
            self.args,
            self.code,
            self.text()
        );
        self
    }

    /// Stdout as one JSON document.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| {
            panic!("{:?} printed no JSON ({err}):\n{}", self.args, self.text())
        })
    }

    /// Stdout's lines, trimmed, without the empty ones.
    fn lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The line of stdout that starts with `prefix`.
    fn line_starting(&self, prefix: &str) -> &str {
        self.lines()
            .into_iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| {
                panic!(
                    "{:?}: no line starts with {prefix:?}:\n{}",
                    self.args,
                    self.text()
                )
            })
    }
}

/// `base` followed by `more`.
fn with<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    [base, more].concat()
}

/// `outbox-relay <args>` on `db` and `bootstrap`, configured as the test's relays are:
/// publishing to `<prefix>.<aggregate_type>`.
fn relay_cli(db: &TestDb, bootstrap: &str, prefix: &str, args: &[&str]) -> Ran {
    let output = relay_command(&db.url, bootstrap)
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .args(args)
        .output()
        .unwrap();
    Ran {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A row's state and marks as the database has them.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Marks {
    id: i64,
    event_id: String,
    shard: i16,
    sent_at: Option<String>,
    kafka_partition: Option<i32>,
    kafka_offset: Option<i64>,
    parked_at: Option<String>,
    park_reason: Option<String>,
    park_error: Option<String>,
    discarded_at: Option<String>,
    discard_reason: Option<String>,
}

/// Every row's state and marks, by id.
async fn marks(db: &TestDb) -> BTreeMap<i64, Marks> {
    sqlx::query_as::<_, Marks>(
        "SELECT id, event_id::text AS event_id, shard, sent_at::text AS sent_at, \
                kafka_partition, kafka_offset, parked_at::text AS parked_at, park_reason, \
                park_error, discarded_at::text AS discarded_at, discard_reason \
         FROM outbox ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|m| (m.id, m))
    .collect()
}

/// The database's clock now, as RFC 3339 in UTC with microseconds.
async fn db_now_rfc3339(db: &TestDb) -> String {
    sqlx::query_scalar(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', \
                        'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// A sent-at bound as RFC 3339 in UTC: `aggregate` (min or max) of the sent rows' sent_at,
/// shifted by `shift`.
async fn sent_at_rfc3339(db: &TestDb, aggregate: &str, shift: &str) -> String {
    sqlx::query_scalar(&format!(
        "SELECT to_char(({aggregate}(sent_at) + $1::interval) AT TIME ZONE 'UTC', \
                        'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
         FROM outbox WHERE sent_at IS NOT NULL"
    ))
    .bind(shift)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Reads `<prefix>.<aggregate_type>` back and checks the contract for the sent rows of that
/// type, duplicates included; returns the records and the number of duplicates.
async fn read_back(
    db: &TestDb,
    bootstrap: &str,
    prefix: &str,
    aggregate_type: &str,
) -> (Vec<Consumed>, usize) {
    let sent: Vec<DbRow> = db
        .rows()
        .await
        .into_iter()
        .filter(|r| r.sent && r.aggregate_type == aggregate_type)
        .collect();
    let records = consume(bootstrap, &format!("{prefix}.{aggregate_type}"), sent.len());
    let duplicates = assert_contract(&sent, &records);
    (records, duplicates)
}

/// Asserts the counts of a JSON report.
fn assert_counts(report: &Value, counts: &[(&str, i64)]) {
    for (key, value) in counts {
        assert_eq!(report[key], *value, "{key} in {report}");
    }
}

/// The problems of a JSON report, by row id.
fn problem_rows(report: &Value) -> BTreeMap<i64, Value> {
    report["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems array in {report}"))
        .iter()
        .map(|p| (p["row_id"].as_i64().expect("row_id"), p.clone()))
        .collect()
}

/// Rows whose per-aggregate sequence numbers start at `first_seq`: `per_aggregate` rows for
/// each of `aggregates` aggregates (`agg-0`, ...), interleaved; each payload names its
/// aggregate and sequence number.
fn batch(
    aggregate_type: &str,
    aggregates: usize,
    first_seq: usize,
    per_aggregate: usize,
) -> Vec<NewRow> {
    (first_seq..first_seq + per_aggregate)
        .flat_map(|seq| {
            (0..aggregates).map(move |a| NewRow::new(aggregate_type, &format!("agg-{a}"), seq))
        })
        .collect()
}

/// A row the relay parks at once: its own topic is not a legal topic name.
fn unpublishable(aggregate_type: &str, aggregate_id: &str) -> NewRow {
    let mut row = NewRow::new(aggregate_type, aggregate_id, 1);
    row.topic = Some("no spaces allowed".into());
    row
}

/// `where` by event id and by row id for a sent row (read back and verified), a parked row,
/// a row pending behind it on a shard a live replica holds, a row pending with no relay
/// running, a discarded row, an event nobody wrote and an argument that is neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_names_each_rows_state_and_verifies_a_sent_row_against_the_broker() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    for aggregate_type in ["orders", "users"] {
        create_topic(&bootstrap, &format!("{prefix}.{aggregate_type}"), 3).await;
    }
    let mut rows = batch("orders", 4, 1, 5);
    rows.extend(batch("users", 3, 1, 4));
    rows.push(unpublishable("orders", "hopeless"));
    rows.push(NewRow::new("orders", "hopeless", 2));
    let ids = db.insert(&rows).await;
    let (parked_id, held_id) = (ids[32], ids[33]);

    let replica = format!("proof-{prefix}");
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        &format!("replica_id = \"{replica}\"\n"),
    ))
    .await;
    wait_for("32 rows sent and 1 parked", CONDITION_TIMEOUT, || async {
        db.sent().await == 32 && db.count("parked_at IS NOT NULL").await == 1
    })
    .await;
    let (orders, _) = read_back(&db, &bootstrap, &prefix, "orders").await;
    read_back(&db, &bootstrap, &prefix, "users").await;
    let state = marks(&db).await;

    // A sent row, by event id: where it went, and the record there is that row's.
    let sent = &state[&ids[5]];
    let (partition, offset) = (sent.kafka_partition.unwrap(), sent.kafka_offset.unwrap());
    let record = orders
        .iter()
        .find(|r| r.partition == partition && r.offset == offset)
        .expect("a record where the row is marked");
    assert_eq!(record.headers["id"], sent.event_id);
    let ran = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &sent.event_id, "--verify"],
    );
    ran.expect_code(0);
    assert_eq!(
        ran.lines()[0],
        format!("event {} (row {}): sent", sent.event_id, sent.id),
        "{}",
        ran.text()
    );
    ran.line_starting("sent at ");
    assert!(
        ran.lines().iter().any(|l| l.contains(&format!(
            "topic {prefix}.orders partition {partition} offset {offset}"
        ))),
        "{}",
        ran.text()
    );
    ran.line_starting("verified:");

    // The same row by row id, as JSON.
    let ran = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &sent.id.to_string(), "--verify", "--json"],
    );
    let json = ran.expect_code(0).json();
    assert_eq!(json["row_id"], sent.id, "{json}");
    assert_eq!(json["event_id"], sent.event_id.as_str(), "{json}");
    assert_eq!(json["state"], "sent", "{json}");
    assert_eq!(json["shard"], sent.shard, "{json}");
    assert_eq!(json["topic"], format!("{prefix}.orders"), "{json}");
    assert_eq!(json["partition"], partition, "{json}");
    assert_eq!(json["offset"], offset, "{json}");
    assert!(json["sent_at"].is_string(), "{json}");
    assert!(json["parked_at"].is_null(), "{json}");
    assert!(json["discarded_at"].is_null(), "{json}");
    assert_eq!(json["verified"]["result"], "found", "{json}");

    // The parked row: its reason and its error, as stored.
    let parked = &state[&parked_id];
    assert_eq!(parked.park_reason.as_deref(), Some("invalid_topic"));
    let ran = relay_cli(&db, &bootstrap, &prefix, &["where", &parked.event_id]);
    ran.expect_code(0);
    assert_eq!(
        ran.lines()[0],
        format!("event {} (row {}): parked", parked.event_id, parked.id),
        "{}",
        ran.text()
    );
    assert!(
        ran.line_starting("parked at").contains("invalid_topic"),
        "{}",
        ran.text()
    );
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &parked.event_id, "--json"],
    )
    .expect_code(0)
    .json();
    assert_eq!(json["state"], "parked", "{json}");
    assert_eq!(json["park_reason"], "invalid_topic", "{json}");
    assert_eq!(
        json["park_error"].as_str(),
        parked.park_error.as_deref(),
        "{json}"
    );
    assert!(json["parked_at"].is_string(), "{json}");
    assert!(json["sent_at"].is_null(), "{json}");
    assert!(json["verified"].is_null(), "{json}");

    // The row held behind it is pending, on a shard the running replica holds.
    let held = &state[&held_id];
    let owner: Option<String> =
        sqlx::query_scalar("SELECT owner FROM outbox_shard_lease WHERE shard = $1")
            .bind(held.shard)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(owner.as_deref(), Some(replica.as_str()));
    let ran = relay_cli(&db, &bootstrap, &prefix, &["where", &held.event_id]);
    ran.expect_code(0);
    assert_eq!(
        ran.lines()[0],
        format!("event {} (row {}): pending", held.event_id, held.id),
        "{}",
        ran.text()
    );
    assert!(
        ran.lines().contains(
            &format!(
                "pending in shard {}, owned by replica {replica}",
                held.shard
            )
            .as_str()
        ),
        "{}",
        ran.text()
    );
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &held.event_id, "--json"],
    )
    .expect_code(0)
    .json();
    assert_eq!(json["state"], "pending", "{json}");
    assert_eq!(json["shard"], held.shard, "{json}");
    assert_eq!(json["owner"], replica.as_str(), "{json}");
    relay.stop().await;

    // A row written while no relay runs: pending, on a shard nobody holds.
    let late_id = db.insert(&[NewRow::new("users", "late", 1)]).await[0];
    let late = marks(&db).await[&late_id].clone();
    let ran = relay_cli(&db, &bootstrap, &prefix, &["where", &late.event_id]);
    ran.expect_code(0);
    assert_eq!(
        ran.lines()[0],
        format!("event {} (row {late_id}): pending", late.event_id),
        "{}",
        ran.text()
    );
    assert!(
        ran.lines()
            .contains(&format!("pending in shard {}, owned by no replica", late.shard).as_str()),
        "{}",
        ran.text()
    );
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &late_id.to_string(), "--json"],
    )
    .expect_code(0)
    .json();
    assert_eq!(json["state"], "pending", "{json}");
    assert_eq!(json["event_id"], late.event_id.as_str(), "{json}");
    assert_eq!(json["shard"], late.shard, "{json}");
    assert!(json["owner"].is_null(), "{json}");
    assert!(json["sent_at"].is_null(), "{json}");

    // The parked row given up on: discarded, with the reason.
    relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &[
            "parked",
            "discard",
            &parked_id.to_string(),
            "--reason",
            "proof: bad topic",
        ],
    )
    .expect_code(0);
    let ran = relay_cli(&db, &bootstrap, &prefix, &["where", &parked.event_id]);
    ran.expect_code(0);
    assert_eq!(
        ran.lines()[0],
        format!("event {} (row {parked_id}): discarded", parked.event_id),
        "{}",
        ran.text()
    );
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &parked.event_id, "--json"],
    )
    .expect_code(0)
    .json();
    assert_eq!(json["state"], "discarded", "{json}");
    assert_eq!(json["discard_reason"], "proof: bad topic", "{json}");
    assert!(json["discarded_at"].is_string(), "{json}");

    // An event nobody wrote, a row id nobody has, and neither.
    let stranger = uuid::Uuid::new_v4().to_string();
    let ran = relay_cli(&db, &bootstrap, &prefix, &["where", &stranger]);
    ran.expect_code(1);
    assert!(
        ran.stderr.contains("no row") && ran.stderr.contains(&stranger),
        "{}",
        ran.text()
    );
    let ran = relay_cli(&db, &bootstrap, &prefix, &["where", "987654321"]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("no row"), "{}", ran.text());
    let ran = relay_cli(&db, &bootstrap, &prefix, &["where", "row-five"]);
    ran.expect_code(2);
    assert!(ran.text().contains("row-five"), "{}", ran.text());
}

/// `verify` finds every sent row where it is recorded (all of them, a sample, a time
/// range); a row whose offset now names another row's record is reported as different and
/// a row whose payload was rewritten after it was sent as changed (not a loss), and only
/// they; bad arguments exit 2 naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_sent_rows_where_recorded_and_names_exactly_the_rows_made_different() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    for aggregate_type in ["orders", "users"] {
        create_topic(&bootstrap, &format!("{prefix}.{aggregate_type}"), 3).await;
    }
    let mut rows = batch("orders", 5, 1, 6);
    rows.extend(batch("users", 3, 1, 5));
    db.insert(&rows).await;
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("45 rows sent", CONDITION_TIMEOUT, || async {
        db.sent().await == 45
    })
    .await;
    relay.stop().await;
    read_back(&db, &bootstrap, &prefix, "orders").await;
    read_back(&db, &bootstrap, &prefix, "users").await;

    let json = relay_cli(&db, &bootstrap, &prefix, &["verify", "--all", "--json"])
        .expect_code(0)
        .json();
    assert_counts(
        &json,
        &[
            ("checked", 45),
            ("found", 45),
            ("missing", 0),
            ("different", 0),
            ("unverifiable", 0),
        ],
    );
    assert!(problem_rows(&json).is_empty(), "{json}");
    let ran = relay_cli(&db, &bootstrap, &prefix, &["verify", "--all"]);
    ran.expect_code(0);
    let summary = ran.line_starting("checked 45 sent rows");
    assert!(
        summary.contains("45 found where recorded, 0 missing, 0 different")
            && summary.contains("0 unverifiable"),
        "{}",
        ran.text()
    );

    // A sample checks that many rows; a range checks the rows sent within it.
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["verify", "--sample", "7", "--json"],
    )
    .expect_code(0)
    .json();
    assert_counts(&json, &[("checked", 7), ("found", 7)]);
    let (first, last) = (
        sent_at_rfc3339(&db, "min", "-1 second").await,
        sent_at_rfc3339(&db, "max", "1 second").await,
    );
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &[
            "verify", "--all", "--since", &first, "--until", &last, "--json",
        ],
    )
    .expect_code(0)
    .json();
    assert_counts(&json, &[("checked", 45), ("found", 45)]);
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["verify", "--all", "--until", &first, "--json"],
    )
    .expect_code(0)
    .json();
    assert_eq!(json["checked"], 0, "rows sent after --until: {json}");
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &[
            "verify", "--all", "--since", "2h", "--until", "1h", "--json",
        ],
    )
    .expect_code(0)
    .json();
    assert_eq!(json["checked"], 0, "nothing was sent an hour ago: {json}");

    // Row a now names row b's offset (another record is there: different); row c's payload
    // was rewritten after it was sent (its record is still its event: changed, no loss).
    let state = marks(&db).await;
    let rows = db.rows().await;
    let orders: Vec<&DbRow> = rows
        .iter()
        .filter(|r| r.aggregate_type == "orders")
        .collect();
    let (a, b) = orders
        .iter()
        .flat_map(|a| orders.iter().map(move |b| (*a, *b)))
        .find(|(a, b)| a.kafka_partition == b.kafka_partition && a.kafka_offset != b.kafka_offset)
        .expect("two orders rows on one partition");
    let c = rows
        .iter()
        .find(|r| r.aggregate_type == "users")
        .expect("a users row");
    sqlx::query("UPDATE outbox SET kafka_offset = $1 WHERE id = $2")
        .bind(b.kafka_offset)
        .bind(a.id)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(r#"UPDATE outbox SET payload = '{"tampered": true}' WHERE id = $1"#)
        .bind(c.id)
        .execute(&db.pool)
        .await
        .unwrap();

    let ran = relay_cli(&db, &bootstrap, &prefix, &["verify", "--all", "--json"]);
    let json = ran.expect_code(1).json();
    assert_counts(
        &json,
        &[
            ("checked", 45),
            ("found", 43),
            ("missing", 0),
            ("different", 1),
            ("changed", 1),
            ("unverifiable", 0),
        ],
    );
    let problems = problem_rows(&json);
    assert_eq!(
        problems.keys().copied().collect::<Vec<_>>(),
        {
            let mut expected = vec![a.id, c.id];
            expected.sort();
            expected
        },
        "{json}"
    );
    for (row, result, topic, offset) in [
        (a, "different", format!("{prefix}.orders"), b.kafka_offset),
        (c, "changed", format!("{prefix}.users"), c.kafka_offset),
    ] {
        let problem = &problems[&row.id];
        assert_eq!(problem["result"], result, "{problem}");
        assert_eq!(problem["event_id"], row.event_id.as_str(), "{problem}");
        assert_eq!(problem["topic"], topic, "{problem}");
        assert_eq!(
            problem["partition"],
            row.kafka_partition.unwrap(),
            "{problem}"
        );
        assert_eq!(problem["offset"], offset.unwrap(), "{problem}");
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{problem}"
        );
    }
    let ran = relay_cli(&db, &bootstrap, &prefix, &["verify", "--all"]);
    ran.expect_code(1);
    let summary = ran.line_starting("checked 45 sent rows");
    assert!(
        summary.contains("43 found where recorded, 0 missing, 1 different")
            && summary.contains("0 unverifiable, 1 changed since sent"),
        "{}",
        ran.text()
    );
    for row in [a, c] {
        assert!(
            ran.lines()
                .iter()
                .any(|l| l.contains(&format!("row {}", row.id))
                    && l.contains(&format!("event {}", row.event_id))),
            "row {} not named:\n{}",
            row.id,
            ran.text()
        );
    }
    // Row b may be named in a's detail, as the record found at a's offset.
    for other in state
        .values()
        .filter(|m| ![a.id, b.id, c.id].contains(&m.id))
    {
        assert!(
            !ran.stdout.contains(&other.event_id),
            "row {} named though found:\n{}",
            other.id,
            ran.text()
        );
    }

    // `where --verify` agrees, row by row.
    let ran = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &a.event_id, "--verify"],
    );
    ran.expect_code(1);
    ran.line_starting("NOT verified: different");
    let json = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &c.event_id, "--verify", "--json"],
    )
    .expect_code(0)
    .json();
    assert_eq!(json["verified"]["result"], "changed", "{json}");
    let ran = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["where", &b.event_id, "--verify"],
    );
    ran.expect_code(0);
    ran.line_starting("verified:");

    // Bad arguments exit 2 naming the argument.
    for (args, named) in [
        (
            &["verify", "--since", "yesterday-ish"][..],
            &["--since"][..],
        ),
        (&["verify", "--sample", "0"][..], &["--sample"][..]),
        (
            &["verify", "--sample", "5", "--all"][..],
            &["--sample", "--all"][..],
        ),
    ] {
        let ran = relay_cli(&db, &bootstrap, &prefix, args);
        ran.expect_code(2);
        for name in named {
            assert!(
                ran.text().contains(name),
                "{args:?} does not name {name}:\n{}",
                ran.text()
            );
        }
    }
}

/// Against a broker that has the topic but none of its records, every sent row is missing,
/// by `verify` and by `where --verify`; against the broker that has them, none is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_against_a_broker_without_the_records_finds_every_sent_row_missing() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.orders");
    create_topic(&bootstrap, &topic, 3).await;
    db.insert(&batch("orders", 4, 1, 3)).await;
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("12 rows sent", CONDITION_TIMEOUT, || async {
        db.sent().await == 12
    })
    .await;
    relay.stop().await;
    read_back(&db, &bootstrap, &prefix, "orders").await;
    let rows = db.rows().await;
    relay_cli(&db, &bootstrap, &prefix, &["verify", "--all"]).expect_code(0);

    let fresh = Tansu::start();
    create_topic(&fresh.bootstrap, &topic, 3).await;
    assert!(consume(&fresh.bootstrap, &topic, 0).is_empty());
    let json = relay_cli(
        &db,
        &fresh.bootstrap,
        &prefix,
        &["verify", "--all", "--json"],
    )
    .expect_code(1)
    .json();
    assert_counts(
        &json,
        &[
            ("checked", 12),
            ("found", 0),
            ("missing", 12),
            ("different", 0),
            ("unverifiable", 0),
        ],
    );
    let problems = problem_rows(&json);
    assert_eq!(
        problems.keys().copied().collect::<Vec<_>>(),
        rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        "{json}"
    );
    for row in &rows {
        let problem = &problems[&row.id];
        assert_eq!(problem["result"], "missing", "{problem}");
        assert_eq!(problem["event_id"], row.event_id.as_str(), "{problem}");
        assert_eq!(problem["topic"], topic.as_str(), "{problem}");
        assert_eq!(
            problem["partition"],
            row.kafka_partition.unwrap(),
            "{problem}"
        );
        assert_eq!(problem["offset"], row.kafka_offset.unwrap(), "{problem}");
    }
    let ran = relay_cli(&db, &fresh.bootstrap, &prefix, &["verify", "--all"]);
    ran.expect_code(1);
    assert!(
        ran.line_starting("checked 12 sent rows")
            .contains("0 found where recorded, 12 missing, 0 different"),
        "{}",
        ran.text()
    );
    let ran = relay_cli(
        &db,
        &fresh.bootstrap,
        &prefix,
        &["where", &rows[0].event_id, "--verify"],
    );
    ran.expect_code(1);
    ran.line_starting("NOT verified: missing");
    let json = relay_cli(
        &db,
        &fresh.bootstrap,
        &prefix,
        &["where", &rows[0].event_id, "--verify", "--json"],
    )
    .expect_code(1)
    .json();
    assert_eq!(json["verified"]["result"], "missing", "{json}");
}

/// `republish` of an id range to a topic of its own: refused without a start or a topic
/// that exists, a dry run sends nothing, then the sent rows of the range (and only they)
/// arrive in id order per aggregate with the key, value and headers they were sent with
/// plus the republished header; pending, parked and discarded rows of the range are skipped
/// and counted, and no row's marks or state change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_to_a_new_topic_resends_the_sent_rows_of_an_id_range_in_order_and_keeps_the_marks()
 {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.orders");
    let replay = format!("{prefix}.replay");
    create_topic(&bootstrap, &topic, 3).await;
    create_topic(&bootstrap, &replay, 3).await;
    let stream_rows = batch("orders", 4, 1, 8);
    let mut rows: Vec<NewRow> = stream_rows[..10].to_vec();
    rows.push(unpublishable("orders", "hopeless"));
    rows.push(NewRow::new("orders", "hopeless", 2));
    rows.push(unpublishable("orders", "doomed"));
    rows.extend_from_slice(&stream_rows[10..]);
    let ids = db.insert(&rows).await;
    let (parked_id, held_id, discarded_id) = (ids[10], ids[11], ids[12]);
    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("32 rows sent and 2 parked", CONDITION_TIMEOUT, || async {
        db.sent().await == 32 && db.count("parked_at IS NOT NULL").await == 2
    })
    .await;
    relay.stop().await;
    relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &[
            "parked",
            "discard",
            &discarded_id.to_string(),
            "--reason",
            "proof",
        ],
    )
    .expect_code(0);
    let (originals, _) = read_back(&db, &bootstrap, &prefix, "orders").await;
    let before = marks(&db).await;
    assert!(before[&parked_id].parked_at.is_some() && before[&parked_id].discarded_at.is_none());
    assert!(before[&held_id].sent_at.is_none() && before[&held_id].parked_at.is_none());
    assert!(before[&discarded_id].discarded_at.is_some());

    // Rows 2..=32 of 35: the first two and the last two sent rows are outside.
    let (from, to) = (ids[2], ids[ids.len() - 3]);
    let in_range: Vec<&Marks> = before
        .values()
        .filter(|m| (from..=to).contains(&m.id) && m.sent_at.is_some())
        .collect();
    assert_eq!(in_range.len(), 28);
    let (from, to) = (from.to_string(), to.to_string());
    let range = ["republish", "--from-id", &from, "--to-id", &to];

    // Refused: no start, a topic that does not exist, the original topics without --yes.
    relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &["republish", "--to-topic", &replay],
    )
    .expect_code(2);
    let absent = format!("{prefix}.absent");
    let ran = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &with(&range, &["--to-topic", &absent]),
    );
    ran.expect_code(1);
    assert!(ran.text().contains(&absent), "{}", ran.text());
    let ran = relay_cli(&db, &bootstrap, &prefix, &range);
    ran.expect_code(2);
    assert!(
        ran.text().contains("--yes") && ran.text().contains("duplicates"),
        "{}",
        ran.text()
    );

    // Dry runs count and send nothing: the range, and everything from its start on (the
    // last two sent rows too).
    for (args, count) in [
        (with(&range, &["--to-topic", &replay, "--dry-run"]), 28),
        (
            vec![
                "republish",
                "--from-id",
                &from,
                "--to-topic",
                &replay,
                "--dry-run",
            ],
            30,
        ),
    ] {
        let ran = relay_cli(&db, &bootstrap, &prefix, &args);
        ran.expect_code(0);
        let last = *ran.lines().last().expect("a line");
        assert!(
            last.starts_with(&format!("--dry-run: would re-send {count} rows"))
                && last.contains("skipped 1 pending, 1 parked, 1 discarded"),
            "{args:?}:\n{}",
            ran.text()
        );
    }
    assert!(
        consume(&bootstrap, &replay, 0).is_empty(),
        "the dry runs sent records"
    );

    let started = chrono::Utc::now();
    let ran = relay_cli(
        &db,
        &bootstrap,
        &prefix,
        &with(&range, &["--to-topic", &replay]),
    );
    let finished = chrono::Utc::now();
    ran.expect_code(0);
    let last = *ran.lines().last().expect("a line");
    assert!(
        last.starts_with("re-sent 28 rows")
            && last.contains("skipped 1 pending, 1 parked, 1 discarded"),
        "{}",
        ran.text()
    );

    // On the new topic: each sent row of the range once, as it was first sent.
    let republished = consume(&bootstrap, &replay, 28);
    assert_eq!(republished.len(), 28, "each row once: {republished:?}");
    let expected: HashSet<&str> = in_range.iter().map(|m| m.event_id.as_str()).collect();
    let got: HashSet<&str> = republished
        .iter()
        .map(|r| r.headers["id"].as_str())
        .collect();
    assert_eq!(got, expected);
    let original_of: HashMap<&str, &Consumed> = originals
        .iter()
        .map(|r| (r.headers["id"].as_str(), r))
        .collect();
    for record in &republished {
        let original = original_of[record.headers["id"].as_str()];
        assert_eq!(
            record.key, original.key,
            "key of {}",
            original.headers["id"]
        );
        assert_eq!(
            record.value_bytes, original.value_bytes,
            "value of {}",
            original.headers["id"]
        );
        let mut headers = record.headers.clone();
        let at = headers
            .remove(REPUBLISHED_HEADER)
            .unwrap_or_else(|| panic!("no {REPUBLISHED_HEADER} header on {record:?}"));
        let at = chrono::DateTime::parse_from_rfc3339(&at)
            .unwrap_or_else(|err| panic!("{REPUBLISHED_HEADER} {at:?} is not RFC 3339: {err}"));
        assert!(
            at.with_timezone(&chrono::Utc) >= started - chrono::TimeDelta::seconds(1)
                && at.with_timezone(&chrono::Utc) <= finished + chrono::TimeDelta::seconds(1),
            "{REPUBLISHED_HEADER} {at} is outside the run ({started} to {finished})"
        );
        assert_eq!(
            headers, original.headers,
            "the headers it was sent with, and only the one more"
        );
    }
    // In id order per aggregate, each aggregate on one partition.
    let id_of: HashMap<&str, i64> = before
        .values()
        .map(|m| (m.event_id.as_str(), m.id))
        .collect();
    let mut ordered: Vec<&Consumed> = republished.iter().collect();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    let mut last_of: HashMap<&str, (i32, i64)> = HashMap::new();
    for record in ordered {
        let key = record.key.as_deref().expect("a key");
        let id = id_of[record.headers["id"].as_str()];
        if let Some((partition, previous)) = last_of.insert(key, (record.partition, id)) {
            assert_eq!(
                partition, record.partition,
                "aggregate {key} spans partitions"
            );
            assert!(
                previous < id,
                "aggregate {key}: row {id} after row {previous}"
            );
        }
    }

    // Nothing more on the original topic, and no row's marks or state changed.
    let again = consume(&bootstrap, &topic, 32);
    assert_eq!(again.len(), 32, "records added to the original topic");
    assert_eq!(marks(&db).await, before);
}

/// `republish` without `--to-topic` sends rows again to each one's own topic, only with
/// `--yes`: the rows of one aggregate sent since a time, on both of its topics, each after
/// every original; the marks still name the originals, so `verify` finds every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_to_the_original_topics_needs_yes_and_resends_only_the_aggregates_rows_sent_since()
 {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let types = ["orders", "users"];
    for aggregate_type in types {
        create_topic(&bootstrap, &format!("{prefix}.{aggregate_type}"), 3).await;
    }
    let settings = || template_settings(&db, &bootstrap, &prefix, "");
    let mut first = batch("orders", 3, 1, 3);
    first.extend(batch("users", 3, 1, 2));
    db.insert(&first).await;
    let relay = RunningRelay::start(settings()).await;
    wait_for("the first 15 rows sent", CONDITION_TIMEOUT, || async {
        db.sent().await == 15
    })
    .await;
    relay.stop().await;
    let since = db_now_rfc3339(&db).await;
    let mut second = batch("orders", 3, 4, 4);
    second.extend(batch("users", 3, 3, 4));
    let second_ids: HashSet<i64> = db.insert(&second).await.into_iter().collect();
    let relay = RunningRelay::start(settings()).await;
    wait_for("all 39 rows sent", CONDITION_TIMEOUT, || async {
        db.sent().await == 39
    })
    .await;
    relay.stop().await;
    let before = marks(&db).await;
    let rows = db.rows().await;
    let chosen: HashSet<&str> = rows
        .iter()
        .filter(|r| r.aggregate_id == "agg-1" && second_ids.contains(&r.id))
        .map(|r| r.event_id.as_str())
        .collect();
    assert_eq!(chosen.len(), 8);

    let selection = ["republish", "--since", &since, "--aggregate", "agg-1"];
    let ran = relay_cli(&db, &bootstrap, &prefix, &selection);
    ran.expect_code(2);
    assert!(ran.text().contains("--yes"), "{}", ran.text());
    let ran = relay_cli(&db, &bootstrap, &prefix, &with(&selection, &["--yes"]));
    ran.expect_code(0);
    assert!(
        ran.lines()
            .last()
            .is_some_and(|l| l.starts_with("re-sent 8 rows")),
        "{}",
        ran.text()
    );

    let id_of: HashMap<&str, i64> = rows.iter().map(|r| (r.event_id.as_str(), r.id)).collect();
    for aggregate_type in types {
        // The contract still holds on each topic, with exactly the rows re-sent as duplicates
        // (so the run refused for want of --yes sent nothing).
        let (records, duplicates) = read_back(&db, &bootstrap, &prefix, aggregate_type).await;
        assert_eq!(duplicates, 4, "{aggregate_type}: duplicates");
        let (copies, firsts): (Vec<&Consumed>, Vec<&Consumed>) = records
            .iter()
            .partition(|r| r.headers.contains_key(REPUBLISHED_HEADER));
        let copied: HashSet<&str> = copies.iter().map(|r| r.headers["id"].as_str()).collect();
        assert_eq!(
            (copies.len(), copied.len()),
            (4, 4),
            "{aggregate_type}: {copies:?}"
        );
        assert!(
            copied.is_subset(&chosen),
            "{aggregate_type}: {copied:?} re-sent"
        );
        let by_event: HashMap<&str, &Consumed> = firsts
            .iter()
            .map(|r| (r.headers["id"].as_str(), *r))
            .collect();
        assert_eq!(
            by_event.len(),
            firsts.len(),
            "{aggregate_type}: a first send twice"
        );
        let last_original = firsts
            .iter()
            .filter(|r| r.key.as_deref() == Some("agg-1"))
            .map(|r| r.offset)
            .max()
            .unwrap();
        let mut copies = copies;
        copies.sort_by_key(|r| r.offset);
        let mut previous = 0;
        for copy in copies {
            let event = copy.headers["id"].as_str();
            let original = by_event[event];
            let row = &before[&id_of[event]];
            assert_eq!(
                (row.kafka_partition, row.kafka_offset),
                (Some(original.partition), Some(original.offset)),
                "the mark names the first send"
            );
            assert_eq!(
                (&copy.key, &copy.value_bytes),
                (&original.key, &original.value_bytes)
            );
            assert_eq!(
                copy.partition, original.partition,
                "the aggregate's partition"
            );
            assert!(copy.offset > last_original, "a copy among the originals");
            assert!(previous < row.id, "copies out of id order");
            previous = row.id;
        }
    }
    assert_eq!(marks(&db).await, before);
    let json = relay_cli(&db, &bootstrap, &prefix, &["verify", "--all", "--json"])
        .expect_code(0)
        .json();
    assert_counts(&json, &[("checked", 39), ("found", 39)]);
}
