//! The `outbox-relay` binary as an operator runs it: exit codes, messages that name the
//! key, `migrate`, `check`, SIGTERM draining and a kill -9 in mid-stream.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    /// (config file, environment, key the message must name, what the case is)
    type Case = (
        &'static str,
        Vec<(&'static str, &'static str)>,
        &'static str,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "[relay]\nbatch_sise = 10\n",
            vec![],
            "relay.batch_sise",
            "unknown key in the file",
        ),
        (
            "",
            vec![("OUTBOX_RELAY_RELAY__BATCH_SIZE", "lots")],
            "relay.batch_size",
            "invalid value from the environment",
        ),
        (
            "",
            vec![("OUTBOX_RELAY_RELAY__BATCH_SIZE", "0")],
            "relay.batch_size",
            "out of range",
        ),
        (
            "[relay]\nmode = \"archive\"\n",
            vec![],
            "relay.mode",
            "unknown mode",
        ),
        (
            "[kafka.properties]\n\"acks\" = \"1\"\n",
            vec![],
            "acks",
            "weaker acks",
        ),
        (
            "[kafka.properties]\n\"enable.idempotence\" = false\n",
            vec![],
            "enable.idempotence",
            "idempotence off",
        ),
        (
            "[kafka.properties]\n\"message.timeout.ms\" = 30000\n",
            vec![],
            "message.timeout.ms",
            "finite message timeout",
        ),
        (
            "[relay]\ntopic_template = \"events.{tenant}\"\n",
            vec![],
            "relay.topic_template",
            "unknown placeholder",
        ),
        (
            "[database]\nurl = \"mysql://x\"\n",
            vec![("OUTBOX_RELAY_DATABASE__URL", "mysql://x")],
            "database.url",
            "wrong scheme",
        ),
        (
            "",
            vec![("OUTBOX_RELAY_RELAY__NONSENSE", "1")],
            "relay.nonsense",
            "unknown environment key",
        ),
        (
            "[relay]\naudit_sample_rate = 1.5\n",
            vec![],
            "relay.audit_sample_rate",
            "an audit share above 1",
        ),
        (
            "[relay]\nmode = \"delete\"\naudit_sample_rate = 0.01\n",
            vec![],
            "relay.audit_sample_rate",
            "an audit in delete mode, which keeps no offsets",
        ),
    ];
    for (i, (file, env, key, what)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, file).unwrap();
        let mut command = relay_command("postgres://relay:hunter2@127.0.0.1:1/app", "127.0.0.1:1");
        command.arg("--config").arg(&path).arg("run");
        for (k, v) in env {
            command.env(k, v);
        }
        let output = command.output().unwrap();
        let text = output_text(&output);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{what}: expected exit 2, got {text}"
        );
        assert!(
            text.contains(key),
            "{what}: message does not name `{key}`: {text}"
        );
        assert!(
            !text.contains("hunter2"),
            "{what}: the password leaked: {text}"
        );
    }

    // A missing database.url and a --config that does not exist.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let output = Command::new(relay_bin())
        .env_clear()
        .arg("--config")
        .arg(&empty)
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output_text(&output).contains("database.url"));
    let output = Command::new(relay_bin())
        .env_clear()
        .env("OUTBOX_RELAY_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .args(["--config", "/nonexistent/relay.toml", "run"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output_text(&output).contains("/nonexistent/relay.toml"));
}

