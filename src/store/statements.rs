//! Every statement on the outbox table, built once per table from its quoted names: the
//! read, marks, deletes, parks, retention and what operators ask. The fragments each
//! statement shares (what the read fetches of a text column, the lease fence, the "parked
//! and still holding" predicate) are written once here.

use super::table::{OutboxTable, PayloadKind};

/// The statements for one outbox table.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) table: OutboxTable,
    pub(crate) read_pending: String,
    pub(crate) read_pending_raw: String,
    /// Whether any row of the shards is pending, by the pending index alone: what an idle
    /// relay asks before the read, which cost the server about 1.2 ms of CPU per empty
    /// poll against 0.35 ms for this (bench step `idle`, 2 cores).
    pub(crate) any_pending: String,
    /// The mark: one UPDATE of the outbox by id, with no join. Each row finds its
    /// partition and offset by binary search (`width_bucket`) in the ids, which are sorted
    /// and distinct.
    ///
    /// Joining the rows with `unnest` of the acks instead leaves the join order to
    /// estimates that are wrong exactly when it matters: with most rows sent, `sent_at IS
    /// NULL` looks rare, the planner expects one row, and it rescans the 1000 acks for
    /// every row marked (400 ms per batch instead of 15).
    ///
    /// The fence is a sorted array of the shards still held under the epochs the rows
    /// were read with; each row finds its shard in it by binary search too.
    pub(crate) mark_sent: String,
    pub(crate) delete_sent: String,
    pub(crate) park: String,
    pub(crate) backlog: String,
    pub(crate) list_parked: String,
    pub(crate) parked_ids: String,
    pub(crate) parked_among: String,
    pub(crate) replay_parked: String,
    pub(crate) discard_parked: String,
    pub(crate) prune_sent: String,
    pub(crate) count_prunable: String,
    /// Proof of delivery ([`super::proof`]): one row with its state, by event id or row id.
    pub(crate) locate_by_event_id: String,
    pub(crate) locate_by_id: String,
    /// Sent rows after a (sent_at, id) key, in that order, each kept with a probability.
    pub(crate) sent_page: String,
    pub(crate) sent_by_ids: String,
    pub(crate) sample_sent_ids: String,
    pub(crate) count_sent_between: String,
    pub(crate) sent_id_bounds: String,
    /// Sent rows of an id range (and a sent_at range, an aggregate), in id order.
    pub(crate) republish_page: String,
    pub(crate) count_republishable: String,
    /// What decides the topics of the oldest pending rows: (aggregate type, event type,
    /// topic column), distinct.
    pub(crate) pending_topic_sources: String,
    /// The rows of an id range, counted by state.
    pub(crate) range_census: String,
}

