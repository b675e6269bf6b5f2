//! The Kafka producer: idempotent, acks=all, no message timeout. Each row is one message
//! whose delivery report (row id, result) arrives on a channel, tagged with the producer's
//! generation so reports from a torn-down producer are never mistaken for current ones. A
//! queued batch is sent at once, without waiting out `linger.ms`.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::statistics::Statistics;
use tokio::sync::mpsc;

use crate::encode::EncodedRecord;
use crate::kafka::classify::{ErrorClass, classify};
use crate::telemetry::{Metrics, ProducerStatistics, emit};

/// What the producer reports back to the relay.
#[derive(Debug)]
pub(crate) enum ProducerEvent {
    /// One row's delivery report.
    Delivered {
        generation: u64,
        row_id: i64,
        result: Result<(i32, i64), KafkaError>,
    },
    /// librdkafka raised a fatal error: the producer must be rebuilt.
    Fatal { generation: u64, reason: String },
    /// A client-level error that is nobody's row (authentication failed, for one):
    /// counted, and readiness false; the batch in flight goes on.
    Global {
        generation: u64,
        kind: &'static str,
        reason: String,
    },
}

/// Bounded: a delivery report waits for room (it must not be lost), a client error is
/// dropped when there is none (it is a hint, and a broker that stays away would otherwise
/// fill memory with them while the relay is idle).
pub(crate) type EventSender = mpsc::Sender<ProducerEvent>;
pub(crate) type EventReceiver = mpsc::Receiver<ProducerEvent>;

/// Whether librdkafka's message reports the consequence of a purge of requests in flight,
/// which only the relay asks for: at a drain deadline (the producer's drop purges), or after
/// a fatal error. The gap-less guarantee turns it into a fatal error logged as `FATAL` at
/// emergency level, while the relay has already logged, as a warning, that those rows stay
/// pending and are sent again.
fn is_own_purge(message: &str) -> bool {
    message.contains("Purged in flight")
}

/// librdkafka callbacks, run on the producer's polling thread.
pub(crate) struct RelayContext {
    generation: u64,
    events: EventSender,
    metrics: Metrics,
}

impl ClientContext for RelayContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        // librdkafka calls the gap-less guarantee experimental each time a producer is
        // built; the relay turns it on deliberately, so this is not worth a warning.
        if facility == "CONFWARN" && message.contains("enable.gapless.guarantee") {
            tracing::debug!(target: "librdkafka", "{facility} {message}");
            return;
        }
        if is_own_purge(message) {
            tracing::debug!(target: "librdkafka", "{facility} {message}");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "{facility} {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "{facility} {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{facility} {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{facility} {message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        self.metrics.scope(|| emit(ProducerStatistics(&statistics)));
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if is_own_purge(reason) {
            // The relay purged the requests itself and says so; the producer is dropped or
            // rebuilt next either way.
            tracing::debug!(target: "librdkafka", error = %error, "{reason}");
            return;
        }
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::Fatal)
        ) {
            tracing::error!(target: "librdkafka", error = %error, "{reason}");
            let _ = self.events.try_send(ProducerEvent::Fatal {
                generation: self.generation,
                reason: reason.to_string(),
            });
        } else if let (ErrorClass::PermanentGlobal, kind) = classify(&error) {
            tracing::error!(target: "librdkafka", error = %error, kind, "{reason}");
            let _ = self.events.try_send(ProducerEvent::Global {
                generation: self.generation,
                kind,
                reason: format!("{error}: {reason}"),
            });
        } else {
            // Connection trouble also reaches `log` (with librdkafka's own suppression of
            // repeats); logging it here again would flood the log while a broker is down.
            tracing::debug!(target: "librdkafka", error = %error, "{reason}");
        }
    }
}

impl ProducerContext for RelayContext {
    /// The row id (ids are positive, so it fits; a usize opaque costs no allocation).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, row_id: usize) {
        let result = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.clone()),
        };
        // A report must not be lost, so a full channel is waited out. It never fills while
        // the relay listens (its capacity covers every report of a batch); this may run on
        // an async thread when the producer is dropped there, so it cannot block_on.
        let mut event = ProducerEvent::Delivered {
            generation: self.generation,
            row_id: row_id as i64,
            result,
        };
        loop {
            match self.events.try_send(event) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(again)) => {
                    event = again;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// The cluster's topics, as [`RowProducer::cluster_topics`] found them.
#[derive(Debug, Default)]
pub(crate) struct ClusterTopics(std::collections::HashMap<String, TopicAnswer>);

impl ClusterTopics {
    /// A topic the answer does not list does not exist (or is hidden from this principal).
    pub(crate) fn about(&self, topic: &str) -> TopicAnswer {
        self.0.get(topic).cloned().unwrap_or(TopicAnswer::Unknown)
    }
}

/// What the cluster says of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TopicAnswer {
    Known,
    /// It does not exist.
    Unknown,
    /// Another topic-level error (authorization, say): producing will tell.
    Refused(String),
    /// No answer (brokers down, a timeout).
    Unanswered(String),
}

/// A producer of one generation.
pub(crate) struct RowProducer {
    inner: Arc<ThreadedProducer<RelayContext>>,
    generation: u64,
    /// `linger.ms`: how long [`RowProducer::send_queued_now`] holds its flush at most.
    linger_ms: i32,
}

