//! Several replicas on one outbox: balanced shard leases, handover on a clean stop,
//! takeover after kill -9, fencing of a paused replica, and per-aggregate order through all
//! of it, read back from Kafka with a consumer.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_relay::store::{Ack, Store};
use rand::{Rng, SeedableRng};
use support::*;

/// Short leases so the faults below resolve in seconds.
const LEASES: &str = "lease_ttl = \"3s\"\nlease_renew_interval = \"500ms\"\n";

fn replica_settings(
    db: &TestDb,
    bootstrap: &str,
    prefix: &str,
    id: &str,
) -> outbox_relay::Settings {
    settings(
        db,
        bootstrap,
        &format!(
            "[relay]\nreplica_id = \"{id}\"\ntopic_template = \"{prefix}.{{aggregate_type}}\"\nbatch_size = 200\n{LEASES}"
        ),
    )
}

async fn owned_by(db: &TestDb, replica: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox_shard_lease WHERE owner = $1 AND expires_at > now()",
    )
    .bind(replica)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_rebalance_as_replicas_join_and_leave() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.acct");
    create_topic(&bootstrap, &topic, 3).await;

    let a = RunningRelay::start(replica_settings(&db, &bootstrap, &prefix, "a")).await;
    wait_for("a owns every shard", CONDITION_TIMEOUT, || async {
        owned_by(&db, "a").await == 256
    })
    .await;
    db.insert(&stream("acct", 300, 3000)).await;

    let b = RunningRelay::start(replica_settings(&db, &bootstrap, &prefix, "b")).await;
    wait_for(
        "a and b share the shards evenly",
        CONDITION_TIMEOUT,
        || async { owned_by(&db, "a").await == 128 && owned_by(&db, "b").await == 128 },
    )
    .await;
    db.insert(&stream("acct", 300, 3000)).await;

    let c = RunningRelay::start(replica_settings(&db, &bootstrap, &prefix, "c")).await;
    wait_for("three even shares", CONDITION_TIMEOUT, || async {
        let shares = [
            owned_by(&db, "a").await,
            owned_by(&db, "b").await,
            owned_by(&db, "c").await,
        ];
        shares.iter().sum::<i64>() == 256 && shares.iter().all(|s| (85..=86).contains(s))
    })
    .await;
    db.insert(&stream("acct", 300, 3000)).await;

    // `status` shows the three replicas and their shares.
    let output = database_command(&db.url)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let replicas = status["replicas"].as_array().unwrap();
    let shares: Vec<(String, i64)> = replicas
        .iter()
        .map(|r| {
            (
                r["replica_id"].as_str().unwrap().to_string(),
                r["shards"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shares.len(), 3, "{status}");
    assert_eq!(shares.iter().map(|s| s.1).sum::<i64>(), 256, "{status}");
    assert_eq!(status["shards_unowned"], 0, "{status}");
    assert!(status["pending_rows"].as_i64().is_some(), "{status}");
    let output = database_command(&db.url).arg("status").output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for replica in ["a", "b", "c"] {
        assert!(
            table.lines().any(|l| l.starts_with(&format!("{replica} "))),
            "{table}"
        );
    }
    assert!(table.contains("pending rows"), "{table}");

    // A clean stop hands the shards over at once, well before its leases would expire.
    let stopped_at = Instant::now();
    b.stop().await;
    wait_for("a and c take b's shards", CONDITION_TIMEOUT, || async {
        owned_by(&db, "a").await == 128 && owned_by(&db, "c").await == 128
    })
    .await;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(3),
        "handover took {:?}, longer than the lease TTL",
        stopped_at.elapsed()
    );
    db.insert(&stream("acct", 300, 3000)).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 12_000
    })
    .await;
    a.stop().await;
    c.stop().await;

    let records = consume(&bootstrap, &topic, 12_000);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert_eq!(duplicates, 0, "clean handovers publish nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_lease_cannot_mark() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let ttl = Duration::from_secs(30);
    db.insert(&stream("fence", 1, 3)).await;
    let shard: i16 = sqlx::query_scalar("SELECT shard FROM outbox LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let taken = store.acquire_leases("old", &[shard], ttl).await.unwrap();
    assert_eq!(taken.len(), 1);
    let old_epoch = taken[0].1;
    // Another replica cannot take a live lease...
    assert!(
        store
            .acquire_leases("new", &[shard], ttl)
            .await
            .unwrap()
            .is_empty()
    );
    // ...but takes it once it has expired, under a new epoch.
    sqlx::query(
        "UPDATE outbox_shard_lease SET expires_at = now() - interval '1 second' WHERE shard = $1",
    )
    .bind(shard)
    .execute(&db.pool)
    .await
    .unwrap();
    let taken = store.acquire_leases("new", &[shard], ttl).await.unwrap();
    assert_eq!(taken, vec![(shard, old_epoch + 1)]);

    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let acks = |epoch| -> Vec<Ack> {
        ids.iter()
            .map(|&id| Ack {
                id,
                partition: 0,
                offset: id,
                shard,
                epoch,
            })
            .collect()
    };
    assert_eq!(
        store.mark_sent("old", &acks(old_epoch)).await.unwrap(),
        0,
        "fenced by owner and epoch"
    );
    assert_eq!(
        store.mark_sent("new", &acks(old_epoch)).await.unwrap(),
        0,
        "fenced by epoch"
    );
    assert_eq!(store.delete_sent("old", &acks(old_epoch)).await.unwrap(), 0);
    assert_eq!(db.sent().await, 0);
    assert_eq!(
        store.mark_sent("new", &acks(old_epoch + 1)).await.unwrap(),
        3
    );
    assert_eq!(
        store
            .renew_leases("old", &[(shard, old_epoch)], ttl)
            .await
            .unwrap(),
        vec![]
    );
}

/// One mark or delete can cover rows of shards still held and of shards lost: only the
/// held shards' rows are marked, whether a lost shard sorts before, between or after the
/// held ones (the fence finds each row's shard by binary search).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_over_held_and_lost_shards_marks_only_the_held_ones() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let ttl = Duration::from_secs(30);
    db.insert(&stream("partial", 60, 600)).await;
    // Three shards a < b < c, two rows of each.
    let picked: Vec<(i16, Vec<i64>)> = sqlx::query_as(
        "SELECT shard, (array_agg(id ORDER BY id))[1:2] FROM outbox \
         GROUP BY shard HAVING count(*) >= 2 ORDER BY shard LIMIT 3",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        picked.len(),
        3,
        "600 rows over 60 aggregates fill three shards"
    );
    let (a, b, c) = (picked[0].0, picked[1].0, picked[2].0);
    let mut epoch = std::collections::HashMap::new();
    for (replica, shards) in [("edges", vec![a, c]), ("middle", vec![b])] {
        for (shard, e) in store.acquire_leases(replica, &shards, ttl).await.unwrap() {
            epoch.insert(shard, e);
        }
    }
    assert_eq!(epoch.len(), 3);
    // The n-th row of each shard, acknowledged under the shard's current epoch.
    let acks = |n: usize| -> Vec<Ack> {
        picked
            .iter()
            .map(|(shard, ids)| Ack {
                id: ids[n],
                partition: 0,
                offset: ids[n],
                shard: *shard,
                epoch: epoch[shard],
            })
            .collect()
    };
    let id_of = |shard_index: usize, n: usize| picked[shard_index].1[n];

    // Held: a and c; lost: b, between them.
    assert_eq!(store.mark_sent("edges", &acks(0)).await.unwrap(), 2);
    let marked: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE sent_at IS NOT NULL ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut expected = vec![id_of(0, 0), id_of(2, 0)];
    expected.sort();
    assert_eq!(marked, expected, "the rows of a and c, not b's");

    // Held: b; lost: a (before it) and c (after it).
    assert_eq!(store.delete_sent("middle", &acks(1)).await.unwrap(), 1);
    for (shard_index, should_remain) in [(0, true), (1, false), (2, true)] {
        let id = id_of(shard_index, 1);
        let remains: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE id = $1)")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            remains, should_remain,
            "row {id} of shard index {shard_index}"
        );
    }
}