/// A one-shot command whose output pipe is closed (`outbox-relay check | head -0`) ends on
/// SIGPIPE like other command-line tools, never with a panic.
#[test]
fn a_closed_output_pipe_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    // Closed before the command starts, so its very first print meets a closed pipe.
    drop(reader);
    let output = relay_command("postgres://relay@127.0.0.1:1/app", "127.0.0.1:1")
        .args(["check", "--timeout", "1s"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGPIPE),
        "expected the end of a pipeline, got {:?}: {stderr}",
        output.status
    );
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["migrate", "--help"],
        vec!["check", "--help"],
        vec!["where", "--help"],
        vec!["verify", "--help"],
        vec!["republish", "--help"],
    ] {
        let output = Command::new(relay_bin()).args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_table_and_check_reports_both_sides() {
    let db = TestDb::empty().await;
    let bootstrap = kafka_bootstrap();
    // A password in the URL (trust authentication ignores it) must never be printed.
    let url = db.url.replace("postgres@", "postgres:hunter2@");

    // `migrate` with these arguments, which must succeed; what it printed.
    let migrate = |args: &[&str]| {
        let output = relay_command(&url, &bootstrap)
            .arg("migrate")
            .args(args)
            .output()
            .unwrap();
        let text = output_text(&output);
        assert!(output.status.success(), "{text}");
        text
    };

    // A plain migrate installs no trigger: the writers pay nothing, the idle relay polls.
    let text = migrate(&[]);
    assert!(
        text.contains("no doorbell trigger: an idle relay polls for new rows every 10ms"),
        "{text}"
    );
    let triggers = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_notify' AND NOT tgisinternal",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(triggers().await, 0);
    let text = migrate(&["--notify-trigger", "on"]);
    assert!(
        text.contains("doorbell trigger installed (channel outbox_relay)"),
        "{text}"
    );
    assert_eq!(triggers().await, 1);
    // Run again, it says what it found rather than what it did the first time.
    let again = migrate(&["--notify-trigger", "on"]);
    assert!(
        again.contains("no migration to apply")
            && again.contains("doorbell trigger already in place (channel outbox_relay)")
            && !again.contains("installed")
            && !again.contains("already exists, skipping"),
        "{again}"
    );
    assert_eq!(triggers().await, 1);
    // Its dry run says so first, and changes nothing.
    let dry = migrate(&["--dry-run"]);
    assert!(
        dry.contains("the doorbell trigger on outbox would be removed"),
        "{dry}"
    );
    assert_eq!(triggers().await, 1);
    // A plain migrate removes it again, and applying the migrations changes nothing else.
    let text = migrate(&[]);
    assert!(text.contains("doorbell trigger removed"), "{text}");
    assert_eq!(triggers().await, 0);

    // `check` shows the size limit of the template's topics, as the relay learns it.
    let prefix = unique_prefix();
    create_topic_with(
        &bootstrap,
        &format!("{prefix}.limited"),
        1,
        &[("max.message.bytes", "123456")],
    )
    .await;
    let output = relay_command(&url, &bootstrap)
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .arg("check")
        .output()
        .unwrap();
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains(&format!("topic {prefix}.limited: max.message.bytes 123456")),
        "{text}"
    );
    assert!(text.contains("outbox table present"), "{text}");
    assert!(
        text.contains(
            "no doorbell trigger on outbox (the default): an idle relay polls every 10ms"
        ) && !text.contains("warning: no doorbell trigger"),
        "{text}"
    );
    // Polling seldom without a trigger leaves rows after a quiet spell waiting: called out.
    let output = relay_command(&url, &bootstrap)
        .env("OUTBOX_RELAY_RELAY__POLL_INTERVAL", "1s")
        .args(["check", "--timeout", "5s"])
        .output()
        .unwrap();
    let slow = output_text(&output);
    assert!(
        slow.contains("warning: no doorbell trigger on outbox and relay.poll_interval = 1s"),
        "{slow}"
    );
    assert!(text.contains("brokers"), "{text}");
    assert!(
        !text.contains("hunter2"),
        "password printed by check: {text}"
    );

    // With the doorbell back, `check` says which channel it notifies; a trigger left from
    // before migration 9 (notifying at every insert) is called out.
    migrate(&["--notify-trigger", "on"]);
    let check = || {
        let output = relay_command(&url, &bootstrap)
            .args(["check", "--timeout", "5s"])
            .output()
            .unwrap();
        output_text(&output)
    };
    let text = check();
    assert!(
        text.contains("doorbell trigger notifies channel outbox_relay while the relay sleeps"),
        "{text}"
    );
    // The trigger before migration 11 (no WHEN clause), with the function before 9.
    let trigger_without_when = "DROP TRIGGER outbox_notify ON outbox; \
         CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT \
         EXECUTE FUNCTION outbox_notify('outbox_relay')";
    sqlx::raw_sql(trigger_without_when)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_notify(COALESCE(TG_ARGV[0], 'outbox_relay'), ''); RETURN NULL; END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let text = check();
    assert!(
        text.contains("warning: the doorbell trigger notifies at every insert"),
        "{text}"
    );
    // migrate puts the doorbell's own function and trigger back.
    migrate(&["--notify-trigger", "on"]);
    let text = check();
    assert!(
        text.contains("doorbell trigger notifies channel outbox_relay while the relay sleeps"),
        "{text}"
    );
    // A trigger from before migration 11, without the WHEN clause, calls its function at
    // every insert: called out, and replaced by migrate.
    sqlx::raw_sql(trigger_without_when)
        .execute(&db.pool)
        .await
        .unwrap();
    let text = check();
    assert!(
        text.contains("warning: the doorbell trigger calls its function at every insert"),
        "{text}"
    );
    // While a transaction holds the outbox, migrate keeps that trigger (it works) rather
    // than queue every writer behind the lock replacing it, and says so.
    let reader = db.lock_table("outbox", "ACCESS SHARE").await;
    let text = migrate(&["--notify-trigger", "on"]);
    assert!(text.contains("doorbell trigger kept as it was"), "{text}");
    reader.rollback().await.unwrap();
    let text = check();
    assert!(
        text.contains("warning: the doorbell trigger calls its function at every insert"),
        "{text}"
    );
    let text = migrate(&["--notify-trigger", "on"]);
    assert!(text.contains("doorbell trigger installed"), "{text}");
    let text = check();
    assert!(
        text.contains("doorbell trigger notifies channel outbox_relay while the relay sleeps"),
        "{text}"
    );
    let when: String = sqlx::query_scalar(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'outbox_notify'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        when.contains("WHEN ((NOT pg_try_advisory_xact_lock_shared(1868722808"),
        "{when}"
    );

    // An unreachable broker fails the check, naming what to fix.
    let output = relay_command(&url, &format!("127.0.0.1:{}", free_port()))
        .args(["check", "--timeout", "2s"])
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("kafka.bootstrap_servers"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_the_table_fails_clearly() {
    let db = TestDb::empty().await;
    let output = relay_command(&db.url, &kafka_bootstrap())
        .arg("run")
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("outbox-relay migrate"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_what_is_in_flight_and_exits_0() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.drain");
    create_topic(&bootstrap, &topic, 3).await;
    db.insert(&stream("drain", 100, 20_000)).await;

    let mut child = relay_command(&db.url, &bootstrap)
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .env("OUTBOX_RELAY_RELAY__BATCH_SIZE", "2000")
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the relay to start marking", CONDITION_TIMEOUT, || async {
        db.sent().await > 0
    })
    .await;
    signal(child.id(), libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");

    // Everything published before the exit was marked: Kafka holds exactly the marked rows.
    let marked = db.sent().await as usize;
    assert!(marked < 20_000, "stopped part-way ({marked} marked)");
    let records = consume(&bootstrap, &topic, marked);
    assert_eq!(
        records.len(),
        marked,
        "every published row was marked before exiting"
    );

    // A new relay finishes the job with no duplicates.
    let mut child = relay_command(&db.url, &bootstrap)
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 20_000
    })
    .await;
    signal(child.id(), libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(30)).code(),
        Some(0)
    );
    let records = consume(&bootstrap, &topic, 20_000);
    assert_eq!(assert_contract(&db.rows().await, &records), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_20_times_mid_stream_loses_nothing_and_duplicates_stay_within_a_batch() {
    use rand::{Rng, SeedableRng};
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.crash");
    create_topic(&bootstrap, &topic, 3).await;
    const TOTAL: i64 = 50_000;
    db.insert(&stream("crash", 300, TOTAL as usize)).await;
    let seed: u64 = rand::rng().random();
    println!("kill seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start_as = |replica_id: &str| {
        relay_command(&db.url, &bootstrap)
            .env("OUTBOX_RELAY_RELAY__REPLICA_ID", replica_id)
            .env(
                "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
                format!("{prefix}.{{aggregate_type}}"),
            )
            .env("OUTBOX_RELAY_RELAY__BATCH_SIZE", "500")
            // A killed replica's leases expire after the TTL; keep the test short.
            .env("OUTBOX_RELAY_RELAY__LEASE_TTL", "1s")
            .env("OUTBOX_RELAY_RELAY__LEASE_RENEW_INTERVAL", "200ms")
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    while kills < 20 {
        let mut child = start_as(&format!("killed-{kills}"));
        // Kill at a random point: after some progress, a random moment later.
        let target = (db.sent().await + rng.random_range(200..2000)).min(TOTAL);
        wait_for("progress before the kill", CONDITION_TIMEOUT, || async {
            db.sent().await >= target
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    // The last kill may land after the last mark: wait for the final relay to join
    // (its signal handlers are in place by then) before asking it to stop.
    let mut child = start_as("final");
    wait_for("the final relay joined", CONDITION_TIMEOUT, || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM outbox_replica WHERE replica_id = 'final')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    })
    .await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == TOTAL
    })
    .await;
    signal(child.id(), libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(30)).code(),
        Some(0)
    );

    let records = consume(&bootstrap, &topic, TOTAL as usize);
    let duplicates = assert_contract(&db.rows().await, &records);
    println!("{duplicates} duplicates after {kills} kills");
    assert!(
        duplicates <= kills * 2 * 500,
        "{duplicates} duplicates from {kills} kills with batches of 500 (at most two per kill: one being marked, one in flight)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_rows_are_listed_replayed_in_order_and_discarded_for_audit() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.ops");
    create_topic(&bootstrap, &topic, 3).await;
    let mut rows = Vec::new();
    let mut bad_headers = NewRow::new("ops", "fixable", 1);
    bad_headers.headers = Some(r#"{"attempt": 1}"#.into());
    rows.push(bad_headers);
    let mut bad_topic = NewRow::new("ops", "hopeless", 1);
    bad_topic.topic = Some("no spaces allowed".into());
    rows.push(bad_topic);
    for seq in 2..=4 {
        rows.push(NewRow::new("ops", "fixable", seq));
        rows.push(NewRow::new("ops", "hopeless", seq));
    }
    rows.extend(stream("ops", 10, 100));
    let ids = db.insert(&rows).await;
    let (fixable_id, hopeless_id) = (ids[0], ids[1]);

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for(
        "the healthy aggregates marked",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 100 },
    )
    .await;
    assert_eq!(
        db.pending().await,
        6,
        "later rows wait behind their parked rows"
    );

    let cli = |args: &[&str]| {
        let output = relay_command(&db.url, &bootstrap)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            output_text(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["parked", "list", "--json"])).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["id"], fixable_id);
    assert_eq!(listed[0]["park_reason"], "bad_headers");
    assert_eq!(listed[1]["park_reason"], "invalid_topic");
    assert!(cli(&["parked", "list", "--aggregate", "hopeless"]).contains("invalid_topic"));
    let by_reason: serde_json::Value = serde_json::from_str(&cli(&[
        "parked",
        "list",
        "--park-reason",
        "invalid_topic",
        "--json",
    ]))
    .unwrap();
    assert_eq!(by_reason.as_array().unwrap().len(), 1, "{by_reason}");
    assert_eq!(by_reason[0]["id"], hopeless_id);
    assert!(cli(&["parked", "list", "--parked-until", "1h"]).contains("no parked rows"));
    // A reason the relay never gives is named as such, with the ones it does.
    let misspelt = cli(&["parked", "list", "--park-reason", "invalid_topics"]);
    assert!(
        misspelt.contains("no parked rows with park reason \"invalid_topics\"")
            && misspelt.contains("invalid_topic, bad_headers"),
        "{misspelt}"
    );

    // An id that is not parked is refused, naming it, and nothing changes.
    let healthy_id = ids[2];
    let output = relay_command(&db.url, &bootstrap)
        .args([
            "parked",
            "replay",
            &fixable_id.to_string(),
            &healthy_id.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", output_text(&output));
    assert!(
        output_text(&output).contains(&format!(
            "not parked (never parked, already replayed or discarded, or no such row): {healthy_id}"
        )),
        "{}",
        output_text(&output)
    );
    assert_eq!(
        db.count("parked_at IS NOT NULL").await,
        2,
        "nothing was replayed"
    );

    // The operator fixes the row, then replays it: it goes first, then the rows behind it.
    sqlx::query("UPDATE outbox SET headers = NULL WHERE id = $1")
        .bind(fixable_id)
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(cli(&["parked", "replay", &fixable_id.to_string()]).contains("1 parked row"));
    wait_for("the fixed aggregate marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 104
    })
    .await;

    // The other is given up on: it stays for audit, and its aggregate flows again. Giving
    // up on an aggregate's rows at once asks for --yes; --dry-run names them.
    let discard = [
        "parked",
        "discard",
        "--aggregate",
        "hopeless",
        "--reason",
        "bad topic name",
    ];
    let output = relay_command(&db.url, &bootstrap)
        .args(discard)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", output_text(&output));
    assert!(output_text(&output).contains("--yes"));
    assert!(
        cli(&[&discard[..], &["--dry-run"]].concat())
            .contains(&format!("would discard 1 parked row(s): {hopeless_id}"))
    );
    assert_eq!(
        db.count("discarded_at IS NOT NULL").await,
        0,
        "a dry run discards nothing"
    );
    assert!(cli(&[&discard[..], &["--yes"]].concat()).contains("1 parked row"));
    wait_for(
        "the discarded row's aggregate marked",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 107 },
    )
    .await;
    relay.stop().await;
    let (reason, sent): (Option<String>, bool) =
        sqlx::query_as("SELECT discard_reason, sent_at IS NOT NULL FROM outbox WHERE id = $1")
            .bind(hopeless_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((reason.as_deref(), sent), (Some("bad topic name"), false));
    assert!(cli(&["parked", "list"]).contains("no parked rows"));

    // Selecting nothing, or two ways at once, is refused.
    let output = relay_command(&db.url, &bootstrap)
        .args(["parked", "replay"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = relay_command(&db.url, &bootstrap)
        .args(["parked", "discard", "--all", "--yes"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "--reason is required");

    let db_rows: Vec<DbRow> = db
        .rows()
        .await
        .into_iter()
        .filter(|r| r.id != hopeless_id)
        .collect();
    let records = consume(&bootstrap, &topic, 107);
    assert_eq!(assert_contract(&db_rows, &records), 0);
}

/// Inserts `rows` rows of `aggregate_type` over `aggregates` keys, each payload an object
/// with `blob` of `md5_repeats` × 32 characters.
async fn insert_blobs(
    db: &TestDb,
    aggregate_type: &str,
    aggregates: i32,
    rows: i32,
    md5_repeats: i32,
) {
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, 'agg-' || (g % $2), 'E', \
                jsonb_build_object('n', g, 'blob', repeat(md5(g::text), $3)) \
         FROM generate_series(1, $4) g",
    )
    .bind(aggregate_type)
    .bind(aggregates)
    .bind(md5_repeats)
    .bind(rows)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// `outbox-relay run` publishing to `<prefix>.<aggregate_type>`, with more environment.
fn spawn_relay(
    db: &TestDb,
    bootstrap: &str,
    prefix: &str,
    env: &[(&str, &str)],
    stderr: Stdio,
) -> std::process::Child {
    let mut command = relay_command(&db.url, bootstrap);
    command.env(
        "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
        format!("{prefix}.{{aggregate_type}}"),
    );
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .arg("run")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Peak resident memory of a process, from `/proc/<pid>/status`.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

/// Big rows drain within the memory limit the Kubernetes manifest ships (128 MiB): a
/// backlog of 200 KB rows, and a 150 MB row that is parked from its length, measured in
/// SQL, without its payload ever being fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_rows_drain_within_the_shipped_memory_limit() {
    const LIMIT: u64 = 128 * 1024 * 1024;
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.big");
    create_topic(&bootstrap, &topic, 3).await;
    // A 150 MB payload, and a 150 MB aggregate id: neither is fetched.
    sqlx::raw_sql(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('big', 'huge', 'E', jsonb_build_object('blob', repeat('x', 150000000))); \
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('big', repeat('k', 150000000), 'E', '{}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // 200 KB each, 20 aggregates.
    insert_blobs(&db, "big", 20, 600, 6250).await;
    let mut child = spawn_relay(&db, &bootstrap, &prefix, &[], Stdio::null());
    wait_for("the 200 KB rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 600
    })
    .await;
    wait_for("the 150 MB rows parked", CONDITION_TIMEOUT, || async {
        db.count("parked_at IS NOT NULL AND park_reason = 'too_large'")
            .await
            == 2
    })
    .await;
    let peak = peak_rss_bytes(child.id());
    eprintln!(
        "peak RSS draining 200 KB rows: {} MiB",
        peak / (1024 * 1024)
    );
    signal(child.id(), libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert!(
        peak < LIMIT,
        "peak RSS {} MiB is over the shipped limit of 128 MiB",
        peak / (1024 * 1024)
    );
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT park_error FROM outbox WHERE parked_at IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        errors.iter().all(|e| e.contains("relay.max_message_bytes")),
        "{errors:?}"
    );
    assert_eq!(
        assert_sent_rows_in_kafka(&db, &bootstrap, &topic).await,
        600
    );
}

/// A topic whose `max.message.bytes` is below the size librdkafka packs record batches to:
/// the relay learns the limit and packs smaller batches, so the broker (which would refuse
/// a larger batch whole) never sees one. Read from librdkafka's own log of each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_batches_fit_the_smallest_topic_limit() {
    const LIMIT: usize = 20_000;
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.small");
    create_topic_with(
        &bootstrap,
        &topic,
        3,
        &[("max.message.bytes", &LIMIT.to_string())],
    )
    .await;
    // About 1 KB each, 30 aggregates.
    insert_blobs(&db, "small", 30, 2000, 30).await;
    let mut child = spawn_relay(
        &db,
        &bootstrap,
        &prefix,
        &[
            ("OUTBOX_RELAY_KAFKA__COMPRESSION", "none"),
            ("OUTBOX_RELAY_KAFKA__PROPERTIES__DEBUG", "msg"),
            ("RUST_LOG", "info,librdkafka=debug"),
        ],
        Stdio::piped(),
    );
    // Read as it comes, so the pipe never fills and holds the relay up.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
        log
    });
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 2000
    })
    .await;
    signal(child.id(), libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    let log = reader.join().unwrap();
    let sizes: Vec<usize> = log
        .lines()
        .filter_map(|line| line.split("Produce MessageSet with ").nth(1))
        .filter_map(|rest| rest.split(" message(s) (").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    assert!(!sizes.is_empty(), "no request logged:\n{log}");
    let largest = sizes.iter().max().copied().unwrap_or(0);
    assert!(
        largest <= LIMIT,
        "a record batch of {largest} bytes over the topic's limit of {LIMIT} ({} requests)",
        sizes.len()
    );
    assert_eq!(
        assert_sent_rows_in_kafka(&db, &bootstrap, &topic).await,
        2000
    );
}

/// `prune` deletes exactly the sent rows older than its cut-off, oldest first, and keeps
/// pending, parked and recent rows; `--dry-run` only counts; it refuses to run beside
/// another pruner and exits 2 on a bad duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_only_old_sent_rows_and_dry_run_deletes_nothing() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, \
                             sent_at, kafka_partition, kafka_offset, parked_at, park_reason) \
         SELECT 'p', 'agg-' || n, 'E', '{}', \
                CASE WHEN n <= 5 THEN now() - interval '10 days' \
                     WHEN n <= 7 THEN now() - interval '1 day' END, \
                CASE WHEN n <= 7 THEN 0 END, CASE WHEN n <= 7 THEN n END, \
                CASE WHEN n = 8 THEN now() - interval '10 days' END, \
                CASE WHEN n = 8 THEN 'bad_headers' END \
         FROM generate_series(1, 9) AS n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let prune = |args: &[&str]| {
        relay_command(&db.url, &bootstrap)
            .arg("prune")
            .args(args)
            .output()
            .unwrap()
    };

    let dry = prune(&["--older-than", "7d", "--dry-run"]);
    assert!(dry.status.success(), "{}", output_text(&dry));
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("5 sent rows are older than 7days"),
        "{}",
        output_text(&dry)
    );
    assert_eq!(db.count("true").await, 9, "a dry run deletes nothing");

    // Another pruner holds the lock: this one says so and deletes nothing.
    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(x'6f7574626f780001'::bigint)")
        .execute(&mut *holder)
        .await
        .unwrap();
    let busy = prune(&["--older-than", "7d", "--yes"]);
    assert_eq!(busy.status.code(), Some(1), "{}", output_text(&busy));
    assert!(
        output_text(&busy).contains("another relay or prune"),
        "{}",
        output_text(&busy)
    );
    assert_eq!(db.count("true").await, 9);
    sqlx::query("SELECT pg_advisory_unlock(x'6f7574626f780001'::bigint)")
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);

    // A bulk deletion asks for --yes, and deletes nothing without it.
    let unconfirmed = prune(&["--older-than", "7d"]);
    assert_eq!(
        unconfirmed.status.code(),
        Some(2),
        "{}",
        output_text(&unconfirmed)
    );
    assert!(output_text(&unconfirmed).contains("--yes"));
    assert_eq!(db.count("true").await, 9);
    let done = prune(&["--older-than", "7d", "--yes"]);
    assert!(done.status.success(), "{}", output_text(&done));
    assert!(
        String::from_utf8_lossy(&done.stdout).contains("deleted 5 sent rows"),
        "{}",
        output_text(&done)
    );
    let kept: Vec<String> = sqlx::query_scalar("SELECT aggregate_id FROM outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(kept, ["agg-6", "agg-7", "agg-8", "agg-9"]);

    let bad = prune(&["--older-than", "soon"]);
    assert_eq!(bad.status.code(), Some(2), "{}", output_text(&bad));
    assert!(
        output_text(&bad).contains("--older-than"),
        "{}",
        output_text(&bad)
    );
}

