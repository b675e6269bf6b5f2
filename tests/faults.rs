//! Broker faults a real broker will not make on demand, injected with rdkafka's
//! MockCluster (it speaks the Kafka protocol): a broker down, fatal producer errors,
//! record batches and rows the broker refuses, a full producer queue. Each test reads the
//! mock cluster back with a real consumer.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;
use support::*;

/// A mock cluster whose brokers each take produce errors of their own; rust-rdkafka's
/// `MockCluster` wraps only the cluster-wide error stack. The cluster lives in `host`.
struct MockBrokers {
    host: BaseProducer,
}

impl MockBrokers {
    fn new(brokers: i32) -> Self {
        let host: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()
            .expect("a client hosting a mock cluster");
        Self { host }
    }

    fn cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.host
            .client()
            .mock_cluster()
            .expect("the host's mock cluster")
    }

    /// The next `count` Produce requests that `broker` receives fail with `err`.
    fn push_produce_errors(&self, broker: i32, err: RDKafkaRespErr, count: usize) {
        self.push_produce_answers(broker, err, Duration::ZERO, count);
    }

    /// The next `count` Produce requests that `broker` receives are answered with `err`
    /// (success: `RD_KAFKA_RESP_ERR_NO_ERROR`) after `delay`.
    fn push_produce_answers(
        &self,
        broker: i32,
        err: RDKafkaRespErr,
        delay: Duration,
        count: usize,
    ) {
        // SAFETY: the cluster belongs to `host`, alive as long as `self`; each call pushes
        // one (error, round trip) pair, the variadic arguments the function reads.
        unsafe {
            let cluster =
                rdkafka::bindings::rd_kafka_handle_mock_cluster(self.host.client().native_ptr());
            for _ in 0..count {
                rdkafka::bindings::rd_kafka_mock_broker_push_request_error_rtts(
                    cluster,
                    broker,
                    RDKafkaApiKey::Produce as i16,
                    1,
                    err as std::os::raw::c_int,
                    delay.as_millis() as std::os::raw::c_int,
                );
            }
        }
    }
}

