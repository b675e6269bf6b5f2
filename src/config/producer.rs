//! The producer contract, written once: the librdkafka properties the relay always sets
//! (acks=all, idempotence, no message timeout, gap-less delivery), the properties that would
//! weaken order or acknowledgement and are refused, and the producer properties built from
//! the settings with the contract applied last, so nothing overrides it.

use super::*;

/// The contract: each property the relay sets, the value it sets, the spellings of that
/// value a configuration may repeat, and why. A configuration may name one only with one
/// of those values.
const CONTRACT: &[(&str, &str, &[&str], &str)] = &[
    (
        "enable.idempotence",
        "true",
        &["true"],
        "the relay always enables idempotence, which keeps retries in order and without duplicates",
    ),
    (
        "acks",
        "all",
        &["all", "-1"],
        "the relay always uses acks=all: a row is marked only after all in-sync replicas have it",
    ),
    (
        "message.timeout.ms",
        "0",
        &["0"],
        "the relay sets 0 (retry until delivered) and raises a stall alarm instead; a finite timeout lets later rows of a partition land before an earlier one",
    ),
    (
        "enable.gapless.guarantee",
        "true",
        &["true"],
        "the relay keeps it on so that a row refused by the broker cannot be overtaken by later rows",
    ),
];

/// Other names librdkafka accepts for a property of the [`CONTRACT`].
const CONTRACT_ALIASES: &[(&str, &str)] = &[
    ("request.required.acks", "acks"),
    ("delivery.timeout.ms", "message.timeout.ms"),
];

/// Properties an admin client must not take from the producer's: they would start an
/// idempotent session of its own, or statistics nobody reads.
const PRODUCER_ONLY: &[&str] = &[
    "enable.idempotence",
    "enable.gapless.guarantee",
    "statistics.interval.ms",
    "transactional.id",
];