/// What trips an operator up in the configuration: Kubernetes service links
/// (`OUTBOX_RELAY_PORT`…) are ignored with a warning instead of stopping the relay, a file
/// named by `OUTBOX_RELAY_CONFIG` is read (and must exist), and a command that only needs the
/// database reads no Kafka secret file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_links_a_config_variable_and_database_only_commands_do_not_trip_the_relay() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, String)]| {
        let mut command = relay_command(&db.url, &bootstrap);
        command.current_dir(dir.path()).args(args);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };

    let links = [
        ("OUTBOX_RELAY_PORT", "tcp://10.0.0.7:9090".to_string()),
        ("OUTBOX_RELAY_SERVICE_HOST", "10.0.0.7".to_string()),
    ];
    let output = run(&["check"], &links);
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("ignored environment variables OUTBOX_RELAY_PORT, OUTBOX_RELAY_SERVICE_HOST"),
        "{text}"
    );
    assert!(!text.contains("10.0.0.7"), "a value was printed: {text}");
    // A required key missing with no file read says that no file was found.
    let output = run(
        &["status"],
        &[("OUTBOX_RELAY_DATABASE__URL", String::new())],
    );
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains("`database.url`: is required")
            && text.contains("no configuration file was read"),
        "{text}"
    );
    // A one-shot command says it too: a misspelt variable is never ignored in silence.
    let output = run(
        &["status"],
        &[(
            "OUTBOX_RELAY_DATABASE_URL",
            "postgres://x@nowhere/y".to_string(),
        )],
    );
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("ignored environment variables OUTBOX_RELAY_DATABASE_URL"),
        "{text}"
    );

    let file = dir.path().join("elsewhere.toml");
    std::fs::write(&file, "[relay]\nreplica_id = \"named-by-the-variable\"\n").unwrap();
    let output = run(
        &["check"],
        &[("OUTBOX_RELAY_CONFIG", file.display().to_string())],
    );
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("named-by-the-variable"), "{text}");
    let output = run(
        &["status"],
        &[("OUTBOX_RELAY_CONFIG", "/nonexistent/relay.toml".to_string())],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(output_text(&output).contains("OUTBOX_RELAY_CONFIG"));

    let secret = [(
        "OUTBOX_RELAY_KAFKA__SECRET_FILES__SASL_PASSWORD",
        "/nonexistent/kafka-password".to_string(),
    )];
    for args in [
        &["status"][..],
        &["parked", "list"],
        &["prune", "--older-than", "7d", "--dry-run"],
    ] {
        let output = run(args, &secret);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?} needs only the database: {}",
            output_text(&output)
        );
    }
    let output = run(&["check"], &secret);
    assert_eq!(output.status.code(), Some(2));
    assert!(output_text(&output).contains("kafka.secret_files"));
}

