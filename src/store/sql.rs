//! SQL written once and spliced into the statements that need it (by `concat!`, so each
//! statement stays one constant string): what the read fetches of a text column, the
//! lease fence of marks and deletes, and the "parked and still holding" predicate.

/// A text column's value (as `$value`) when it is at most the read's per-row limit (`$8`),
/// NULL otherwise: its stored size decides first, so that a small value is never measured
/// and a large one never sent.
macro_rules! fetched {
    ($column:literal, $value:literal) => {
        concat!(
            "CASE WHEN pg_catalog.pg_column_size(",
            $column,
            ") <= 8192 \
                    OR pg_catalog.octet_length(",
            $column,
            ") <= $8 \
                  THEN ",
            $value,
            " END"
        )
    };
}

/// The `withheld_bytes` arm of a text column [`fetched!`] leaves out: its length.
macro_rules! withheld {
    ($column:literal) => {
        concat!(
            "WHEN pg_catalog.pg_column_size(",
            $column,
            ") > 8192 \
               AND pg_catalog.octet_length(",
            $column,
            ") > $8 \
               THEN pg_catalog.octet_length(",
            $column,
            ") "
        )
    };
}

/// A row "parked and still holding" its aggregate back: parked, neither discarded nor
/// sent. `parked_holding!("p")` qualifies the columns with the alias `p`. The partial
/// index `outbox_parked_holding_hash_idx` (migration 6) carries the same predicate, so
/// that the read's probe uses it; a test keeps the two equal.
macro_rules! parked_holding {
    () => {
        "parked_at IS NOT NULL AND discarded_at IS NULL AND sent_at IS NULL"
    };
    ($alias:literal) => {
        concat!(
            $alias,
            ".parked_at IS NOT NULL AND ",
            $alias,
            ".discarded_at IS NULL AND ",
            $alias,
            ".sent_at IS NULL"
        )
    };
}

/// The lease fence of a mark or delete: the CTE `fence` holds the shards `$owner` still
/// leases under the epochs its rows were read with (`$shards`, `$epochs`: parallel
/// arrays), share-locked so that a takeover waits for the statement or fences it out.
/// [`fenced_shard!`] then keeps only rows of those shards.
macro_rules! lease_fence {
    ($shards:literal, $epochs:literal, $owner:literal) => {
        concat!(
            "WITH fence AS ( \
               SELECT l.shard FROM outbox_shard_lease l \
               JOIN unnest(",
            $shards,
            "::smallint[], ",
            $epochs,
            "::bigint[]) AS f(shard, epoch) \
                 ON l.shard = f.shard AND l.epoch = f.epoch \
               WHERE l.owner = ",
            $owner,
            " ORDER BY l.shard \
               FOR SHARE OF l) "
        )
    };
}

/// Whether row `o`'s shard is in the [`lease_fence!`]: found by binary search in the
/// sorted fence (a plain `= ANY` of a computed array searches it linearly: about 128
/// comparisons per row when one replica holds all 256 shards).
macro_rules! fenced_shard {
    () => {
        "o.shard = (ARRAY(SELECT shard FROM fence ORDER BY shard)) \
           [pg_catalog.width_bucket(o.shard, ARRAY(SELECT shard FROM fence ORDER BY shard))]"
    };
}

#[cfg(test)]
mod tests {
    const HOLDING_INDEX: &str =
        include_str!("../../migrations/20261207000006_parked_holding_by_hash.sql");

    #[test]
    fn the_holding_index_has_the_holding_predicate() {
        let predicate = concat!("WHERE ", parked_holding!(), ";");
        assert!(
            HOLDING_INDEX.contains(predicate),
            "migration 6's partial index must be `{predicate}`, the predicate the read probes with"
        );
        assert_eq!(
            parked_holding!("p").replace("p.", ""),
            parked_holding!(),
            "the qualified and plain predicates differ"
        );
    }
}
