//! Validation: every setting checked before anything connects, each refusal naming the key
//! and the fix; and the settings accepted with a warning.

use super::*;

impl Settings {
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
                format!(
                    "is required: set it in the config file or OUTBOX_RELAY_DATABASE__URL, e.g. postgres://relay@db.internal/app{}",
                    self.no_file_found()
                ),
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
        let rate = self.relay.audit_sample_rate;
        if !(0.0..=1.0).contains(&rate) {
            return Err(ConfigError::new(
                "relay.audit_sample_rate",
                format!(
                    "is {rate}; it is the share of sent rows to audit, from 0 (off) to 1 (every row), e.g. 0.001"
                ),
            ));
        }
        if rate > 0.0 && self.relay.mode == Mode::Delete {
            return Err(ConfigError::new(
                "relay.audit_sample_rate",
                "audits the partition and offset each sent row keeps, which relay.mode = \"delete\" does not keep; set relay.mode = \"mark\" or relay.audit_sample_rate = 0",
            ));
        }
        if rate > 0.0 && self.relay.audit_interval.is_zero() {
            return Err(ConfigError::new(
                "relay.audit_interval",
                "must be longer than 0 while relay.audit_sample_rate is above 0, e.g. \"30s\"",
            ));
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
                format!(
                    "is required, e.g. kafka-1:9092,kafka-2:9092{}",
                    self.no_file_found()
                ),
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
        self.validate_producer_properties()?;
        self.outbox.validate()?;
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
                "must be greater than zero, e.g. \"10ms\"",
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
    pub(super) fn durations(&self) -> [(&'static str, Duration); 12] {
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
            ("relay.retain_sent", self.relay.retain_sent),
            ("relay.lease_ttl", self.relay.lease_ttl),
            (
                "relay.lease_renew_interval",
                self.relay.lease_renew_interval,
            ),
            ("relay.audit_interval", self.relay.audit_interval),
        ]
    }

    /// Said after a required key is missing when no configuration file was read: the
    /// likelier cause.
    fn no_file_found(&self) -> String {
        if self.config_file.is_some() {
            return String::new();
        }
        format!(
            " (no configuration file was read: none given with --config or ${}, and neither {} nor {} exists)",
            super::CONFIG_PATH_VARIABLE,
            super::DEFAULT_CONFIG_PATH,
            super::SYSTEM_CONFIG_PATH
        )
    }

    /// Settings the relay accepts but an operator should hear about at start.
    pub(crate) fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.ignored_environment.is_empty() {
            warnings.push(format!(
                "ignored environment variables {}: a configuration variable is OUTBOX_RELAY_<SECTION>__<KEY> (two underscores); Kubernetes sets variables like these for a Service named outbox-relay unless the pod has enableServiceLinks: false",
                self.ignored_environment.join(", ")
            ));
        }
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
}

/// The URL query parameters sqlx's PostgreSQL client takes (`sqlx-postgres`'s
/// `options/parse.rs`); it ignores any other with a warning that prints its value.
pub(super) const CONNECT_PARAMETERS: &[&str] = &[
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

pub(super) fn is_connect_parameter(key: &str) -> bool {
    CONNECT_PARAMETERS.contains(&key) || (key.starts_with("options[") && key.ends_with(']'))
}

/// The `sslmode` of `url` when the connection goes to a remote host without verifying
/// the server's name (anything short of verify-full; libpq's default is `prefer`).
/// Decided from the options the client will connect with, not from the URL's text: a
/// `?host=` or `?hostaddr=` replaces the authority, `sslmode` is taken in any case and
/// under either spelling. Loopback hosts and Unix sockets never leave the machine.
pub(super) fn unverified_remote_sslmode(url: &str) -> Option<String> {
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

/// A name PostgreSQL takes as it is written, once double-quoted: no quoting or escaping
/// needed anywhere it is passed on (the `search_path` startup option takes no spaces).
pub(super) fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// PostgreSQL's longest identifier, in bytes.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// `None` when `name` can name a table or column (it is quoted wherever it is used).
fn identifier_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_IDENTIFIER_BYTES {
        Some("is longer than PostgreSQL's 63 bytes")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    }
}

impl OutboxSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let table = self.table.trim();
        if table.is_empty() {
            if self.columns != OutboxColumns::default() || !self.header_columns.is_empty() {
                return Err(ConfigError::new(
                    "outbox.columns",
                    "maps the columns of a table named by outbox.table; the relay's own outbox has its own names: set outbox.table = \"schema.table\" too, or remove [outbox.columns] and [outbox.header_columns]",
                ));
            }
            return Ok(());
        }
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || parts.iter().any(|p| identifier_problem(p).is_some()) {
            return Err(ConfigError::new(
                "outbox.table",
                format!(
                    "`{}` is not a table name: use table or schema.table, each part 1 to 63 bytes (e.g. app.events)",
                    crate::model::printable(table, 200)
                ),
            ));
        }
        let c = &self.columns;
        let mut named: Vec<(&str, &str)> = vec![
            ("event_id", &c.event_id),
            ("aggregate_type", &c.aggregate_type),
            ("aggregate_id", &c.aggregate_id),
            ("event_type", &c.event_type),
        ];
        if !c.payload.is_empty() {
            named.push(("payload", &c.payload));
        }
        for (key, column) in [("headers", &c.headers), ("topic", &c.topic)] {
            if let Some(column) = column.as_deref().filter(|c| !c.is_empty()) {
                named.push((key, column));
            }
        }
        for (i, (key, column)) in named.iter().enumerate() {
            if let Some(problem) = identifier_problem(column) {
                return Err(ConfigError::new(
                    format!("outbox.columns.{key}"),
                    format!("{problem}; name a column of {table}"),
                ));
            }
            if let Some((other, _)) = named[..i].iter().find(|(_, c)| c == column) {
                return Err(ConfigError::new(
                    format!("outbox.columns.{key}"),
                    format!(
                        "names the column `{column}`, as outbox.columns.{other} does; each role needs a column of its own"
                    ),
                ));
            }
        }
        if self.header_columns.len() > crate::model::headers::MAX_ROW_HEADERS {
            return Err(ConfigError::new(
                "outbox.header_columns",
                format!(
                    "{} columns; at most {} are sent as headers",
                    self.header_columns.len(),
                    crate::model::headers::MAX_ROW_HEADERS
                ),
            ));
        }
        for (header, column) in &self.header_columns {
            let key = format!(
                "outbox.header_columns.\"{}\"",
                crate::model::printable(header, 64)
            );
            if header.is_empty()
                || header.len() > crate::model::headers::MAX_HEADER_NAME_BYTES
                || header.chars().any(char::is_control)
            {
                return Err(ConfigError::new(
                    key,
                    "a header name is 1 to 256 bytes without control characters",
                ));
            }
            if crate::model::headers::RESERVED_HEADERS
                .iter()
                .any(|r| r.eq_ignore_ascii_case(header))
            {
                return Err(ConfigError::new(
                    key,
                    "is a header the relay writes itself (id, event_type, aggregate_type); choose another name",
                ));
            }
            if let Some(problem) = identifier_problem(column) {
                return Err(ConfigError::new(
                    key,
                    format!("{problem}; name a column of {table}"),
                ));
            }
        }
        Ok(())
    }
}
