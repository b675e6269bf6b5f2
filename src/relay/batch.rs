//! One batch's state: what happened to each row and to the producer while the batch was
//! in flight, and the rule of what may be marked: an acknowledged row whose earlier rows of
//! the same aggregate in the batch were all acknowledged (or parked under `skip`). Pure:
//! no I/O, so every rule is unit-tested.

use super::*;

#[derive(Debug, Clone)]
pub(super) enum Outcome {
    /// Not handed to the producer (held behind an earlier failure, or after a fatal error).
    NotSent,
    InFlight,
    Acked {
        partition: i32,
        offset: i64,
    },
    Failed,
    Parked,
}

/// What happened to each row of one batch, and to the producer while it was in flight.
pub(super) struct Batch {
    pub(super) outcomes: Vec<Outcome>,
    pub(super) topics: Vec<Option<Arc<str>>>,
    /// The lease epoch each produced row was read under; marks are fenced by it.
    pub(super) epochs: Vec<i64>,
    pub(super) parkings: Vec<Parking>,
    pub(super) error_kinds: HashMap<&'static str, u64>,
    /// A permanent global error held rows back (unknown topic, authorization).
    pub(super) blocked: Option<String>,
    /// The producer hit a fatal error: rebuild it after this batch.
    pub(super) fatal: bool,
    pub(super) produced: u64,
    /// Rows handed to the producer whose delivery report has not arrived.
    pub(super) outstanding: u64,
    /// Produced one record per request: a refusal concerns that row alone.
    pub(super) isolating: bool,
    /// `relay.on_park = "hold"`: a row waits behind an earlier failure of its aggregate.
    pub(super) hold: bool,
    /// Aggregates with a row of this batch that failed or was parked: under `hold`, a
    /// later row of theirs that the broker refuses waits rather than being parked too.
    pub(super) failed_aggregates: foldhash::HashSet<String>,
    /// Rows refused as part of a record batch the broker rejected as a whole: they may be
    /// innocent, so they are sent again one record per request before anything is parked.
    pub(super) refused_in_a_set: u64,
    /// Rows the broker refused on their own (parked).
    pub(super) refused_alone: u64,
    /// A client-level error (authentication failing, say) arrived while rows were in
    /// flight.
    pub(super) client_error: Option<String>,
    /// Template topics the broker does not know, with the reason and the position of a
    /// row that waits for each: only those rows wait.
    pub(super) topic_refusals: Vec<(Arc<str>, String, usize)>,
}

impl Batch {
    pub(super) fn new(rows: usize, isolating: bool, hold: bool) -> Self {
        Self {
            outcomes: vec![Outcome::NotSent; rows],
            topics: vec![None; rows],
            epochs: vec![0; rows],
            parkings: Vec::new(),
            error_kinds: HashMap::new(),
            blocked: None,
            fatal: false,
            produced: 0,
            outstanding: 0,
            isolating,
            hold,
            failed_aggregates: foldhash::HashSet::default(),
            refused_in_a_set: 0,
            refused_alone: 0,
            client_error: None,
            topic_refusals: Vec::new(),
        }
    }

    pub(super) fn park(&mut self, pos: usize, row_id: i64, reason: &ParkReason) {
        self.outcomes[pos] = Outcome::Parked;
        self.parkings.push(parking(row_id, reason));
    }

    pub(super) fn delivery_failed(
        &mut self,
        pos: usize,
        row: &OutboxRow,
        err: &rdkafka::error::KafkaError,
    ) {
        let (class, kind) = classify(err);
        *self.error_kinds.entry(kind).or_default() += 1;
        self.outcomes[pos] = Outcome::Failed;
        // Reports of one partition arrive in order, so an earlier row of the aggregate has
        // had its result; under `hold` only the first unsent row of an aggregate is parked.
        let behind_a_failure =
            self.hold && !self.failed_aggregates.insert(row.aggregate_id.clone());
        match row_class(class, err, row) {
            ErrorClass::PermanentRow if self.isolating || !refused_by_broker(kind) => {
                if behind_a_failure {
                    debug!(row_id = row.id, error = %err, "broker refused a row behind an earlier failure of its aggregate; it waits");
                    return;
                }
                warn!(row_id = row.id, error = %err, "broker refused the row on its own; parking it");
                self.refused_alone += 1;
                self.park(pos, row.id, &ParkReason::Rejected(err.to_string()));
            }
            ErrorClass::PermanentRow => {
                debug!(row_id = row.id, error = %err, "broker refused the row's record batch");
                self.refused_in_a_set += 1;
            }
            ErrorClass::PermanentGlobal => self.refused(pos, err),
            ErrorClass::FatalProducer => self.fatal = true,
            ErrorClass::Retriable | ErrorClass::Purged => {}
        }
    }

