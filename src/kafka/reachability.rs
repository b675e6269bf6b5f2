//! Whether the brokers answer, asked by a metadata round trip at an interval: an idle relay
//! pointed at a wrong address, or at brokers that went away, is not ready and says so, even
//! though it has nothing to send. Each change is logged once.

use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::telemetry::{Health, PUBLISH_ERRORS};

/// How long one round trip may take before the brokers count as unreachable.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(10);
/// A topic named only to keep the metadata request small; it need not exist, and clients
/// of this relay never create topics.
const PROBE_TOPIC: &str = "__consumer_offsets";

/// Asks the brokers every `every` until `cancel`, with the connection settings of the
/// producer's `properties`.
pub(crate) async fn watch_brokers(
    properties: Vec<(String, String)>,
    health: Arc<Health>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut config = ClientConfig::new();
    for (key, value) in crate::config::consumer_properties(&properties) {
        config.set(key, value);
    }
    let client: BaseConsumer = match config.create() {
        Ok(client) => client,
        Err(err) => {
            warn!(error = %err, "cannot create the client that checks the brokers answer; readiness follows produce results only");
            health.set_broker_reachable(true);
            return;
        }
    };
    let client = Arc::new(client);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let asking = client.clone();
        let answer = tokio::task::spawn_blocking(move || {
            asking
                .fetch_metadata(Some(PROBE_TOPIC), ROUND_TRIP_TIMEOUT)
                .map(|metadata| metadata.brokers().len())
        })
        .await;
        match answer {
            Ok(Ok(brokers)) if brokers > 0 => {
                if health.set_broker_reachable(true) {
                    info!(brokers, "the brokers answer again");
                }
            }
            Ok(Ok(_)) => note_unreachable(&health, "the cluster listed no brokers"),
            Ok(Err(err)) => note_unreachable(&health, &err.to_string()),
            Err(err) => note_unreachable(&health, &err.to_string()),
        }
    }
}

fn note_unreachable(health: &Health, why: &str) {
    counter!(PUBLISH_ERRORS, "kind" => "transport").increment(1);
    if health.set_broker_reachable(false) {
        warn!(
            error = why,
            "the brokers do not answer a metadata request: not ready until they do; check kafka.bootstrap_servers, the network and the credentials"
        );
    }
}
