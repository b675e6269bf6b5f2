//! The outbox table as the relay's SQL names it: the relay's own `outbox`, or a table a team
//! already has, whose columns `[outbox]` maps and the catalog confirms before anything runs.
//! Every name is double-quoted here; nothing from the configuration reaches SQL otherwise.

use crate::config::{OutboxColumns, OutboxSettings};

/// A name as SQL reads it: double-quoted, inner quotes doubled.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What a payload column holds, and so what its value becomes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadKind {
    /// `jsonb` or `json`: the JSON text, as UTF-8.
    Json,
    /// `text` (or `varchar`): the text, as UTF-8.
    Text,
    /// `bytea`: the bytes as they are.
    Bytes,
}

/// The outbox table and the column behind each role, as SQL names them.
#[derive(Debug, Clone)]
pub struct OutboxTable {
    /// `outbox` (the relay's own, found through the pinned search path) or
    /// `"schema"."table"`.
    pub(crate) name: String,
    /// As people read it: `outbox`, `app.events`.
    pub(crate) display: String,
    /// The column that orders rows (ids grow with inserts).
    pub(crate) id: String,
    pub(crate) event_id: String,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) event_type: String,
    pub(crate) payload: Option<(String, PayloadKind)>,
    /// A second, `bytea` payload column (the relay's own table has `payload_bytes`).
    pub(crate) payload_bytes: Option<String>,
    /// A `jsonb` object of headers.
    pub(crate) headers: Option<String>,
    /// A column naming the row's topic.
    pub(crate) topic: Option<String>,
    /// Further columns sent as headers: (header name, column).
    pub(crate) header_columns: Vec<(String, String)>,
    pub(crate) created_at: String,
    /// The stored shard column, or `None`: computed from the aggregate id.
    pub(crate) shard: Option<String>,
    /// The partial index of pending rows, as `to_regclass` reads it, for estimates.
    pub(crate) pending_index: String,
}

/// Names of the relay's bookkeeping columns on a table it adopted.
pub(crate) const ADOPTED_ID: &str = "relay_seq";
pub(crate) const ADOPTED_CREATED_AT: &str = "relay_created_at";

impl OutboxTable {
    /// The relay's own `outbox`, as its migrations create it.
    pub fn own() -> Self {
        Self {
            name: "outbox".into(),
            display: "outbox".into(),
            id: "id".into(),
            event_id: "event_id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: Some(("payload".into(), PayloadKind::Json)),
            payload_bytes: Some("payload_bytes".into()),
            headers: Some("headers".into()),
            topic: Some("topic".into()),
            header_columns: Vec::new(),
            created_at: "created_at".into(),
            shard: Some("shard".into()),
            pending_index: "outbox_pending_idx".into(),
        }
    }

    /// `alias.shard`, or the same value computed from the aggregate id.
    pub(crate) fn shard_of(&self, alias: &str) -> String {
        match &self.shard {
            Some(column) => format!("{alias}.{column}"),
            None => format!(
                "(pg_catalog.hashtextextended({alias}.{}, 0) & 255)::smallint",
                self.aggregate_id
            ),
        }
    }

    /// `alias.id`, named `id` in a select list.
    pub(crate) fn id_as_id(&self, alias: &str) -> String {
        if self.id == "id" {
            format!("{alias}.id")
        } else {
            format!("{alias}.{} AS id", self.id)
        }
    }
}

/// Where the table is and what the configuration maps, before the catalog is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) columns: OutboxColumns,
    pub(crate) header_columns: Vec<(String, String)>,
}

impl TableSpec {
    /// `None` for the relay's own table (nothing to ask the catalog about).
    pub fn from_settings(outbox: &OutboxSettings, default_schema: &str) -> Option<Self> {
        let (schema, table) = outbox.table_name(default_schema)?;
        Some(Self {
            schema,
            table,
            columns: outbox.columns.clone(),
            header_columns: outbox
                .header_columns
                .iter()
                .map(|(h, c)| (h.clone(), c.clone()))
                .collect(),
        })
    }

    /// `schema.table` as people read it.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    pub(crate) fn quoted_name(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.table))
    }
}

/// The relay's bookkeeping columns every outbox table needs, with their types.
pub(crate) const BOOKKEEPING: &[(&str, &str)] = &[
    ("sent_at", "timestamp with time zone"),
    ("kafka_partition", "integer"),
    ("kafka_offset", "bigint"),
    ("parked_at", "timestamp with time zone"),
    ("park_reason", "text"),
    ("park_error", "text"),
    ("discarded_at", "timestamp with time zone"),
    ("discard_reason", "text"),
];

