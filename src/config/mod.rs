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

mod producer;
mod secrets;
mod validate;

pub(crate) use producer::{admin_properties, consumer_properties};
pub(crate) use secrets::redact_url;
use secrets::*;

/// Where the configuration file is looked for when neither `--config` nor
/// [`CONFIG_PATH_VARIABLE`] names one: here (a checkout), then [`SYSTEM_CONFIG_PATH`].
pub const DEFAULT_CONFIG_PATH: &str = "config/outbox-relay.toml";
/// The configuration file of a host install (the Debian package puts it there).
pub const SYSTEM_CONFIG_PATH: &str = "/etc/outbox-relay/outbox-relay.toml";
/// The environment variable naming the configuration file, as `--config` does.
pub const CONFIG_PATH_VARIABLE: &str = "OUTBOX_RELAY_CONFIG";
/// The longest duration any setting accepts: long enough for any real use, short enough
/// that adding it to a clock reading or doubling it cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// How long sent rows are kept in mark mode unless `relay.retain_sent` says otherwise.
pub const DEFAULT_RETAIN_SENT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub outbox: OutboxSettings,
    pub kafka: KafkaSettings,
    pub relay: RelaySettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    /// `OUTBOX_RELAY_*` variables without `__`, which are not configuration (Kubernetes
    /// sets `OUTBOX_RELAY_PORT` and the like for a Service of that name): ignored, and
    /// named in one warning.
    #[serde(skip)]
    pub(crate) ignored_environment: Vec<String>,
    /// The configuration file read, if any.
    #[serde(skip)]
    pub(crate) config_file: Option<PathBuf>,
}

/// What a command needs of the configuration: a command that only talks to the database
/// reads no Kafka secret file and checks no Kafka TLS file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Everything,
    DatabaseOnly,
    /// Only to be validated (`check --config-only`): no secret file is read, and none need
    /// exist where it runs (a build machine checking a ConfigMap).
    Validation,
}

/// The outbox table: the relay's own (`outbox-relay migrate` creates it), or one a team
/// already has, with the column behind each of the relay's roles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxSettings {
    /// `schema.table`, or `table` in `database.schema`. Empty: the relay's own `outbox`.
    pub table: String,
    pub columns: OutboxColumns,
    /// Further columns sent as headers: header name = column (Debezium's
    /// `table.fields.additional.placement` with `header`).
    pub header_columns: BTreeMap<String, String>,
}

/// The column behind each of the relay's roles; the defaults are the relay's own names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxColumns {
    /// `uuid`: the `id` header, for consumers to drop duplicates.
    pub event_id: String,
    /// Text: the topic template's `{aggregate_type}`, and the `aggregate_type` header.
    pub aggregate_type: String,
    /// Text: the record key; rows of one aggregate keep their order.
    pub aggregate_id: String,
    /// Text: the template's `{event_type}`, and the `event_type` header.
    pub event_type: String,
    /// `jsonb` or `json` (the JSON text), `text` (its UTF-8) or `bytea` (the bytes as
    /// they are): the record's value. NULL is a tombstone.
    pub payload: String,
    /// A `jsonb` object of headers. Unset: `headers` on the relay's own table, none on
    /// another; `""`: none.
    pub headers: Option<String>,
    /// A text column naming the row's topic instead of the template. Unset: `topic` on
    /// the relay's own table, none on another; `""`: none.
    pub topic: Option<String>,
}

impl Default for OutboxColumns {
    fn default() -> Self {
        Self {
            event_id: "event_id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            headers: None,
            topic: None,
        }
    }
}

