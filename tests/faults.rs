//! Broker faults a real broker will not make on demand, injected with rdkafka's
//! MockCluster (it speaks the Kafka protocol): a broker down, and a fatal producer error.
//! Each test reads the mock cluster back with a real consumer.

mod support;

use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;
use support::*;

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
