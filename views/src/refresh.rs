//! One refresh of one view on the primary, and creating a missing view.
//!
//! A refresh is one transaction: take the view's advisory lock (`pg_try_advisory_xact_lock`, so a second
//! scheduled refresher — another gateway — gives up at once instead of queueing; REFRESH VIEW waits), skip if the history
//! already has a success for this slot, REFRESH (CONCURRENTLY when the view has a unique index and is
//! populated), count rows, and write the history row. The row commits with the new contents, so a replica
//! that has replayed the row has replayed the contents: that is how replicas' freshness is read. The partial
//! unique index on (view_name, slot) makes a second success for one slot impossible even if the locks were
//! somehow bypassed.

use crate::config::ViewSpec;
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::Client;

/// The gateway's own tables, views' history among them (the same idempotent SQL as the first migration).
pub const SCHEMA_SQL: &str = include_str!("../../migrations/0001_regiongate.sql");

/// The advisory lock key of a view: the same in every gateway, and distinct from other users' keys by prefix.
const LOCK_SQL: &str = "SELECT pg_try_advisory_xact_lock(hashtext('regiongate.view:' || $1))";
/// The same lock, waited for (an operator's REFRESH VIEW runs after a refresh in flight).
const WAIT_LOCK_SQL: &str =
    "SELECT true FROM pg_advisory_xact_lock(hashtext('regiongate.view:' || $1))";

/// What a refresh attempt did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Refreshed {
        rows: i64,
        took: Duration,
        concurrently: bool,
    },
    /// This slot has a successful refresh already (another gateway ran it).
    AlreadyDone,
    /// Another refresh of this view holds its lock now.
    Busy,
}

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("no view named {0:?} is configured")]
    UnknownView(String),
    #[error("cannot connect to the primary: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{}", describe(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error("reading the view's query: {0}")]
    QueryFile(#[from] std::io::Error),
}

impl RefreshError {
    /// The SQLSTATE a client of the admin console is told.
    pub fn sqlstate(&self) -> &str {
        match self {
            RefreshError::UnknownView(_) => "42P01",
            RefreshError::Pool(_) => "08006",
            RefreshError::Sql(e) => e.code().map(|c| c.code()).unwrap_or("XX000"),
            RefreshError::QueryFile(_) => "58030",
        }
    }
}

/// An error as an operator wants to read it: SQLSTATE and the server's message, or the connection failure.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => {
            use std::error::Error;
            match error.source() {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            }
        }
    }
}

/// Refreshes `view` for `slot`; `None` is an operator's REFRESH VIEW, which waits for a refresh in flight
/// instead of giving way to it. A failure is recorded in the history (after the failed transaction rolled
/// back) and returned.
pub async fn refresh(
    client: &mut Client,
    view: &ViewSpec,
    slot: Option<SystemTime>,
    gateway: &str,
) -> Result<Outcome, RefreshError> {
    let started = Instant::now();
    match attempt(client, view, slot, gateway, started).await {
        Ok(outcome) => Ok(outcome),
        Err(error) => {
            record_failure(client, view, slot, gateway, started, &error).await;
            Err(error)
        }
    }
}

/// Writes a failed attempt's history row. The attempt's transaction is gone, so this is a row of its own; if
/// even that fails (the primary is down), the error still reaches the log and the metric through the caller.
pub async fn record_failure(
    client: &Client,
    view: &ViewSpec,
    slot: Option<SystemTime>,
    gateway: &str,
    started: Instant,
    error: &RefreshError,
) {
    let _ = client
        .execute(
            "INSERT INTO regiongate.view_refreshes \
             (view_name, slot, gateway, started_at, finished_at, error) \
             VALUES ($1, $2, $3, clock_timestamp() - $4 * interval '1 microsecond', clock_timestamp(), $5)",
            &[
                &view.name,
                &slot,
                &gateway,
                &(started.elapsed().as_micros() as f64),
                &error.to_string(),
            ],
        )
        .await;
}