impl Statements {
    pub(crate) fn new(table: OutboxTable) -> Self {
        let t = &table;
        let n = &t.name;
        let id = &t.id;
        Self {
            read_pending: read_pending(t, false),
            read_pending_raw: read_pending(t, true),
            any_pending: format!(
                "SELECT EXISTS (SELECT 1 FROM {n} o WHERE {})",
                pending_in_shards(t, "$1")
            ),
            mark_sent: format!(
                "{fence}UPDATE {n} o \
                 SET sent_at = pg_catalog.now(), \
                     kafka_partition = ($2::int[])[pg_catalog.width_bucket(o.{id}, $1::bigint[])], \
                     kafka_offset = ($3::bigint[])[pg_catalog.width_bucket(o.{id}, $1::bigint[])] \
                 WHERE o.{id} = ANY($1::bigint[]) AND o.sent_at IS NULL AND {fenced}",
                fence = lease_fence("$4", "$5", "$6"),
                fenced = fenced_shard(t),
            ),
            delete_sent: format!(
                "{fence}DELETE FROM {n} o WHERE o.{id} = ANY($1::bigint[]) AND {fenced}",
                fence = lease_fence("$2", "$3", "$4"),
                fenced = fenced_shard(t),
            ),
            park: format!(
                "UPDATE {n} o \
                 SET parked_at = pg_catalog.now(), \
                     park_reason = ($2::text[])[pg_catalog.width_bucket(o.{id}, $1::bigint[])], \
                     park_error = ($3::text[])[pg_catalog.width_bucket(o.{id}, $1::bigint[])] \
                 WHERE o.{id} = ANY($1::bigint[]) \
                   AND o.sent_at IS NULL AND o.parked_at IS NULL \
                 RETURNING o.{id}"
            ),
            backlog: format!(
                "SELECT \
                   (SELECT pg_catalog.count(*) FROM ( \
                      SELECT 1 FROM {n} WHERE sent_at IS NULL AND parked_at IS NULL LIMIT $1 + 1) c) \
                     AS counted, \
                   (SELECT reltuples::float8 FROM pg_catalog.pg_class \
                      WHERE oid = pg_catalog.to_regclass($2)) AS indexed_rows, \
                   (SELECT {id} FROM {n} WHERE sent_at IS NULL AND parked_at IS NULL \
                      ORDER BY {id} DESC LIMIT 1) AS newest_id, \
                   o.{id} AS oldest_id, \
                   CASE WHEN o.{id} IS NOT NULL THEN \
                     EXTRACT(EPOCH FROM (pg_catalog.clock_timestamp() \
                       - LEAST(GREATEST(o.{created}, '1970-01-01Z'::timestamptz), \
                               pg_catalog.clock_timestamp())))::float8 END AS oldest_age, \
                   (SELECT pg_catalog.count(*) FROM {n} WHERE {holding}) AS parked \
                 FROM (SELECT 1) AS one \
                 LEFT JOIN LATERAL ( \
                   SELECT {id}, {created} FROM {n} WHERE sent_at IS NULL AND parked_at IS NULL \
                   ORDER BY {id} LIMIT 1) o ON true",
                created = t.created_at,
                holding = parked_holding(""),
            ),
            list_parked: format!(
                "SELECT {id} AS id, {agg_type}::text AS aggregate_type, \
                        {agg_id}::text AS aggregate_id, {event_type}::text AS event_type, \
                        {event_id} AS event_id, \
                        LEAST(GREATEST({created}, '1970-01-01Z'::timestamptz), \
                              '9999-12-31Z'::timestamptz) AS created_at, \
                        parked_at, park_reason, park_error \
                 FROM {n} \
                 WHERE {holding} AND ($1::text IS NULL OR {agg_id} = $1) \
                   AND ($3::text IS NULL OR park_reason = $3) \
                   AND ($4::timestamptz IS NULL OR parked_at >= $4) \
                   AND ($5::timestamptz IS NULL OR parked_at < $5) \
                 ORDER BY {id} LIMIT $2",
                agg_type = t.aggregate_type,
                agg_id = t.aggregate_id,
                event_type = t.event_type,
                event_id = t.event_id,
                created = t.created_at,
                holding = parked_holding(""),
            ),
            parked_ids: format!(
                "SELECT {id} FROM {n} \
                 WHERE {holding} AND ($1::text IS NULL OR {agg_id} = $1) \
                   AND ($2::text IS NULL OR park_reason = $2) \
                   AND ($3::timestamptz IS NULL OR parked_at >= $3) \
                   AND ($4::timestamptz IS NULL OR parked_at < $4) \
                 ORDER BY {id}",
                agg_id = t.aggregate_id,
                holding = parked_holding(""),
            ),
            parked_among: format!(
                "SELECT {id} FROM {n} WHERE {id} = ANY($1::bigint[]) AND {holding} ORDER BY {id}",
                holding = parked_holding(""),
            ),
            replay_parked: format!(
                "UPDATE {n} SET parked_at = NULL, park_reason = NULL, park_error = NULL \
                 WHERE {id} = ANY($1::bigint[]) AND {holding}",
                holding = parked_holding(""),
            ),
            discard_parked: format!(
                "UPDATE {n} SET discarded_at = pg_catalog.now(), discard_reason = $2 \
                 WHERE {id} = ANY($1::bigint[]) AND {holding}",
                holding = parked_holding(""),
            ),
            prune_sent: format!(
                "WITH lock AS MATERIALIZED ( \
                   SELECT pg_catalog.pg_try_advisory_xact_lock($3) AS held), \
                 doomed AS ( \
                   DELETE FROM {n} o WHERE o.{id} = ANY(ARRAY( \
                     SELECT {id} FROM {n} \
                     WHERE sent_at IS NOT NULL \
                       AND sent_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) \
                       AND (SELECT held FROM lock) \
                     ORDER BY sent_at LIMIT $2)) \
                   RETURNING 1) \
                 SELECT (SELECT held FROM lock) AS held, \
                        (SELECT pg_catalog.count(*) FROM doomed) AS deleted"
            ),
            count_prunable: format!(
                "SELECT pg_catalog.count(*) FROM {n} \
                 WHERE sent_at IS NOT NULL \
                   AND sent_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)"
            ),
            locate_by_event_id: locate(t, &t.event_id),
            locate_by_id: locate(t, id),
            sent_page: format!(
                "{columns} FROM {n} o \
                 WHERE o.sent_at >= $2 AND (o.sent_at, o.{id}) > ($2, $3) AND o.sent_at < $4 \
                   AND ($5::float8 >= 1 OR pg_catalog.random() < $5::float8) \
                   AND ($7::smallint[] IS NULL OR {shard} = ANY($7)) \
                 ORDER BY o.sent_at, o.{id} LIMIT $6",
                columns = proof_columns(t),
                shard = t.shard_of("o"),
            ),
            sent_by_ids: format!(
                "{columns} FROM {n} o \
                 WHERE o.{id} = ANY($2::bigint[]) AND o.sent_at IS NOT NULL ORDER BY o.{id}",
                columns = proof_columns(t),
            ),
            sample_sent_ids: format!(
                "SELECT {id} FROM {n} WHERE sent_at >= $1 AND sent_at < $2 \
                 ORDER BY pg_catalog.random() LIMIT $3"
            ),
            count_sent_between: format!(
                "SELECT pg_catalog.count(*) FROM {n} WHERE sent_at >= $1 AND sent_at < $2"
            ),
            sent_id_bounds: format!(
                "SELECT pg_catalog.min({id}), pg_catalog.max({id}) FROM {n} \
                 WHERE sent_at >= $1 AND sent_at < $2"
            ),
            republish_page: format!(
                "{columns}, {SENT_COLUMNS} FROM {n} o \
                 WHERE o.{id} > $2 AND o.{id} <= $3 AND o.sent_at IS NOT NULL \
                   AND ($4::timestamptz IS NULL OR o.sent_at >= $4) \
                   AND ($5::timestamptz IS NULL OR o.sent_at < $5) \
                   AND ($6::text IS NULL OR o.{agg_id} = $6) \
                 ORDER BY o.{id} LIMIT $7",
                columns = row_columns(t, false, "$1"),
                agg_id = t.aggregate_id,
            ),
            count_republishable: format!(
                "SELECT pg_catalog.count(*) FROM {n} o \
                 WHERE o.{id} > $1 AND o.{id} <= $2 AND o.sent_at IS NOT NULL \
                   AND ($3::timestamptz IS NULL OR o.sent_at >= $3) \
                   AND ($4::timestamptz IS NULL OR o.sent_at < $4) \
                   AND ($5::text IS NULL OR o.{agg_id} = $5)",
                agg_id = t.aggregate_id,
            ),
            pending_topic_sources: format!(
                "SELECT DISTINCT aggregate_type, event_type, topic FROM ( \
                   SELECT {agg_type}::text AS aggregate_type, {event_type}::text AS event_type, \
                          {topic} AS topic \
                   FROM {n} WHERE sent_at IS NULL AND parked_at IS NULL \
                   ORDER BY {id} LIMIT 100000) p \
                 LIMIT $1",
                agg_type = t.aggregate_type,
                event_type = t.event_type,
                topic = t
                    .topic
                    .as_ref()
                    .map_or("NULL::text".to_string(), |c| format!("{c}::text")),
            ),
            range_census: format!(
                "SELECT \
                   pg_catalog.count(*) FILTER (WHERE sent_at IS NULL AND parked_at IS NULL) \
                     AS pending, \
                   pg_catalog.count(*) FILTER (WHERE {holding}) AS parked, \
                   pg_catalog.count(*) FILTER ( \
                     WHERE sent_at IS NULL AND discarded_at IS NOT NULL) AS discarded \
                 FROM {n} WHERE {id} >= $1 AND {id} <= $2 \
                   AND ($3::text IS NULL OR {agg_id} = $3)",
                holding = parked_holding(""),
                agg_id = t.aggregate_id,
            ),
            table,
        }
    }
}

