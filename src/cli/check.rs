//! `outbox-relay check`: the configuration validated, both sides reached, and what the relay
//! would do said, secrets redacted.

use super::*;

pub(super) async fn check(settings: Settings, timeout: Duration) -> anyhow::Result<()> {
    match &settings.config_file {
        Some(file) => println!("configuration is valid (file {}):\n", file.display()),
        None => println!(
            "configuration is valid (no file: neither {} nor {} exists; defaults and the environment):\n",
            crate::config::DEFAULT_CONFIG_PATH,
            crate::config::SYSTEM_CONFIG_PATH
        ),
    }
    println!("{}", settings.redacted());
    for warning in settings.warnings() {
        println!("warning: {warning}");
    }
    let mut failures = Vec::new();
    // What decides the topics the pending rows need, checked against the cluster below.
    let mut pending_sources = Vec::new();

    let mut database = settings.database.clone();
    database.connect_timeout = timeout;
    let store = Store::connect(&database)
        .map(|store| {
            store.on_table(crate::store::TableSpec::from_settings(
                &settings.outbox,
                &settings.database.schema,
            ))
        })
        .context("Failed to configure the database connection from database.url")?;
    let url = redact_url(settings.database.url.expose());
    // A direct connection first: the pool would only say that it timed out.
    let reachable = match tokio::time::timeout(timeout, store::probe(&settings.database)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    let schema = match reachable {
        Ok(()) => match store.verify_schema().await {
            // A mapping the table does not fit is the configuration's fault: exit 2.
            Err(err @ store::StoreError::Config { .. }) => {
                return Err(err).context("The table outbox.table names does not fit [outbox]");
            }
            other => other.map_err(|e| e.to_string()),
        },
        Err(err) => Err(err),
    };
    match schema {
        Ok(version) => {
            println!(
                "PostgreSQL {version} at {url}: outbox table present ({})",
                store.table_display()
            );
            let prunes = settings.relay.mode == crate::model::Mode::Mark
                && !settings.relay.retain_sent.is_zero();
            match store.missing_grants(settings.relay.mode, false).await {
                Ok(missing) if missing.is_empty() => {
                    println!("  the role holds every privilege the relay needs")
                }
                Ok(missing) => {
                    failures.push(format!("database: {}", crate::app::MissingGrants(missing)))
                }
                Err(err) => failures.push(format!("database: checking privileges: {err}")),
            }
            if prunes {
                match store.missing_grants(settings.relay.mode, true).await {
                    Ok(missing) if !missing.is_empty() => println!(
                        "  warning: relay.retain_sent is on but the role lacks {}: sent rows will be kept; grant it or set relay.retain_sent = \"0s\"",
                        missing.join(", ")
                    ),
                    Ok(_) => {}
                    Err(err) => failures.push(format!("database: checking privileges: {err}")),
                }
            }
            match store.replica_state_unrecordable().await {
                Ok(Some(advice)) => println!("  warning: {advice}"),
                Ok(None) => {}
                Err(err) => failures.push(format!("database: checking privileges: {err}")),
            }
            match store.schema_creators().await {
                Ok(creators) if !creators.is_empty() => println!(
                    "  warning: {} (may create there: {})",
                    crate::app::SCHEMA_CREATORS_ADVICE,
                    creators.join(", ")
                ),
                Ok(_) => println!("  only the schema's owner may create in it"),
                Err(err) => {
                    failures.push(format!("database: checking the schema's privileges: {err}"))
                }
            }
            let doorbell = store.doorbell_trigger().await;
            match &doorbell {
                Ok(Some(_)) if !settings.database.listen => println!(
                    "  doorbell trigger present, but database.listen = false: the relay polls every {:?}",
                    settings.relay.poll_interval
                ),
                Ok(trigger) => match store::doorbell_finding(
                    trigger.as_ref(),
                    &settings.database.listen_channel,
                    settings.relay.poll_interval,
                    &store.table_display(),
                ) {
                    Ok(finding) => println!("  {finding}"),
                    Err(advice) => println!("  warning: {advice}"),
                },
                Err(err) => failures.push(format!("database: reading the doorbell trigger: {err}")),
            }
            if matches!(doorbell, Ok(Some(_)))
                && let Ok(prepared @ 1..) = store.max_prepared_transactions().await
            {
                println!(
                    "  warning: max_prepared_transactions = {prepared}: PostgreSQL refuses PREPARE TRANSACTION after a NOTIFY, so a writer using two-phase commit fails while the relay sleeps; if yours do, run `outbox-relay migrate` without `--notify-trigger on` (it removes the trigger; the relay then polls)"
                );
            }
            match store.backlog_stats().await {
                Ok(stats) => println!(
                    "  pending rows: {}, oldest pending: {}, parked rows: {}",
                    pending_text(stats.pending_rows, stats.pending_rows_estimated),
                    stats
                        .oldest_pending_age
                        .map_or("none".to_string(), |d| format!(
                            "{:.1}s ago",
                            d.as_secs_f64()
                        )),
                    stats.parked_rows
                ),
                Err(err) => failures.push(format!("database: {err}")),
            }
            match store.pending_topic_sources(1000).await {
                Ok(sources) => pending_sources = sources,
                Err(err) => {
                    failures.push(format!("database: reading the pending rows' topics: {err}"))
                }
            }
        }
        Err(err) => failures.push(format!(
            "database at {url}: {err}; check database.url and that PostgreSQL accepts connections"
        )),
    }
    store.pool().close().await;

    let properties = settings.producer_properties();
    let mut topic_limits = crate::kafka::topics::TopicLimits::new(&properties);
    let bootstrap = settings.kafka.bootstrap_servers.clone();
    // `check` exports no metrics: the producer's statistics go to a recorder of its own.
    let metrics = crate::telemetry::Metrics::new(&[]).map_err(anyhow::Error::msg)?;
    let cluster = tokio::task::spawn_blocking(move || {
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let producer = RowProducer::build(&properties, 0, tx, metrics, false, None)?;
        producer.describe_cluster(timeout)
    })
    .await
    .context("Kafka check panicked")?;
    match cluster {
        Ok(summary) => {
            println!(
                "Kafka at {bootstrap}: brokers {}",
                summary.brokers.join(", ")
            );
            println!("  {} topics visible", summary.topics.len());
            check_needed_topics(&settings, &pending_sources, &summary.topics, &mut failures)?;
            // The size limit of the topics the template names, as the relay learns it.
            let prefix = settings
                .relay
                .topic_template
                .split('{')
                .next()
                .unwrap_or_default();
            let ours = summary
                .topics
                .iter()
                .filter(|t| !prefix.is_empty() && t.starts_with(prefix));
            for topic in ours.take(5) {
                match topic_limits.describe(topic).await {
                    Ok(Some(limit)) => println!("  topic {topic}: max.message.bytes {limit}"),
                    Ok(None) => println!(
                        "  topic {topic}: max.message.bytes not reported; rows are checked against relay.max_message_bytes only"
                    ),
                    Err(err) => println!(
                        "  topic {topic}: max.message.bytes unknown ({err}); grant the relay's principal DescribeConfigs on its topics, or rows over it are refused by the broker instead of parked"
                    ),
                }
            }
        }
        Err(err) => failures.push(format!(
            "Kafka at {bootstrap}: {err}; check kafka.bootstrap_servers and network access"
        )),
    }

    println!(
        "\nwould publish pending rows in batches of {} to `{}` (or each row's topic column), \
         {} rows after the broker's ack, acks=all, idempotent, {} compression",
        settings.relay.batch_size,
        settings.relay.topic_template,
        match settings.relay.mode {
            crate::model::Mode::Mark => "marking",
            crate::model::Mode::Delete => "deleting",
        },
        settings.kafka.compression,
    );
    if failures.is_empty() {
        println!("check passed");
        Ok(())
    } else {
        for failure in &failures {
            eprintln!("FAILED: {failure}");
        }
        anyhow::bail!("{} check(s) failed", failures.len())
    }
}

/// The topics the pending rows need (the template's, or their own), each said to exist or
/// counted as a failure naming it: the relay never creates topics, and their rows would wait.
fn check_needed_topics(
    settings: &Settings,
    sources: &[(String, String, Option<String>)],
    visible: &[String],
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    const SHOWN: usize = 20;
    let mut encoder = crate::proof::encoder(settings)?;
    let mut needed: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        std::collections::BTreeMap::new();
    let shown = |text: &str| crate::model::printable(text, 128);
    for (aggregate_type, event_type, own) in sources {
        match encoder.topic_of(aggregate_type, event_type, own.as_deref()) {
            Ok(topic) => {
                needed
                    .entry(topic.to_string())
                    .or_default()
                    .insert(shown(aggregate_type));
            }
            Err(reason) => println!(
                "  a pending row of aggregate type {} has no topic it may be published to ({reason}): it will be parked",
                shown(aggregate_type)
            ),
        }
    }
    if needed.is_empty() {
        println!(
            "  no pending rows: each aggregate type needs its topic (`{}`), which the relay never creates; create them before rows arrive",
            settings.relay.topic_template
        );
        return Ok(());
    }
    for (i, (topic, types)) in needed.iter().enumerate() {
        let types = types.iter().cloned().collect::<Vec<_>>().join(", ");
        if visible.iter().any(|t| t == topic) {
            if i < SHOWN {
                println!("  topic {} exists (pending rows of {types})", shown(topic));
            }
        } else {
            failures.push(format!(
                "Kafka: topic {} does not exist (or the relay's principal may not describe it), and pending rows of aggregate type {types} need it: create it; the relay never creates topics",
                shown(topic)
            ));
        }
    }
    if needed.len() > SHOWN {
        println!("  … and {} more topics", needed.len() - SHOWN);
    }
    Ok(())
}