struct Replica {
    id: String,
    child: Child,
}

fn spawn_replica(db: &TestDb, bootstrap: &str, prefix: &str, id: &str) -> Replica {
    let child = Command::new(relay_bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OUTBOX_RELAY_DATABASE__URL", &db.url)
        .env("OUTBOX_RELAY_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
        .env("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0")
        .env("OUTBOX_RELAY_RELAY__REPLICA_ID", id)
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .env("OUTBOX_RELAY_RELAY__BATCH_SIZE", "500")
        .env("OUTBOX_RELAY_RELAY__POLL_INTERVAL", "100ms")
        .env("OUTBOX_RELAY_RELAY__LEASE_TTL", "3s")
        .env("OUTBOX_RELAY_RELAY__LEASE_RENEW_INTERVAL", "500ms")
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(std::env::temp_dir().join(format!("outbox-relay-{prefix}-{id}.log")))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Replica {
        id: id.to_string(),
        child,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_the_contract_through_kill_9_and_sigstop() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.chaos");
    create_topic(&bootstrap, &topic, 3).await;
    let seed: u64 = rand::rng().random();
    println!("chaos seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut killed = spawn_replica(&db, &bootstrap, &prefix, "r-kill");
    let paused = spawn_replica(&db, &bootstrap, &prefix, "r-pause");
    let mut steady = spawn_replica(&db, &bootstrap, &prefix, "r-steady");

    const TOTAL: usize = 50_000;
    let rows = stream("chaos", 500, TOTAL);
    let mut inserted = 0;
    let mut faults = 0;
    for round in 0..5 {
        // Keep rows flowing while the faults happen.
        let chunk = TOTAL / 5;
        db.insert(&rows[inserted..inserted + chunk / 2]).await;
        inserted += chunk / 2;

        // Chaos schedule, not a wait for a condition: kill -9 at a random moment while that
        // backlog drains, restart after a random pause.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        killed.child.kill().unwrap();
        killed.child.wait().unwrap();
        faults += 1;
        db.insert(&rows[inserted..inserted + chunk / 4]).await;
        inserted += chunk / 4;
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        killed = spawn_replica(&db, &bootstrap, &prefix, "r-kill");

        // SIGSTOP past the lease TTL while a backlog drains: the others take its shards;
        // then it resumes and must not mark what they now own.
        if round % 2 == 0 {
            db.insert(&rows[inserted..inserted + chunk / 8]).await;
            inserted += chunk / 8;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
            signal(paused.child.id(), libc::SIGSTOP);
            faults += 1;
            wait_for(
                "the paused replica's shards taken over",
                CONDITION_TIMEOUT,
                || async {
                    owned_by(&db, &paused.id).await == 0
                        && sqlx::query_scalar::<_, i64>(
                            "SELECT count(*) FROM outbox_shard_lease WHERE expires_at > now()",
                        )
                        .fetch_one(&db.pool)
                        .await
                        .unwrap()
                            == 256
                },
            )
            .await;
            signal(paused.child.id(), libc::SIGCONT);
        }
        let rest = (round + 1) * chunk - inserted;
        db.insert(&rows[inserted..inserted + rest]).await;
        inserted += rest;
    }
    assert_eq!(inserted, TOTAL);

    wait_for("every row marked", Duration::from_secs(120), || async {
        db.sent().await == TOTAL as i64
    })
    .await;
    wait_for(
        "all three replicas hold shards again",
        CONDITION_TIMEOUT,
        || async {
            owned_by(&db, "r-kill").await > 0
                && owned_by(&db, "r-pause").await > 0
                && owned_by(&db, "r-steady").await > 0
        },
    )
    .await;
    let mut paused = paused;
    for replica in [&mut killed, &mut paused, &mut steady] {
        signal(replica.child.id(), libc::SIGTERM);
    }
    for replica in [&mut killed, &mut paused, &mut steady] {
        let status = replica.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{} exits 0 on SIGTERM", replica.id);
    }

    let records = consume(&bootstrap, &topic, TOTAL);
    let duplicates = assert_contract(&db.rows().await, &records);
    println!("{duplicates} duplicates over {faults} faults");
    assert!(
        duplicates <= faults * 500,
        "{duplicates} duplicates exceed one batch (500) per fault ({faults} faults)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_work_through_pgbouncer_in_transaction_mode() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.pooled");
    create_topic(&bootstrap, &topic, 3).await;
    // Two server connections for two replicas' relay loops, lease keepers and gauges.
    let bouncer = PgBouncer::start(2);
    let pooled = bouncer.url_for(&db.url);
    let replica = |id: &str| {
        let mut settings = replica_settings(&db, &bootstrap, &prefix, id);
        settings.database.url = outbox_relay::config::Secret::new(pooled.clone());
        settings.database.transaction_pooler = true;
        settings.database.listen = false;
        settings.validate().expect("valid pooler settings");
        settings
    };
    let a = RunningRelay::start(replica("pooled-a")).await;
    let b = RunningRelay::start(replica("pooled-b")).await;
    db.insert(&stream("pooled", 200, 6000)).await;
    wait_for("both replicas hold shards", CONDITION_TIMEOUT, || async {
        owned_by(&db, "pooled-a").await == 128 && owned_by(&db, "pooled-b").await == 128
    })
    .await;
    db.insert(&stream("pooled", 200, 4000)).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 10_000
    })
    .await;

    let output = database_command(&pooled)
        .env("OUTBOX_RELAY_DATABASE__TRANSACTION_POOLER", "true")
        .env("OUTBOX_RELAY_DATABASE__LISTEN", "false")
        .arg("status")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    a.stop().await;
    b.stop().await;

    let records = consume(&bootstrap, &topic, 10_000);
    let duplicates = assert_contract(&db.rows().await, &records);
    // A shard handed over while its batch is in flight is sent again by its new owner: at
    // most one batch (200 rows) per replica joining.
    assert!(duplicates <= 200, "{duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeping_replicas_wake_for_rows_of_either_without_ringing_each_other_awake() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.duo");
    create_topic(&bootstrap, &topic, 3).await;
    sqlx::query("SELECT outbox_enable_notify(true)")
        .execute(&db.pool)
        .await
        .unwrap();
    // An hour between polls: within the test only the doorbell wakes either replica.
    let replica = |id: &str| {
        settings(
            &db,
            &bootstrap,
            &format!(
                "[relay]\nreplica_id = \"{id}\"\ntopic_template = \"{prefix}.{{aggregate_type}}\"\npoll_interval = \"1h\"\n{LEASES}"
            ),
        )
    };
    let a = RunningRelay::start(replica("sleeper-a")).await;
    let b = RunningRelay::start(replica("sleeper-b")).await;
    wait_for("both replicas hold shards", CONDITION_TIMEOUT, || async {
        owned_by(&db, "sleeper-a").await == 128 && owned_by(&db, "sleeper-b").await == 128
    })
    .await;
    let waits = async |series: &str| {
        let mut total = 0.0;
        for relay in [&a, &b] {
            total += metric_value(&http_get(relay.http_addr, "/metrics").await.1, series);
        }
        total
    };
    // One sleeps on the doorbell's lock, the other waits to be rung by it.
    wait_for(
        "one replica asleep, the other waiting",
        CONDITION_TIMEOUT,
        || async {
            waits(r#"outbox_relay_idle_waits_total{doorbell="armed""#).await > 0.0
                && waits(r#"outbox_relay_idle_waits_total{doorbell="waiting""#).await > 0.0
        },
    )
    .await;

    let rounds = 5;
    for round in 1..=rounds {
        // 40 aggregates fall in the shards of both replicas.
        db.insert(&stream("duo", 40, 80)).await;
        wait_for(
            &format!("round {round} marked by whichever replica owns each row"),
            Duration::from_secs(20),
            || async { db.sent().await == 80 * round },
        )
        .await;
    }
    // A replica rung awake by its own ring, or by the other's for ever, waits thousands of
    // times a second; each round costs each replica a handful of waits.
    let all_waits = waits("outbox_relay_idle_waits_total").await;

    assert!(
        all_waits < 40.0 * rounds as f64,
        "{all_waits} idle waits in {rounds} rounds"
    );
    a.stop().await;
    b.stop().await;

    let records = consume(&bootstrap, &topic, 80 * rounds as usize);
    assert_eq!(assert_contract(&db.rows().await, &records), 0, "duplicates");
}

/// Two relays under one replica id would share its leases, the second reporting ready and
/// publishing nothing: the second is refused (exit 2, naming the key). A registration left
/// by a relay that died (live, but no heartbeat moves) is taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_with_a_replica_id_in_use_is_refused_and_a_dead_ones_is_taken_over() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.twin"), 3).await;
    let first = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "replica_id = \"twin\"\n",
    ))
    .await;
    wait_for("the first relay registered", CONDITION_TIMEOUT, || async {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_replica WHERE replica_id = 'twin' AND expires_at > now()",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        live == 1
    })
    .await;
    let mut second = relay_command(&db.url, &bootstrap)
        .env("OUTBOX_RELAY_RELAY__REPLICA_ID", "twin")
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut second, Duration::from_secs(30));
    let mut text = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut text).unwrap();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(
        text.contains("relay.replica_id") && text.contains("`twin`"),
        "{text}"
    );
    first.stop().await;

    // A relay killed without handing over leaves its registration live until it expires;
    // one that died long ago is deleted by the next heartbeat of any relay.
    sqlx::query(
        "INSERT INTO outbox_replica (replica_id, heartbeat_at, expires_at) \
         VALUES ('ghost', now() - interval '1 second', now() + interval '1 hour'), \
                ('long-gone', now() - interval '3 hours', now() - interval '2 hours')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ghost = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "replica_id = \"ghost\"\n",
    ))
    .await;
    db.insert(&stream("twin", 5, 50)).await;
    wait_for(
        "the rows marked by the relay that took over",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 50 },
    )
    .await;
    let long_gone: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_replica WHERE replica_id = 'long-gone'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(long_gone, 0, "a registration expired for hours is dropped");
    ghost.stop().await;
}

