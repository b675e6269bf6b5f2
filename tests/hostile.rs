//! Rows written by services the relay does not trust, and neighbours in the same database:
//! whatever a row holds, the relay keeps running, parks it with a reason an operator can
//! read, and keeps every other aggregate flowing. Checked by reading Kafka back.

mod support;

use support::*;

/// A row whose aggregate id is far larger than a btree entry may be, with a reason to be
/// parked: parking it must not fail (once, the parked-rows index took the id itself and
/// the park failed with SQLSTATE 54000, which stopped the relay before it marked the acked
/// rows of the batch, on every replica in turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_a_huge_aggregate_id_is_parked_and_the_rest_flows() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.huge");
    create_topic(&bootstrap, &topic, 3).await;
    let huge = incompressible_text(12_000);
    let mut rows = stream("huge", 10, 60);
    let mut hostile = NewRow::new("huge", &huge, 1);
    hostile.headers = Some("[1, 2]".into());
    rows.insert(20, hostile);
    rows.insert(40, NewRow::new("huge", &huge, 2));
    db.insert(&rows).await;

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for(
        "every other aggregate marked",
        CONDITION_TIMEOUT,
        || async { db.sent().await == 60 },
    )
    .await;
    wait_for("the hostile row parked", CONDITION_TIMEOUT, || async {
        db.count("parked_at IS NOT NULL AND park_reason = 'bad_headers'")
            .await
            == 1
    })
    .await;
    assert!(!relay.handle.is_finished(), "the relay is still running");
    relay.stop().await;
    assert_eq!(
        db.count(&format!(
            "sent_at IS NULL AND parked_at IS NULL AND aggregate_id = '{huge}'"
        ))
        .await,
        1,
        "the huge aggregate's next row waits behind the parked one"
    );

    let sent: Vec<DbRow> = db.rows().await.into_iter().filter(|r| r.sent).collect();
    let records = consume(&bootstrap, &topic, sent.len());
    let duplicates = assert_contract(&sent, &records);
    assert_eq!(duplicates, 0);
    assert!(
        records
            .iter()
            .all(|r| r.key.as_deref() != Some(huge.as_str()))
    );
}

/// A neighbour with CREATE on the outbox's schema plants a `width_bucket(bigint, bigint[])`
/// (an exact match beats the polymorphic built-in) and an `=` for bigints, and the database
/// searches `public` before `pg_catalog`: neither may ever run in the relay's sessions,
/// where they would read every service's payloads with the relay's privileges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_and_operators_planted_in_the_schema_never_run_as_the_relay() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "CREATE TABLE public.stolen (what text PRIMARY KEY, seen bigint); \
         GRANT INSERT ON public.stolen TO PUBLIC; \
         CREATE FUNCTION public.width_bucket(v bigint, b bigint[]) RETURNS integer \
         LANGUAGE plpgsql AS $$ BEGIN \
           IF pg_catalog.current_setting('application_name') = 'outbox-relay' \
           AND pg_catalog.current_setting('transaction_read_only') = 'off' THEN \
             INSERT INTO public.stolen SELECT 'width_bucket', pg_catalog.count(*) FROM public.outbox \
             ON CONFLICT DO NOTHING; \
           END IF; \
           RETURN pg_catalog.width_bucket(v, b); END $$; \
         CREATE FUNCTION public.width_bucket(v smallint, b smallint[]) RETURNS integer \
         LANGUAGE sql AS $$ SELECT pg_catalog.width_bucket(v, b) $$; \
         CREATE FUNCTION public.spy_eq(a bigint, b bigint) RETURNS boolean \
         LANGUAGE plpgsql AS $$ BEGIN \
           IF pg_catalog.current_setting('application_name') = 'outbox-relay' \
           AND pg_catalog.current_setting('transaction_read_only') = 'off' THEN \
             INSERT INTO public.stolen VALUES ('=', NULL) ON CONFLICT DO NOTHING; \
           END IF; \
           RETURN a OPERATOR(pg_catalog.=) b; END $$; \
         CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.spy_eq); \
         DO $$ BEGIN EXECUTE pg_catalog.format( \
           'ALTER DATABASE %I SET search_path = public, pg_catalog', pg_catalog.current_database()); END $$;",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let topic = format!("{prefix}.planted");
    create_topic(&bootstrap, &topic, 3).await;
    let mut rows = stream("planted", 5, 50);
    rows[10].headers = Some("\"not an object\"".into());
    db.insert(&rows).await;
    let parked_aggregate = rows[10].aggregate_id.clone();
    let waiting = rows[10..]
        .iter()
        .filter(|r| r.aggregate_id == parked_aggregate)
        .count() as i64;

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("the other rows marked", CONDITION_TIMEOUT, || async {
        relay.handle.is_finished() || db.sent().await == 50 - waiting
    })
    .await;
    relay.stop().await;
    assert_eq!(db.sent().await, 50 - waiting);
    assert_eq!(db.count("parked_at IS NOT NULL").await, 1);

    let stolen: Vec<(String, Option<i64>)> = sqlx::query_as("SELECT what, seen FROM public.stolen")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(
        stolen.is_empty(),
        "planted code ran as the relay: {stolen:?}"
    );
    let sent: Vec<DbRow> = db.rows().await.into_iter().filter(|r| r.sent).collect();
    let records = consume(&bootstrap, &topic, sent.len());
    assert_eq!(assert_contract(&sent, &records), 0, "no duplicates");
}