/// What the proof statements select after a row's columns, by position: when it was sent
/// and where its ack put it.
pub(crate) const SENT_COLUMNS: &str = "o.sent_at, o.kafka_partition, o.kafka_offset";

/// A row's columns for proving its delivery ([`row_columns`] without the payload, headers
/// and header columns), then [`SENT_COLUMNS`], then the SHA-256 and the length of the value
/// the relay sends for it, computed by the database: proving a row never fetches its
/// payload.
fn proof_columns(t: &OutboxTable) -> String {
    let lean = OutboxTable {
        payload: None,
        payload_bytes: None,
        headers: None,
        header_columns: Vec::new(),
        ..t.clone()
    };
    let value = sent_value(t);
    format!(
        "{}, {SENT_COLUMNS}, pg_catalog.sha256({value}) AS value_sha256, \
         pg_catalog.octet_length({value}) AS value_length",
        row_columns(&lean, false, "$1")
    )
}

/// The bytes of a row's record value, as SQL: a json or text payload as its UTF-8 text, a
/// `bytea` payload as it is; NULL for a row without one.
fn sent_value(t: &OutboxTable) -> String {
    let mut arms = String::new();
    match &t.payload {
        Some((column, PayloadKind::Json)) => {
            arms += &format!(
                "WHEN o.{column} IS NOT NULL THEN pg_catalog.convert_to(o.{column}::text, 'UTF8') "
            )
        }
        Some((column, PayloadKind::Text)) => {
            arms += &format!(
                "WHEN o.{column} IS NOT NULL THEN pg_catalog.convert_to(o.{column}, 'UTF8') "
            )
        }
        Some((column, PayloadKind::Bytes)) => {
            arms += &format!("WHEN o.{column} IS NOT NULL THEN o.{column} ")
        }
        None => {}
    }
    if let Some(column) = &t.payload_bytes {
        arms += &format!("WHEN o.{column} IS NOT NULL THEN o.{column} ");
    }
    if arms.is_empty() {
        "NULL::bytea".into()
    } else {
        format!("(CASE {arms}END)")
    }
}

