//! Security as deployed: Kafka over TLS with the broker's certificate verified, SASL
//! credentials refused by the broker (publishing stops, nothing is parked), PostgreSQL with
//! `sslmode=verify-full` against a cluster with a certificate of the test's own CA, and the
//! secrets never printed.

mod support;

use std::process::Stdio;

use support::*;

fn tls_properties(certs: &Certs) -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", "ssl".to_string()),
        ("ssl.ca.location", certs.path("ca.crt")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_verifies_the_broker_and_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path());
    // tansu 0.6.0 cannot be given both --cert and --key (its CLI puts them in one
    // exclusive group), so TLS is terminated by a proxy the broker advertises.
    let tls_port = free_port();
    let tansu = Tansu::start_with(&[], Some(tls_port));
    let _proxy = TlsProxy::start(tls_port, tansu.port, &certs);
    let bootstrap = format!("127.0.0.1:{tls_port}");
    let tls = tls_properties(&certs);
    let tls_refs: Vec<(&str, &str)> = tls.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let db = TestDb::new().await;
    let prefix = unique_prefix();
    let topic = format!("{prefix}.tls");
    create_topic_with_client(&bootstrap, &tls_refs, &topic, 3).await;
    db.insert(&stream("tls", 20, 300)).await;
    let relay = RunningRelay::start(settings(
        &db,
        &bootstrap,
        &format!(
            "[relay]\ntopic_template = \"{prefix}.{{aggregate_type}}\"\n[kafka.properties]\n\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{}\"\n",
            certs.path("ca.crt")
        ),
    ))
    .await;
    wait_for("every row marked over TLS", CONDITION_TIMEOUT, || async {
        db.sent().await == 300
    })
    .await;
    relay.stop().await;
    let records = consume_with(&bootstrap, &tls_refs, &topic, 300);
    assert_eq!(assert_contract(&db.rows().await, &records), 0);

    // A broker whose certificate the configured CA did not sign is refused, and `check`
    // says why.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Certs::generate(other_dir.path());
    let output = relay_command(&db.url, &bootstrap)
        .env("OUTBOX_RELAY_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "ssl")
        .env(
            "OUTBOX_RELAY_KAFKA__PROPERTIES__SSL_CA_LOCATION",
            other.path("ca.crt"),
        )
        .args(["check", "--timeout", "5s"])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.to_lowercase().contains("certificate verify failed"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sasl_credentials_stop_publishing_park_nothing_and_never_print_the_password() {
    let tansu = Tansu::start_with(&["--authentication"], None);
    let dir = tempfile::tempdir().unwrap();
    let password = "Kafka-Secret-7f3a9c";
    std::fs::write(dir.path().join("kafka-password"), format!("{password}\n")).unwrap();

    let db = TestDb::new().await;
    let prefix = unique_prefix();
    db.insert(&stream("sasl", 5, 50)).await;
    let relay = RunningRelay::start(settings(
        &db,
        &tansu.bootstrap,
        &format!(
            "[relay]\ntopic_template = \"{prefix}.{{aggregate_type}}\"\n[kafka.properties]\n\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"relay\"\n[kafka.secret_files]\n\"sasl.password\" = \"{}\"\n",
            dir.path().join("kafka-password").display()
        ),
    ))
    .await;
    wait_for_metric(
        relay.http_addr,
        "outbox_relay_publish_errors_total{kind=\"authentication_failed\"",
    )
    .await;
    let (status, body) = http_get(relay.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    // `status`, from another process, names the replica blocked and the broker's refusal.
    let status_table = wait_for_status_state(&db, "blocked", "Authentication").await;
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    assert_eq!(db.sent().await, 0);
    assert_eq!(db.count("parked_at IS NOT NULL").await, 0, "nothing parked");
    relay.stop().await;
    for text in [&body, &metrics, &status_table] {
        assert!(!text.contains(password), "the password leaked: {text}");
    }

    // The binary's own output, with the password in the environment and in a file.
    let secret_file = dir.path().join("kafka-password").display().to_string();
    let http_port = free_port();
    let child = relay_command(&db.url, &tansu.bootstrap)
        .env(
            "OUTBOX_RELAY_HTTP__LISTEN",
            format!("127.0.0.1:{http_port}"),
        )
        .env(
            "OUTBOX_RELAY_KAFKA__PROPERTIES__SECURITY_PROTOCOL",
            "sasl_plaintext",
        )
        .env(
            "OUTBOX_RELAY_KAFKA__PROPERTIES__SASL_MECHANISMS",
            "SCRAM-SHA-512",
        )
        .env("OUTBOX_RELAY_KAFKA__PROPERTIES__SASL_USERNAME", "relay")
        .env(
            "OUTBOX_RELAY_KAFKA__SECRET_FILES__SASL_PASSWORD",
            &secret_file,
        )
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .arg("run")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http_addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    wait_for(
        "the binary to serve /metrics",
        CONDITION_TIMEOUT,
        || async { port_open(http_port) },
    )
    .await;
    wait_for_metric(
        http_addr,
        "outbox_relay_publish_errors_total{kind=\"authentication_failed\"",
    )
    .await;
    signal(child.id(), libc::SIGTERM);
    let run_output = child.wait_with_output().unwrap();
    let run_text = output_text(&run_output);
    assert!(
        run_text.to_lowercase().contains("authentication"),
        "the log names the failure: {run_text}"
    );
    let check = relay_command(&db.url, &tansu.bootstrap)
        .env("OUTBOX_RELAY_KAFKA__PROPERTIES__SASL_PASSWORD", password)
        .args(["check", "--timeout", "3s"])
        .output()
        .unwrap();
    let help = relay_command(&db.url, &tansu.bootstrap)
        .env("OUTBOX_RELAY_KAFKA__PROPERTIES__SASL_PASSWORD", password)
        .arg("--help")
        .output()
        .unwrap();
    let bad = relay_command(&format!("postgres://relay:{password}@127.0.0.1:1/x"), "")
        .arg("run")
        .output()
        .unwrap();
    for (what, text) in [
        ("run", run_text),
        ("check", output_text(&check)),
        ("--help", output_text(&help)),
        ("a configuration error", output_text(&bad)),
    ] {
        assert!(
            !text.contains(password),
            "{what} printed the password:\n{text}"
        );
    }
    assert_eq!(bad.status.code(), Some(2), "{}", output_text(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_verify_full_connects_only_to_the_server_its_ca_signed() {
    let cluster = PgCluster::init_with(|dir| {
        let certs = Certs::generate(dir);
        vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", certs.path("server.crt")),
            format!("ssl_key_file={}", certs.path("server.key")),
        ]
    });
    let ca = cluster_file(&cluster, "ca.crt");
    let db = TestDb::new_on(&cluster).await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.pgtls"), 3).await;
    db.insert(&stream("pgtls", 5, 100)).await;

    let mut tls_db = TestDb {
        url: format!("{}?sslmode=verify-full&sslrootcert={ca}", db.url),
        pool: db.pool.clone(),
    };
    let relay = RunningRelay::start(template_settings(&tls_db, &bootstrap, &prefix, "")).await;
    wait_for("every row marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 100
    })
    .await;
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(encrypted > 0, "the relay's sessions use TLS");
    relay.stop().await;

    // Another CA: `check` refuses the server and says so.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Certs::generate(other_dir.path());
    tls_db.url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        other.path("ca.crt")
    );
    let output = relay_command(&tls_db.url, &bootstrap)
        .args(["check", "--timeout", "5s"])
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

fn cluster_file(cluster: &PgCluster, name: &str) -> String {
    cluster.dir().join(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_runs_under_the_least_privilege_role_and_names_a_missing_grant() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.grants");
    create_topic(&bootstrap, &topic, 3).await;
    let role = format!("relay_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sql/least-privilege.sql");
    let psql = std::process::Command::new(postgres_bin_dir().join("psql"))
        .arg(&db.url)
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-v"])
        .arg(format!("relay_role={role}"))
        .arg("-f")
        .arg(&script)
        .output()
        .unwrap();
    assert!(psql.status.success(), "{}", output_text(&psql));
    let mut role_url = url::Url::parse(&db.url).unwrap();
    role_url.set_username(&role).unwrap();
    let role_url = role_url.to_string();
    let template = format!("{prefix}.{{aggregate_type}}");

    let start_restricted = || {
        relay_command(&role_url, &bootstrap)
            .env("OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE", &template)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let stop = |child: std::process::Child| {
        signal(child.id(), libc::SIGTERM);
        let output = child.wait_with_output().unwrap();
        let text = output_text(&output);
        assert_eq!(output.status.code(), Some(0), "{text}");
        text
    };

    db.insert(&stream("grants", 10, 100)).await;
    let child = start_restricted();
    wait_for(
        "every row marked by the restricted role",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 100 },
    )
    .await;
    // The role may record the replica's state for `status`.
    wait_for_status_state(&db, "ready", "").await;
    // Its state grants taken away while it runs, the relay keeps its leases and relays.
    let revoke_state = format!(
        "REVOKE INSERT (state, state_reason), UPDATE (state, state_reason) ON outbox_replica FROM {role}"
    );
    let revoked_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    sqlx::query(&revoke_state).execute(&db.pool).await.unwrap();
    wait_for(
        "a heartbeat after the state grants went away",
        CONDITION_TIMEOUT,
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM outbox_replica WHERE heartbeat_at > $1",
            )
            .bind(revoked_at)
            .fetch_one(&db.pool)
            .await
            .unwrap()
                == 1
        },
    )
    .await;
    db.insert(&stream("grants", 10, 10)).await;
    wait_for(
        "rows marked after the state grants went away",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 110 },
    )
    .await;
    let text = stop(child);
    assert!(
        text.contains("can no longer record this replica's state"),
        "{text}"
    );
    assert!(!text.contains("lease renewal failed"), "{text}");
    sqlx::query(&format!(
        "GRANT INSERT (state, state_reason), UPDATE (state, state_reason) ON outbox_replica TO {role}"
    ))
    .execute(&db.pool)
    .await
    .unwrap();

    // A role made before the state was recorded relays all the same, and says what to grant.
    sqlx::query(&revoke_state).execute(&db.pool).await.unwrap();
    db.insert(&stream("grants", 10, 10)).await;
    let child = start_restricted();
    wait_for(
        "the rows marked by a role that may not record its state",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 120 },
    )
    .await;
    let status_table = wait_for_status_state(&db, "-", "a role that may not record it").await;
    let text = stop(child);
    assert!(
        text.contains(
            "GRANT INSERT (state, state_reason), UPDATE (state, state_reason) ON outbox_replica"
        ),
        "the relay names the grant: {text}\n{status_table}"
    );

    // Without one grant the relay refuses to start, naming it, before publishing anything.
    sqlx::query(&format!("REVOKE UPDATE (sent_at) ON outbox FROM {role}"))
        .execute(&db.pool)
        .await
        .unwrap();
    db.insert(&stream("grants", 1, 1)).await;
    let output = relay_command(&role_url, &bootstrap)
        .env("OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE", &template)
        .arg("run")
        .output()
        .unwrap();
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("UPDATE (sent_at) ON outbox"), "{text}");
    let check = relay_command(&role_url, &bootstrap)
        .args(["check", "--timeout", "5s"])
        .output()
        .unwrap();
    let check_text = output_text(&check);
    assert_eq!(check.status.code(), Some(1), "{check_text}");
    assert!(
        check_text.contains("UPDATE (sent_at) ON outbox"),
        "{check_text}"
    );
    let records = consume(&bootstrap, &topic, 120);
    assert_eq!(records.len(), 120, "nothing published without the grant");
    assert_eq!(assert_contract(&db.rows().await[..120], &records), 0);
}