const TEXT_TYPES: &[&str] = &["text", "character varying", "character"];

/// What the catalog says about a table `[outbox]` names.
#[derive(Debug, Clone, Default)]
pub(crate) struct Catalog {
    /// (name, type without modifiers, NOT NULL); empty when the table does not exist.
    pub(crate) columns: Vec<(String, String, bool)>,
    /// `r` for a table; `p` for a partitioned one.
    pub(crate) kind: String,
    /// Whether the CHECK that every row has its `relay_seq` is validated: numbering ended.
    pub(crate) numbered: bool,
    /// Whether the CHECK exists at all (validated or not).
    pub(crate) numbering_checked: bool,
    /// The relay's indexes on it: (name, valid).
    pub(crate) indexes: Vec<(String, bool)>,
}

impl Catalog {
    pub(crate) fn has(&self, column: &str) -> bool {
        self.columns.iter().any(|(c, _, _)| c == column)
    }

    fn type_of(&self, column: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|(c, _, _)| c == column)
            .map(|(_, ty, _)| ty.as_str())
    }

    fn not_null(&self, column: &str) -> bool {
        self.columns.iter().any(|(c, _, n)| c == column && *n)
    }

    /// The relay's own table, made by its migrations (whatever name it was given).
    fn is_the_relays_own(&self) -> bool {
        ["id", "event_id", "payload_bytes", "shard", "created_at"]
            .iter()
            .all(|c| self.has(c))
    }
}

fn config_error(key: impl Into<String>, message: impl Into<String>) -> super::StoreError {
    super::StoreError::Config {
        key: key.into(),
        message: message.into(),
    }
}