impl RowProducer {
    /// Builds a producer from `properties`; reports go to `events`. An `isolating`
    /// producer sends one record per request, one request at a time per broker, so that a
    /// refusal concerns one row alone; `batch_bytes` caps a record batch's size.
    pub(crate) fn build(
        properties: &[(String, String)],
        generation: u64,
        events: EventSender,
        metrics: Metrics,
        isolating: bool,
        batch_bytes: Option<usize>,
    ) -> KafkaResult<Self> {
        let mut config = ClientConfig::new();
        for (key, value) in properties {
            config.set(key, value);
        }
        if let Some(bytes) = batch_bytes {
            // librdkafka packs a partition's record batch up to this size; the broker
            // refuses a batch over the topic's limit whole.
            config.set("batch.size", bytes.to_string());
        }
        if isolating {
            // One record per request and one request at a time: a refusal is that row's,
            // and the gap-less purge that follows it leaves no other row of its broker in
            // flight to be refused in the same round.
            config.set("batch.num.messages", "1");
            config.set("max.in.flight.requests.per.connection", "1");
        }
        let inner: ThreadedProducer<RelayContext> = config.create_with_context(RelayContext {
            generation,
            events,
            metrics,
        })?;
        let linger_ms = properties
            .iter()
            .find(|(key, _)| key == "linger.ms")
            .and_then(|(_, value)| value.parse().ok())
            // librdkafka's own default, should the property ever be left out.
            .unwrap_or(5);
        Ok(Self {
            inner: Arc::new(inner),
            generation,
            linger_ms,
        })
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Hands one row to librdkafka. On error the row was not queued.
    pub(crate) fn send(&self, row_id: i64, record: &EncodedRecord<'_>) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(3);
        for (key, value) in record.headers() {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut message = BaseRecord::with_opaque_to(&record.topic, row_id as usize)
            .key(record.key.as_bytes())
            .headers(headers);
        if let Some(value) = record.value {
            message = message.payload(value);
        }
        self.inner.send(message).map_err(|(error, _)| error)
    }

    /// Sends what is queued now instead of after `linger.ms`. librdkafka treats linger as
    /// immediate while a flush is in progress, so this holds a flush on a blocking thread
    /// until the queue is delivered or linger has passed (when it would be sent anyway),
    /// at most a second, which only has to outlast waking the broker threads. Called once
    /// a whole batch is queued, it still goes out as one request per partition, where
    /// `linger.ms=0` would send its first rows one request each. Must be called from
    /// within the tokio runtime.
    pub(crate) fn send_queued_now(&self) {
        if self.linger_ms <= 0 {
            return;
        }
        let (producer, linger_ms) = (Arc::clone(&self.inner), self.linger_ms.min(1000));
        tokio::task::spawn_blocking(move || {
            // SAFETY: the pointer is the client `producer` keeps alive for the whole call,
            // and rd_kafka_flush may be called from any thread. In event mode (how
            // rust-rdkafka runs the producer) it only waits; the polling thread still
            // takes the delivery reports.
            unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), linger_ms) };
        });
    }

    /// Purges every message queued or in flight; each gets a purge report. Used after a
    /// fatal error, when requests still in flight would otherwise never report.
    pub(crate) fn purge_all(&self) {
        self.inner
            .purge(PurgeConfig::default().queue().inflight().non_blocking());
    }

    pub(crate) fn fatal_error(&self) -> Option<String> {
        self.inner
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// The cluster's topics as this principal sees them, each with its answer, from one
    /// metadata request for all topics: asking for one topic by name would make librdkafka
    /// keep an object for it (and query it every second) for the producer's lifetime,
    /// whatever name a row chose. Blocks up to `timeout`: call it off the async threads.
    pub(crate) fn cluster_topics(&self, timeout: Duration) -> Result<ClusterTopics, String> {
        use rdkafka::types::RDKafkaRespErr as E;
        let metadata = self
            .inner
            .client()
            .fetch_metadata(None, timeout)
            .map_err(|err| err.to_string())?;
        Ok(ClusterTopics(
            metadata
                .topics()
                .iter()
                .map(|t| {
                    let answer = match t.error() {
                        None if !t.partitions().is_empty() => TopicAnswer::Known,
                        None => TopicAnswer::Unanswered("the topic has no partitions yet".into()),
                        Some(E::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => TopicAnswer::Unknown,
                        Some(other) => TopicAnswer::Refused(format!("{other:?}")),
                    };
                    (t.name().to_string(), answer)
                })
                .collect(),
        ))
    }

    /// A handle on the same producer, for a blocking call on another thread.
    pub(crate) fn handle(&self) -> RowProducer {
        RowProducer {
            inner: self.inner.clone(),
            generation: self.generation,
            linger_ms: self.linger_ms,
        }
    }

    /// Lists the cluster's brokers and topics, as `check` needs. Blocking: call it off the
    /// async runtime.
    pub(crate) fn describe_cluster(&self, timeout: Duration) -> KafkaResult<ClusterSummary> {
        let metadata = self.inner.client().fetch_metadata(None, timeout)?;
        Ok(ClusterSummary {
            brokers: metadata
                .brokers()
                .iter()
                .map(|b| format!("{}:{} (id {})", b.host(), b.port(), b.id()))
                .collect(),
            topics: metadata
                .topics()
                .iter()
                .map(|t| t.name().to_string())
                .collect(),
        })
    }
}

/// What a metadata request said about the cluster.
#[derive(Debug, Clone)]
pub(crate) struct ClusterSummary {
    pub brokers: Vec<String>,
    pub topics: Vec<String>,
}