/// One row by `column` (`$2`) with everything known of its state: [`proof_columns`], its
/// parking and discarding, and the replica whose live lease holds its shard.
fn locate(t: &OutboxTable, column: &str) -> String {
    format!(
        "{columns}, o.parked_at, o.park_reason, o.park_error, \
           o.discarded_at, o.discard_reason, \
           (SELECT l.owner FROM outbox_shard_lease l \
             WHERE l.shard = {shard} AND l.expires_at > pg_catalog.now()) AS owner \
         FROM {n} o WHERE o.{column} = $2 ORDER BY o.{id} LIMIT 10",
        columns = proof_columns(t),
        shard = t.shard_of("o"),
        n = t.name,
        id = t.id,
    )
}

/// A row "parked and still holding" its aggregate back: parked, neither discarded nor
/// sent; `alias` qualifies the columns (none when empty). The partial index
/// `outbox_parked_holding_hash_idx` (migration 6) carries the same predicate, so that the
/// read's probe uses it; a test keeps the two equal.
pub(crate) fn parked_holding(alias: &str) -> String {
    let a = if alias.is_empty() {
        String::new()
    } else {
        format!("{alias}.")
    };
    format!("{a}parked_at IS NOT NULL AND {a}discarded_at IS NULL AND {a}sent_at IS NULL")
}