/// `run` and `check` warn when anyone but the schema's owner may create in it: everyone
/// (`PUBLIC`, the default before PostgreSQL 15), or named roles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_may_create_in_the_outbox_schema_is_found() {
    use outbox_relay::store::Store;
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    assert_eq!(store.schema_creators().await.unwrap(), Vec::<String>::new());
    sqlx::query("GRANT CREATE ON SCHEMA public TO PUBLIC")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(store.schema_creators().await.unwrap(), vec!["PUBLIC"]);

    let neighbour = format!("neighbour_{}", unique_prefix());
    sqlx::raw_sql(&format!(
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
         CREATE ROLE {neighbour} NOLOGIN; \
         GRANT CREATE ON SCHEMA public TO {neighbour};"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        store.schema_creators().await.unwrap(),
        vec![neighbour.clone()]
    );
    sqlx::raw_sql(&format!(
        "REVOKE CREATE ON SCHEMA public FROM {neighbour}; DROP ROLE {neighbour};"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Row text that tries to forge log lines or drive the operator's terminal (newlines,
/// escape sequences, bidirectional overrides, in the topic and in a header name) is
/// parked, and shows escaped and bounded in `park_error` and `parked list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_is_escaped_in_park_errors_and_the_parked_list() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.text"), 1).await;
    let forged = "\n2026-12-07T00:00:00Z ERROR forged line\u{1b}[2J\u{1b}]0;owned\u{7}\u{202e}";
    let mut by_topic = NewRow::new("text", "agg-topic", 1);
    by_topic.topic = Some(format!("evil{forged}"));
    let mut by_header = NewRow::new("text", "agg-header", 1);
    by_header.headers = Some(serde_json::json!({ format!("x{forged}"): "v" }).to_string());
    db.insert(&[by_topic, by_header, NewRow::new("text", "agg-fine", 1)])
        .await;

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("the hostile rows parked", CONDITION_TIMEOUT, || async {
        db.count("parked_at IS NOT NULL").await == 2 && db.sent().await == 1
    })
    .await;
    relay.stop().await;

    let errors: Vec<String> =
        sqlx::query_scalar("SELECT park_error FROM outbox WHERE parked_at IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for error in &errors {
        assert!(!error.chars().any(char::is_control), "{error:?}");
        assert!(!error.contains('\u{202e}'), "{error:?}");
        assert!(error.contains(r"\n2026-12-07"), "{error:?}");
    }
    let output = relay_command(&db.url, &bootstrap)
        .args(["parked", "list"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", output_text(&output));
    let listed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        listed.lines().count(),
        3,
        "a header and one line per row:\n{listed}"
    );
    assert!(
        !listed.chars().any(|c| c != '\n' && c.is_control()),
        "{listed:?}"
    );
}

/// Slow or idle HTTP clients cannot hold the endpoints: a client that never finishes its
/// headers is cut off after the header timeout, one address's connections beyond its cap
/// are closed on arrival while another address is still served, and the scrape answers
/// once the slow ones are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_are_cut_off_and_capped() {
    use outbox_relay::http::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS_PER_PEER};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let db = TestDb::new().await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &kafka_bootstrap(),
        &unique_prefix(),
        "",
    ))
    .await;
    // Closed by the server: the read ends (EOF, or a reset) before `within`.
    async fn closed_within(stream: &mut TcpStream, within: std::time::Duration) -> bool {
        let mut buf = [0u8; 512];
        let read = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        };
        tokio::time::timeout(within, read).await.is_ok()
    }

    let mut slow = TcpStream::connect(relay.http_addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nX-Slow: ")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, HEADER_READ_TIMEOUT * 3).await,
        "a client that never finishes its headers is cut off"
    );
    assert_eq!(http_get(relay.http_addr, "/metrics").await.0, 200);

    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER {
        idle.push(TcpStream::connect(relay.http_addr).await.unwrap());
    }
    // Connections are accepted in order: with one address's share in, its next is refused.
    let mut extra = TcpStream::connect(relay.http_addr).await.unwrap();
    assert!(
        closed_within(&mut extra, HEADER_READ_TIMEOUT / 2).await,
        "a connection over one address's cap of {MAX_CONNECTIONS_PER_PEER} is closed on arrival"
    );
    // Another address (a probe, the scraper) is still served meanwhile.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(relay.http_addr).await.unwrap();
    other
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    for stream in &mut idle {
        assert!(
            closed_within(stream, HEADER_READ_TIMEOUT * 3).await,
            "an idle connection is cut off"
        );
    }
    let (status, body) = http_get(relay.http_addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    relay.stop().await;
}

