//! Template topics the broker does not know (not created yet): only their rows wait, in
//! order, while every other topic flows. Rows of a waiting topic hold
//! their aggregate back, and reads leave held aggregates out, so that they do not fill
//! every batch; a waiting topic is tried again with backoff, its rows read again in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// The first retry of a waiting topic comes after this long, each next one twice as late.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);
/// At most this many aggregates are left out of reads: beyond, their rows are read (and
/// held in memory) again each time, which slows the relay but loses nothing.
pub const MAX_HELD_AGGREGATES: usize = 10_000;

#[derive(Debug)]
struct Waiting {
    reason: String,
    since: Instant,
    retry_at: Instant,
    delay: Duration,
}

#[derive(Debug, Default)]
pub struct WaitingTopics {
    topics: foldhash::HashMap<Arc<str>, Waiting>,
    /// Aggregates with a row waiting for a topic, in the order they were held.
    held: Vec<String>,
    held_set: foldhash::HashSet<String>,
    warned_full: bool,
}

impl WaitingTopics {
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Whether rows for `topic` wait.
    pub fn holds(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// The broker does not know `topic`: its rows wait until a retry finds it.
    pub fn refused(&mut self, topic: &Arc<str>, reason: &str, now: Instant) {
        match self.topics.get_mut(topic) {
            Some(waiting) => {
                waiting.delay = (waiting.delay * 2).min(LAST_RETRY);
                waiting.retry_at = now + waiting.delay;
                waiting.reason = reason.to_string();
            }
            None => {
                warn!(%topic, %reason, "the broker does not know the topic: its rows wait, in order, and every other topic keeps flowing; create the topic");
                self.topics.insert(
                    topic.clone(),
                    Waiting {
                        reason: reason.to_string(),
                        since: now,
                        retry_at: now + FIRST_RETRY,
                        delay: FIRST_RETRY,
                    },
                );
            }
        }
    }

    /// Waiting topics whose retry is due: the relay asks the broker whether they exist.
    pub fn due(&self, now: Instant) -> Vec<Arc<str>> {
        self.topics
            .iter()
            .filter(|(_, w)| now >= w.retry_at)
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// The topic exists (or took a record): it waits no more, and reads start again from
    /// the oldest pending row, so that its rows go first, in order (rows of topics still
    /// waiting are held again as they are read).
    pub fn accepted(&mut self, topic: &str) {
        if let Some(waiting) = self.topics.remove(topic) {
            info!(%topic, waited = ?waiting.since.elapsed(), "the topic exists now; its rows follow");
            self.held.clear();
            self.held_set.clear();
            self.warned_full = false;
        }
    }

    /// Leaves the aggregate's rows out of reads while topics wait.
    pub fn hold_aggregate(&mut self, aggregate: &str) {
        if self.held_set.contains(aggregate) {
            return;
        }
        if self.held.len() >= MAX_HELD_AGGREGATES {
            if !self.warned_full {
                warn!(
                    max = MAX_HELD_AGGREGATES,
                    "more aggregates wait for a topic than reads leave out; the rest are read again each time"
                );
                self.warned_full = true;
            }
            return;
        }
        self.held.push(aggregate.to_string());
        self.held_set.insert(aggregate.to_string());
    }

    /// The aggregates reads leave out.
    pub fn held_aggregates(&self) -> &[String] {
        &self.held
    }

    /// `topic (reason)` for each waiting topic, sorted, for readiness.
    pub fn summary(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .topics
            .iter()
            .map(|(topic, w)| format!("{topic} ({})", w.reason))
            .collect();
        lines.sort();
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_topic_waits_with_backoff_until_it_exists() {
        let mut waiting = WaitingTopics::default();
        let topic: Arc<str> = Arc::from("outbox.event.new");
        let t0 = Instant::now();
        assert!(!waiting.holds(&topic));
        waiting.refused(&topic, "unknown topic", t0);
        assert!(waiting.holds(&topic));
        assert!(!waiting.holds("outbox.event.other"));
        assert!(waiting.due(t0).is_empty());
        waiting.hold_aggregate("a-1");
        waiting.hold_aggregate("a-1");
        assert_eq!(waiting.held_aggregates(), ["a-1".to_string()]);

        let due = t0 + FIRST_RETRY;
        assert_eq!(waiting.due(due), std::slice::from_ref(&topic));
        waiting.refused(&topic, "unknown topic", due);
        assert!(waiting.due(due + FIRST_RETRY).is_empty(), "twice as late");
        assert_eq!(
            waiting.due(due + FIRST_RETRY * 2),
            std::slice::from_ref(&topic)
        );
        assert_eq!(
            waiting.summary(),
            ["outbox.event.new (unknown topic)".to_string()]
        );

        waiting.accepted(&topic);
        assert!(waiting.is_empty());
        assert!(waiting.held_aggregates().is_empty(), "reads start over");
    }

    #[test]
    fn held_aggregates_are_bounded() {
        let mut waiting = WaitingTopics::default();
        waiting.refused(&Arc::from("t"), "unknown topic", Instant::now());
        for i in 0..MAX_HELD_AGGREGATES + 5 {
            waiting.hold_aggregate(&format!("a-{i}"));
        }
        assert_eq!(waiting.held_aggregates().len(), MAX_HELD_AGGREGATES);
    }
}