/// The lease fence of a mark or delete: the CTE `fence` holds the shards `owner` still
/// leases under the epochs its rows were read with (`shards`, `epochs`: parallel arrays),
/// share-locked so that a takeover waits for the statement or fences it out.
fn lease_fence(shards: &str, epochs: &str, owner: &str) -> String {
    format!(
        "WITH fence AS ( \
           SELECT l.shard FROM outbox_shard_lease l \
           JOIN unnest({shards}::smallint[], {epochs}::bigint[]) AS f(shard, epoch) \
             ON l.shard = f.shard AND l.epoch = f.epoch \
           WHERE l.owner = {owner} \
           ORDER BY l.shard \
           FOR SHARE OF l) "
    )
}

/// Whether row `o`'s shard is in the [`lease_fence`]: found by binary search in the sorted
/// fence (a plain `= ANY` of a computed array searches it linearly: about 128 comparisons
/// per row when one replica holds all 256 shards).
fn fenced_shard(t: &OutboxTable) -> String {
    let shard = t.shard_of("o");
    format!(
        "{shard} = (ARRAY(SELECT shard FROM fence ORDER BY shard)) \
           [pg_catalog.width_bucket({shard}, ARRAY(SELECT shard FROM fence ORDER BY shard))]"
    )
}

/// A value (`value`) of `column` when its text (`text`: the column itself, or its cast
/// to text) is at most the per-row limit (the parameter `limit`), NULL otherwise: its
/// stored size decides first, so that a small value is never measured and a large one
/// never sent.
fn fetched(column: &str, text: &str, value: &str, limit: &str) -> String {
    format!(
        "CASE WHEN pg_catalog.pg_column_size({column}) <= 8192 \
              OR pg_catalog.octet_length({text}) <= {limit} \
         THEN {value} END"
    )
}

/// The `withheld_bytes` arm of a column [`fetched`] leaves out: the length of its text.
fn withheld(column: &str, text: &str, limit: &str) -> String {
    format!(
        "WHEN pg_catalog.pg_column_size({column}) > 8192 \
           AND pg_catalog.octet_length({text}) > {limit} \
         THEN pg_catalog.octet_length({text}) "
    )
}

/// A text column as the read sends it: as text, or (`raw`) as the bytes the database stores.
fn as_sent(expression: &str, raw: bool) -> String {
    if raw {
        format!("pg_catalog.convert_to({expression}, 'SQL_ASCII')")
    } else {
        expression.to_string()
    }
}