/// The connection settings of `producer_properties` for an admin client, named apart.
pub(crate) fn admin_properties(producer_properties: &[(String, String)]) -> Vec<(String, String)> {
    producer_properties
        .iter()
        .filter(|(k, _)| !PRODUCER_ONLY.contains(&k.as_str()))
        .map(|(k, v)| {
            if k == "client.id" {
                (k.clone(), format!("{v}-admin"))
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

/// Properties only a producer takes: a consumer would warn about each.
const PRODUCER_SIDE: &[&str] = &[
    "acks",
    "request.required.acks",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "compression.type",
    "compression.codec",
    "compression.level",
    "batch.size",
    "batch.num.messages",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "request.timeout.ms",
    "retries",
    "message.send.max.retries",
    "partitioner",
    "sticky.partitioning.linger.ms",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
];

/// The connection settings of `producer_properties` for a consumer that reads records
/// back, named apart.
pub(crate) fn consumer_properties(
    producer_properties: &[(String, String)],
) -> Vec<(String, String)> {
    admin_properties(producer_properties)
        .into_iter()
        .filter(|(k, _)| !PRODUCER_SIDE.contains(&k.as_str()))
        .map(|(k, v)| {
            if k == "client.id" {
                let named = v
                    .strip_suffix("-admin")
                    .map(|base| format!("{base}-verify"));
                (k, named.unwrap_or(v))
            } else {
                (k, v)
            }
        })
        .collect()
}

/// The contract's entry for `name` (itself or an alias): (property, value, accepted, why).
fn contract_entry(
    name: &str,
) -> Option<(&'static str, &'static str, &'static [&'static str], String)> {
    let (canonical, alias) = match CONTRACT_ALIASES.iter().find(|(a, _)| *a == name) {
        Some((alias, canonical)) => (*canonical, Some(*alias)),
        None => (name, None),
    };
    let (property, value, accepted, why) = CONTRACT.iter().find(|(p, ..)| *p == canonical)?;
    let why = match alias {
        Some(_) => format!("alias of {property}: {why}"),
        None => why.to_string(),
    };
    Some((property, value, accepted, why))
}

/// What a guarded librdkafka property may be set to.
pub(super) enum Accepts {
    /// Never: the relay refuses the property whatever its value.
    Nothing,
    /// Only these values (compared case-insensitively): the relay's own.
    Values(&'static [&'static str]),
    /// Integers in this range.
    Range(i64, i64),
    /// Values this predicate accepts.
    Check(fn(&str) -> bool),
}

/// Further librdkafka properties the contract depends on (acks after replication, every ack
/// reported, per-aggregate order on the key's partition, the configured cluster), with
/// what they may be set to and why. docs/kafka-properties.md goes through the rest.
pub(super) const GUARDED_PROPERTIES: &[(&str, Accepts, &str)] = &[
    (
        "message.send.max.retries",
        Accepts::Values(&["2147483647"]),
        "a row that runs out of retries fails while later rows of its partition may already be acknowledged, so its resend lands after them",
    ),
    (
        "retries",
        Accepts::Values(&["2147483647"]),
        "alias of message.send.max.retries: a row that runs out of retries can be overtaken by later rows of its partition",
    ),
    (
        "max.in.flight.requests.per.connection",
        Accepts::Range(1, 5),
        "the idempotent producer keeps order only with at most 5 requests in flight",
    ),
    (
        "max.in.flight",
        Accepts::Range(1, 5),
        "alias of max.in.flight.requests.per.connection: the idempotent producer keeps order only with at most 5 requests in flight",
    ),
    (
        "queue.buffering.backpressure.threshold",
        Accepts::Values(&["1"]),
        "librdkafka requires 1 with idempotence",
    ),
    (
        "queuing.strategy",
        Accepts::Values(&["fifo"]),
        "lifo sends newer messages first, which reorders an aggregate",
    ),
    (
        "delivery.report.only.error",
        Accepts::Values(&["false"]),
        "with true librdkafka reports only failures, so no acknowledgement reaches the relay and no row is ever marked",
    ),
    (
        "partitioner",
        Accepts::Values(&["murmur2_random", "murmur2"]),
        "an aggregate's partition is murmur2 of its key, as the Java client computes it; another partitioner puts aggregates on other partitions than other producers do, or ignores the key",
    ),
    (
        "transactional.id",
        Accepts::Nothing,
        "it makes the producer transactional, and the relay never begins a transaction; replicas sharing the id would fence each other",
    ),
    (
        "test.mock.num.brokers",
        Accepts::Values(&["0"]),
        "it starts an in-process mock cluster instead of connecting to bootstrap.servers, so rows would be acknowledged without reaching Kafka",
    ),
    (
        "test.mock.broker.rtt",
        Accepts::Values(&["0"]),
        "it configures librdkafka's in-process mock cluster, which is for tests only",
    ),
    (
        "api.version.request",
        Accepts::Values(&["true"]),
        "without the version request librdkafka may assume a broker without the idempotent producer",
    ),
    (
        "broker.version.fallback",
        Accepts::Check(supports_idempotence),
        "brokers before 0.11 have no idempotent producer and no record headers",
    ),
    (
        "plugin.library.paths",
        Accepts::Nothing,
        "a plugin sees and can change every message and the configuration beyond the relay's checks",
    ),
    (
        "internal.termination.signal",
        Accepts::Values(&["0"]),
        "librdkafka would install a process-wide handler for that signal, which can take SIGTERM away from the relay's drain",
    ),
    (
        "topic.blacklist",
        Accepts::Nothing,
        "it makes existing topics look absent, so their rows would be held or parked as unknown",
    ),
];

/// `broker.version.fallback` values of brokers that support the idempotent producer.
pub(super) fn supports_idempotence(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    major > 0 || minor >= 11
}

/// A guarded or typed property's canonical name: librdkafka reads `topic.acks` as the
/// topic-level `acks` when `topic.acks` is not a global property of its own.
pub(super) fn canonical_property(name: &str) -> &str {
    match name.strip_prefix("topic.") {
        Some(rest)
            if contract_entry(rest).is_some()
                || GUARDED_PROPERTIES.iter().any(|(p, _, _)| *p == rest)
                || TYPED_PROPERTIES.iter().any(|(p, _)| *p == rest) =>
        {
            rest
        }
        _ => name,
    }
}

pub(super) fn accepts(accepts: &Accepts, value: &PropertyValue) -> bool {
    let v = value.to_string().to_ascii_lowercase();
    match accepts {
        Accepts::Nothing => false,
        Accepts::Values(values) => values.contains(&v.as_str()),
        Accepts::Range(low, high) => v.parse::<i64>().is_ok_and(|n| (*low..=*high).contains(&n)),
        Accepts::Check(check) => check(&v),
    }
}

/// librdkafka properties that a typed key of `[kafka]` already sets.
pub(super) const TYPED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "kafka.bootstrap_servers"),
    ("metadata.broker.list", "kafka.bootstrap_servers"),
    ("compression.type", "kafka.compression"),
    ("compression.codec", "kafka.compression"),
    ("linger.ms", "kafka.linger"),
    ("queue.buffering.max.ms", "kafka.linger"),
];

