//! Settings: built-in defaults, then a TOML file, then `OUTBOX_RELAY_` environment
//! variables. Loading either yields settings that keep the contract (acks=all, idempotence,
//! no message timeout) or a [`ConfigError`] that names the key and the fix.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::model::{Mode, ParkPolicy, TemplateError, TopicTemplate};

/// Where the configuration file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/outbox-relay.toml";
/// The longest duration any setting accepts: long enough for any real use, short enough
/// that adding it to a clock reading or doubling it cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub relay: RelaySettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// PostgreSQL connection URL. Required, here or through `url_file`.
    pub url: Secret,
    /// A file holding the whole connection URL (it replaces `url`). A relative path is
    /// looked up in `$CREDENTIALS_DIRECTORY` when systemd sets it.
    pub url_file: Option<PathBuf>,
    /// A file holding the password, put into the URL.
    pub password_file: Option<PathBuf>,
    /// Connections in the relay's pool (reads, marks, leases and metrics share it); the
    /// LISTEN connection comes on top of these.
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `statement_timeout` set on every connection; zero disables it.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// LISTEN for the doorbell NOTIFY; polling always runs as well.
    pub listen: bool,
    /// Channel the relay listens on; `outbox-relay migrate --notify-trigger on` installs
    /// the doorbell trigger notifying this channel.
    pub listen_channel: String,
    /// The schema holding the outbox tables. Every session's `search_path` is pinned to
    /// it, after `pg_catalog`, whatever the role or database sets: nothing another role
    /// creates elsewhere can stand in for a table, function or operator the relay uses.
    pub schema: String,
    /// Prepared statements cached per connection.
    pub statement_cache_capacity: usize,
    /// Connected through PgBouncer (or another pooler) in transaction mode: every
    /// statement runs in its own explicit transaction with unnamed prepared statements and
    /// no session state. Needs `listen = false`.
    pub transaction_pooler: bool,
    /// Accept a connection to a remote server that is not verified (`sslmode` disable,
    /// allow, prefer or require). Refused by default: use `sslmode=verify-full`.
    pub allow_unverified_tls: bool,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: String,
    /// librdkafka's `linger.ms`. The relay queues a whole batch, then sends it without
    /// waiting this out (see `RowProducer::send_queued_now`).
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Any librdkafka producer property, passed through as is. Properties that would
    /// weaken the contract, or that one of the typed keys above already sets, are refused.
    pub properties: BTreeMap<String, PropertyValue>,
    /// librdkafka properties whose values are read from files (Kubernetes secret volumes,
    /// systemd credentials), e.g. `"sasl.password" = "kafka-password"`. A relative path is
    /// looked up in `$CREDENTIALS_DIRECTORY` when systemd sets it.
    pub secret_files: BTreeMap<String, PathBuf>,
    /// Accept turning off the verification of the brokers' certificates
    /// (`enable.ssl.certificate.verification = false`,
    /// `ssl.endpoint.identification.algorithm = none`). Refused by default.
    pub allow_unverified_tls: bool,
}