/// The columns of one row as `decode_pending` reads them, by position: `SELECT …` up to
/// the `FROM`, over the table aliased `o`. A value over the per-row limit (the parameter
/// `limit`) is measured and left out.
fn row_columns(t: &OutboxTable, raw: bool, limit: &str) -> String {
    let agg_id = format!("o.{}", t.aggregate_id);
    let text = |column: &str, alias: &str| {
        let column = format!("o.{column}");
        format!(
            "{} AS {alias}, ",
            fetched(&column, &column, &as_sent(&column, raw), limit)
        )
    };
    let mut select = format!("SELECT {}, ", t.id_as_id("o"));
    select += &text(&t.aggregate_type, "aggregate_type");
    select += &text(&t.aggregate_id, "aggregate_id");
    select += &text(&t.event_type, "event_type");
    // (value measured, value sent, withheld arm) per payload-like column.
    let mut withheld_arms = String::new();
    // A json or jsonb column, measured and sent as its text.
    let json = |column: &str, alias: &str, withheld_arms: &mut String| {
        let c = format!("o.{column}");
        let text = format!("{c}::text");
        *withheld_arms += &withheld(&c, &text, limit);
        format!(
            "{} AS {alias}, ",
            fetched(&c, &text, &as_sent(&text, raw), limit)
        )
    };
    match &t.payload {
        Some((column, PayloadKind::Json)) => {
            select += &json(column, "payload_json", &mut withheld_arms);
        }
        Some((column, PayloadKind::Text)) => {
            select += &text(column, "payload_json");
            let c = format!("o.{column}");
            withheld_arms += &withheld(&c, &c, limit);
        }
        Some((_, PayloadKind::Bytes)) | None => select += "NULL::text AS payload_json, ",
    }
    let bytes = match (&t.payload, &t.payload_bytes) {
        (Some((column, PayloadKind::Bytes)), _) | (_, Some(column)) => Some(column),
        _ => None,
    };
    match bytes {
        Some(column) => {
            let c = format!("o.{column}");
            select += &format!(
                "CASE WHEN pg_catalog.octet_length({c}) <= {limit} THEN {c} END AS payload_bytes, "
            );
            withheld_arms = format!(
                "WHEN pg_catalog.octet_length({c}) > {limit} THEN pg_catalog.octet_length({c}) {withheld_arms}"
            );
        }
        None => select += "NULL::bytea AS payload_bytes, ",
    }
    match &t.headers {
        Some(column) => select += &json(column, "headers_json", &mut withheld_arms),
        None => select += "NULL::text AS headers_json, ",
    }
    match &t.topic {
        Some(column) => select += &text(column, "topic"),
        None => select += "NULL::text AS topic, ",
    }
    select += &format!(
        "o.{event_id} AS event_id, \
         LEAST(GREATEST(o.{created}, '1970-01-01Z'::timestamptz), \
               '9999-12-31Z'::timestamptz) AS created_at, \
         {shard} AS shard, CASE {withheld_arms}",
        event_id = t.event_id,
        created = t.created_at,
        shard = t.shard_of("o"),
    );
    for column in [&t.aggregate_id, &t.aggregate_type, &t.event_type] {
        let c = format!("o.{column}");
        select += &withheld(&c, &c, limit);
    }
    if let Some(column) = &t.topic {
        let c = format!("o.{column}");
        select += &withheld(&c, &c, limit);
    }
    for (_, column) in &t.header_columns {
        let c = format!("o.{column}::text");
        select += &format!(
            "WHEN pg_catalog.octet_length({c}) > {limit} THEN pg_catalog.octet_length({c}) "
        );
    }
    select += &format!(
        "END::bigint AS withheld_bytes, \
         pg_catalog.hashtextextended({agg_id}, 0) AS aggregate_hash"
    );
    for (i, (_, column)) in t.header_columns.iter().enumerate() {
        let c = format!("o.{column}::text");
        select += &format!(
            ", CASE WHEN pg_catalog.octet_length({c}) <= {limit} THEN {} END AS header_{i}",
            as_sent(&c, raw)
        );
    }
    select
}

/// Rows of `o` that are pending (neither sent nor parked) and in the shards `shards` names
/// (a `smallint[]` parameter; NULL: all): what the read reads and an idle relay asks about.
fn pending_in_shards(t: &OutboxTable, shards: &str) -> String {
    format!(
        "o.sent_at IS NULL AND o.parked_at IS NULL \
         AND ({shards}::smallint[] IS NULL OR {shard} = ANY({shards}))",
        shard = t.shard_of("o"),
    )
}