/// A row may not publish outside `relay.allowed_topics` (by default what the template
/// can render): not into another team's topic, not into Kafka's internal ones. It is
/// parked as `topic_not_allowed` and nothing reaches those topics; with
/// `relay.row_topics = false` no row may name its own topic at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_cannot_publish_outside_the_allowed_topics() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let ours = format!("{prefix}.orders");
    let theirs = format!("{}.payments", unique_prefix());
    create_topic(&bootstrap, &ours, 3).await;
    create_topic(&bootstrap, &theirs, 1).await;
    let mut rows = stream("orders", 4, 20);
    let mut into_theirs = NewRow::new("orders", "agg-theirs", 1);
    into_theirs.topic = Some(theirs.clone());
    let mut into_offsets = NewRow::new("orders", "agg-offsets", 1);
    into_offsets.topic = Some("__consumer_offsets".into());
    let mut own_allowed = NewRow::new("orders", "agg-own", 1);
    own_allowed.topic = Some(ours.clone());
    rows.extend([into_theirs, into_offsets, own_allowed]);
    db.insert(&rows).await;

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for("the allowed rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 21 && db.count("parked_at IS NOT NULL").await == 2
    })
    .await;
    relay.stop().await;
    assert_eq!(
        db.count(
            "park_reason = 'topic_not_allowed' AND aggregate_id IN ('agg-theirs', 'agg-offsets')"
        )
        .await,
        2
    );
    assert_eq!(
        high_watermark(&bootstrap, &theirs),
        0,
        "nothing reached their topic"
    );
    let sent: Vec<DbRow> = db.rows().await.into_iter().filter(|r| r.sent).collect();
    // Rows are parked before they are produced: none is sent twice.
    assert_eq!(
        assert_contract(&sent, &consume(&bootstrap, &ours, sent.len())),
        0,
        "no duplicates"
    );

    // Template only: the row naming its own topic (an allowed one) is parked as well.
    let db = TestDb::new().await;
    let mut row = NewRow::new("orders", "agg-own", 1);
    row.topic = Some(ours.clone());
    db.insert(&[row, NewRow::new("orders", "agg-template", 1)])
        .await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "row_topics = false\n",
    ))
    .await;
    wait_for("the template row marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 1 && db.count("parked_at IS NOT NULL").await == 1
    })
    .await;
    relay.stop().await;
    assert_eq!(
        db.count("park_reason = 'topic_not_allowed' AND aggregate_id = 'agg-own'")
            .await,
        1
    );
}

