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
        metrics.contains("outbox_relay_producer_rebuilds_total"),
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
