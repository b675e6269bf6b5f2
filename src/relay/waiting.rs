//! Template topics the cluster does not know (not created yet): only their rows wait, in
//! order, while every other topic flows. Rows of a waiting topic hold their aggregate back,
//! and reads leave held aggregates out (by hash: eight bytes each, whatever the id), so
//! that they do not fill every batch. The relay asks the cluster again with backoff; at
//! each retry that topic's holds are dropped and rebuilt from what the reads find, so a
//! row fixed or discarded meanwhile holds nothing, and a topic no pending row needs is
//! forgotten. An aggregate held for two topics waits for both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// The first retry of a waiting topic comes after this long, each next one twice as late.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);
/// At most this many aggregates are held (800 KB of hashes, sent with every read).
pub(crate) const MAX_HELD_AGGREGATES: usize = 100_000;
/// At most this many topics wait: `aggregate_type` comes from rows, and each waiting
/// topic costs a question to the cluster per retry.
pub const MAX_WAITING_TOPICS: usize = 1_000;

#[derive(Debug)]
struct Waiting {
    reason: String,
    since: Instant,
    retry_at: Instant,
    delay: Duration,
    /// A row held for it since the last retry: something still needs the topic.
    needed: bool,
    /// The aggregates held for it.
    held: foldhash::HashSet<i64>,
}

/// What became of a topic the relay wanted to hold.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Hold {
    /// Its rows wait; other topics flow.
    Waiting,
    /// Too many topics or aggregates wait already: the relay parks the row instead of
    /// reading the same rows again and again or stopping every other topic.
    Full,
}

#[derive(Debug, Default)]
pub(super) struct WaitingTopics {
    topics: foldhash::HashMap<Arc<str>, Waiting>,
    /// Hashes of aggregates with a row waiting for a topic, and for how many topics.
    held: foldhash::HashMap<i64, u32>,
}

