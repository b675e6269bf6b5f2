//! What the broker says about each topic's record size limit (`max.message.bytes`), asked
//! once per topic and again every few minutes. A limit the broker does not report (the
//! principal lacks DescribeConfigs, say) is unknown, said once per topic at warn, and
//! checks nothing: the producer's own limit still applies.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaResult;
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long an answer (or the lack of one) is trusted before asking again: a lowered limit
/// or a granted DescribeConfigs is seen within this.
const REFRESH_AFTER: Duration = Duration::from_secs(300);
/// How long one question may take; the batch waits for it once per topic per hour.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct TopicLimits {
    admin: Option<AdminClient<DefaultClientContext>>,
    properties: Vec<(String, String)>,
    known: foldhash::HashMap<String, (Instant, Option<usize>)>,
    /// Topics whose limit could not be learnt, already warned about.
    warned: foldhash::HashSet<String>,
}

impl TopicLimits {
    /// The admin client is built on first use from the producer's connection settings.
    pub(crate) fn new(producer_properties: &[(String, String)]) -> Self {
        let properties = crate::config::admin_properties(producer_properties);
        Self {
            admin: None,
            properties,
            known: foldhash::HashMap::default(),
            warned: foldhash::HashSet::default(),
        }
    }

    /// The topic's `max.message.bytes`, when the broker reports it.
    pub(crate) async fn limit(&mut self, topic: &str) -> Option<usize> {
        if let Some((asked_at, limit)) = self.known.get(topic) {
            if asked_at.elapsed() < REFRESH_AFTER {
                return *limit;
            }
        }
        let limit = match self.describe(topic).await {
            Ok(Some(limit)) => Some(limit),
            Ok(None) => {
                self.warn_once(topic, "the broker did not report it".into());
                None
            }
            Err(err) => {
                self.warn_once(topic, err.to_string());
                None
            }
        };
        if self.known.len() > 10_000 {
            self.known.clear();
        }
        self.known
            .insert(topic.to_string(), (Instant::now(), limit));
        limit
    }

    fn warn_once(&mut self, topic: &str, why: String) {
        if self.warned.len() < 10_000 && self.warned.insert(topic.to_string()) {
            // A request that timed out says nothing of the grants: the brokers did not answer.
            let advice = if why.contains("Timed out") || why.contains("TimedOut") {
                "the brokers did not answer in time (see whether they are reachable), or the principal lacks DescribeConfigs on its topics"
            } else {
                "grant the relay's principal DescribeConfigs on its topics"
            };
            warn!(
                topic,
                error = %why,
                "cannot learn the topic's max.message.bytes, so rows are checked only against relay.max_message_bytes; {advice}"
            );
        } else {
            debug!(topic, error = %why, "the topic's max.message.bytes is still unknown");
        }
    }

    /// Asks the broker now, without the cache: what `check` shows.
    pub(crate) async fn describe(&mut self, topic: &str) -> KafkaResult<Option<usize>> {
        let admin = match &self.admin {
            Some(admin) => admin,
            None => {
                let mut config = ClientConfig::new();
                for (k, v) in &self.properties {
                    config.set(k, v);
                }
                self.admin.insert(config.create()?)
            }
        };
        let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
        let answers = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
            .await?;
        let Some(Ok(resource)) = answers.into_iter().next() else {
            return Ok(None);
        };
        let value = resource
            .get("max.message.bytes")
            .and_then(|entry| entry.value.as_deref());
        Ok(match value.map(str::parse::<usize>) {
            Some(Ok(limit)) => Some(limit),
            Some(Err(_)) => {
                warn!(
                    topic,
                    value, "the broker reported an unreadable max.message.bytes"
                );
                None
            }
            None => None,
        })
    }
}
