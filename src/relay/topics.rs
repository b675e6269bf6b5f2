//! Topics the cluster lacks: a row bound for one waits (with its aggregate) while the
//! other topics flow; the cluster is asked a bounded number of questions per tick, and
//! its answers are kept a short while.

use super::*;

/// How long a question to the cluster about one topic may take, and how many waiting
/// topics are asked about again per tick.
pub(super) const TOPIC_QUESTION_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) const TOPIC_QUESTIONS_PER_TICK: usize = 4;

/// How long the cluster's list of topics answers questions about them.
pub(super) const CLUSTER_TOPICS_FRESH: Duration = Duration::from_secs(1);

pub(super) const UNKNOWN_TOPIC: &str = "the cluster does not know the topic";

pub(super) const UNANSWERED_TOPIC: &str = "the cluster did not say whether it knows the topic";

/// How long an answer about a topic stands: one the cluster could not be asked about is
/// produced to meanwhile, and a row's own topic it does not know parks its rows.
pub(super) const TOPIC_ANSWER_KEPT: Duration = Duration::from_secs(30);

/// Keeps `topic`'s answer until `until`, in a map bounded as the topic caches are: rows
/// choose their topics.
pub(super) fn remember_until(
    answers: &mut foldhash::HashMap<Arc<str>, Instant>,
    topic: &Arc<str>,
    until: Instant,
) {
    if answers.len() >= 10_000 {
        answers.clear();
    }
    answers.insert(topic.clone(), until);
}

/// A row for a missing topic when the relay already holds apart all it can.
pub(super) fn too_much_waiting(topic: &str) -> ParkReason {
    ParkReason::Rejected(format!(
        "{UNKNOWN_TOPIC} `{topic}`, and the relay already holds apart {} topics or {} aggregates waiting for missing topics; create the topic, then replay the row",
        waiting::MAX_WAITING_TOPICS,
        waiting::MAX_HELD_AGGREGATES
    ))
}

impl Relay {
    /// Ids of the batch whose mark is still running: pending in the database, but sent.
    /// Topics the broker refused in this batch wait (and hold the aggregates of their
    /// rows); topics it acknowledged records of wait no more.
    pub(super) fn note_waiting_topics(
        &mut self,
        rows: &[OutboxRow],
        batch: &mut Batch,
        settled: &Settled,
    ) {
        let now = std::time::Instant::now();
        for topic in settled.published_by_topic.keys() {
            self.waiting.accepted(topic);
        }
        for (topic, reason, pos) in std::mem::take(&mut batch.topic_refusals) {
            self.known_topics.remove(&topic);
            let full = self.waiting.refused(&topic, &reason, now) == Hold::Full
                || self.waiting.hold_row(&topic, rows[pos].aggregate_hash) == Hold::Full;
            if full {
                batch.park(pos, rows[pos].id, &too_much_waiting(&topic));
            }
        }
        self.publish_waiting_topics();
    }

    /// Waiting topics whose retry is due (a few per tick, so that a tick stays short
    /// however many wait): asked about again, released if the cluster knows them now.
    pub(super) async fn retry_waiting_topics(&mut self, cancel: &CancellationToken) {
        let now = std::time::Instant::now();
        for topic in self.waiting.due(now, TOPIC_QUESTIONS_PER_TICK) {
            if cancel.is_cancelled() {
                break;
            }
            let answer = self.ask_cluster_about(&topic).await;
            self.health.loop_progress();
            match answer {
                TopicAnswer::Known | TopicAnswer::Refused(_) => {
                    self.waiting.accepted(&topic);
                    self.remember_known_topic(&topic);
                }
                TopicAnswer::Unknown => self.waiting.still_unknown(&topic, UNKNOWN_TOPIC, now),
                TopicAnswer::Unanswered(why) => {
                    self.waiting
                        .still_unknown(&topic, &format!("{UNANSWERED_TOPIC}: {why}"), now)
                }
            }
        }
        self.publish_waiting_topics();
    }