    /// A permanent refusal beyond the row: of its topic alone (its rows wait), or of
    /// everything (the relay backs off).
    pub(super) fn refused(&mut self, pos: usize, err: &rdkafka::error::KafkaError) {
        match &self.topics[pos] {
            Some(topic) if is_unknown_topic(err) => {
                self.topic_refusals
                    .push((topic.clone(), err.to_string(), pos));
            }
            // Named with the topic the refused row was for: an authorization failure is
            // usually one topic's ACL.
            Some(topic) => self.blocked = Some(format!("{err} (producing to topic {topic})")),
            None => self.blocked = Some(err.to_string()),
        }
    }
}

/// Applies one producer report to the batch in flight. Returns whether a row of this batch
/// got its delivery result. Reports of an earlier producer generation are dropped. A fatal
/// error does not end the batch's reports: librdkafka raises it before the reports of the
/// refused record batch, and requests in flight still report, so the caller keeps
/// collecting until every row produced has its result.
pub(super) fn apply_event(
    event: ProducerEvent,
    generation: u64,
    rows: &[OutboxRow],
    batch: &mut Batch,
) -> bool {
    match event {
        ProducerEvent::Delivered {
            generation: g,
            row_id,
            result,
        } if g == generation => {
            let Ok(pos) = rows.binary_search_by_key(&row_id, |r| r.id) else {
                return false;
            };
            if !matches!(batch.outcomes[pos], Outcome::InFlight) {
                return false;
            }
            batch.outstanding -= 1;
            match result {
                Ok((partition, offset)) => {
                    batch.outcomes[pos] = Outcome::Acked { partition, offset }
                }
                Err(err) => batch.delivery_failed(pos, &rows[pos], &err),
            }
            true
        }
        ProducerEvent::Fatal {
            generation: g,
            reason,
        } if g == generation => {
            if !batch.fatal {
                error!(%reason, "fatal producer error; collecting the reports in flight, then rebuilding the producer");
            }
            batch.fatal = true;
            false
        }
        ProducerEvent::Global {
            generation: g,
            kind,
            reason,
        } if g == generation => {
            // A connection-level error (one broker failing authentication, say) does not
            // cut the batch: the partitions of healthy brokers go on. It is counted now,
            // and readiness is false until a batch is fully acknowledged.
            emit(ProducerClientError {
                kind,
                reason: &reason,
            });
            batch.client_error = Some(reason);
            false
        }
        // A report from a producer already torn down.
        _ => false,
    }
}

/// A refusal the broker makes of a whole record batch, which may hold innocent rows.
pub(super) fn refused_by_broker(kind: &str) -> bool {
    matches!(kind, "message_too_large" | "invalid_record")
}

/// A missing topic is the row's own problem when the row named it, everyone's otherwise;
/// authorization and authentication failures are everyone's whatever the row says.
/// A topic the row named itself that does not exist or that the relay may not write is
/// the row's problem (parked); the template's topic is the relay's (its rows wait).
pub(super) fn row_class(
    class: ErrorClass,
    err: &rdkafka::error::KafkaError,
    row: &OutboxRow,
) -> ErrorClass {
    if class == ErrorClass::PermanentGlobal && is_topic_refusal(err) && row.topic.is_some() {
        ErrorClass::PermanentRow
    } else {
        class
    }
}

/// The broker does not know the topic (not created yet): only its rows wait. An
/// authorization refusal stays global: the relay's grants are one decision.
pub(super) fn is_unknown_topic(err: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        err,
        rdkafka::error::KafkaError::MessageProduction(
            C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition
        )
    )
}

/// The broker refuses one topic: it does not know it, or the relay's principal may not
/// write it.
pub(super) fn is_topic_refusal(err: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        err,
        rdkafka::error::KafkaError::MessageProduction(
            C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::UnknownPartition
                | C::TopicAuthorizationFailed
        )
    )
}

pub(super) fn parking(id: i64, reason: &ParkReason) -> Parking {
    Parking {
        id,
        reason: reason.kind(),
        error: reason.to_string(),
    }
}