impl TableSpec {
    /// The table as the relay will use it, from its columns in the catalog: each mapped
    /// column must exist with a type the relay can use (else a configuration error naming
    /// the key), and the relay's bookkeeping must be in place (else `migrate` adopts it).
    pub(crate) fn resolve(&self, catalog: &Catalog) -> Result<OutboxTable, super::StoreError> {
        let display = self.display();
        if catalog.columns.is_empty() {
            return Err(config_error(
                "outbox.table",
                format!(
                    "{display} does not exist, or the relay's role may not see it; name an existing table (schema.table) or leave outbox.table empty for the relay's own outbox"
                ),
            ));
        }
        if catalog.kind != "r" {
            return Err(config_error(
                "outbox.table",
                format!("{display} is partitioned; the relay adopts plain tables only"),
            ));
        }
        if catalog.is_the_relays_own() {
            // The relay's own table under an explicit name: its own columns and indexes.
            return Ok(OutboxTable {
                name: self.quoted_name(),
                display,
                pending_index: format!("{}.{}", quote(&self.schema), quote("outbox_pending_idx")),
                ..OutboxTable::own()
            });
        }
        let mapped = |key: &str, column: &str, allowed: &[&str], needs: &str, required: bool| {
            let key = format!("outbox.columns.{key}");
            match catalog.type_of(column) {
                None => Err(config_error(
                    key,
                    format!("{display} has no column `{column}`; name one of its columns"),
                )),
                Some(ty) if !allowed.contains(&ty) => Err(config_error(
                    key,
                    format!("column `{column}` of {display} is {ty}; the relay needs {needs}"),
                )),
                Some(_) if required && !catalog.not_null(column) => Err(config_error(
                    key,
                    format!(
                        "column `{column}` of {display} may be NULL, and a NULL there would stop the relay; make it NOT NULL (ALTER TABLE ... ALTER COLUMN ... SET NOT NULL)"
                    ),
                )),
                Some(ty) => Ok((quote(column), ty.to_string())),
            }
        };
        let (event_id, _) = mapped("event_id", &self.columns.event_id, &["uuid"], "uuid", true)?;
        let text = "text or varchar";
        let (aggregate_type, _) = mapped(
            "aggregate_type",
            &self.columns.aggregate_type,
            TEXT_TYPES,
            text,
            true,
        )?;
        let (aggregate_id, _) = mapped(
            "aggregate_id",
            &self.columns.aggregate_id,
            TEXT_TYPES,
            text,
            true,
        )?;
        let (event_type, _) = mapped(
            "event_type",
            &self.columns.event_type,
            TEXT_TYPES,
            text,
            true,
        )?;
        // An optional role is mapped when it names a column; unset or `""` is none.
        let named = |column: Option<&String>| column.filter(|c| !c.is_empty()).cloned();
        let payload = match named(Some(&self.columns.payload)) {
            None => None,
            Some(column) => {
                let (quoted, ty) = mapped(
                    "payload",
                    &column,
                    &["jsonb", "json", "text", "character varying", "bytea"],
                    "jsonb, json, text or bytea",
                    false,
                )?;
                let kind = match ty.as_str() {
                    "jsonb" | "json" => PayloadKind::Json,
                    "bytea" => PayloadKind::Bytes,
                    _ => PayloadKind::Text,
                };
                Some((quoted, kind))
            }
        };
        let headers = named(self.columns.headers.as_ref())
            .map(|column| {
                mapped("headers", &column, &["jsonb"], "jsonb (an object)", false).map(|c| c.0)
            })
            .transpose()?;
        let topic = named(self.columns.topic.as_ref())
            .map(|column| mapped("topic", &column, TEXT_TYPES, text, false).map(|c| c.0))
            .transpose()?;
        let mut header_columns = Vec::new();
        for (header, column) in &self.header_columns {
            if !catalog.has(column) {
                return Err(config_error(
                    format!("outbox.header_columns.{header}"),
                    format!("{display} has no column `{column}`; name one of its columns"),
                ));
            }
            header_columns.push((header.clone(), quote(column)));
        }
        let adopt = |what: &str| {
            super::StoreError::Schema(format!(
                "{display} {what}: run `outbox-relay migrate` to adopt it (`--dry-run` shows what it changes)"
            ))
        };
        for (column, ty) in BOOKKEEPING {
            if catalog.type_of(column) != Some(*ty) {
                return Err(adopt(&format!("has no column {column} ({ty}) yet")));
            }
        }
        if catalog.type_of(ADOPTED_ID) != Some("bigint") {
            return Err(adopt(&format!("has no ordering column {ADOPTED_ID} yet")));
        }
        let created_at = if catalog.type_of(ADOPTED_CREATED_AT) == Some("timestamp with time zone")
        {
            quote(ADOPTED_CREATED_AT)
        } else {
            return Err(adopt(&format!("has no column {ADOPTED_CREATED_AT} yet")));
        };
        // Until every row has its number and the indexes are built, the rows already there
        // would go out after newer ones, or not at all.
        if !catalog.numbered {
            return Err(adopt(
                "is adopted only half-way (rows without their ordering number)",
            ));
        }
        for name in self.relay_indexes() {
            if !catalog
                .indexes
                .iter()
                .any(|(n, valid)| *n == name && *valid)
            {
                return Err(adopt(&format!("lacks the valid index {name}")));
            }
        }
        Ok(OutboxTable {
            name: self.quoted_name(),
            display,
            id: quote(ADOPTED_ID),
            event_id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            payload_bytes: None,
            headers,
            topic,
            header_columns,
            created_at,
            shard: None,
            pending_index: format!("{}.{}", quote(&self.schema), quote(&self.pending_index())),
        })
    }

    /// The indexes `migrate` gives an adopted table.
    pub(crate) fn relay_indexes(&self) -> [String; 4] {
        ["seq", "pending", "holding", "sent_at"].map(|what| self.index_name(what))
    }

    /// The CHECK that every row has its ordering number.
    pub(crate) fn numbered_check(&self) -> String {
        self.object_name("seq_check")
    }

    /// Name of the partial index of pending rows `migrate` gives an adopted table.
    pub(crate) fn pending_index(&self) -> String {
        self.index_name("pending")
    }

    /// `<table>_relay_<what>_idx`, cut to PostgreSQL's 63 bytes.
    pub(crate) fn index_name(&self, what: &str) -> String {
        self.object_name(&format!("{what}_idx"))
    }

    /// `<table>_relay_<what>`, the table's name cut so that it fits PostgreSQL's 63 bytes.
    pub(crate) fn object_name(&self, what: &str) -> String {
        let suffix = format!("_relay_{what}");
        if self.table.len() + suffix.len() <= 63 {
            return format!("{}{suffix}", self.table);
        }
        // Cut, with a hash of the whole name so that two long names do not collide.
        let hash = self.table.bytes().fold(0xcbf2_9ce4_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let tag = format!("_{hash:08x}");
        let mut table = self.table.clone();
        while table.len() + tag.len() + suffix.len() > 63 {
            table.pop();
        }
        format!("{table}{tag}{suffix}")
    }
}