impl Settings {
    /// The librdkafka producer properties, safety settings last so nothing overrides them.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let mut props: Vec<(String, String)> = self
            .kafka
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        let typed = [
            ("bootstrap.servers", self.kafka.bootstrap_servers.clone()),
            ("compression.type", self.kafka.compression.clone()),
            ("linger.ms", self.kafka.linger.as_millis().to_string()),
            ("message.max.bytes", self.message_max_bytes().to_string()),
        ];
        let contract = CONTRACT.iter().map(|(k, v, ..)| (*k, v.to_string()));
        for (k, v) in typed.into_iter().chain(contract) {
            props.retain(|(name, _)| name != k);
            props.push((k.to_string(), v));
        }
        if !props.iter().any(|(k, _)| k == "partitioner") {
            props.push(("partitioner".into(), "murmur2_random".into()));
        }
        if !props.iter().any(|(k, _)| k == "client.id") {
            props.push(("client.id".into(), "outbox-relay".into()));
        }
        // librdkafka's queue holds one batch: a full queue waits for acks instead of
        // copying a backlog into memory.
        if !props.iter().any(|(k, _)| k == "queue.buffering.max.kbytes") {
            let kbytes =
                (self.relay.batch_max_bytes + self.relay.max_message_bytes + 4096).div_ceil(1024);
            props.push(("queue.buffering.max.kbytes".into(), kbytes.to_string()));
        }
        // Queue depth, round trip and batch size gauges come from these statistics.
        if !props.iter().any(|(k, _)| k == "statistics.interval.ms") {
            props.push(("statistics.interval.ms".into(), "15000".into()));
        }
        // A row names its topic: it must not make the broker create one.
        if !props.iter().any(|(k, _)| k == "allow.auto.create.topics") {
            props.push(("allow.auto.create.topics".into(), "false".into()));
        }
        // Client metrics push (KIP-714) is noise for brokers that do not support it.
        if !props.iter().any(|(k, _)| k == "enable.metrics.push") {
            props.push(("enable.metrics.push".into(), "false".into()));
        }
        props
    }

    /// librdkafka's `message.max.bytes` must leave room for the framing around the
    /// largest record the relay hands it.
    pub(super) fn message_max_bytes(&self) -> usize {
        let passed = self
            .kafka
            .properties
            .get("message.max.bytes")
            .and_then(|v| v.to_string().parse::<usize>().ok());
        passed.unwrap_or(0).max(self.relay.max_message_bytes + 4096)
    }

    /// The first property that turns off the verification of the brokers' certificates.
    pub(super) fn unverified_kafka_tls(&self) -> Option<(&str, String)> {
        self.kafka.properties.iter().find_map(|(name, value)| {
            let value = value.to_string();
            let off = match canonical_property(name) {
                "enable.ssl.certificate.verification" => value.eq_ignore_ascii_case("false"),
                "ssl.endpoint.identification.algorithm" => value.eq_ignore_ascii_case("none"),
                _ => false,
            };
            off.then_some((name.as_str(), value))
        })
    }

    /// The `kafka.properties` checks: the contract, the guarded and typed properties, TLS
    /// verification, and librdkafka's own word on each property.
    pub(super) fn validate_producer_properties(&self) -> Result<(), ConfigError> {
        if !self.kafka.allow_unverified_tls {
            if let Some((name, value)) = self.unverified_kafka_tls() {
                return Err(ConfigError::new(
                    format!("kafka.properties.\"{name}\""),
                    format!(
                        "= {value} turns off the verification of the brokers' certificates, so anyone on the path can pose as the cluster and read every event; remove it (give the CA with ssl.ca.location), or set kafka.allow_unverified_tls = true to accept the risk"
                    ),
                ));
            }
        }
        for (name, value) in &self.kafka.properties {
            let key = format!("kafka.properties.\"{name}\"");
            let canonical = canonical_property(name);
            if let Some((_, value_set, accepted, why)) = contract_entry(canonical) {
                if !accepted.contains(&value.to_string().to_ascii_lowercase().as_str()) {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "is refused: {why}; remove it (the relay uses {value_set}) (see docs/kafka-properties.md)"
                        ),
                    ));
                }
            }
            if let Some((_, allowed, why)) =
                GUARDED_PROPERTIES.iter().find(|(p, _, _)| *p == canonical)
            {
                if !accepts(allowed, value) {
                    let fix = match allowed {
                        Accepts::Nothing => "remove it".to_string(),
                        Accepts::Values(values) => {
                            format!("remove it (the relay uses {})", values[0])
                        }
                        Accepts::Range(low, high) => format!("use {low} to {high}, or remove it"),
                        Accepts::Check(_) => "remove it".to_string(),
                    };
                    return Err(ConfigError::new(
                        key,
                        format!("is refused: {why}; {fix} (see docs/kafka-properties.md)"),
                    ));
                }
            }
            if canonical == "queue.buffering.max.kbytes" {
                let needed = self.relay.max_message_bytes.div_ceil(1024) as i64;
                if !value
                    .to_string()
                    .parse::<i64>()
                    .is_ok_and(|kb| kb >= needed)
                {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "must be at least {needed} (relay.max_message_bytes in KiB): a row larger than librdkafka's queue could never be queued and would hold the relay for ever"
                        ),
                    ));
                }
            }
            if let Some((_, typed)) = TYPED_PROPERTIES.iter().find(|(p, _)| *p == canonical) {
                return Err(ConfigError::new(
                    key,
                    format!("is set by `{typed}`; set that key instead and remove this one"),
                ));
            }
        }
        // librdkafka itself says whether each property exists and takes that value.
        let mut native = rdkafka::ClientConfig::new();
        for (name, value) in &self.kafka.properties {
            native.set(name, value.to_string());
        }
        if let Err(err) = native.create_native_config() {
            let name = self
                .kafka
                .properties
                .keys()
                .find(|name| err.to_string().contains(name.as_str()))
                .cloned()
                .unwrap_or_default();
            let shown = if self.kafka.is_secret(&name) {
                "a librdkafka property is invalid".to_string()
            } else {
                // librdkafka quotes the values it refuses: none of a secret's.
                let mut shown = err.to_string();
                for (secret, value) in &self.kafka.properties {
                    let value = value.to_string();
                    if self.kafka.is_secret(secret) && !value.is_empty() {
                        shown = shown.replace(&value, "[redacted]");
                    }
                }
                shown
            };
            return Err(ConfigError::new(
                format!("kafka.properties.\"{name}\""),
                format!("{shown}; see librdkafka's CONFIGURATION.md for producer properties"),
            ));
        }
        Ok(())
    }
}
