//! The settings' unit tests: loading, validation, the contract, secrets.

use super::*;
use figment::providers::Toml;

fn from_toml(text: &str) -> Result<Settings, ConfigError> {
    Settings::from_figment(
        Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(text)),
    )
}

const BASE: &str = "[database]\nurl = \"postgres://relay:hunter2@db/app?sslmode=verify-full\"\n";

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
    from_toml(&format!("{BASE}[relay]\ndrain_timeout = \"365d\"\n")).expect("a year is accepted");
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
    let err = from_toml(&format!("{BASE}[relay]\ntopic_template = \"x.{{nope}}\"\n")).unwrap_err();
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

#[test]
fn the_configuration_file_is_the_flag_the_variable_or_the_first_default_present() {
    let here = Path::new(DEFAULT_CONFIG_PATH);
    let system = Path::new(SYSTEM_CONFIG_PATH);
    let mine = Path::new("/srv/relay.toml");
    fn only<'a>(present: &'a [&'a Path]) -> impl Fn(&Path) -> bool + 'a {
        move |p: &Path| present.contains(&p)
    }
    // Nothing named: the checkout's file, then the host's, then none.
    assert_eq!(
        config_file(None, None, only(&[here, system])).unwrap(),
        Some(here.to_path_buf())
    );
    assert_eq!(
        config_file(None, None, only(&[system])).unwrap(),
        Some(system.to_path_buf())
    );
    assert_eq!(config_file(None, None, only(&[])).unwrap(), None);
    // The variable wins over the defaults, the flag over the variable; either must exist.
    assert_eq!(
        config_file(None, Some(mine), only(&[here, mine])).unwrap(),
        Some(mine.to_path_buf())
    );
    assert_eq!(
        config_file(Some(here), Some(mine), only(&[here, mine])).unwrap(),
        Some(here.to_path_buf())
    );
    let err = config_file(None, Some(mine), only(&[here])).unwrap_err();
    assert!(err.to_string().contains(CONFIG_PATH_VARIABLE), "{err}");
    let err = config_file(Some(mine), None, only(&[here])).unwrap_err();
    assert!(err.to_string().contains("--config"), "{err}");
}

#[test]
fn variables_without_a_section_separator_are_ignored_and_named() {
    let names = [
        "OUTBOX_RELAY_PORT",
        "OUTBOX_RELAY_SERVICE_HOST",
        "OUTBOX_RELAY_CONFIG",
        "OUTBOX_RELAY_RELAY__BATCH_SIZE",
        "PATH",
    ]
    .map(std::ffi::OsString::from);
    assert_eq!(
        ignored_environment(names.into_iter()),
        ["OUTBOX_RELAY_PORT", "OUTBOX_RELAY_SERVICE_HOST"]
    );
}

#[test]
fn the_default_metrics_port_is_not_prometheuss_own() {
    // 9090 is the Prometheus server's port: a relay on the same host must not take it.
    let port = Settings::default().http.listen.port();
    assert_ne!(port, 9090);
    assert_eq!(port, 9743, "the documented default");
}