impl OutboxSettings {
    /// `(schema, table)` of a table `outbox.table` names; `None` for the relay's own.
    pub fn table_name(&self, default_schema: &str) -> Option<(String, String)> {
        let table = self.table.trim();
        if table.is_empty() {
            return None;
        }
        Some(match table.split_once('.') {
            Some((schema, name)) => (schema.to_string(), name.to_string()),
            None => (default_schema.to_string(), table.to_string()),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
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
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// `statement_timeout` set on every connection; zero disables it.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
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

#[derive(Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: String,
    /// librdkafka's `linger.ms`. The relay queues a whole batch, then sends it without
    /// waiting this out (see `RowProducer::send_queued_now`).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
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

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// How long an idle relay waits before polling again, after reading again 1, 1, 2, 2,
    /// 4, 4 and 8 ms after the last rows (a doorbell trigger, if installed, wakes it sooner).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
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
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
    /// Acks missing for this long raise the stall alarm (readiness false).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stall_after: Duration,
    /// `/healthz` fails once the relay loop has been stuck inside one step (a read, a mark,
    /// a send) for this long, so a liveness probe restarts a wedged relay. Waiting for acks
    /// or backing off after an error is not stuck.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub liveness_timeout: Duration,
    /// How often pending-row gauges are refreshed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stats_interval: Duration,
    /// In mark mode, sent rows older than this are deleted: in batches, by one replica at
    /// a time, at least every min(`retain_sent`, 1 minute). Zero keeps them for ever.
    /// Parked and discarded rows are never deleted by it.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retain_sent: Duration,
    /// This replica's name in the lease table; empty means `<hostname>-<pid>`. Give each
    /// replica a different one.
    pub replica_id: String,
    /// A shard lease lasts this long unless renewed; a replica that dies loses its shards
    /// to the others within it.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lease_ttl: Duration,
    /// How often leases are renewed and membership is checked.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lease_renew_interval: Duration,
    /// The share of sent rows (0 to 1) whose records the auditor reads back from Kafka and
    /// compares with the row; 0 turns it off. Mark mode only.
    pub audit_sample_rate: f64,
    /// How often the auditor samples the rows sent since its last look.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub audit_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz`; port 0 picks a free port.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise (systemd journal, Kubernetes).
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `outbox_relay=debug,info`; `RUST_LOG` wins.
    pub level: String,
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
            poll_interval: Duration::from_millis(10),
            topic_template: "outbox.event.{aggregate_type}".into(),
            allowed_topics: Vec::new(),
            row_topics: true,
            max_message_bytes: 1_000_000,
            on_park: ParkPolicy::Hold,
            drain_timeout: Duration::from_secs(10),
            stall_after: Duration::from_secs(30),
            liveness_timeout: Duration::from_secs(300),
            stats_interval: Duration::from_secs(10),
            retain_sent: DEFAULT_RETAIN_SENT,
            replica_id: String::new(),
            lease_ttl: Duration::from_secs(10),
            lease_renew_interval: Duration::from_secs(2),
            audit_sample_rate: 0.0,
            audit_interval: Duration::from_secs(30),
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9743)),
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
#[derive(Clone, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
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

impl Settings {
    /// Loads defaults, then the configuration file ([`config_file`]), then the environment,
    /// and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_for(path, Needs::Everything)
    }

    /// [`Settings::load`] for a command that needs only `needs`.
    pub fn load_for(path: Option<&Path>, needs: Needs) -> Result<Settings, ConfigError> {
        let variable = std::env::var_os(CONFIG_PATH_VARIABLE).map(PathBuf::from);
        let file = config_file(path, variable.as_deref(), |p| p.exists())?;
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = &file {
            figment = figment.merge(Toml::file(file));
        }
        // A configuration variable is OUTBOX_RELAY_<SECTION>__<KEY>; one without `__`
        // is someone else's (a Kubernetes service link) and must not stop the relay.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let mut settings = Self::from_figment_for(figment, needs)?;
        settings.ignored_environment = ignored_environment(std::env::vars_os().map(|(k, _)| k));
        settings.config_file = file;
        Ok(settings)
    }

    /// Extracts and validates settings from any figment (tests build their own).
    pub fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
        Self::from_figment_for(figment, Needs::Everything)
    }

    fn from_figment_for(figment: Figment, needs: Needs) -> Result<Settings, ConfigError> {
        let mut settings: Settings = figment.extract().map_err(from_figment_error)?;
        settings.normalize();
        if needs == Needs::Validation {
            if settings.database.url_file.is_some() && settings.database.url.expose().is_empty() {
                // Read at run time; what validation needs is that a URL will come.
                settings.database.url = Secret::new("postgres://from-url-file@localhost/unread");
            }
        } else {
            settings.read_secret_files(needs)?;
        }
        settings.validate()?;
        if needs == Needs::Everything {
            settings.check_files()?;
        }
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

    /// What rows may publish to: `relay.allowed_topics`, or the template's own glob.
    pub(crate) fn topic_policy(&self) -> Result<crate::model::TopicPolicy, TemplateError> {
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

    /// How much sooner than the database a replica considers its lease gone: covers clock
    /// drift and the time a renewal takes to return.
    pub(crate) fn lease_margin(&self) -> Duration {
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

    /// The settings as TOML with every secret replaced, for `check` and logs.
    pub(crate) fn redacted(&self) -> String {
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

/// The configuration file to read: `--config`, else [`CONFIG_PATH_VARIABLE`] (either must
/// exist), else the first of [`DEFAULT_CONFIG_PATH`] and [`SYSTEM_CONFIG_PATH`] that
/// exists, else none (defaults and the environment only).
pub(crate) fn config_file(
    flag: Option<&Path>,
    variable: Option<&Path>,
    exists: impl Fn(&Path) -> bool,
) -> Result<Option<PathBuf>, ConfigError> {
    if let Some((key, path)) = flag
        .map(|p| ("--config", p))
        .or(variable.map(|p| (CONFIG_PATH_VARIABLE, p)))
    {
        if !exists(path) {
            return Err(ConfigError::new(
                key,
                format!(
                    "names {}, which does not exist; name an existing TOML file, or leave it out to use {DEFAULT_CONFIG_PATH} or {SYSTEM_CONFIG_PATH}",
                    path.display()
                ),
            ));
        }
        return Ok(Some(path.to_path_buf()));
    }
    Ok([DEFAULT_CONFIG_PATH, SYSTEM_CONFIG_PATH]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| exists(p)))
}

/// The `OUTBOX_RELAY_*` variable names in `names` that are not configuration: no `__`, and
/// not [`CONFIG_PATH_VARIABLE`].
fn ignored_environment(names: impl Iterator<Item = std::ffi::OsString>) -> Vec<String> {
    let mut ignored: Vec<String> = names
        .filter_map(|name| name.into_string().ok())
        .filter(|name| {
            name.strip_prefix(ENV_PREFIX)
                .is_some_and(|key| !key.contains("__"))
                && name != CONFIG_PATH_VARIABLE
        })
        .collect();
    ignored.sort();
    ignored
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
        // An unknown section leaves only its own name in the path: the key is not known.
        _ if m.name.contains("environment") && path.len() < 2 => format!(
            "an environment variable {ENV_PREFIX}{}__...",
            path.join("__").to_uppercase()
        ),
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
mod tests;