impl KafkaSettings {
    /// Whether the property's value is a secret: by its name, or because it was read
    /// from one of `secret_files`, whatever its name.
    pub fn is_secret(&self, name: &str) -> bool {
        is_secret_property(name) || self.secret_files.contains_key(name)
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, String> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if self.is_secret(k) {
                    "[redacted]".to_string()
                } else {
                    v.to_string()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("compression", &self.compression)
            .field("linger", &self.linger)
            .field("properties", &properties)
            .field("secret_files", &self.secret_files)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySettings {
    pub mode: Mode,
    /// Rows read, produced and marked together.
    pub batch_size: u32,
    /// Bytes a batch may hold (payloads, headers, keys): a read stops after the row that
    /// reaches it. The batch in flight, its copy in librdkafka and the batch read ahead
    /// are each bounded by it, so memory follows this setting, not the rows' sizes.
    pub batch_max_bytes: usize,
    /// Mark a fully acknowledged batch in the background while the next one is read and
    /// produced; while a backlog drains, also read the next batch while this one is
    /// produced and its acks arrive.
    pub pipeline: bool,
    /// How long an idle relay waits before polling again (a doorbell wakes it sooner).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Topic of a row whose `topic` column is NULL. Placeholders: `{aggregate_type}`,
    /// `{event_type}`.
    pub topic_template: String,
    /// Globs (`*`, `?`) of the topics rows may be published to; empty means what the
    /// template can render (`outbox.event.*` for the default). A row outside them is
    /// parked (`topic_not_allowed`). Topics beginning with `_` need a glob beginning
    /// with `_`.
    pub allowed_topics: Vec<String>,
    /// Honour a row's own `topic` column (within `allowed_topics`). `false`: rows go to
    /// the template's topic only, and a row naming its own is parked.
    pub row_topics: bool,
    /// Largest record (key + value + headers) the relay hands to the producer; larger rows
    /// are parked. Keep it at or below the broker's and topic's limits.
    pub max_message_bytes: usize,
    pub on_park: ParkPolicy,
    /// On SIGTERM, how long to wait for outstanding acknowledgements before exiting.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Acks missing for this long raise the stall alarm (readiness false).
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
    /// `/healthz` fails once the relay loop has been stuck inside one step (a read, a mark,
    /// a send) for this long, so a liveness probe restarts a wedged relay. Waiting for acks
    /// or backing off after an error is not stuck.
    #[serde(with = "humantime_serde")]
    pub liveness_timeout: Duration,
    /// How often pending-row gauges are refreshed.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// This replica's name in the lease table; empty means `<hostname>-<pid>`. Give each
    /// replica a different one.
    pub replica_id: String,
    /// A shard lease lasts this long unless renewed; a replica that dies loses its shards
    /// to the others within it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often leases are renewed and membership is checked.
    #[serde(with = "humantime_serde")]
    pub lease_renew_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz`; port 0 picks a free port.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise (systemd journal, Kubernetes).
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `outbox_relay=debug,info`; `RUST_LOG` wins.
    pub level: String,
}

/// A name PostgreSQL takes as it is written, once double-quoted: no quoting or escaping
/// needed anywhere it is passed on (the `search_path` startup option takes no spaces).
fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret(String::new()),
            url_file: None,
            password_file: None,
            max_connections: 4,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            listen: true,
            listen_channel: "outbox_relay".into(),
            schema: "public".into(),
            statement_cache_capacity: 100,
            transaction_pooler: false,
            allow_unverified_tls: false,
        }
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: "localhost:9092".into(),
            compression: "lz4".into(),
            linger: Duration::from_millis(5),
            properties: BTreeMap::new(),
            secret_files: BTreeMap::new(),
            allow_unverified_tls: false,
        }
    }
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            mode: Mode::Mark,
            batch_size: 1000,
            batch_max_bytes: 8 * 1024 * 1024,
            pipeline: true,
            poll_interval: Duration::from_millis(500),
            topic_template: "outbox.event.{aggregate_type}".into(),
            allowed_topics: Vec::new(),
            row_topics: true,
            max_message_bytes: 1_000_000,
            on_park: ParkPolicy::Hold,
            drain_timeout: Duration::from_secs(10),
            stall_after: Duration::from_secs(30),
            liveness_timeout: Duration::from_secs(300),
            stats_interval: Duration::from_secs(10),
            replica_id: String::new(),
            lease_ttl: Duration::from_secs(10),
            lease_renew_interval: Duration::from_secs(2),
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

/// A librdkafka property value as TOML or the environment spells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Bool(v) => write!(f, "{v}"),
            PropertyValue::Int(v) => write!(f, "{v}"),
            PropertyValue::Float(v) => write!(f, "{v}"),
            PropertyValue::Text(v) => f.write_str(v),
        }
    }
}

/// A value that never appears in `Debug` output, logs or errors.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A configuration problem: the key it concerns and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: `{key}`{source_note}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
    source_note: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
            source_note: String::new(),
        }
    }

    fn with_source(mut self, source: Option<String>) -> Self {
        if let Some(source) = source {
            self.source_note = format!(" (from {source})");
        }
        self
    }
}

/// What a guarded librdkafka property may be set to.
enum Accepts {
    /// Never: the relay refuses the property whatever its value.
    Nothing,
    /// Only these values (compared case-insensitively): the relay's own.
    Values(&'static [&'static str]),
    /// Integers in this range.
    Range(i64, i64),
    /// Values this predicate accepts.
    Check(fn(&str) -> bool),
}

/// librdkafka properties the contract depends on (acks after replication, every ack
/// reported, per-aggregate order on the key's partition, the configured cluster), with
/// what they may be set to and why. docs/kafka-properties.md goes through the rest.
const GUARDED_PROPERTIES: &[(&str, Accepts, &str)] = &[
    (
        "enable.idempotence",
        Accepts::Values(&["true"]),
        "the relay always enables idempotence, which keeps retries in order and without duplicates",
    ),
    (
        "acks",
        Accepts::Values(&["all", "-1"]),
        "the relay always uses acks=all: a row is marked only after all in-sync replicas have it",
    ),
    (
        "request.required.acks",
        Accepts::Values(&["all", "-1"]),
        "the relay always uses acks=all: a row is marked only after all in-sync replicas have it",
    ),
    (
        "message.timeout.ms",
        Accepts::Values(&["0"]),
        "the relay sets 0 (retry until delivered) and raises a stall alarm instead; a finite timeout lets later rows of a partition land before an earlier one",
    ),
    (
        "delivery.timeout.ms",
        Accepts::Values(&["0"]),
        "alias of message.timeout.ms, which the relay sets to 0",
    ),
    (
        "enable.gapless.guarantee",
        Accepts::Values(&["true"]),
        "the relay keeps it on so that a row refused by the broker cannot be overtaken by later rows",
    ),
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
fn supports_idempotence(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    major > 0 || minor >= 11
}

/// A guarded or typed property's canonical name: librdkafka reads `topic.acks` as the
/// topic-level `acks` when `topic.acks` is not a global property of its own.
fn canonical_property(name: &str) -> &str {
    match name.strip_prefix("topic.") {
        Some(rest)
            if GUARDED_PROPERTIES.iter().any(|(p, _, _)| *p == rest)
                || TYPED_PROPERTIES.iter().any(|(p, _)| *p == rest) =>
        {
            rest
        }
        _ => name,
    }
}

fn accepts(accepts: &Accepts, value: &PropertyValue) -> bool {
    let v = value.to_string().to_ascii_lowercase();
    match accepts {
        Accepts::Nothing => false,
        Accepts::Values(values) => values.contains(&v.as_str()),
        Accepts::Range(low, high) => v.parse::<i64>().is_ok_and(|n| (*low..=*high).contains(&n)),
        Accepts::Check(check) => check(&v),
    }
}

/// librdkafka properties that a typed key of `[kafka]` already sets.
const TYPED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "kafka.bootstrap_servers"),
    ("metadata.broker.list", "kafka.bootstrap_servers"),
    ("compression.type", "kafka.compression"),
    ("compression.codec", "kafka.compression"),
    ("linger.ms", "kafka.linger"),
    ("queue.buffering.max.ms", "kafka.linger"),
];

/// Substrings of property names whose values are secrets.
const SECRET_PROPERTY_MARKERS: &[&str] = &[
    "password",
    "secret",
    "sasl.oauthbearer.config",
    "ssl.key",
    "sasl.jaas",
];

impl Settings {
    /// Loads defaults, then `path` (which must exist unless it is the default path), then
    /// the environment, and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        if explicit && !path.exists() {
            return Err(ConfigError::new(
                "--config",
                format!(
                    "file {} does not exist; pass an existing TOML file or omit --config",
                    path.display()
                ),
            ));
        }
        let figment = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::file(&path))
            .merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::from_figment(figment)
    }

    /// Extracts and validates settings from any figment (tests build their own).
    pub fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
        let mut settings: Settings = figment.extract().map_err(from_figment_error)?;
        settings.normalize();
        settings.read_secret_files()?;
        settings.validate()?;
        settings.check_files()?;
        Ok(settings)
    }

    /// Environment variables cannot carry dots, so `sasl_username` means `sasl.username`,
    /// in `kafka.properties` and `kafka.secret_files` alike.
    fn normalize(&mut self) {
        let properties = std::mem::take(&mut self.kafka.properties);
        self.kafka.properties = properties
            .into_iter()
            .map(|(k, v)| (k.replace('_', "."), v))
            .collect();
        let secret_files = std::mem::take(&mut self.kafka.secret_files);
        self.kafka.secret_files = secret_files
            .into_iter()
            .map(|(k, v)| (k.replace('_', "."), v))
            .collect();
    }

    /// Replaces `*_file` settings with the files' contents; a missing or unreadable file is
    /// a configuration error naming the key (never the content).
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.database.url_file {
            let url = read_secret_file("database.url_file", path)?;
            self.database.url = Secret(url);
        }
        if let Some(path) = &self.database.password_file {
            let password = read_secret_file("database.password_file", path)?;
            let mut url = url::Url::parse(self.database.url.expose()).map_err(|e| {
                ConfigError::new(
                    "database.url",
                    format!(
                        "is not a valid URL ({e}), so database.password_file cannot be applied"
                    ),
                )
            })?;
            url.set_password(Some(&password)).map_err(|()| {
                ConfigError::new(
                    "database.password_file",
                    "cannot be applied: database.url has no host",
                )
            })?;
            self.database.url = Secret(url.to_string());
        }
        for (name, path) in &self.kafka.secret_files {
            let key = format!("kafka.secret_files.\"{name}\"");
            let value = read_secret_file(&key, path)?;
            if self.kafka.properties.contains_key(name) {
                return Err(ConfigError::new(
                    key,
                    format!("kafka.properties.\"{name}\" is set as well; keep one of the two"),
                ));
            }
            self.kafka
                .properties
                .insert(name.clone(), PropertyValue::Text(value));
        }
        Ok(())
    }

    /// Files the relay will open later (TLS material) must exist and be readable now, so a
    /// typo fails at start with the key named rather than at the first connection.
    fn check_files(&self) -> Result<(), ConfigError> {
        for (name, value) in &self.kafka.properties {
            if name.ends_with(".location")
                && !(name == "ssl.ca.location" && value.to_string() == "probe")
            {
                let path = PathBuf::from(value.to_string());
                check_readable(&format!("kafka.properties.\"{name}\""), &path)?;
            }
        }
        if let Ok(url) = url::Url::parse(self.database.url.expose()) {
            for (param, value) in url.query_pairs() {
                // sqlx also takes the PEM itself in place of a path: nothing to open, and
                // nothing to quote in an error.
                if matches!(
                    param.as_ref(),
                    "sslrootcert"
                        | "ssl-root-cert"
                        | "ssl-ca"
                        | "sslcert"
                        | "ssl-cert"
                        | "sslkey"
                        | "ssl-key"
                ) && value != "system"
                    && !value.trim_start().starts_with("-----BEGIN")
                {
                    check_readable(
                        &format!("database.url ({param})"),
                        Path::new(value.as_ref()),
                    )?;
                }
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in self.durations() {
            if value > MAX_DURATION {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "{} is longer than the longest accepted duration ({}); use a realistic value such as \"30s\"",
                        humantime::format_duration(value),
                        humantime::format_duration(MAX_DURATION)
                    ),
                ));
            }
        }
        if self.database.url.expose().trim().is_empty() {
            return Err(ConfigError::new(
                "database.url",
                "is required: set it in the config file or OUTBOX_RELAY_DATABASE__URL, e.g. postgres://relay@db.internal/app",
            ));
        }
        let url = url::Url::parse(self.database.url.expose()).map_err(|e| {
            ConfigError::new(
                "database.url",
                format!("is not a valid URL ({e}); expected postgres://user@host:port/database"),
            )
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::new(
                "database.url",
                format!(
                    "has scheme `{}`; expected postgres:// or postgresql://",
                    url.scheme()
                ),
            ));
        }
        // sqlx logs a parameter it does not know with its value (a misspelt `passwd=`):
        // refuse it here, naming only the key.
        if let Some((key, _)) = url.query_pairs().find(|(k, _)| !is_connect_parameter(k)) {
            return Err(ConfigError::new(
                "database.url",
                format!(
                    "has the parameter `{}`, which PostgreSQL's client here does not know (its value is not shown); remove it, or spell it as one of: {}",
                    crate::model::printable(&key, 64),
                    CONNECT_PARAMETERS.join(", ")
                ),
            ));
        }
        if let Some(sslmode) = unverified_remote_sslmode(self.database.url.expose()) {
            if !self.database.allow_unverified_tls {
                return Err(ConfigError::new(
                    "database.url",
                    format!(
                        "uses sslmode={sslmode} to a remote server, which does not verify who answers (verify-ca checks the chain but not the server's name, and trusts every public CA as well as sslrootcert); use sslmode=verify-full with sslrootcert=/path/to/ca.crt, or set database.allow_unverified_tls = true to accept the risk"
                    ),
                ));
            }
        }
        if self.database.max_connections < 2 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 2 (the relay reads and marks on one, refreshes metrics on another)",
            ));
        }
        if self.database.transaction_pooler && self.database.listen {
            return Err(ConfigError::new(
                "database.listen",
                "LISTEN needs a session of its own, which a transaction-mode pooler does not keep; set database.listen = false when database.transaction_pooler = true (polling still wakes the relay)",
            ));
        }
        if self.database.listen_channel.is_empty() || self.database.listen_channel.len() > 63 {
            return Err(ConfigError::new(
                "database.listen_channel",
                "must be 1 to 63 bytes long (PostgreSQL's limit for a channel name)",
            ));
        }
        if !is_plain_identifier(&self.database.schema) {
            return Err(ConfigError::new(
                "database.schema",
                "must be a plain identifier: a letter or underscore, then letters, digits or underscores, at most 63 bytes (e.g. public)",
            ));
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err(ConfigError::new(
                "kafka.bootstrap_servers",
                "is required, e.g. kafka-1:9092,kafka-2:9092",
            ));
        }
        if !matches!(
            self.kafka.compression.as_str(),
            "none" | "gzip" | "snappy" | "lz4" | "zstd"
        ) {
            return Err(ConfigError::new(
                "kafka.compression",
                format!(
                    "`{}` is not one of none, gzip, snappy, lz4, zstd",
                    self.kafka.compression
                ),
            ));
        }
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
        if self.relay.batch_size == 0 || self.relay.batch_size > 100_000 {
            return Err(ConfigError::new(
                "relay.batch_size",
                format!(
                    "{} is out of range; use 1 to 100000 (1000 is a good start)",
                    self.relay.batch_size
                ),
            ));
        }
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&self.relay.batch_max_bytes) {
            return Err(ConfigError::new(
                "relay.batch_max_bytes",
                format!(
                    "{} is out of range; use 65536 to 1073741824 (8388608, 8 MiB, is the default)",
                    self.relay.batch_max_bytes
                ),
            ));
        }
        if self.relay.poll_interval.is_zero() {
            return Err(ConfigError::new(
                "relay.poll_interval",
                "must be greater than zero, e.g. \"500ms\"",
            ));
        }
        TopicTemplate::parse(&self.relay.topic_template)
            .map_err(|e| ConfigError::new("relay.topic_template", e.to_string()))?;
        if let Some(glob) = self
            .relay
            .allowed_topics
            .iter()
            .find(|glob| !crate::model::is_topic_glob(glob))
        {
            return Err(ConfigError::new(
                "relay.allowed_topics",
                format!(
                    "`{}` is not a topic pattern: use letters, digits, '.', '_', '-', with `*` for any run of characters and `?` for one, e.g. \"orders.*\"",
                    crate::model::printable(glob, 100)
                ),
            ));
        }
        if self.relay.max_message_bytes < 1024 {
            return Err(ConfigError::new(
                "relay.max_message_bytes",
                "must be at least 1024",
            ));
        }
        if self.relay.stall_after.is_zero() {
            return Err(ConfigError::new(
                "relay.stall_after",
                "must be greater than zero, e.g. \"30s\"",
            ));
        }
        if self.relay.liveness_timeout < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "relay.liveness_timeout",
                "must be at least 1s (5m is the default); keep it above database.statement_timeout",
            ));
        }
        if self.relay.stats_interval.is_zero() {
            return Err(ConfigError::new(
                "relay.stats_interval",
                "must be greater than zero, e.g. \"10s\"",
            ));
        }
        if self.relay.lease_ttl < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "relay.lease_ttl",
                "must be at least 1s (10s is the default)",
            ));
        }
        if self.relay.lease_renew_interval.is_zero()
            || self.relay.lease_renew_interval * 2 > self.relay.lease_ttl - self.lease_margin()
        {
            return Err(ConfigError::new(
                "relay.lease_renew_interval",
                format!(
                    "must be greater than zero and at most half of relay.lease_ttl minus its safety margin ({:?}), so that one failed renewal does not lose the leases",
                    self.relay.lease_ttl - self.lease_margin()
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::new(
                "log.level",
                format!("`{}` is not a tracing filter ({e})", self.log.level),
            )
        })?;
        Ok(())
    }

    /// Every duration setting with its key. Each is added to `Instant`s and multiplied,
    /// so each is bounded by [`MAX_DURATION`].
    fn durations(&self) -> [(&'static str, Duration); 10] {
        [
            ("database.connect_timeout", self.database.connect_timeout),
            (
                "database.statement_timeout",
                self.database.statement_timeout,
            ),
            ("kafka.linger", self.kafka.linger),
            ("relay.poll_interval", self.relay.poll_interval),
            ("relay.drain_timeout", self.relay.drain_timeout),
            ("relay.stall_after", self.relay.stall_after),
            ("relay.liveness_timeout", self.relay.liveness_timeout),
            ("relay.stats_interval", self.relay.stats_interval),
            ("relay.lease_ttl", self.relay.lease_ttl),
            (
                "relay.lease_renew_interval",
                self.relay.lease_renew_interval,
            ),
        ]
    }

    /// What rows may publish to: `relay.allowed_topics`, or the template's own glob.
    pub fn topic_policy(&self) -> Result<crate::model::TopicPolicy, TemplateError> {
        let allowed = if self.relay.allowed_topics.is_empty() {
            vec![TopicTemplate::parse(&self.relay.topic_template)?.glob()]
        } else {
            self.relay.allowed_topics.clone()
        };
        Ok(crate::model::TopicPolicy::new(
            allowed,
            self.relay.row_topics,
        ))
    }

    /// The first property that turns off the verification of the brokers' certificates.
    fn unverified_kafka_tls(&self) -> Option<(&str, String)> {
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

    /// Settings the relay accepts but an operator should hear about at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some((name, value)) = self.unverified_kafka_tls() {
            warnings.push(format!(
                "kafka.properties.\"{name}\" = {value}: the brokers' certificates are not verified (allowed by kafka.allow_unverified_tls)"
            ));
        }
        let secret_files = self
            .database
            .url_file
            .iter()
            .map(|p| ("database.url_file".to_string(), p))
            .chain(
                self.database
                    .password_file
                    .iter()
                    .map(|p| ("database.password_file".to_string(), p)),
            )
            .chain(
                self.kafka
                    .secret_files
                    .iter()
                    .map(|(name, p)| (format!("kafka.secret_files.\"{name}\""), p)),
            );
        for (key, path) in secret_files {
            if let Some(exposure) = secret_file_exposure(path) {
                warnings.push(format!(
                    "{key}: {exposure}; chmod 0400 it (or 0440 for the relay's own group)"
                ));
            }
        }
        let protocol = self
            .kafka
            .properties
            .get("security.protocol")
            .map(|v| v.to_string().to_ascii_lowercase());
        if protocol.as_deref() == Some("sasl_plaintext") {
            warnings.push(
                "kafka security.protocol = sasl_plaintext: the SASL credentials and every event cross the network unencrypted; use sasl_ssl".into(),
            );
        }
        if let Some(sslmode) = unverified_remote_sslmode(self.database.url.expose()) {
            warnings.push(format!(
                "database.url uses sslmode={sslmode}: the server is not verified (allowed by database.allow_unverified_tls)"
            ));
        }
        warnings
    }

    /// How much sooner than the database a replica considers its lease gone: covers clock
    /// drift and the time a renewal takes to return.
    pub fn lease_margin(&self) -> Duration {
        self.relay.lease_ttl / 5
    }

    /// `relay.replica_id`, or `<hostname>-<pid>`.
    pub fn replica_id(&self) -> String {
        if !self.relay.replica_id.is_empty() {
            return self.relay.replica_id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "relay".into());
        format!("{host}-{}", std::process::id())
    }

    /// The librdkafka producer properties, safety settings last so nothing overrides them.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let mut props: Vec<(String, String)> = self
            .kafka
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        let fixed = [
            ("bootstrap.servers", self.kafka.bootstrap_servers.clone()),
            ("compression.type", self.kafka.compression.clone()),
            ("linger.ms", self.kafka.linger.as_millis().to_string()),
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("message.timeout.ms", "0".into()),
            ("enable.gapless.guarantee", "true".into()),
            ("message.max.bytes", self.message_max_bytes().to_string()),
        ];
        for (k, v) in fixed {
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
    fn message_max_bytes(&self) -> usize {
        let passed = self
            .kafka
            .properties
            .get("message.max.bytes")
            .and_then(|v| v.to_string().parse::<usize>().ok());
        passed.unwrap_or(0).max(self.relay.max_message_bytes + 4096)
    }

    /// The settings as TOML with every secret replaced, for `check` and logs.
    pub fn redacted(&self) -> String {
        let mut copy = self.clone();
        copy.database.url = Secret(redact_url(self.database.url.expose()));
        for (k, v) in copy.kafka.properties.iter_mut() {
            if self.kafka.is_secret(k) {
                *v = PropertyValue::Text("[redacted]".into());
            }
        }
        toml_string(&copy)
    }
}

/// The URL query parameters sqlx's PostgreSQL client takes (`sqlx-postgres`'s
/// `options/parse.rs`); it ignores any other with a warning that prints its value.
const CONNECT_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

fn is_connect_parameter(key: &str) -> bool {
    CONNECT_PARAMETERS.contains(&key) || (key.starts_with("options[") && key.ends_with(']'))
}

/// The `sslmode` of `url` when the connection goes to a remote host without verifying
/// the server's name (anything short of verify-full; libpq's default is `prefer`).
/// Decided from the options the client will connect with, not from the URL's text: a
/// `?host=` or `?hostaddr=` replaces the authority, `sslmode` is taken in any case and
/// under either spelling. Loopback hosts and Unix sockets never leave the machine.
fn unverified_remote_sslmode(url: &str) -> Option<String> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    let options: PgConnectOptions = url.parse().ok()?;
    let sslmode = match options.get_ssl_mode() {
        PgSslMode::VerifyFull => return None,
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
    };
    if options.get_socket().is_some() {
        return None;
    }
    let host = options.get_host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let local = host.is_empty()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!local).then(|| sslmode.to_string())
}

fn toml_string(settings: &Settings) -> String {
    // Durations through humantime serialize as strings, so TOML can always represent this.
    let value = serde_json::to_value(settings).unwrap_or_default();
    let mut out = String::new();
    if let serde_json::Value::Object(sections) = value {
        for (section, body) in sections {
            out.push_str(&format!("[{section}]\n"));
            if let serde_json::Value::Object(fields) = body {
                for (k, v) in fields {
                    match v {
                        serde_json::Value::Object(map) => {
                            for (pk, pv) in map {
                                out.push_str(&format!("{k}.\"{pk}\" = {pv}\n"));
                            }
                        }
                        other => out.push_str(&format!("{k} = {other}\n")),
                    }
                }
            }
            out.push('\n');
        }
    }
    out
}

/// Resolves a relative secret path against systemd's `$CREDENTIALS_DIRECTORY`.
fn credential_path(path: &Path) -> PathBuf {
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) if path.is_relative() => Path::new(&dir).join(path),
        _ => path.to_path_buf(),
    }
}

fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let path = credential_path(path);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ConfigError::new(
            key,
            format!(
                "cannot read {} ({e}); check the path, the file's permissions, or the systemd credential / Kubernetes secret that should provide it",
                path.display()
            ),
        )
    })?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(value)
}

/// Why a secret file is exposed to other users of the machine, if it is: readable by
/// everyone, or by a group the relay is not in (a group the relay is in, as Kubernetes'
/// `fsGroup` with `defaultMode: 0440`, is how it gets to read the file at all).
fn secret_file_exposure(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = credential_path(path);
    let meta = std::fs::metadata(&path).ok()?;
    let mode = meta.mode() & 0o777;
    if mode & 0o004 != 0 {
        return Some(format!(
            "{} is readable by every user (mode {mode:o})",
            path.display()
        ));
    }
    if mode & 0o040 != 0 && !in_group(meta.gid()) {
        return Some(format!(
            "{} is readable by group {} (mode {mode:o}), which the relay is not in",
            path.display(),
            meta.gid()
        ));
    }
    None
}

/// Whether the process is in group `gid` (effective or supplementary).
fn in_group(gid: u32) -> bool {
    // SAFETY: getegid cannot fail; getgroups writes at most `groups.len()` ids.
    unsafe {
        if libc::getegid() == gid {
            return true;
        }
        let mut groups = [0 as libc::gid_t; 256];
        let n = libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

fn check_readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(|_| ()).map_err(|e| {
        ConfigError::new(
            key,
            format!(
                "cannot read {} ({e}); point it at a readable file",
                path.display()
            ),
        )
    })
}

pub fn is_secret_property(name: &str) -> bool {
    SECRET_PROPERTY_MARKERS.iter().any(|m| name.contains(m))
}

/// `postgres://user:pw@host/db` → `postgres://user:[redacted]@host/db`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("redacted"));
            }
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    // Passwords, and keys given inline as PEM.
                    if k.contains("password") || k.contains("key") {
                        (k.into_owned(), "redacted".to_string())
                    } else {
                        (k.into_owned(), v.into_owned())
                    }
                })
                .collect();
            if !pairs.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "[unparseable URL redacted]".into(),
    }
}