impl WaitingTopics {
    pub(super) fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Whether rows for `topic` wait.
    pub(super) fn holds(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// The cluster does not know `topic` (or did not answer): its rows wait until a retry
    /// finds it.
    pub(super) fn refused(&mut self, topic: &Arc<str>, reason: &str, now: Instant) -> Hold {
        let full = self.topics.len() >= MAX_WAITING_TOPICS;
        match self.topics.get_mut(topic) {
            Some(waiting) => {
                waiting.delay = (waiting.delay * 2).min(LAST_RETRY);
                waiting.retry_at = now + waiting.delay;
                waiting.reason = reason.to_string();
                Hold::Waiting
            }
            None if full => Hold::Full,
            None => {
                warn!(%topic, %reason, "the topic's rows wait, in order, and every other topic keeps flowing; create the topic");
                self.topics.insert(
                    topic.clone(),
                    Waiting {
                        reason: reason.to_string(),
                        since: now,
                        retry_at: now + FIRST_RETRY,
                        delay: FIRST_RETRY,
                        needed: true,
                        held: foldhash::HashSet::default(),
                    },
                );
                Hold::Waiting
            }
        }
    }

    /// Holds a row's aggregate for a waiting topic: reads leave it out until the next
    /// retry.
    pub(super) fn hold_row(&mut self, topic: &str, aggregate_hash: i64) -> Hold {
        let full = self.held.len() >= MAX_HELD_AGGREGATES;
        let Some(waiting) = self.topics.get_mut(topic) else {
            return Hold::Waiting;
        };
        waiting.needed = true;
        if waiting.held.contains(&aggregate_hash) {
            return Hold::Waiting;
        }
        if full && !self.held.contains_key(&aggregate_hash) {
            return Hold::Full;
        }
        waiting.held.insert(aggregate_hash);
        *self.held.entry(aggregate_hash).or_default() += 1;
        Hold::Waiting
    }

    /// Waiting topics whose retry is due, at most `max` of them.
    pub(super) fn due(&self, now: Instant, max: usize) -> Vec<Arc<str>> {
        let mut due: Vec<(&Arc<str>, &Waiting)> = self
            .topics
            .iter()
            .filter(|(_, w)| now >= w.retry_at)
            .collect();
        // The longest due first; by name among equals, so that every topic gets its turn.
        due.sort_by(|a, b| a.1.retry_at.cmp(&b.1.retry_at).then_with(|| a.0.cmp(b.0)));
        due.into_iter()
            .take(max)
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// The cluster still does not know `topic`: it waits on, unless no row was held for it
    /// since the last retry (its rows were fixed, discarded or parked), when it is
    /// forgotten. Either way its holds start over, so that reads find what still needs it.
    pub(super) fn still_unknown(&mut self, topic: &Arc<str>, reason: &str, now: Instant) {
        let needed = self.topics.get(topic).is_some_and(|w| w.needed);
        if needed {
            self.refused(topic, reason, now);
            if let Some(waiting) = self.topics.get_mut(topic) {
                waiting.needed = false;
                let held = std::mem::take(&mut waiting.held);
                self.release(held);
            }
        } else if let Some(waiting) = self.topics.remove(topic) {
            info!(%topic, waited = ?waiting.since.elapsed(), "no pending row needs the topic any more");
            self.release(waiting.held);
        }
    }

    /// The topic exists now: it waits no more, and its rows are read again, oldest first
    /// (an aggregate held for another topic too waits on).
    pub(super) fn accepted(&mut self, topic: &str) {
        if let Some(waiting) = self.topics.remove(topic) {
            info!(%topic, waited = ?waiting.since.elapsed(), "the topic exists now; its rows follow");
            self.release(waiting.held);
        }
    }

    fn release(&mut self, hashes: foldhash::HashSet<i64>) {
        for hash in hashes {
            if let Some(count) = self.held.get_mut(&hash) {
                *count -= 1;
                if *count == 0 {
                    self.held.remove(&hash);
                }
            }
        }
    }

    /// The aggregate hashes reads leave out.
    pub(super) fn held_aggregates(&self) -> Vec<i64> {
        self.held.keys().copied().collect()
    }

    /// `topic (reason)` for the first waiting topics by name, and how many more, for
    /// readiness.
    pub(super) fn summary(&self) -> (Vec<String>, usize) {
        const SHOWN: usize = 10;
        let mut topics: Vec<(&Arc<str>, &Waiting)> = self.topics.iter().collect();
        topics.sort_by(|a, b| a.0.cmp(b.0));
        let shown = topics
            .iter()
            .take(SHOWN)
            .map(|(topic, w)| format!("{topic} ({})", w.reason))
            .collect();
        (shown, self.topics.len())
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
        assert_eq!(waiting.refused(&topic, "unknown topic", t0), Hold::Waiting);
        assert!(waiting.holds(&topic));
        assert!(waiting.due(t0, 10).is_empty());
        waiting.hold_row(&topic, 7);
        waiting.hold_row(&topic, 7);
        assert_eq!(waiting.held_aggregates(), [7]);
        // Due at the same time as `topic`, and after it by name.
        let other: Arc<str> = Arc::from("outbox.event.other");
        waiting.refused(&other, "unknown topic", t0);
        waiting.hold_row(&other, 7);
        waiting.hold_row(&other, 8);

        let due = t0 + FIRST_RETRY;
        assert_eq!(waiting.due(due, 1), std::slice::from_ref(&topic));
        waiting.still_unknown(&topic, "unknown topic", due);
        let mut held = waiting.held_aggregates();
        held.sort();
        assert_eq!(held, [7, 8], "its holds start over; the other topic's stay");
        waiting.accepted(&other);
        assert!(waiting.held_aggregates().is_empty());
        assert!(
            waiting.due(due + FIRST_RETRY, 10).is_empty(),
            "twice as late"
        );
        assert_eq!(
            waiting.due(due + FIRST_RETRY * 2, 10),
            std::slice::from_ref(&topic)
        );
        assert_eq!(
            waiting.summary(),
            (vec!["outbox.event.new (unknown topic)".to_string()], 1)
        );

        waiting.hold_row(&topic, 7);
        waiting.accepted(&topic);
        assert!(waiting.is_empty());
        assert!(waiting.held_aggregates().is_empty(), "reads start over");
    }

    #[test]
    fn a_topic_no_row_needs_any_more_is_forgotten() {
        let mut waiting = WaitingTopics::default();
        let topic: Arc<str> = Arc::from("outbox.event.typo");
        let t0 = Instant::now();
        waiting.refused(&topic, "unknown topic", t0);
        waiting.still_unknown(&topic, "unknown topic", t0 + FIRST_RETRY);
        assert!(waiting.holds(&topic), "held a row before this retry");
        waiting.still_unknown(&topic, "unknown topic", t0 + FIRST_RETRY * 4);
        assert!(waiting.is_empty(), "no row held for it since");
    }

    #[test]
    fn holds_and_waiting_topics_are_bounded() {
        let mut waiting = WaitingTopics::default();
        let now = Instant::now();
        for i in 0..MAX_WAITING_TOPICS {
            let topic: Arc<str> = Arc::from(format!("t{i}"));
            assert_eq!(waiting.refused(&topic, "unknown topic", now), Hold::Waiting);
        }
        assert_eq!(
            waiting.refused(&Arc::from("one.more"), "unknown topic", now),
            Hold::Full
        );
        assert_eq!(waiting.summary().0.len(), 10);
        assert_eq!(waiting.summary().1, MAX_WAITING_TOPICS);
        for hash in 0..MAX_HELD_AGGREGATES as i64 {
            assert_eq!(waiting.hold_row("t0", hash), Hold::Waiting);
        }
        assert_eq!(waiting.hold_row("t0", -1), Hold::Full);
        assert_eq!(waiting.hold_row("t1", 5), Hold::Waiting, "already held");
        assert_eq!(waiting.held_aggregates().len(), MAX_HELD_AGGREGATES);
        assert_eq!(waiting.due(now + FIRST_RETRY, 4).len(), 4);
    }
}