    /// Whether the cluster says it does not know `topic`. A topic known to exist is not
    /// asked about again, nor for a while one the cluster could not be asked about: the
    /// brokers are down or refuse the relay, and producing decides and reports that.
    pub(super) async fn cluster_lacks(&mut self, topic: &Arc<str>) -> bool {
        let now = Instant::now();
        if self.known_topics.contains(topic)
            || self
                .unanswered_topics
                .get(topic)
                .is_some_and(|reask| now < *reask)
        {
            return false;
        }
        let answer = self.ask_cluster_about(topic).await;
        self.health.loop_progress();
        match answer {
            TopicAnswer::Known | TopicAnswer::Refused(_) => {
                self.remember_known_topic(topic);
                false
            }
            TopicAnswer::Unknown => true,
            TopicAnswer::Unanswered(why) => {
                debug!(%topic, %why, "{UNANSWERED_TOPIC}; producing decides");
                remember_until(&mut self.unanswered_topics, topic, now + TOPIC_ANSWER_KEPT);
                false
            }
        }
    }

    /// The cluster knows `topic` (or producing will tell): rows go to it without asking.
    pub(super) fn remember_known_topic(&mut self, topic: &Arc<str>) {
        if self.known_topics.len() >= 10_000 {
            self.known_topics.clear();
        }
        self.known_topics.insert(topic.clone());
    }

    /// What stands between an encoded row and the producer: its topic must exist (a row's
    /// own missing topic parks it; a template topic's rows wait), and the row must fit the
    /// topic's size limit (learnt only for a topic that exists: a request per topic).
    pub(super) async fn clear_for_producing<'r>(
        &mut self,
        row: &OutboxRow,
        record: EncodedRecord<'r>,
    ) -> Result<Cleared<'r>, ParkReason> {
        if row.topic.is_some() {
            // A row's own topic the cluster does not know: the row is parked at once, and
            // the answer kept for a while for the rows naming it after.
            let said_lately = self
                .unknown_row_topics
                .get(&record.topic)
                .is_some_and(|until| Instant::now() < *until);
            if said_lately || self.cluster_lacks(&record.topic).await {
                if !said_lately {
                    let until = Instant::now() + TOPIC_ANSWER_KEPT;
                    remember_until(&mut self.unknown_row_topics, &record.topic, until);
                }
                return Err(ParkReason::Rejected(format!(
                    "{UNKNOWN_TOPIC} `{}` named by the row",
                    record.topic
                )));
            }
        } else if !self.waiting.holds(&record.topic) && self.cluster_lacks(&record.topic).await {
            // A template topic the cluster does not know: its rows wait, the others flow.
            let now = std::time::Instant::now();
            let hold = self.waiting.refused(&record.topic, UNKNOWN_TOPIC, now);
            self.publish_waiting_topics();
            if hold == Hold::Full {
                // Rows choose their topics: past the cap, a row for yet another missing
                // topic is parked rather than every other topic stopped.
                return Err(too_much_waiting(&record.topic));
            }
        }
        if self.waiting.holds(&record.topic) {
            if self.waiting.hold_row(&record.topic, row.aggregate_hash) == Hold::Full {
                return Err(too_much_waiting(&record.topic));
            }
            return Ok(Cleared::Waits);
        }
        self.check_topic_limit(record).await.map(Cleared::Produce)
    }

    pub(super) fn publish_waiting_topics(&self) {
        let (shown, total) = self.waiting.summary();
        self.health.set_waiting_topics(shown, total);
    }

    /// What the cluster says of `topic`, from its list of topics, asked for at most once
    /// per [`CLUSTER_TOPICS_FRESH`].
    pub(super) async fn ask_cluster_about(&mut self, topic: &Arc<str>) -> TopicAnswer {
        let fresh = self
            .cluster_topics
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < CLUSTER_TOPICS_FRESH);
        if !fresh {
            let producer = self.producer.handle();
            let answer = tokio::task::spawn_blocking(move || {
                producer.cluster_topics(TOPIC_QUESTION_TIMEOUT)
            })
            .await
            .unwrap_or_else(|err| Err(err.to_string()));
            match answer {
                Ok(topics) => self.cluster_topics = Some((Instant::now(), Arc::new(topics))),
                Err(why) => {
                    self.cluster_topics = None;
                    return TopicAnswer::Unanswered(why);
                }
            }
        }
        match &self.cluster_topics {
            Some((_, topics)) => topics.about(topic),
            None => TopicAnswer::Unanswered("no answer".into()),
        }
    }
}
