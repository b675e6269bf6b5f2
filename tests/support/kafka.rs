//! Kafka: a tansu broker started once per test binary (or `KAFKA_BOOTSTRAP`), brokers a
//! test owns, topics unique to each test, and a real consumer that reads a topic back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::process::{
    CONDITION_TIMEOUT, free_port, port_open, signal, spawn_tied_to_process, wait_for_blocking,
};

pub fn tansu_bin() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = Path::new(&home).join(".cache/outbox-relay/tansu-0.6.0/bin/tansu");
    assert!(
        path.exists(),
        "tansu 0.6.0 not found at {}: run scripts/test.sh (it installs it), set TANSU_BIN, or set KAFKA_BOOTSTRAP",
        path.display()
    );
    path
}

/// A tansu broker process.
pub struct Tansu {
    pub bootstrap: String,
    pub port: u16,
    child: Child,
}

impl Tansu {
    /// Starts a broker that belongs to the caller (for tests that freeze or kill it).
    pub fn start() -> Tansu {
        Tansu::start_with(&[], None)
    }

    /// A broker with extra arguments (`--authentication`), advertising `advertised_port`
    /// instead of its own (where a TLS proxy listens in front of it).
    pub fn start_with(extra_args: &[&str], advertised_port: Option<u16>) -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{}", advertised_port.unwrap_or(port));
        let mut command = Command::new(tansu_bin());
        command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied_to_process(command, None);
        wait_for_blocking(&format!("tansu to listen on port {port}"), || {
            port_open(port)
        });
        Tansu {
            bootstrap: format!("127.0.0.1:{port}"),
            port,
            child,
        }
    }

    pub fn freeze(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker shared by the tests of this binary.
pub fn kafka_bootstrap() -> String {
    static SHARED: OnceLock<(String, Option<Tansu>)> = OnceLock::new();
    SHARED
        .get_or_init(|| match std::env::var("KAFKA_BOOTSTRAP") {
            Ok(bootstrap) => (bootstrap, None),
            Err(_) => {
                let tansu = Tansu::start();
                (tansu.bootstrap.clone(), Some(tansu))
            }
        })
        .0
        .clone()
}

/// A topic-name prefix unique to one test.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    create_topic_with(bootstrap, name, partitions, &[]).await;
}

/// Creates a topic through a client with extra properties (TLS, SASL).
pub async fn create_topic_with_client(
    bootstrap: &str,
    properties: &[(&str, &str)],
    name: &str,
    partitions: i32,
) {
    let mut config = ClientConfig::new();
    for (key, value) in properties {
        config.set(*key, *value);
    }
    let admin: AdminClient<DefaultClientContext> =
        config.set("bootstrap.servers", bootstrap).create().unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(topic, err)| panic!("create topic {topic}: {err:?}"));
    }
}

/// Creates a topic with topic-level configs such as `max.message.bytes`.
pub async fn create_topic_with(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(topic, err)| panic!("create topic {topic}: {err:?}"));
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub value_bytes: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the beginning of every partition until `expected` distinct records
/// (by their `id` header) arrived and then none for half a second, so that duplicates are
/// read too; an empty topic is read for half a second. Fails after CONDITION_TIMEOUT.
pub fn consume(bootstrap: &str, topic: &str, expected: usize) -> Vec<Consumed> {
    consume_with(bootstrap, &[], topic, expected)
}

/// [`consume`] with extra client properties (TLS, SASL).
pub fn consume_with(
    bootstrap: &str,
    properties: &[(&str, &str)],
    topic: &str,
    expected: usize,
) -> Vec<Consumed> {
    let mut config = ClientConfig::new();
    for (key, value) in properties {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("verify-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut out: Vec<Consumed> = Vec::new();
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    // Records are counted by their `id` header (by position when they have none), so that
    // duplicates do not count towards `expected`; once it is reached, reading goes on until
    // no record came for QUIET, so that duplicates beyond it are read too. An empty topic
    // (`expected` 0) is read for QUIET as well.
    const QUIET: Duration = Duration::from_millis(500);
    let mut distinct: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut last_record = Instant::now();
    loop {
        if distinct.len() >= expected && last_record.elapsed() >= QUIET {
            break;
        }
        if Instant::now() >= deadline {
            let mut per_partition: std::collections::BTreeMap<i32, (usize, i64)> =
                std::collections::BTreeMap::new();
            for record in &out {
                let entry = per_partition.entry(record.partition).or_insert((0, -1));
                entry.0 += 1;
                entry.1 = entry.1.max(record.offset);
            }
            panic!(
                "read {} distinct of {expected} records ({} in all) from {topic} before \
                 timing out; per partition (count, last offset): {per_partition:?}",
                distinct.len(),
                out.len()
            );
        }
        if let Some(result) = consumer.poll(Duration::from_millis(100)) {
            let message = result.expect("consume");
            let headers: HashMap<String, String> = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            last_record = Instant::now();
            distinct.insert(match headers.get("id") {
                Some(id) => id.clone(),
                None => format!("{}@{}", message.partition(), message.offset()),
            });
            out.push(Consumed {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                key: message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                value: message
                    .payload()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
                value_bytes: message.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
}