/// A relay upgraded before `migrate` added the state columns (a schema from before
/// migration 10) relays all the same; `status` shows its state as unknown and a killed
/// replica as gone, quoting what it last said when it could.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_a_schema_from_before_the_replica_state_and_shows_the_dead_as_gone() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.old"), 3).await;
    sqlx::query("ALTER TABLE outbox_replica DROP COLUMN state, DROP COLUMN state_reason")
        .execute(&db.pool)
        .await
        .unwrap();
    db.insert(&stream("old", 5, 50)).await;
    let relay = RunningRelay::start(replica_settings(&db, &bootstrap, &prefix, "old")).await;
    wait_for(
        "rows marked on the old schema",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 50 },
    )
    .await;
    wait_for_status_state(&db, "-", "earlier version").await;
    relay.stop().await;

    // With the columns back, a replica that stops heartbeating is gone, with its last word.
    sqlx::query("ALTER TABLE outbox_replica ADD COLUMN state text, ADD COLUMN state_reason text")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox_replica (replica_id, heartbeat_at, expires_at, state, state_reason) \
         VALUES ('killed', now() - interval '5 minutes', now() - interval '4 minutes', \
                 'stalled', 'stalled: broker acknowledgements have stopped')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let table = wait_for_status_state(&db, "gone", "last said: stalled").await;
    assert!(
        ["300s", "301s"]
            .iter()
            .any(|age| table.contains(&format!("no heartbeat for {age}"))),
        "{table}"
    );
}
