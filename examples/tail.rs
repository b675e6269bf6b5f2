//! Prints the records of a topic from the beginning, with their headers: the demo uses it
//! to show what the relay published. `cargo run --example tail -- BOOTSTRAP TOPIC COUNT`

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, topic, count] = args.as_slice() else {
        anyhow::bail!("usage: tail BOOTSTRAP TOPIC COUNT");
    };
    let count: usize = count.parse()?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-relay-demo-tail")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..metadata.topics()[0].partitions().len() as i32 {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while seen < count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {seen} of {count} records arrived"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let headers: Vec<String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        format!(
                            "{}={}",
                            h.key,
                            String::from_utf8_lossy(h.value.unwrap_or_default())
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{topic} p{} @{}  key={}  {}\n    headers: {}",
            message.partition(),
            message.offset(),
            String::from_utf8_lossy(message.key().unwrap_or_default()),
            String::from_utf8_lossy(message.payload().unwrap_or_default()),
            headers.join(" "),
        );
        seen += 1;
    }
    Ok(())
}