fn mock_settings(
    db: &TestDb,
    cluster: &MockCluster<'_, impl rdkafka::ClientContext>,
    extra: &str,
) -> outbox_relay::Settings {
    settings(db, &cluster.bootstrap_servers(), extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_marked_while_the_only_broker_is_down() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.event.down", 3, 1).unwrap();
    let relay = RunningRelay::start(mock_settings(
        &db,
        &cluster,
        "[relay]\nstall_after = \"1s\"\n",
    ))
    .await;
    db.insert(&stream("down", 10, 100)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 100
    })
    .await;

    cluster.broker_down(1).unwrap();
    db.insert(&stream("down", 10, 500)).await;
    let health = relay.health.clone();
    wait_for("rows in flight", CONDITION_TIMEOUT, || async {
        health.in_flight() > 0
    })
    .await;
    wait_for("the stall alarm", CONDITION_TIMEOUT, || async {
        health.stalled()
    })
    .await;
    assert_eq!(
        db.sent().await,
        100,
        "nothing marked while the broker is down"
    );

    cluster.broker_up(1).unwrap();
    wait_for(
        "all rows marked after the broker returns",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 600 },
    )
    .await;
    relay.stop().await;
    let records = consume(&cluster.bootstrap_servers(), "outbox.event.down", 600);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(duplicates <= 500, "{duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_rebuilds_the_producer_and_resends_in_order() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("outbox.event.fatal", 3, 3).unwrap();
    let relay =
        RunningRelay::start(mock_settings(&db, &cluster, "[relay]\nbatch_size = 200\n")).await;
    db.insert(&stream("fatal", 30, 300)).await;
    wait_for("first rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 300
    })
    .await;

    // With the gap-less guarantee on, an out-of-order sequence is fatal for the producer.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    db.insert(&stream("fatal", 30, 1000)).await;
    let health = relay.health.clone();
    wait_for("the producer rebuilt", CONDITION_TIMEOUT, || async {
        health.producer_rebuilds() >= 1
    })
    .await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 1300
    })
    .await;
    assert_eq!(
        db.count("parked_at IS NOT NULL").await,
        0,
        "a fatal error parks nothing"
    );
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert!(
        metric_value(&metrics, "outbox_relay_producer_rebuilds_total") > 0.0,
        "{metrics}"
    );
    relay.stop().await;

    let records = consume(&cluster.bootstrap_servers(), "outbox.event.fatal", 1300);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(
        duplicates <= 200,
        "duplicates bounded by one batch, got {duplicates}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_in_order() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("outbox.event.retry", 3, 3).unwrap();
    let relay =
        RunningRelay::start(mock_settings(&db, &cluster, "[relay]\nbatch_size = 300\n")).await;
    db.insert(&stream("retry", 40, 200)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 200
    })
    .await;

    use RDKafkaRespErr::*;
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    db.insert(&stream("retry", 40, 2000)).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 2200
    })
    .await;
    assert_eq!(
        db.count("parked_at IS NOT NULL").await,
        0,
        "retriable errors park nothing"
    );
    relay.stop().await;

    let records = consume(&cluster.bootstrap_servers(), "outbox.event.retry", 2200);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(
        duplicates <= 300,
        "duplicates bounded by one batch, got {duplicates}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leaders_moving_mid_flight_lose_and_reorder_nothing() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("outbox.event.moving", 3, 3).unwrap();
    let relay =
        RunningRelay::start(mock_settings(&db, &cluster, "[relay]\nbatch_size = 250\n")).await;
    let rows = stream("moving", 60, 6000);
    for (round, chunk) in rows.chunks(1000).enumerate() {
        db.insert(chunk).await;
        // Move every partition's leader to another broker while the chunk is in flight.
        for partition in 0..3 {
            let leader = 1 + ((partition + round as i32 + 1) % 3);
            cluster
                .partition_leader("outbox.event.moving", partition, Some(leader))
                .unwrap();
        }
    }
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 6000
    })
    .await;
    relay.stop().await;
    let records = consume(&cluster.bootstrap_servers(), "outbox.event.moving", 6000);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(duplicates <= 250 * 6, "{duplicates} duplicates");
}

/// The broker is away briefly, then for longer than the stall threshold (a shortened
/// stand-in for minutes): nothing is marked meanwhile, the alarm rises for the long outage
/// and clears by itself, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_and_long_broker_outages() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.event.outage", 3, 1).unwrap();
    let relay = RunningRelay::start(mock_settings(
        &db,
        &cluster,
        "[relay]\nstall_after = \"3s\"\n",
    ))
    .await;
    let health = relay.health.clone();
    db.insert(&stream("outage", 20, 100)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 100
    })
    .await;

    // Short: back before the stall threshold.
    cluster.broker_down(1).unwrap();
    db.insert(&stream("outage", 20, 300)).await;
    wait_for("rows in flight", CONDITION_TIMEOUT, || async {
        health.in_flight() > 0
    })
    .await;
    assert_eq!(
        db.sent().await,
        100,
        "nothing marked while the broker is down"
    );
    cluster.broker_up(1).unwrap();
    wait_for("short outage drained", CONDITION_TIMEOUT, || async {
        db.sent().await == 400
    })
    .await;

    // Long: past the stall threshold.
    cluster.broker_down(1).unwrap();
    db.insert(&stream("outage", 20, 300)).await;
    wait_for("the stall alarm", CONDITION_TIMEOUT, || async {
        health.stalled()
    })
    .await;
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "outbox_relay_stalled"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        db.sent().await,
        400,
        "nothing marked during the long outage"
    );
    cluster.broker_up(1).unwrap();
    wait_for("long outage drained", CONDITION_TIMEOUT, || async {
        db.sent().await == 700
    })
    .await;
    wait_for("the alarm clears by itself", CONDITION_TIMEOUT, || async {
        !health.stalled()
    })
    .await;
    relay.stop().await;

    let records = consume(&cluster.bootstrap_servers(), "outbox.event.outage", 700);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(duplicates <= 600, "{duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_failures_park_nothing_and_publishing_resumes() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.event.acl", 3, 1).unwrap();
    let relay = RunningRelay::start(mock_settings(&db, &cluster, "")).await;
    db.insert(&stream("acl", 10, 50)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 50
    })
    .await;

    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
    );
    db.insert(&stream("acl", 10, 500)).await;
    wait_for_metric(
        relay.http_addr,
        "outbox_relay_publish_errors_total{kind=\"authorization_failed\"",
    )
    .await;
    // Once the grant is back (the injected errors are used up), everything flows.
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 550
    })
    .await;
    assert_eq!(
        db.count("parked_at IS NOT NULL").await,
        0,
        "nothing parked for a global error"
    );
    relay.stop().await;
    let records = consume(&cluster.bootstrap_servers(), "outbox.event.acl", 550);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(duplicates <= 500, "{duplicates} duplicates");
}

