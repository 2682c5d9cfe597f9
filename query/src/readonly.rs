//! Which statements may run: the SQL surface is read-only on every entry point.
//!
//! Allowed: queries (`SELECT`, `WITH`, `VALUES`) without `INTO`, `EXPLAIN` of those,
//! `SHOW …`, `DESCRIBE`, and — on the Postgres wire only, where drivers send them —
//! transaction brackets, cursors over queries and Postgres session settings such as
//! `SET application_name` that change nothing on the server. Everything else (DDL, DML,
//! `COPY … TO`, `CREATE EXTERNAL TABLE`, `SET datafusion.*`, …) is refused.

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Query, Set, SetExpr, Statement};

/// Where a statement arrived, since Postgres drivers need a few session statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Http,
    Postgres,
}

/// A refused statement, with a message that says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("meshscope SQL is read-only: {what} is not allowed (use SELECT, WITH, EXPLAIN or SHOW)")]
pub struct ReadOnly {
    pub what: String,
}

fn refuse(what: impl Into<String>) -> Result<(), ReadOnly> {
    Err(ReadOnly { what: what.into() })
}

fn first_words(s: &str, n: usize) -> String {
    s.split_whitespace()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

fn check_query(q: &Query) -> Result<(), ReadOnly> {
    if let SetExpr::Select(s) = q.body.as_ref()
        && s.into.is_some()
    {
        return refuse("SELECT … INTO");
    }
    Ok(())
}

/// Postgres session settings a driver may send; they affect only the connection.
const PG_SESSION_SETTINGS: &[&str] = &[
    "application_name",
    "bytea_output",
    "client_encoding",
    "client_min_messages",
    "datestyle",
    "extra_float_digits",
    "intervalstyle",
    "search_path",
    "statement_timeout",
    "standard_conforming_strings",
];

/// Checks one parsed SQL statement.
pub fn check(stmt: &Statement, surface: Surface) -> Result<(), ReadOnly> {
    match stmt {
        Statement::Query(q) => check_query(q),
        Statement::Explain { statement, .. } => check(statement, surface),
        Statement::ExplainTable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowSchemas { .. } => Ok(()),
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
            if surface == Surface::Postgres =>
        {
            Ok(())
        }
        Statement::Declare { stmts, .. } if surface == Surface::Postgres => {
            for d in stmts {
                if let Some(q) = &d.for_query {
                    check_query(q)?;
                }
            }
            Ok(())
        }
        Statement::Fetch { .. } | Statement::Close { .. } if surface == Surface::Postgres => Ok(()),
        Statement::Set(set) if surface == Surface::Postgres => match set {
            Set::SingleAssignment { variable, .. } => {
                let name = variable.to_string().to_lowercase();
                if PG_SESSION_SETTINGS.contains(&name.as_str()) {
                    Ok(())
                } else {
                    refuse(format!("SET {name}"))
                }
            }
            Set::SetTimeZone { .. } | Set::SetNames { .. } | Set::SetNamesDefault {} => Ok(()),
            other => refuse(first_words(&other.to_string(), 2)),
        },
        other => refuse(first_words(&other.to_string(), 2)),
    }
}

/// Checks a statement parsed by DataFusion's parser (which adds `COPY`, `CREATE EXTERNAL
/// TABLE` and friends to the SQL standard ones).
pub fn check_df(stmt: &DfStatement, surface: Surface) -> Result<(), ReadOnly> {
    match stmt {
        DfStatement::Statement(s) => check(s, surface),
        DfStatement::Explain(e) => check_df(&e.statement, surface),
        DfStatement::CreateExternalTable(_) => refuse("CREATE EXTERNAL TABLE"),
        DfStatement::CopyTo(_) => refuse("COPY … TO"),
        DfStatement::Reset(_) => refuse("RESET"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn verdict(sql: &str, surface: Surface) -> Result<(), ReadOnly> {
        let stmts = DFParser::parse_sql(sql).expect("parses");
        stmts.iter().try_for_each(|s| check_df(s, surface))
    }

    #[test]
    fn reads_pass() {
        for sql in [
            "SELECT 1",
            "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
            "EXPLAIN SELECT * FROM spans",
            "SHOW TABLES",
            "SHOW COLUMNS FROM spans",
            "SELECT span_attributes['http.route'] FROM spans",
        ] {
            assert_eq!(verdict(sql, Surface::Http), Ok(()), "{sql}");
        }
    }

    #[test]
    fn writes_are_refused_everywhere() {
        for sql in [
            "CREATE TABLE t (a INT)",
            "CREATE TABLE t AS SELECT 1",
            "CREATE VIEW v AS SELECT 1",
            "INSERT INTO spans SELECT * FROM spans",
            "DELETE FROM spans",
            "UPDATE spans SET span_name = 'x'",
            "DROP TABLE spans",
            "COPY spans TO '/tmp/x.parquet'",
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc'",
            "SET datafusion.execution.batch_size = 1",
            "SELECT * INTO t FROM spans",
            "EXPLAIN INSERT INTO spans SELECT * FROM spans",
            "ALTER TABLE spans ADD COLUMN x INT",
            "TRUNCATE spans",
        ] {
            for surface in [Surface::Http, Surface::Postgres] {
                let v = verdict(sql, surface);
                let err = v.expect_err("must be refused");
                assert!(
                    err.to_string().contains("read-only"),
                    "{sql} on {surface:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn driver_session_statements_pass_only_on_the_postgres_wire() {
        for sql in [
            "SET application_name = 'psql'",
            "SET extra_float_digits = 3",
            "BEGIN",
            "COMMIT",
            "SET TIME ZONE 'UTC'",
        ] {
            assert_eq!(verdict(sql, Surface::Postgres), Ok(()), "{sql}");
            assert!(verdict(sql, Surface::Http).is_err(), "{sql} over HTTP");
        }
    }
}
