//! Database errors, each able to say whether retrying can help, with a bounded `kind`
//! label for metrics.

/// Database errors, each able to say whether retrying can help. The display carries the
/// database's own message once; there is no source chain to repeat it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unreachable or connection lost: {0}")]
    Connection(sqlx::Error),
    /// A connection could not be opened, with the reason PostgreSQL or the network gave.
    #[error("cannot connect to PostgreSQL {target}: {cause}")]
    Unreachable {
        /// `at host:port, database d, as user u`.
        target: String,
        cause: String,
        /// Whether waiting can help (a server down or restarting, not a wrong password).
        retriable: bool,
    },
    #[error(
        "database refused the statement (SQLSTATE {code}): {message}{}",
        privilege_hint(code)
    )]
    Statement { code: String, message: String },
    #[error(
        "the outbox table is missing or incomplete ({0}); run `outbox-relay migrate`, or set database.schema to the schema holding it and grant the relay's role USAGE on that schema"
    )]
    Schema(String),
    /// `[outbox]` names a table or column the catalog does not have, or of a type the
    /// relay cannot use: a configuration error (exit 2), named by its key.
    #[error("invalid configuration: `{key}`: {message}")]
    Config { key: String, message: String },
    #[error("database error: {0}")]
    Other(sqlx::Error),
}

/// What to do about a refused privilege (SQLSTATE 42501): which role each command runs as.
fn privilege_hint(code: &str) -> &'static str {
    if code == "42501" {
        ": the connected role lacks this privilege. deploy/sql/least-privilege.sql grants the relay's role what `run` needs, and the operator role (-v operator_role=...) what `status`, `parked`, `where`, `verify` and `prune` need; `migrate` runs as the tables' owner"
    } else {
        ""
    }
}

impl StoreError {
    /// Whether waiting and reconnecting can fix it (lost connections, restarts, failover,
    /// timeouts, serialization failures).
    pub(crate) fn is_retriable(&self) -> bool {
        match self {
            StoreError::Connection(_) => true,
            StoreError::Unreachable { retriable, .. } => *retriable,
            StoreError::Statement { code, .. } => {
                // 08: connection exception, 25006: read-only (failover), 40: rollback,
                // 53: insufficient resources, 57: operator intervention (restart,
                // statement_timeout as 57014), 58: system error.
                ["08", "40", "53", "57", "58"]
                    .iter()
                    .any(|c| code.starts_with(c))
                    || code == "25006"
            }
            StoreError::Schema(_) | StoreError::Config { .. } => false,
            StoreError::Other(_) => false,
        }
    }

    /// Bounded label for metrics.
    /// Bounded label for metrics; one of [`ERROR_KINDS`].
    /// A column the statement names is missing, or the role may not use it (SQLSTATE 42703,
    /// 42P01, 42501): what an optional column does when a schema or a grant goes back.
    pub(crate) fn is_missing_column_or_grant(&self) -> bool {
        match self {
            StoreError::Schema(_) => true,
            StoreError::Statement { code, .. } => code == "42501",
            _ => false,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Connection(_) | StoreError::Unreachable { .. } => "connection",
            StoreError::Statement { code, .. } if code == "25006" => "read_only",
            StoreError::Statement { code, .. } if code == "57014" => "statement_timeout",
            StoreError::Statement { code, .. } if code.starts_with("57") => "server_shutdown",
            StoreError::Statement { code, .. } if code.starts_with("42") => "schema",
            StoreError::Statement { .. } => "statement",
            StoreError::Schema(_) | StoreError::Config { .. } => "schema",
            StoreError::Other(_) => "other",
        }
    }
}

/// Every label [`StoreError::kind`] can return.
pub(crate) const ERROR_KINDS: &[&str] = &[
    "connection",
    "read_only",
    "statement_timeout",
    "server_shutdown",
    "schema",
    "statement",
    "other",
];

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Connection(err),
            sqlx::Error::Database(db) => match db.code() {
                Some(code) if code == "42P01" || code == "42703" => {
                    StoreError::Schema(db.message().to_string())
                }
                Some(code) => StoreError::Statement {
                    code: code.into_owned(),
                    message: db.message().to_string(),
                },
                None => StoreError::Other(err),
            },
            _ => StoreError::Other(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_privilege_says_which_role_runs_which_command() {
        let refused = StoreError::Statement {
            code: "42501".into(),
            message: "permission denied for table outbox".into(),
        };
        let text = refused.to_string();
        assert!(
            text.contains("permission denied for table outbox"),
            "{text}"
        );
        assert!(text.contains("operator role"), "{text}");
        let other = StoreError::Statement {
            code: "23505".into(),
            message: "duplicate key".into(),
        };
        assert!(!other.to_string().contains("operator role"));
    }
}