fn from_figment_error(err: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let mut path = err.path.clone();
    let message = match &err.kind {
        Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            format!(
                "is not a known key; known keys here: {}",
                expected.join(", ")
            )
        }
        Kind::MissingField(field) => {
            if path.last().map(String::as_str) != Some(field.as_ref()) {
                path.push(field.to_string());
            }
            "is required".to_string()
        }
        other => format!("{other}"),
    };
    let source = err.metadata.as_ref().map(|m| match &m.source {
        Some(figment::Source::File(file)) => file.display().to_string(),
        _ if m.name.contains("environment") => format!(
            "environment variable {ENV_PREFIX}{}",
            path.join("__").to_uppercase()
        ),
        _ => m.name.to_string(),
    });
    let key = if path.is_empty() {
        "<root>".to_string()
    } else {
        path.join(".")
    };
    ConfigError::new(key, message).with_source(source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Toml;

    fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_figment(
            Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(text)),
        )
    }

    const BASE: &str =
        "[database]\nurl = \"postgres://relay:hunter2@db/app?sslmode=verify-full\"\n";

    #[test]
    fn defaults_with_a_url_are_valid_and_keep_the_contract() {
        let s = from_toml(BASE).expect("valid");
        let props = s.producer_properties();
        let get = |k: &str| props.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("acks"), Some("all"));
        assert_eq!(get("enable.idempotence"), Some("true"));
        assert_eq!(get("message.timeout.ms"), Some("0"));
        assert_eq!(get("partitioner"), Some("murmur2_random"));
        assert_eq!(get("compression.type"), Some("lz4"));
        assert_eq!(get("linger.ms"), Some("5"));
        assert_eq!(s.relay.topic_template, "outbox.event.{aggregate_type}");
    }

    #[test]
    fn missing_url_names_the_key() {
        let err = from_toml("").unwrap_err();
        assert_eq!(err.key, "database.url");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = from_toml(&format!("{BASE}[relay]\nbatch_sise = 5\n")).unwrap_err();
        assert_eq!(err.key, "relay.batch_sise");
        assert!(err.to_string().contains("batch_size"), "{err}");
    }

    #[test]
    fn invalid_value_names_the_key() {
        let err = from_toml(&format!("{BASE}[relay]\nbatch_size = \"many\"\n")).unwrap_err();
        assert_eq!(err.key, "relay.batch_size");
        let err = from_toml(&format!("{BASE}[relay]\nmode = \"archive\"\n")).unwrap_err();
        assert_eq!(err.key, "relay.mode");
        let err = from_toml(&format!("{BASE}[relay]\npoll_interval = \"soon\"\n")).unwrap_err();
        assert_eq!(err.key, "relay.poll_interval");
    }

    #[test]
    fn weakening_the_contract_is_refused() {
        for (prop, value) in [
            ("acks", "\"1\""),
            ("enable.idempotence", "false"),
            ("message.timeout.ms", "30000"),
            ("delivery.timeout.ms", "30000"),
            ("enable.gapless.guarantee", "false"),
        ] {
            let text = format!("{BASE}[kafka.properties]\n\"{prop}\" = {value}\n");
            let err = from_toml(&text).unwrap_err();
            assert_eq!(err.key, format!("kafka.properties.\"{prop}\""), "{err}");
        }
        // Restating the contract's own value is harmless.
        from_toml(&format!("{BASE}[kafka.properties]\n\"acks\" = \"all\"\n")).expect("ok");
    }

    #[test]
    fn properties_that_weaken_order_or_acks_are_refused() {
        for (prop, value) in [
            ("retries", "5"),
            ("message.send.max.retries", "10"),
            ("partitioner", "\"random\""),
            ("partitioner", "\"consistent_random\""),
            ("partitioner", "\"fnv1a\""),
            ("topic.partitioner", "\"random\""),
            ("topic.acks", "\"1\""),
            ("topic.message.timeout.ms", "30000"),
            ("topic.compression.type", "\"gzip\""),
            ("transactional.id", "\"relay\""),
            ("delivery.report.only.error", "true"),
            ("queuing.strategy", "\"lifo\""),
            ("max.in.flight.requests.per.connection", "6"),
            ("max.in.flight", "0"),
            ("queue.buffering.backpressure.threshold", "5"),
            ("test.mock.num.brokers", "3"),
            ("api.version.request", "false"),
            ("broker.version.fallback", "\"0.10.2\""),
            ("plugin.library.paths", "\"/tmp/evil.so\""),
            ("internal.termination.signal", "15"),
            ("topic.blacklist", "\"orders.*\""),
            ("queue.buffering.max.kbytes", "100"),
        ] {
            let text = format!("{BASE}[kafka.properties]\n\"{prop}\" = {value}\n");
            let err = from_toml(&text).expect_err(prop);
            assert_eq!(err.key, format!("kafka.properties.\"{prop}\""), "{err}");
        }
        for (prop, value) in [
            ("partitioner", "\"murmur2\""),
            ("retries", "2147483647"),
            ("max.in.flight", "5"),
            ("broker.version.fallback", "\"2.8.0\""),
            ("queue.buffering.max.kbytes", "1048576"),
            ("topic.metadata.refresh.sparse", "true"),
        ] {
            let text = format!("{BASE}[kafka.properties]\n\"{prop}\" = {value}\n");
            from_toml(&text).unwrap_or_else(|e| panic!("{prop} = {value}: {e}"));
        }
    }

    #[test]
    fn absurd_durations_are_refused_naming_the_key() {
        for (section, key) in [
            ("relay", "drain_timeout"),
            ("relay", "poll_interval"),
            ("relay", "stall_after"),
            ("database", "statement_timeout"),
        ] {
            // BASE ends inside [database].
            let table = if section == "database" {
                String::new()
            } else {
                format!("[{section}]\n")
            };
            let text = format!("{BASE}{table}{key} = \"18446744073709551615s\"\n");
            let err = from_toml(&text).unwrap_err();
            assert_eq!(err.key, format!("{section}.{key}"), "{err}");
            assert!(err.to_string().contains("longest accepted"), "{err}");
        }
        from_toml(&format!("{BASE}[relay]\ndrain_timeout = \"365d\"\n"))
            .expect("a year is accepted");
    }

    #[test]
    fn passthrough_colliding_with_a_typed_key_names_both() {
        let text = format!("{BASE}[kafka.properties]\n\"linger.ms\" = 20\n");
        let err = from_toml(&text).unwrap_err();
        assert!(err.to_string().contains("kafka.linger"), "{err}");
    }

    #[test]
    fn unknown_or_invalid_librdkafka_properties_are_refused() {
        let err = from_toml(&format!("{BASE}[kafka.properties]\n\"lingr.ms\" = 5\n")).unwrap_err();
        assert_eq!(err.key, "kafka.properties.\"lingr.ms\"", "{err}");
        let err = from_toml(&format!(
            "{BASE}[kafka.properties]\n\"batch.num.messages\" = \"many\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.key, "kafka.properties.\"batch.num.messages\"", "{err}");
        from_toml(&format!(
            "{BASE}[kafka.properties]\n\"batch.num.messages\" = 5000\n"
        ))
        .expect("a valid property passes");
    }

    #[test]
    fn bad_topic_template_is_refused() {
        let err =
            from_toml(&format!("{BASE}[relay]\ntopic_template = \"x.{{nope}}\"\n")).unwrap_err();
        assert_eq!(err.key, "relay.topic_template");
    }

    /// A value read from a secret file is a secret whatever the property's name, and a
    /// secret file others can read is warned about.
    #[test]
    fn values_from_secret_files_are_redacted_and_exposed_files_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok3n-value").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o400)).unwrap();
        let text = format!(
            "{BASE}[kafka.secret_files]\n\"sasl.username\" = \"{}\"\n",
            token.display()
        );
        let s = from_toml(&text).expect("valid");
        for shown in [s.redacted(), format!("{s:?}")] {
            assert!(!shown.contains("tok3n"), "{shown}");
        }
        assert!(s.warnings().is_empty(), "{:?}", s.warnings());

        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = from_toml(&text).expect("valid");
        let warnings = s.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("readable by every user"),
            "{warnings:?}"
        );
        assert!(!warnings[0].contains("tok3n"), "{warnings:?}");
    }

    #[test]
    fn secrets_come_from_files_and_missing_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("url"), "postgres://relay@localhost/app\n").unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret-pw\n").unwrap();
        std::fs::write(dir.path().join("kafka"), "kafka-s3cret").unwrap();
        let text = format!(
            "[database]\nurl_file = \"{d}/url\"\npassword_file = \"{d}/pw\"\n\
             [kafka.secret_files]\n\"sasl.password\" = \"{d}/kafka\"\n",
            d = dir.path().display()
        );
        let s = from_toml(&text).expect("valid");
        assert_eq!(
            s.database.url.expose(),
            "postgres://relay:s3cret-pw@localhost/app"
        );
        assert_eq!(
            s.kafka.properties.get("sasl.password"),
            Some(&PropertyValue::Text("kafka-s3cret".into()))
        );
        for shown in [s.redacted(), format!("{s:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }

        let err = from_toml("[database]\nurl_file = \"/nonexistent/url\"\n").unwrap_err();
        assert_eq!(err.key, "database.url_file");
        assert!(err.to_string().contains("/nonexistent/url"), "{err}");
        let err = from_toml(&format!(
            "{BASE}[kafka.properties]\n\"ssl.ca.location\" = \"/nonexistent/ca.pem\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.key, "kafka.properties.\"ssl.ca.location\"");
        let err = from_toml(
            "[database]\nurl = \"postgres://relay@db/app?sslmode=verify-full&sslrootcert=/nonexistent/root.crt\"\n",
        )
        .unwrap_err();
        assert!(err.key.starts_with("database.url"), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        let text = format!("{BASE}[kafka.properties]\n\"sasl.password\" = \"s3cr3t-kafka\"\n");
        let s = from_toml(&text).unwrap();
        let shown = s.redacted();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cr3t-kafka"), "{shown}");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    /// sqlx would log an unknown URL parameter with its value: refused at start, naming
    /// the key only. Inline PEM keys are neither opened as paths nor echoed.
    #[test]
    fn unknown_url_parameters_are_refused_without_their_value() {
        for url in [
            "postgres://relay@localhost/app?passwd=hunter2",
            "postgres://relay@localhost/app?sslpassword=hunter2",
        ] {
            let err = from_toml(&format!("[database]\nurl = \"{url}\"\n")).unwrap_err();
            assert_eq!(err.key, "database.url");
            assert!(!err.to_string().contains("hunter2"), "{err}");
            assert!(err.to_string().contains("pass"), "names the key: {err}");
        }
        let pem = "-----BEGIN%20PRIVATE%20KEY-----MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-----END%20PRIVATE%20KEY-----";
        let s = from_toml(&format!(
            "[database]\nurl = \"postgres://relay@localhost/app?sslmode=verify-full&sslkey={pem}\"\n"
        ))
        .expect("an inline key is not a path");
        assert!(!s.redacted().contains("MIIEvQ"), "{}", s.redacted());
    }

    #[test]
    fn unverified_kafka_tls_is_refused_unless_allowed() {
        for (name, value) in [
            ("enable.ssl.certificate.verification", "false"),
            ("ssl.endpoint.identification.algorithm", "none"),
            ("ssl.endpoint.identification.algorithm", "NONE"),
        ] {
            let toml = format!(
                "[database]\nurl = \"postgres://relay@localhost/app\"\n[kafka.properties]\n\"{name}\" = \"{value}\"\n"
            );
            let err = from_toml(&toml).unwrap_err();
            assert_eq!(err.key, format!("kafka.properties.\"{name}\""));
            assert!(err.to_string().contains("allow_unverified_tls"), "{err}");
            let allowed = from_toml(&toml.replace(
                "[kafka.properties]",
                "[kafka]\nallow_unverified_tls = true\n[kafka.properties]",
            ))
            .expect("allowed explicitly");
            assert_eq!(allowed.warnings().len(), 1, "{:?}", allowed.warnings());
        }
        let sasl = from_toml(
            "[database]\nurl = \"postgres://relay@localhost/app\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n",
        )
        .unwrap();
        assert!(
            sasl.warnings()[0].contains("sasl_ssl"),
            "{:?}",
            sasl.warnings()
        );
        let defaults = from_toml("[database]\nurl = \"postgres://relay@localhost/app\"\n").unwrap();
        assert!(
            defaults
                .producer_properties()
                .contains(&("allow.auto.create.topics".into(), "false".into()))
        );
    }

    #[test]
    fn unverified_tls_to_a_remote_server_is_refused_unless_allowed() {
        for url in [
            "postgres://relay@db.internal/app",
            "postgres://relay@db.internal/app?sslmode=prefer",
            "postgres://relay@10.0.0.5/app?sslmode=require",
            // Once decided on the URL's text, each of these passed.
            "postgres://relay@db.internal/app?sslmode=DISABLE",
            "postgres://relay@db.internal/app?sslmode=verify-full&ssl-mode=disable",
            "postgres://relay@db.internal/app?sslmode=verify-full&sslmode=disable",
            "postgres://relay@localhost/app?host=db.internal&sslmode=disable",
            "postgres://relay@localhost/app?hostaddr=10.0.0.5",
            "postgres://relay@[::1]/app?host=db.internal",
            // verify-ca checks no name, and rustls trusts the public roots too.
            "postgres://relay@db.internal/app?sslmode=verify-ca",
        ] {
            let err = from_toml(&format!("[database]\nurl = \"{url}\"\n")).unwrap_err();
            assert_eq!(err.key, "database.url", "{url}");
            assert!(err.to_string().contains("verify-full"), "{err}");
            let allowed = from_toml(&format!(
                "[database]\nurl = \"{url}\"\nallow_unverified_tls = true\n"
            ))
            .expect("allowed explicitly");
            assert_eq!(allowed.warnings().len(), 1, "{url}");
        }
        for url in [
            "postgres://relay@localhost/app",
            "postgres://relay@127.0.0.1:5432/app?sslmode=disable",
            "postgres://relay@db.internal/app?sslmode=verify-full",
            "postgres://relay@db.internal/app?ssl-mode=VERIFY-FULL",
            "postgres://relay@db.internal/app?sslmode=verify-full&host=/run/postgresql",
            "postgres://relay@db.internal/app?sslmode=disable&hostaddr=127.0.0.1",
        ] {
            let s = from_toml(&format!("[database]\nurl = \"{url}\"\n")).expect(url);
            assert!(s.warnings().is_empty(), "{url}");
        }
    }
}