/// The acknowledgements of a batch that may be marked: every acknowledged row whose
/// earlier rows of the same aggregate in the batch were all acknowledged too, or parked
/// while the policy is `skip`. An earlier row that failed, waits, is still in flight or is
/// parked under `hold` is sent again later, and the rows behind it with it: marking one of
/// those now would let its first occurrence precede the earlier row's.
pub(super) fn markable(rows: &[OutboxRow], batch: &Batch) -> Vec<Ack> {
    let mut broken = foldhash::HashSet::<&str>::default();
    let mut acks = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        match batch.outcomes[i] {
            Outcome::Acked { partition, offset } => {
                if !broken.contains(row.aggregate_id.as_str()) {
                    acks.push(Ack {
                        id: row.id,
                        partition,
                        offset,
                        shard: row.shard,
                        epoch: batch.epochs[i],
                    });
                }
            }
            Outcome::Parked if !batch.hold => {}
            Outcome::Parked | Outcome::NotSent | Outcome::InFlight | Outcome::Failed => {
                broken.insert(&row.aggregate_id);
            }
        }
    }
    acks
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    fn row(id: i64, aggregate: &str) -> OutboxRow {
        OutboxRow {
            id,
            aggregate_type: "order".into(),
            aggregate_id: aggregate.into(),
            event_type: "E".into(),
            payload_json: None,
            payload_bytes: None,
            headers_json: None,
            topic: None,
            event_id: uuid::Uuid::nil(),
            created_at: Utc::now(),
            shard: 0,
            withheld_bytes: None,
            undecodable: None,
            aggregate_hash: 0,
            column_headers: Vec::new(),
        }
    }

    fn in_flight(rows: &[OutboxRow], isolating: bool) -> Batch {
        let mut batch = Batch::new(rows.len(), isolating, true);
        for outcome in &mut batch.outcomes {
            *outcome = Outcome::InFlight;
        }
        batch.produced = rows.len() as u64;
        batch.outstanding = rows.len() as u64;
        batch
    }

    fn refused(row_id: i64, generation: u64) -> ProducerEvent {
        ProducerEvent::Delivered {
            generation,
            row_id,
            result: Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge,
            )),
        }
    }

    fn fatal(generation: u64) -> ProducerEvent {
        ProducerEvent::Fatal {
            generation,
            reason: "gap-less".into(),
        }
    }

    /// librdkafka raises the fatal error before the refused batch's reports; the other
    /// order must come to the same: every report applied, nothing parked, the refused rows
    /// left for one record per request.
    #[test]
    fn a_refused_record_batch_is_settled_alike_whichever_comes_first() {
        let rows = [row(1, "a"), row(2, "b"), row(3, "a")];
        let orders = [
            vec![fatal(7), refused(1, 7), refused(2, 7), refused(3, 7)],
            vec![refused(1, 7), refused(2, 7), refused(3, 7), fatal(7)],
        ];
        for events in orders {
            let mut batch = in_flight(&rows, false);
            for event in events {
                apply_event(event, 7, &rows, &mut batch);
            }
            assert!(batch.fatal);
            assert_eq!(batch.outstanding, 0);
            assert_eq!(batch.refused_in_a_set, 3);
            assert!(
                batch.parkings.is_empty(),
                "nothing parked outside isolation"
            );
        }
    }

    #[test]
    fn a_row_refused_on_its_own_is_parked() {
        let rows = [row(1, "a"), row(2, "a")];
        let mut batch = in_flight(&rows, true);
        apply_event(refused(1, 3), 3, &rows, &mut batch);
        apply_event(
            ProducerEvent::Delivered {
                generation: 3,
                row_id: 2,
                result: Err(KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue)),
            },
            3,
            &rows,
            &mut batch,
        );
        assert_eq!(batch.refused_alone, 1);
        assert_eq!(batch.parkings.len(), 1);
        assert_eq!(batch.parkings[0].id, 1);
        assert!(
            matches!(batch.outcomes[1], Outcome::Failed),
            "purged: sent again"
        );
    }

    /// The broker may refuse every record of a partition, each on its own: under `hold`
    /// only the first unsent row of an aggregate is parked and the rest waits behind it;
    /// under `skip` each refused row is parked.
    #[test]
    fn a_refusal_behind_a_parked_row_of_its_aggregate_waits_under_hold() {
        let rows = [row(1, "a"), row(2, "b"), row(3, "a")];
        for (hold, parked) in [(true, vec![1, 2]), (false, vec![1, 2, 3])] {
            let mut batch = in_flight(&rows, true);
            batch.hold = hold;
            for id in 1..=3 {
                apply_event(refused(id, 3), 3, &rows, &mut batch);
            }
            let ids: Vec<i64> = batch.parkings.iter().map(|p| p.id).collect();
            assert_eq!(ids, parked, "hold = {hold}");
            assert_eq!(batch.refused_alone, parked.len() as u64);
            assert!(matches!(
                batch.outcomes[2],
                Outcome::Failed | Outcome::Parked
            ));
        }
    }

    /// A row's own topic that does not exist or that the relay may not write is that
    /// row's problem (parked); for the template's topic, a missing topic waits on its own
    /// and an authorization refusal stays global.
    #[test]
    fn topic_refusals_are_the_rows_own_or_the_topics() {
        let code = |c| KafkaError::MessageProduction(c);
        let mut own = row(1, "a");
        own.topic = Some("outbox.event.own".into());
        let template = row(2, "b");
        for c in [
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            let (class, _) = classify(&code(c));
            assert_eq!(row_class(class, &code(c), &own), ErrorClass::PermanentRow);
            assert_eq!(
                row_class(class, &code(c), &template),
                ErrorClass::PermanentGlobal
            );
        }

        let rows = [row(1, "a"), row(2, "b")];
        let mut batch = in_flight(&rows, false);
        batch.topics = vec![Some(Arc::from("outbox.event.new")), Some(Arc::from("t"))];
        for (id, c) in [
            (1, RDKafkaErrorCode::UnknownTopicOrPartition),
            (2, RDKafkaErrorCode::TopicAuthorizationFailed),
        ] {
            apply_event(
                ProducerEvent::Delivered {
                    generation: 3,
                    row_id: id,
                    result: Err(code(c)),
                },
                3,
                &rows,
                &mut batch,
            );
        }
        assert_eq!(batch.topic_refusals.len(), 1);
        assert_eq!(&*batch.topic_refusals[0].0, "outbox.event.new");
        assert!(
            batch.blocked.is_some(),
            "an authorization refusal stays global"
        );
        assert!(batch.parkings.is_empty());
    }

    #[test]
    fn reports_of_another_generation_and_client_errors_leave_the_batch_alone() {
        let rows = [row(1, "a")];
        let mut batch = in_flight(&rows, false);
        assert!(!apply_event(refused(1, 2), 3, &rows, &mut batch));
        apply_event(fatal(2), 3, &rows, &mut batch);
        apply_event(
            ProducerEvent::Global {
                generation: 3,
                kind: "authentication_failed",
                reason: "one broker".into(),
            },
            3,
            &rows,
            &mut batch,
        );
        assert!(!batch.fatal, "a stale fatal error does not cut the batch");
        assert_eq!(batch.outstanding, 1);
        assert!(matches!(batch.outcomes[0], Outcome::InFlight));
        assert!(batch.client_error.is_some());
    }

    fn acked(offset: i64) -> Outcome {
        Outcome::Acked {
            partition: 0,
            offset,
        }
    }

    fn marked_ids(rows: &[OutboxRow], outcomes: Vec<Outcome>, hold: bool) -> Vec<i64> {
        let mut batch = Batch::new(rows.len(), false, hold);
        batch.outcomes = outcomes;
        markable(rows, &batch).iter().map(|a| a.id).collect()
    }

    #[test]
    fn a_fully_acknowledged_batch_is_marked_whole_with_where_each_row_went() {
        let rows = [row(1, "a"), row(2, "b"), row(3, "a")];
        let mut batch = Batch::new(rows.len(), false, true);
        batch.outcomes = vec![acked(10), acked(11), acked(12)];
        batch.epochs = vec![4, 5, 4];
        let acks = markable(&rows, &batch);
        assert_eq!(
            acks.iter()
                .map(|a| (a.id, a.offset, a.epoch))
                .collect::<Vec<_>>(),
            [(1, 10, 4), (2, 11, 5), (3, 12, 4)]
        );
    }

    #[test]
    fn an_acknowledged_row_behind_an_unacknowledged_one_of_its_aggregate_is_not_marked() {
        let rows = [
            row(1, "a"),
            row(2, "b"),
            row(3, "a"),
            row(4, "b"),
            row(5, "a"),
        ];
        for earlier in [Outcome::Failed, Outcome::NotSent, Outcome::InFlight] {
            let outcomes = vec![earlier.clone(), acked(1), acked(2), acked(3), acked(4)];
            assert_eq!(
                marked_ids(&rows, outcomes, true),
                [2, 4],
                "after {earlier:?}, only the other aggregate is marked"
            );
        }
        // A row of the aggregate before the failure is marked; those after it are not.
        let outcomes = vec![acked(0), acked(1), Outcome::Failed, acked(3), acked(4)];
        assert_eq!(marked_ids(&rows, outcomes, true), [1, 2, 4]);
    }

    #[test]
    fn a_parked_row_holds_its_aggregate_under_hold_and_not_under_skip() {
        let rows = [row(1, "a"), row(2, "a"), row(3, "b")];
        let outcomes = || vec![Outcome::Parked, acked(1), acked(2)];
        assert_eq!(marked_ids(&rows, outcomes(), true), [3]);
        assert_eq!(marked_ids(&rows, outcomes(), false), [2, 3]);
        // Under skip, a failure still holds what comes after it.
        let outcomes = vec![Outcome::Parked, Outcome::Failed, acked(2)];
        let rows = [row(1, "a"), row(2, "a"), row(3, "a")];
        assert!(marked_ids(&rows, outcomes, false).is_empty());
    }
}