/// One Produce request refused whole, as a broker refuses a record batch over the topic's
/// size limit or with one bad record: the innocent rows of that batch are sent again one
/// record per request, and accepted, so nothing is parked and nothing is lost or reordered.
async fn a_record_batch_refused_once(err: RDKafkaRespErr, topic_suffix: &str) {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(3).unwrap();
    let topic = format!("outbox.event.{topic_suffix}");
    cluster.create_topic(&topic, 3, 3).unwrap();
    let relay =
        RunningRelay::start(mock_settings(&db, &cluster, "[relay]\nbatch_size = 500\n")).await;
    db.insert(&stream(topic_suffix, 5, 50)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 50
    })
    .await;

    cluster.request_errors(RDKafkaApiKey::Produce, &[err]);
    db.insert(&stream(topic_suffix, 5, 300)).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 350
    })
    .await;
    assert_eq!(
        db.count("parked_at IS NOT NULL").await,
        0,
        "a record batch refused once parks nothing"
    );
    assert!(
        relay.health.refused_record_batches() >= 1,
        "the injected refusal reached the relay"
    );
    let rebuilds = relay.health.producer_rebuilds();
    assert!(rebuilds <= 2, "one rebuild for the refusal, got {rebuilds}");
    relay.stop().await;
    let records = consume(&cluster.bootstrap_servers(), &topic, 350);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(duplicates <= 300, "{duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_batch_refused_once_as_too_large_parks_nothing() {
    a_record_batch_refused_once(
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        "toolarge",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_batch_refused_once_as_invalid_parks_nothing() {
    a_record_batch_refused_once(RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD, "invalid").await;
}

/// One partition's leader refuses every record, as a broker refuses a row that is too
/// large on its own: only those refusals park rows, one per aggregate of that partition
/// (the rest of each such aggregate waits behind it), every other partition flows, and
/// each parked row costs at most one producer rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_rows_refused_on_their_own_are_parked() {
    let db = TestDb::new().await;
    let brokers = MockBrokers::new(3);
    let cluster = brokers.cluster();
    let topic = "outbox.event.alone";
    cluster.create_topic(topic, 3, 3).unwrap();
    for partition in 0..3 {
        cluster
            .partition_leader(topic, partition, Some(partition + 1))
            .unwrap();
    }
    let relay = RunningRelay::start(mock_settings(&db, &cluster, "")).await;
    // One row per aggregate first, to learn each aggregate's partition.
    db.insert(&stream("alone", 12, 12)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 12
    })
    .await;
    let partition_of: HashMap<String, i32> = db
        .rows()
        .await
        .into_iter()
        .map(|r| (r.aggregate_id, r.kafka_partition.unwrap()))
        .collect();
    let refusing = 1; // led by broker 2
    let refused_aggregates = partition_of.values().filter(|p| **p == refusing).count();
    assert!(refused_aggregates > 0, "{partition_of:?}");

    brokers.push_produce_errors(
        2,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        100_000,
    );
    db.insert(&stream("alone", 12, 240)).await;
    let healthy_rows = 12 + 240 / 12 * (12 - refused_aggregates) as i64;
    wait_for(
        "rows of healthy partitions marked",
        CONDITION_TIMEOUT,
        || async { db.sent().await == healthy_rows },
    )
    .await;
    wait_for(
        "one parked row per refused aggregate",
        CONDITION_TIMEOUT,
        || async { db.count("parked_at IS NOT NULL").await == refused_aggregates as i64 },
    )
    .await;
    let rebuilds = relay.health.producer_rebuilds();
    relay.stop().await;

    // Each parked row is the first unsent row of an aggregate on the refusing partition,
    // refused by the broker on its own; the rest of its aggregate waits unparked.
    let parked: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, aggregate_id, park_reason FROM outbox WHERE parked_at IS NOT NULL ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let rows = db.rows().await;
    let mut first_unsent: BTreeMap<&str, i64> = BTreeMap::new();
    for row in rows.iter().filter(|r| !r.sent) {
        first_unsent
            .entry(row.aggregate_id.as_str())
            .or_insert(row.id);
    }
    assert_eq!(parked.len(), refused_aggregates, "{parked:?}");
    for (id, aggregate, reason) in &parked {
        assert_eq!(partition_of[aggregate], refusing, "row {id} of {aggregate}");
        assert_eq!(
            first_unsent[aggregate.as_str()],
            *id,
            "row {id} of {aggregate}"
        );
        assert_eq!(reason, "rejected_by_broker", "row {id}");
    }
    assert!(
        rows.iter()
            .all(|r| r.sent || partition_of[&r.aggregate_id] == refusing),
        "every row of a healthy partition is sent"
    );
    assert!(
        rebuilds <= parked.len() as u64 + 2,
        "{rebuilds} rebuilds for {} refused rows",
        parked.len()
    );
    let sent: Vec<DbRow> = rows.into_iter().filter(|r| r.sent).collect();
    let records = consume(&cluster.bootstrap_servers(), topic, sent.len());
    let duplicates = assert_contract(&sent, &records);
    assert!(duplicates <= 240, "{duplicates} duplicates");
}

