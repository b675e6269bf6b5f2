//! One classification of every Kafka error the relay meets into what the relay does about
//! it, with a bounded `kind` label for metrics. Database errors are classified by
//! the store's `StoreError`.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What an error means for the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// librdkafka retries in order; the relay waits (stall alarm after a threshold).
    Retriable,
    /// The producer is unusable: rebuild it and resend every unmarked row.
    FatalProducer,
    /// This row can never be published: park it with the reason.
    PermanentRow,
    /// Nothing can be published (authorization, authentication): stop, readiness false.
    PermanentGlobal,
    /// The message was purged from the queue because the producer was torn down or a
    /// gap-less failure: resend it.
    Purged,
}

/// Every `kind` label [`classify`] can return, so metrics can export each at zero.
pub(crate) const KINDS: &[&str] = &[
    "queue_full",
    "message_too_large",
    "invalid_record",
    "unsupported_by_broker",
    "invalid_topic",
    "unknown_topic",
    "authorization_failed",
    "authentication_failed",
    "fatal_producer",
    "purged",
    "timeout",
    "not_enough_replicas",
    "leader_change",
    "transport",
    "other",
];

/// The class and bounded metric label of a produce or delivery error.
pub(crate) fn classify(err: &KafkaError) -> (ErrorClass, &'static str) {
    let code = match err {
        KafkaError::MessageProduction(code) => *code,
        KafkaError::Global(code) => *code,
        _ => return (ErrorClass::Retriable, "other"),
    };
    classify_code(code)
}

pub(crate) fn classify_code(code: RDKafkaErrorCode) -> (ErrorClass, &'static str) {
    use RDKafkaErrorCode as C;
    match code {
        C::QueueFull => (ErrorClass::Retriable, "queue_full"),
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            (ErrorClass::PermanentRow, "message_too_large")
        }
        C::InvalidRecord
        | C::InvalidMessage
        | C::BadMessage
        | C::InvalidTimestamp
        | C::PolicyViolation
        | C::UnsupportedForMessageFormat => (ErrorClass::PermanentRow, "invalid_record"),
        C::UnsupportedCompressionType | C::InvalidRequiredAcks | C::UnsupportedVersion => {
            (ErrorClass::PermanentGlobal, "unsupported_by_broker")
        }
        C::InvalidTopic => (ErrorClass::PermanentRow, "invalid_topic"),
        // Global for a template topic (the relay waits for it to be created); the relay
        // parks instead when the topic came from the row's own `topic` column.
        C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition => {
            (ErrorClass::PermanentGlobal, "unknown_topic")
        }
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => {
            (ErrorClass::PermanentGlobal, "authorization_failed")
        }
        C::Authentication | C::SaslAuthenticationFailed => {
            (ErrorClass::PermanentGlobal, "authentication_failed")
        }
        C::Fatal
        | C::OutOfOrderSequenceNumber
        | C::UnknownProducerId
        | C::InvalidProducerEpoch
        | C::ProducerFenced
        | C::InvalidProducerIdMapping
        | C::DuplicateSequenceNumber
        | C::Fenced
        | C::Inconsistent => (ErrorClass::FatalProducer, "fatal_producer"),
        C::PurgeQueue | C::PurgeInflight => (ErrorClass::Purged, "purged"),
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut | C::TimedOutQueue => {
            (ErrorClass::Retriable, "timeout")
        }
        C::NotEnoughReplicas | C::NotEnoughReplicasAfterAppend => {
            (ErrorClass::Retriable, "not_enough_replicas")
        }
        C::NotLeaderForPartition | C::LeaderNotAvailable => {
            (ErrorClass::Retriable, "leader_change")
        }
        C::BrokerTransportFailure | C::AllBrokersDown | C::NetworkException => {
            (ErrorClass::Retriable, "transport")
        }
        _ => (ErrorClass::Retriable, "other"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_known_codes() {
        use RDKafkaErrorCode as C;
        let class = |c| classify_code(c).0;
        assert_eq!(class(C::MessageSizeTooLarge), ErrorClass::PermanentRow);
        assert_eq!(
            class(C::TopicAuthorizationFailed),
            ErrorClass::PermanentGlobal
        );
        assert_eq!(
            class(C::OutOfOrderSequenceNumber),
            ErrorClass::FatalProducer
        );
        assert_eq!(class(C::Fatal), ErrorClass::FatalProducer);
        assert_eq!(class(C::NotEnoughReplicas), ErrorClass::Retriable);
        assert_eq!(class(C::PurgeInflight), ErrorClass::Purged);
        assert_eq!(
            classify(&KafkaError::MessageProduction(C::QueueFull)),
            (ErrorClass::Retriable, "queue_full")
        );
    }

    #[test]
    fn every_kind_is_a_declared_label() {
        use RDKafkaErrorCode as C;
        let codes = [
            C::QueueFull,
            C::MessageSizeTooLarge,
            C::InvalidRecord,
            C::UnsupportedCompressionType,
            C::InvalidTopic,
            C::UnknownTopicOrPartition,
            C::TopicAuthorizationFailed,
            C::SaslAuthenticationFailed,
            C::Fatal,
            C::PurgeQueue,
            C::RequestTimedOut,
            C::NotEnoughReplicas,
            C::NotLeaderForPartition,
            C::BrokerTransportFailure,
            C::NoError,
        ];
        let kinds: std::collections::BTreeSet<&str> =
            codes.iter().map(|c| classify_code(*c).1).collect();
        let declared: std::collections::BTreeSet<&str> = KINDS.iter().copied().collect();
        assert_eq!(kinds, declared);
    }
}