/// A row naming a topic of its own that does not exist (within the allowed globs) is
/// parked at once, so that its batch, and every other aggregate's rows in it, does not
/// wait out librdkafka's `topic.metadata.propagation.max.ms` (30 s by default) first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_naming_a_topic_that_does_not_exist_is_parked_at_once() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let ours = format!("{prefix}.orders");
    create_topic(&bootstrap, &ours, 3).await;
    let mut nowhere = NewRow::new("orders", "agg-nowhere", 1);
    nowhere.topic = Some(format!("{prefix}.nowhere"));
    let mut rows = vec![nowhere];
    rows.extend(stream("orders", 4, 20));
    db.insert(&rows).await;

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    // Well within the 30 s librdkafka would hold the batch for the unknown topic.
    wait_for(
        "the row parked and the others marked",
        std::time::Duration::from_secs(20),
        || async { db.sent().await == 20 && db.count("parked_at IS NOT NULL").await == 1 },
    )
    .await;
    relay.stop().await;
    let error: String =
        sqlx::query_scalar("SELECT park_error FROM outbox WHERE aggregate_id = 'agg-nowhere'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(error.contains("does not know the topic"), "{error}");
    let sent: Vec<DbRow> = db.rows().await.into_iter().filter(|r| r.sent).collect();
    // Rows are parked before they are produced: none is sent twice.
    assert_eq!(
        assert_contract(&sent, &consume(&bootstrap, &ours, sent.len())),
        0,
        "no duplicates"
    );
}

/// Rows that each name a different missing template topic (their `aggregate_type`):
/// up to the cap each topic waits on its own, and past it a row is parked with the reason,
/// never stopping every other topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_for_more_missing_topics_than_the_cap_are_parked_and_the_rest_flows() {
    use outbox_relay::relay::MAX_WAITING_TOPICS;
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    let ours = format!("{prefix}.orders");
    create_topic(&bootstrap, &ours, 3).await;
    let over = 5;
    let mut rows: Vec<NewRow> = (0..MAX_WAITING_TOPICS + over)
        .map(|i| NewRow::new(&format!("missing{i}"), &format!("agg-missing-{i}"), 1))
        .collect();
    rows.extend(stream("orders", 4, 20));
    db.insert(&rows).await;

    let relay = RunningRelay::start(template_settings(&db, &bootstrap, &prefix, "")).await;
    wait_for(
        "the rows past the cap parked and the others marked",
        CONDITION_TIMEOUT,
        || async {
            db.sent().await == 20 && db.count("parked_at IS NOT NULL").await == over as i64
        },
    )
    .await;
    let (status, body) = http_get(relay.http_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("and {} more", MAX_WAITING_TOPICS - 10)),
        "{body}"
    );
    relay.stop().await;
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT park_error FROM outbox WHERE parked_at IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        reasons.iter().all(|r| r.contains("holds apart")),
        "{reasons:?}"
    );
    let sent: Vec<DbRow> = db.rows().await.into_iter().filter(|r| r.sent).collect();
    // Rows are parked before they are produced: none is sent twice.
    assert_eq!(
        assert_contract(&sent, &consume(&bootstrap, &ours, sent.len())),
        0,
        "no duplicates"
    );
}

/// The high watermark of partition 0 of `topic`: how many records it ever received.
fn high_watermark(bootstrap: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_prefix())
        .create()
        .unwrap();
    consumer
        .fetch_watermarks(topic, 0, std::time::Duration::from_secs(10))
        .unwrap()
        .1
}

/// `len` letters and digits that neither pglz nor lz4 can shrink much (an index entry is
/// compressed before its size is checked, so a repeated letter would slip through).
fn incompressible_text(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ALPHABET[(state % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}