/// Authorization refused for as long as it takes: nothing is parked, readiness is false
/// and the error counted meanwhile, the producer is rebuilt with backoff rather than in a
/// loop, and everything flows once the grant is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lasting_authorization_failure_holds_readiness_and_parks_nothing() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.event.denied", 3, 1).unwrap();
    let relay = RunningRelay::start(mock_settings(&db, &cluster, "")).await;
    db.insert(&stream("denied", 10, 50)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 50
    })
    .await;

    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 5000],
    );
    db.insert(&stream("denied", 10, 200)).await;
    wait_for("readiness false", CONDITION_TIMEOUT, || async {
        http_get(relay.http_addr, "/readyz").await.0 == 503
    })
    .await;
    wait_for_metric(
        relay.http_addr,
        "outbox_relay_publish_errors_total{kind=\"authorization_failed\"",
    )
    .await;
    let rebuilds_then = relay.health.producer_rebuilds();
    // A few seconds of the denial: the rebuilds back off instead of spinning.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < watch_until {
        assert_eq!(http_get(relay.http_addr, "/readyz").await.0, 503);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rebuilds = relay.health.producer_rebuilds() - rebuilds_then;
    assert!(rebuilds <= 6, "{rebuilds} rebuilds in 6 s of denial");
    assert_eq!(db.sent().await, 50, "nothing marked while denied");
    assert_eq!(db.count("parked_at IS NOT NULL").await, 0);

    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 250
    })
    .await;
    wait_for("ready again", CONDITION_TIMEOUT, || async {
        http_get(relay.http_addr, "/readyz").await.0 == 200
    })
    .await;
    relay.stop().await;
    let records = consume(&cluster.bootstrap_servers(), "outbox.event.denied", 250);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(duplicates <= 200, "{duplicates} duplicates");
}

