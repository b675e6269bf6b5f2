//! The two ceilings the relay is measured against: plain SQL reading and retiring the
//! outbox in batches of 1000 (no broker), and the broker taking the same records from an
//! idempotent acks=all producer as fast as it can (no database).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::infra::{
    Broker, Db, TOPIC, busy_cores_since, machine_busy_time, relay_producer_properties,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ceiling {
    /// `database` or `broker`.
    pub kind: String,
    /// `mark` or `delete` for the database; `produce` for the broker.
    pub mode: String,
    pub rows: u64,
    pub make_rows_seconds: f64,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Statements (database) or records acknowledged (broker) per batch.
    pub batch: u64,
    /// Checkpoints the server began while the backlog was made and retired (database; over
    /// every measurement of this ceiling).
    #[serde(default)]
    pub checkpoints_during: Option<i64>,
    /// Database: rows/s of every measurement of this ceiling, of which `rows_per_second`
    /// is the fastest.
    #[serde(default)]
    pub measured_rows_per_second: Vec<f64>,
    /// Cores the whole machine kept busy on average while it was measured (the fastest
    /// measurement's). Absent from older results.
    #[serde(default)]
    pub busy_cores: Option<f64>,
}

/// The columns the relay reads (src/store.rs `read_pending`).
const RETURNING: &str = "RETURNING o.id, o.aggregate_type, o.aggregate_id, o.event_type, \
    o.payload::text AS payload_json, o.payload_bytes, o.headers::text AS headers_json, \
    o.topic, o.event_id, o.created_at, o.shard";

/// The relay's pending predicate, served by its partial index `outbox_pending_idx`.
const NEXT_BATCH: &str = "SELECT id FROM outbox \
    WHERE sent_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT 1000";

/// Reads and retires every pending row, 1000 per statement, on one connection.
pub async fn database(db: &Db, rows: u64, mode: &str) -> Result<Ceiling> {
    db.reset().await?;
    let settled = db.settle().await?;
    let make = db.make_rows(rows, mode).await?;
    let sql = match mode {
        "mark" => format!(
            "UPDATE outbox o SET sent_at = now(), kafka_partition = 0, kafka_offset = o.id \
             WHERE o.id IN ({NEXT_BATCH}) {RETURNING}"
        ),
        "delete" => format!("DELETE FROM outbox o WHERE o.id IN ({NEXT_BATCH}) {RETURNING}"),
        other => bail!("unknown mode {other}"),
    };
    let mut conn = db.pool.acquire().await?;
    let busy_before = machine_busy_time();
    let started = Instant::now();
    let mut retired = 0u64;
    let mut bytes = 0usize;
    loop {
        let batch = sqlx::query(&sql).fetch_all(&mut *conn).await?;
        if batch.is_empty() {
            break;
        }
        for row in &batch {
            // Decode what the relay would encode, so the transfer is not optimised away.
            let payload: Option<String> = row.try_get("payload_json")?;
            let key: String = row.try_get("aggregate_id")?;
            bytes += payload.map_or(0, |p| p.len()) + key.len();
        }
        retired += batch.len() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    let busy_cores = busy_cores_since(busy_before, started.elapsed());
    if retired != rows {
        bail!("database ceiling ({mode}) retired {retired} of {rows} rows");
    }
    std::hint::black_box(bytes);
    Ok(Ceiling {
        kind: "database".into(),
        mode: mode.into(),
        rows,
        make_rows_seconds: make.as_secs_f64(),
        seconds,
        rows_per_second: rows as f64 / seconds,
        batch: 1000,
        checkpoints_during: Some(db.checkpoints_since(settled).await?),
        measured_rows_per_second: vec![rows as f64 / seconds],
        busy_cores,
    })
}

/// A record as the relay would produce it for a row.
pub struct Record {
    key: String,
    value: String,
    event_id: String,
}

/// Loads the rows of a fresh make-rows step into memory, so the broker ceiling produces
/// the very bytes the relay does without touching the database while it is timed.
pub async fn load_records(db: &Db, rows: u64) -> Result<(Vec<Record>, Duration)> {
    db.reset().await?;
    let make = db.make_rows(rows, "mark").await?;
    let loaded = sqlx::query(
        "SELECT aggregate_id, payload::text AS payload, event_id::text AS event_id \
         FROM outbox ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?
    .iter()
    .map(|r| {
        Ok(Record {
            key: r.try_get("aggregate_id")?,
            value: r.try_get("payload")?,
            event_id: r.try_get("event_id")?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    db.reset().await?;
    Ok((loaded, make))
}

struct CountingContext {
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Produces every record with the relay's producer settings, as many in flight as
/// librdkafka allows, and times the first send to the last acknowledgement.
pub async fn broker(broker: &Broker, records: Arc<Vec<Record>>, make: Duration) -> Result<Ceiling> {
    broker.create_topic().await?;
    let bootstrap = broker.bootstrap.clone();
    let rows = records.len() as u64;
    let seconds = tokio::task::spawn_blocking(move || -> Result<f64> {
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut config = ClientConfig::new();
        for (key, value) in relay_producer_properties(&bootstrap) {
            config.set(key, value);
        }
        let producer: ThreadedProducer<CountingContext> =
            config.create_with_context(CountingContext {
                acked: acked.clone(),
                failed: failed.clone(),
            })?;
        // Metadata first, so connection set-up is not timed.
        producer
            .client()
            .fetch_metadata(Some(TOPIC), Duration::from_secs(10))?;
        let started = Instant::now();
        for record in records.iter() {
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "id",
                    value: Some(record.event_id.as_bytes()),
                })
                .insert(Header {
                    key: "event_type",
                    value: Some("OrderUpdated".as_bytes()),
                })
                .insert(Header {
                    key: "aggregate_type",
                    value: Some("order".as_bytes()),
                });
            let mut message = BaseRecord::to(TOPIC)
                .key(record.key.as_bytes())
                .payload(record.value.as_bytes())
                .headers(headers);
            loop {
                match producer.send(message) {
                    Ok(()) => break,
                    Err((err, back)) => {
                        if err.rdkafka_error_code()
                            != Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        {
                            bail!("produce failed: {err}");
                        }
                        message = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        while acked.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < rows {
            if Instant::now() > deadline {
                bail!("broker ceiling: acknowledgements missing after 10 minutes");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let seconds = started.elapsed().as_secs_f64();
        if failed.load(Ordering::Relaxed) > 0 {
            bail!(
                "broker ceiling: {} deliveries failed",
                failed.load(Ordering::Relaxed)
            );
        }
        Ok(seconds)
    })
    .await??;
    Ok(Ceiling {
        kind: "broker".into(),
        mode: "produce".into(),
        rows,
        make_rows_seconds: make.as_secs_f64(),
        seconds,
        rows_per_second: rows as f64 / seconds,
        batch: 0,
        checkpoints_during: None,
        measured_rows_per_second: Vec::new(),
        busy_cores: None,
    })
}