async fn attempt(
    client: &mut Client,
    view: &ViewSpec,
    slot: Option<SystemTime>,
    gateway: &str,
    started: Instant,
) -> Result<Outcome, RefreshError> {
    let transaction = client.transaction().await?;
    // SET LOCAL takes no parameters; the value is a number we format.
    transaction
        .batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            view.refresh_timeout.as_millis()
        ))
        .await?;
    // The wait is bounded by the statement timeout above.
    let lock = if slot.is_some() {
        LOCK_SQL
    } else {
        WAIT_LOCK_SQL
    };
    let locked: bool = transaction.query_one(lock, &[&view.name]).await?.get(0);
    if !locked {
        return Ok(Outcome::Busy);
    }
    if let Some(slot) = slot {
        let done = transaction
            .query_opt(
                "SELECT 1 FROM regiongate.view_refreshes \
                 WHERE view_name = $1 AND slot = $2 AND error IS NULL",
                &[&view.name, &slot],
            )
            .await?;
        if done.is_some() {
            return Ok(Outcome::AlreadyDone);
        }
    }
    let concurrently = can_refresh_concurrently(&transaction, view).await?;
    let name = view.quoted_name();
    let command = if concurrently {
        format!("REFRESH MATERIALIZED VIEW CONCURRENTLY {name}")
    } else {
        format!("REFRESH MATERIALIZED VIEW {name}")
    };
    transaction.batch_execute(&command).await?;
    let rows: i64 = transaction
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await?
        .get(0);
    // started_at is the transaction's start (now()): the refresh's snapshot is no older, so ages computed
    // from it are never too small.
    transaction
        .execute(
            "INSERT INTO regiongate.view_refreshes \
             (view_name, slot, gateway, started_at, finished_at, rows) \
             VALUES ($1, $2, $3, now(), clock_timestamp(), $4)",
            &[&view.name, &slot, &gateway, &rows],
        )
        .await?;
    // The history is for operators and freshness probes: a week of it is plenty, and a view refreshed every
    // second would otherwise add 600k rows a week.
    transaction
        .execute(
            "DELETE FROM regiongate.view_refreshes \
             WHERE view_name = $1 AND started_at < now() - interval '7 days'",
            &[&view.name],
        )
        .await?;
    transaction.commit().await?;
    Ok(Outcome::Refreshed {
        rows,
        took: started.elapsed(),
        concurrently,
    })
}

/// CONCURRENTLY needs a populated view with a unique index on plain columns and no predicate.
async fn can_refresh_concurrently(
    transaction: &tokio_postgres::Transaction<'_>,
    view: &ViewSpec,
) -> Result<bool, tokio_postgres::Error> {
    let row = transaction
        .query_opt(
            "SELECT c.relispopulated AND EXISTS (
                 SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
                 AND i.indpred IS NULL AND i.indexprs IS NULL)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'm'",
            &[&view.schema(), &view.relation()],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get::<_, Option<bool>>(0) == Some(true)))
}

/// Creates the view if it does not exist (with its unique index when `unique_key` is given), under the view's
/// advisory lock so that gateways starting together do not race. Creating counts as a refresh: it writes a
/// history row. Returns whether it created the view; a view without a query that does not exist is an error.
pub async fn ensure_exists(
    client: &mut Client,
    view: &ViewSpec,
    gateway: &str,
) -> Result<bool, RefreshError> {
    let query = view.defining_query()?;
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('regiongate.view:' || $1))",
            &[&view.name],
        )
        .await?;
    let exists = transaction
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'm'",
            &[&view.schema(), &view.relation()],
        )
        .await?
        .is_some();
    let name = view.quoted_name();
    if !exists {
        let Some(query) = query else {
            // Let PostgreSQL say it: 42P01 relation does not exist.
            transaction
                .batch_execute(&format!("SELECT FROM {name} LIMIT 0"))
                .await?;
            return Ok(false);
        };
        let query = query.trim().trim_end_matches(';');
        transaction
            .batch_execute(&format!(
                "CREATE MATERIALIZED VIEW {name} AS {query} WITH DATA"
            ))
            .await?;
    }
    if !view.unique_key.is_empty() {
        let index = format!("\"{}_regiongate_key\"", view.relation());
        let columns = view
            .unique_key
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        transaction
            .batch_execute(&format!(
                "CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {name} ({columns})"
            ))
            .await?;
    }
    if !exists {
        let record = format!(
            "INSERT INTO regiongate.view_refreshes (view_name, gateway, started_at, finished_at, rows) \
             SELECT $1, $2, now(), clock_timestamp(), count(*) FROM {name}"
        );
        transaction
            .execute(&record, &[&view.name, &gateway])
            .await?;
    }
    transaction.commit().await?;
    Ok(!exists)
}