/// `--version` names the git revision and the bundled librdkafka; completions and the manual
/// page need no configuration at all (a package builds them with none).
#[test]
fn the_version_names_revision_and_librdkafka_and_completions_and_man_need_no_configuration() {
    let plain = |args: &[&str]| {
        let output = Command::new(relay_bin())
            .env_clear()
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            output_text(&output)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let version = plain(&["--version"]);
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let revision = head.unwrap_or_else(|| "unknown".into());
    assert!(
        version.starts_with(&format!(
            "outbox-relay {} (git {revision}",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
    assert!(version.contains(", librdkafka 2."), "{version}");
    assert!(
        version.contains(outbox_relay::build::GIT_REVISION),
        "--version and build_info must name the same revision: {version}"
    );

    let bash = plain(&["completions", "bash"]);
    assert!(
        bash.contains("complete -F") && bash.contains("outbox-relay") && bash.contains("republish"),
        "{bash}"
    );
    for shell in ["zsh", "fish"] {
        assert!(plain(&["completions", shell]).contains("verify"), "{shell}");
    }
    // Bash completes a subcommand's options, not only the subcommands.
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), &bash).unwrap();
    let completed = Command::new("bash")
        .arg("-c")
        .arg(
            r#"source "$1"; COMP_WORDS=(outbox-relay parked discard --); COMP_CWORD=3; _outbox__relay outbox-relay -- discard; printf '%s\n' "${COMPREPLY[@]}""#,
        )
        .arg("bash")
        .arg(script.path())
        .output()
        .unwrap();
    let offered = String::from_utf8_lossy(&completed.stdout);
    assert!(
        offered.lines().any(|l| l == "--yes") && offered.lines().any(|l| l == "--dry-run"),
        "`outbox-relay parked discard --<TAB>` offered: {offered:?} {}",
        String::from_utf8_lossy(&completed.stderr)
    );
    let man = plain(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH outbox-relay"),
        "{man}"
    );
    assert!(man.contains(outbox_relay::build::GIT_REVISION), "{man}");
    for section in ["EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"] {
        assert!(
            man.contains(&format!(".SH \"{section}\"")) || man.contains(&format!(".SH {section}")),
            "{section}: {man}"
        );
    }

    // `man --dir` writes the main page and one per command: every page a page names is
    // among them, as the Debian package installs them.
    let pages = tempfile::tempdir().unwrap();
    plain(&["man", "--dir", pages.path().to_str().unwrap()]);
    let page = |name: &str| std::fs::read_to_string(pages.path().join(format!("{name}.1")));
    assert_eq!(
        page("outbox-relay").unwrap(),
        man,
        "man and man --dir disagree"
    );
    let mut checked = 0;
    for entry in std::fs::read_dir(pages.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        // A reference reads `outbox\-relay\-parked\-list(1)` in roff.
        for (at, _) in text.match_indices("outbox\\-relay") {
            let rest = &text[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '\\' || c == '-'))
                .unwrap_or(rest.len());
            if rest[end..].starts_with("(1)") {
                let name = rest[..end].replace("\\-", "-");
                assert!(
                    page(&name).is_ok(),
                    "a page names {name}(1), which man --dir did not write"
                );
                checked += 1;
            }
        }
    }
    for command in ["run", "status", "parked-list", "republish"] {
        let text = page(&format!("outbox-relay-{command}")).unwrap();
        assert!(
            text.contains(outbox_relay::build::GIT_REVISION),
            "{command}: {text}"
        );
    }
    assert!(
        checked >= 10,
        "the main page names each command's page: {man}"
    );
}

/// A database the relay cannot use is named with the reason PostgreSQL or the network gave:
/// nothing listening, a database or a role that does not exist; never only "pool timed out",
/// and once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_name_the_server_the_user_and_the_cause() {
    let db = TestDb::new().await;
    let mut url = url::Url::parse(&db.url).unwrap();
    let closed = free_port();
    let cases = {
        let mut refused = url.clone();
        refused.set_port(Some(closed)).unwrap();
        let mut no_database = url.clone();
        no_database.set_path("/no_such_database");
        url.set_username("no_such_role").unwrap();
        [
            (
                refused.to_string(),
                format!("at 127.0.0.1:{closed}"),
                "connection refused",
            ),
            (
                no_database.to_string(),
                "database no_such_database".to_string(),
                "does not exist",
            ),
            (
                url.to_string(),
                "as user no_such_role".to_string(),
                "no_such_role",
            ),
        ]
    };
    for (database_url, target, cause) in cases {
        for args in [&["status"][..], &["migrate"]] {
            let output = relay_command(&database_url, "127.0.0.1:1")
                .env("OUTBOX_RELAY_DATABASE__CONNECT_TIMEOUT", "2s")
                .args(args)
                .output()
                .unwrap();
            let text = output_text(&output);
            assert_eq!(output.status.code(), Some(1), "{args:?}: {text}");
            assert!(
                text.contains("cannot connect to PostgreSQL") && text.contains(&target),
                "{args:?} does not name {target}: {text}"
            );
            assert!(
                text.contains(cause),
                "{args:?} does not say {cause}: {text}"
            );
            assert_eq!(
                text.matches("cannot connect").count(),
                1,
                "{args:?} says it more than once: {text}"
            );
        }
    }
}