/// The pending rows of one side of the skipped run, without the skipped ids on that side;
/// the two sides are merged in id order. Written out twice because a range is what lets
/// the index step over the run. Columns by position, as `decode_pending` reads them.
fn read_pending_side(t: &OutboxTable, raw: bool, side: &str) -> String {
    let n = &t.name;
    let id = &t.id;
    let agg_id = format!("o.{}", t.aggregate_id);
    let mut select = format!("({}", row_columns(t, raw, "$8"));
    select += &format!(
        " FROM {n} o \
         WHERE {pending} AND {side} \
           AND ($9::bigint[] IS NULL \
                OR pg_catalog.hashtextextended({agg_id}, 0) <> ALL($9)) \
           AND ($2 \
                OR NOT EXISTS (SELECT 1 FROM {n} h WHERE {holding_h}) \
                OR NOT EXISTS ( \
                 SELECT 1 FROM {n} p WHERE {holding_p} \
                   AND pg_catalog.hashtextextended(p.{agg}, 0) \
                       = pg_catalog.hashtextextended({agg_id}, 0) \
                   AND p.{agg} = {agg_id} AND p.{id} < o.{id})) \
         ORDER BY o.{id} \
         LIMIT $1)",
        pending = pending_in_shards(t, "$3"),
        holding_h = parked_holding("h"),
        holding_p = parked_holding("p"),
        agg = t.aggregate_id,
    );
    select
}

/// The read: pending rows in id order, without the skipped ids. The longest run of
/// consecutive skipped ids (`$5..=$6`) is left out by two index ranges, below and above
/// it, so its rows are never fetched; the other skipped ids are filtered row by row, each
/// side by its own list (`$4` below the run, `$7` above it), so that planning estimates
/// each skipped id once. With one replica the run is usually every row in flight
/// (filtering the whole skip list fetched and dropped up to two batches of rows per read);
/// with several, a replica's rows in flight are interleaved with other shards' ids and
/// most of them are filtered as before.
///
/// `raw`: every text column as the bytes the database stores, for when the server cannot
/// send a row's text as UTF-8 (SQLSTATE 22021, a SQL_ASCII database): decoding then finds
/// the row and it is parked instead of failing every read.
fn read_pending(t: &OutboxTable, raw: bool) -> String {
    let id = &t.id;
    format!(
        "SELECT * FROM ({} UNION ALL {}) AS pending ORDER BY id LIMIT $1",
        read_pending_side(
            t,
            raw,
            &format!("o.{id} < $5::bigint AND o.{id} <> ALL($4::bigint[])")
        ),
        read_pending_side(
            t,
            raw,
            &format!("o.{id} > $6::bigint AND o.{id} <> ALL($7::bigint[])")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLDING_INDEX: &str =
        include_str!("../../migrations/20261207000006_parked_holding_by_hash.sql");

    #[test]
    fn the_holding_index_has_the_holding_predicate() {
        let predicate = format!("WHERE {};", parked_holding(""));
        assert!(
            HOLDING_INDEX.contains(&predicate),
            "migration 6's partial index must be `{predicate}`, the predicate the read probes with"
        );
        assert_eq!(
            parked_holding("p").replace("p.", ""),
            parked_holding(""),
            "the qualified and plain predicates differ"
        );
    }

    #[test]
    fn every_configured_name_is_quoted() {
        let mut table = OutboxTable::own();
        table.name = "\"app\".\"ev\"\"ents\"".into();
        table.aggregate_id = "\"aggregate id\"".into();
        let sql = Statements::new(table);
        for statement in [&sql.read_pending, &sql.mark_sent, &sql.list_parked] {
            assert!(!statement.contains(" outbox "), "{statement}");
        }
        assert!(sql.read_pending.contains("o.\"aggregate id\""));
        assert!(sql.read_pending.contains("FROM \"app\".\"ev\"\"ents\" o"));
    }
}
