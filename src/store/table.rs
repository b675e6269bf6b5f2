//! The outbox table as the relay's SQL names it: the relay's own `outbox`, or a table a team
//! already has, whose columns `[outbox]` maps and the catalog confirms before anything runs.
//! Every name is double-quoted here; nothing from the configuration reaches SQL otherwise.

use crate::config::OutboxSettings;

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
    pub(crate) columns: Vec<(&'static str, String)>,
    pub(crate) optional: Vec<(&'static str, Option<String>)>,
    pub(crate) header_columns: Vec<(String, String)>,
}

impl TableSpec {
    /// `None` for the relay's own table (nothing to ask the catalog about).
    pub fn from_settings(outbox: &OutboxSettings, default_schema: &str) -> Option<Self> {
        let (schema, table) = outbox.table_name(default_schema)?;
        let columns = &outbox.columns;
        Some(Self {
            schema,
            table,
            columns: vec![
                ("event_id", columns.event_id.clone()),
                ("aggregate_type", columns.aggregate_type.clone()),
                ("aggregate_id", columns.aggregate_id.clone()),
                ("event_type", columns.event_type.clone()),
            ],
            optional: vec![
                (
                    "payload",
                    Some(columns.payload.clone()).filter(|c| !c.is_empty()),
                ),
                ("headers", columns.headers.clone().filter(|c| !c.is_empty())),
                ("topic", columns.topic.clone().filter(|c| !c.is_empty())),
            ],
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

/// The table's columns as the catalog has them: (name, type without modifiers).
pub(crate) type CatalogColumns = Vec<(String, String)>;

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
    pub(crate) fn resolve(
        &self,
        columns: &CatalogColumns,
    ) -> Result<OutboxTable, super::StoreError> {
        let display = self.display();
        if columns.is_empty() {
            return Err(config_error(
                "outbox.table",
                format!(
                    "{display} does not exist, or the relay's role may not see it; name an existing table (schema.table) or leave outbox.table empty for the relay's own outbox"
                ),
            ));
        }
        let type_of = |name: &str| {
            columns
                .iter()
                .find(|(column, _)| column == name)
                .map(|(_, ty)| ty.as_str())
        };
        let mapped = |key: &str, column: &str, allowed: &[&str], needs: &str| {
            let key = format!("outbox.columns.{key}");
            match type_of(column) {
                None => Err(config_error(
                    key,
                    format!("{display} has no column `{column}`; name one of its columns"),
                )),
                Some(ty) if !allowed.contains(&ty) => Err(config_error(
                    key,
                    format!("column `{column}` of {display} is {ty}; the relay needs {needs}"),
                )),
                Some(ty) => Ok((quote(column), ty.to_string())),
            }
        };
        let (event_id, _) = mapped("event_id", &self.columns[0].1, &["uuid"], "uuid")?;
        let text = "text or varchar";
        let (aggregate_type, _) = mapped("aggregate_type", &self.columns[1].1, TEXT_TYPES, text)?;
        let (aggregate_id, _) = mapped("aggregate_id", &self.columns[2].1, TEXT_TYPES, text)?;
        let (event_type, _) = mapped("event_type", &self.columns[3].1, TEXT_TYPES, text)?;
        let optional = |key: &str| {
            self.optional
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, column)| column.clone())
        };
        let payload = match optional("payload") {
            None => None,
            Some(column) => {
                let (quoted, ty) = mapped(
                    "payload",
                    &column,
                    &["jsonb", "json", "text", "character varying", "bytea"],
                    "jsonb, json, text or bytea",
                )?;
                let kind = match ty.as_str() {
                    "jsonb" | "json" => PayloadKind::Json,
                    "bytea" => PayloadKind::Bytes,
                    _ => PayloadKind::Text,
                };
                Some((quoted, kind))
            }
        };
        let headers = optional("headers")
            .map(|column| mapped("headers", &column, &["jsonb"], "jsonb (an object)").map(|c| c.0))
            .transpose()?;
        let topic = optional("topic")
            .map(|column| mapped("topic", &column, TEXT_TYPES, text).map(|c| c.0))
            .transpose()?;
        let mut header_columns = Vec::new();
        for (header, column) in &self.header_columns {
            match type_of(column) {
                Some(_) => header_columns.push((header.clone(), quote(column))),
                None => {
                    return Err(config_error(
                        format!("outbox.header_columns.{header}"),
                        format!("{display} has no column `{column}`; name one of its columns"),
                    ));
                }
            }
        }
        let adopt = |what: &str| {
            super::StoreError::Schema(format!(
                "{display} has no {what} yet: run `outbox-relay migrate` to adopt it (`--dry-run` shows what it changes)"
            ))
        };
        for (column, ty) in BOOKKEEPING {
            if type_of(column) != Some(*ty) {
                return Err(adopt(&format!("column {column} ({ty})")));
            }
        }
        let taken: Vec<&str> = self.columns.iter().map(|(_, c)| c.as_str()).collect();
        let id = if type_of(ADOPTED_ID) == Some("bigint") {
            quote(ADOPTED_ID)
        } else if type_of("id") == Some("bigint") && !taken.contains(&"id") {
            quote("id")
        } else {
            return Err(adopt(&format!("ordering column {ADOPTED_ID} (bigint)")));
        };
        let created_at = if type_of(ADOPTED_CREATED_AT) == Some("timestamp with time zone") {
            quote(ADOPTED_CREATED_AT)
        } else if type_of("created_at") == Some("timestamp with time zone") {
            quote("created_at")
        } else {
            return Err(adopt(&format!(
                "column {ADOPTED_CREATED_AT} (timestamp with time zone)"
            )));
        };
        let shard = (type_of("shard") == Some("smallint")).then(|| quote("shard"));
        Ok(OutboxTable {
            name: self.quoted_name(),
            display,
            id,
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
            shard,
            pending_index: format!("{}.{}", quote(&self.schema), quote(&self.pending_index())),
        })
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
        let mut table = self.table.clone();
        while table.len() + suffix.len() > 63 {
            table.pop();
        }
        format!("{table}{suffix}")
    }
}