/// `check` names the topics the pending rows need and fails on one that does not exist
/// (the relay never creates topics), instead of passing with "0 topics visible".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_topic_the_pending_rows_need_and_fails_on_a_missing_one() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.present"), 1).await;
    db.insert(&[
        NewRow::new("present", "a", 1),
        NewRow::new("absent", "b", 1),
    ])
    .await;
    let check = || {
        relay_command(&db.url, &bootstrap)
            .env(
                "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
                format!("{prefix}.{{aggregate_type}}"),
            )
            .arg("check")
            .output()
            .unwrap()
    };
    let output = check();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "topic {prefix}.present exists (pending rows of present)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "topic {prefix}.absent does not exist (or the relay's principal may not describe it), and pending rows of aggregate type absent need it"
        )),
        "{text}"
    );
    create_topic(&bootstrap, &format!("{prefix}.absent"), 1).await;
    let output = check();
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
}

/// `status --watch` refreshes until Ctrl-C (with --json, a document per line) and then
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_refreshes_until_interrupted() {
    let db = TestDb::new().await;
    db.insert(&stream("watched", 2, 3)).await;
    let mut child = relay_command(&db.url, "127.0.0.1:1")
        .args(["status", "--watch", "200ms", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    for _ in 0..2 {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a refresh within 20 s");
        let report: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(report["pending_rows"], 3, "{line}");
    }
    signal(child.id(), libc::SIGINT);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

/// Ctrl-C ends `status --watch` even while a refresh waits on a locked outbox: the
/// operator is not left with a watch that ignores them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_stops_at_ctrl_c_while_a_refresh_waits() {
    let db = TestDb::new().await;
    db.insert(&stream("watched", 1, 1)).await;
    let lock = db.lock_table("outbox", "ACCESS EXCLUSIVE").await;
    let mut child = relay_command(&db.url, "127.0.0.1:1")
        .args(["status", "--watch", "200ms", "--json"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "status's refresh to wait on the lock",
        CONDITION_TIMEOUT,
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'outbox-relay'
               AND wait_event_type = 'Lock'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap()
                == 1
        },
    )
    .await;
    signal(child.id(), libc::SIGINT);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    lock.rollback().await.unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A stall is logged when it begins and, once, when it is over: the operator reading the
/// log at 3 a.m. sees that the relay recovered without being told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_and_its_end_are_each_logged_once() {
    let db = TestDb::new().await;
    let tansu = Tansu::start();
    let prefix = unique_prefix();
    create_topic(&tansu.bootstrap, &format!("{prefix}.stalling"), 1).await;
    let mut relay = relay_command(&db.url, &tansu.bootstrap)
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .env("OUTBOX_RELAY_RELAY__STALL_AFTER", "1s")
        .arg("run")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = relay.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut log = Vec::new();
    let wait_for_line = |what: &str, log: &mut Vec<String>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                let found = line.contains(what);
                log.push(line);
                if found {
                    return;
                }
            }
        }
        panic!("no log line with `{what}`:\n{}", log.join("\n"));
    };
    wait_for_line("relaying the outbox to Kafka", &mut log);
    tansu.freeze();
    db.insert(&stream("stalling", 2, 10)).await;
    wait_for_line("stalled:", &mut log);
    tansu.thaw();
    wait_for_line("the stall is over", &mut log);
    wait_for(
        "the rows marked after the stall",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 10 },
    )
    .await;
    signal(relay.id(), libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut relay, Duration::from_secs(30)).code(),
        Some(0)
    );
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        log.push(line);
    }
    let recoveries = log
        .iter()
        .filter(|l| l.contains("the stall is over"))
        .count();
    assert_eq!(recoveries, 1, "{}", log.join("\n"));
}

/// config/outbox-relay.schema.json, which editors complete the TOML from, is what the binary
/// says its configuration is: regenerate it with `outbox-relay config-schema` when a key
/// changes.
#[test]
fn the_committed_config_schema_is_the_binarys() {
    let output = Command::new(relay_bin())
        .env_clear()
        .arg("config-schema")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", output_text(&output));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../config/outbox-relay.schema.json")).unwrap();
    assert_eq!(
        printed, committed,
        "config/outbox-relay.schema.json is stale: outbox-relay config-schema > config/outbox-relay.schema.json"
    );
    let relay = &printed["$defs"]["RelaySettings"];
    assert_eq!(relay["additionalProperties"], false, "{relay}");
    assert!(
        relay["properties"]["audit_sample_rate"].is_object(),
        "{relay}"
    );
}