/// The broker is gone and librdkafka's queue is full with the batch only partly queued:
/// the stall alarm takes readiness away, and a stop is honoured within the drain timeout.
/// Nothing queued then is marked, and a relay started later delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_with_the_broker_gone_honours_stall_and_shutdown() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.event.full", 3, 1).unwrap();
    let extra = "[relay]\nbatch_size = 500\nstall_after = \"1s\"\ndrain_timeout = \"2s\"\n\
                 [kafka.properties]\n\"queue.buffering.max.messages\" = 50\n";
    let relay = RunningRelay::start(mock_settings(&db, &cluster, extra)).await;
    db.insert(&stream("full", 10, 20)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 20
    })
    .await;

    cluster.broker_down(1).unwrap();
    db.insert(&stream("full", 10, 500)).await;
    let health = relay.health.clone();
    wait_for("the stall alarm", CONDITION_TIMEOUT, || async {
        health.stalled()
    })
    .await;
    assert_eq!(http_get(relay.http_addr, "/readyz").await.0, 503);

    relay.cancel.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(15), relay.handle).await;
    let outcome = stopped.expect("the relay stops within the drain timeout and its grace");
    outcome.expect("relay task").expect("relay stopped cleanly");
    assert_eq!(db.sent().await, 20, "nothing marked without the broker");

    cluster.broker_up(1).unwrap();
    let relay = RunningRelay::start(mock_settings(&db, &cluster, extra)).await;
    wait_for("all rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 520
    })
    .await;
    relay.stop().await;
    let records = consume(&cluster.bootstrap_servers(), "outbox.event.full", 520);
    let duplicates = assert_contract(&db.rows().await, &records);
    assert!(duplicates <= 500, "{duplicates} duplicates");
}

/// A stop whose drain deadline passes with produce requests in flight abandons them (their
/// rows stay pending and are sent again). The purge that abandons them is the relay's own
/// doing, not a fault: librdkafka's fatal "Purged in flight" (its gap-less guarantee) must
/// not reach the log as an error, nor a FATAL line at 3 a.m.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_abandons_requests_in_flight_logs_no_fatal_error() {
    let db = TestDb::new().await;
    let brokers = MockBrokers::new(1);
    let cluster = brokers.cluster();
    cluster.create_topic("outbox.event.abandon", 3, 1).unwrap();
    let http_port = free_port();
    let child = relay_command(&db.url, &cluster.bootstrap_servers())
        .env(
            "OUTBOX_RELAY_HTTP__LISTEN",
            format!("127.0.0.1:{http_port}"),
        )
        .env("OUTBOX_RELAY_RELAY__DRAIN_TIMEOUT", "1s")
        .arg("run")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    db.insert(&stream("abandon", 5, 10)).await;
    wait_for("warm-up rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 10
    })
    .await;

    // The broker now answers produce requests after a minute: the rows stay in flight.
    brokers.push_produce_answers(
        1,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        Duration::from_secs(60),
        10,
    );
    db.insert(&stream("abandon", 5, 10)).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    wait_for("rows in flight", CONDITION_TIMEOUT, || async {
        let (_, metrics) = http_get(addr, "/metrics").await;
        metric_value(&metrics, "outbox_relay_in_flight_rows") > 0.0
    })
    .await;
    let pid = child.id();
    signal(pid, libc::SIGTERM);
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || exited.send(child.wait_with_output()));
    let Ok(output) = exit.recv_timeout(Duration::from_secs(30)) else {
        signal(pid, libc::SIGKILL);
        panic!("the relay did not stop within 30 s of SIGTERM with a 1 s drain timeout");
    };
    let output = output.unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("drain deadline passed"),
        "the relay says the rows in flight stay pending: {text}"
    );
    let errors: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("FATAL") || line.contains(" ERROR "))
        .collect();
    assert!(
        errors.is_empty(),
        "a clean stop logged errors: {errors:#?}\n{text}"
    );
    assert_eq!(
        db.sent().await,
        10,
        "nothing marked without an acknowledgement"
    );
}
