//! `regiongate migrate`: applies the `*.sql` files of a folder in name order, each in its own transaction, and
//! records each one's name and SHA-256 in `regiongate.migrations`. A file that was applied and has changed since
//! stops everything before anything runs: the database no longer matches the files, and an operator must
//! decide (restore the file, or write a new migration).

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio_postgres::Client;

const BOOTSTRAP_SQL: &str = "SET client_min_messages = warning;
CREATE SCHEMA IF NOT EXISTS regiongate;
CREATE TABLE IF NOT EXISTS regiongate.migrations (
    name text PRIMARY KEY,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);";

/// Why `migrate` stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    // Not `source`: the I/O error would be printed twice, as this error's text and as its cause.
    #[error("cannot read migrations from {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{name} was applied with checksum {applied} but the file now has {now}: it was edited after it ran. \
         Restore it, and put the change in a new migration"
    )]
    Edited {
        name: String,
        applied: String,
        now: String,
    },
    #[error("{name}: {}", crate::refresh::describe(source))]
    Apply {
        name: String,
        source: tokio_postgres::Error,
    },
    #[error("{}", crate::refresh::describe(.0))]
    Database(#[from] tokio_postgres::Error),
}

/// A migration file.
#[derive(Debug, Clone)]
pub struct Migration {
    pub name: String,
    pub checksum: String,
    pub sql: String,
}

/// The folder's `*.sql` files in name order, with their checksums.
pub fn read_dir(dir: &Path) -> Result<Vec<Migration>, MigrateError> {
    let read_error = |error| MigrateError::Read {
        path: dir.to_path_buf(),
        error,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_error)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let sql = std::fs::read_to_string(&path).map_err(|error| MigrateError::Read {
                path: path.clone(),
                error,
            })?;
            Ok(Migration {
                name: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                checksum: checksum(&sql),
                sql,
            })
        })
        .collect()
}

fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies the pending migrations of `dir`; returns the names applied. Concurrent runs wait for each other
/// (a session advisory lock), so two deploys cannot apply one file twice.
pub async fn run(client: &mut Client, dir: &Path) -> Result<Vec<String>, MigrateError> {
    let migrations = read_dir(dir)?;
    client.batch_execute(BOOTSTRAP_SQL).await?;
    client
        .execute(
            "SELECT pg_advisory_lock(hashtext('regiongate.migrate'))",
            &[],
        )
        .await?;
    let result = apply(client, &migrations).await;
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock(hashtext('regiongate.migrate'))",
            &[],
        )
        .await;
    result
}

async fn apply(client: &mut Client, migrations: &[Migration]) -> Result<Vec<String>, MigrateError> {
    let applied: Vec<(String, String)> = client
        .query("SELECT name, checksum FROM regiongate.migrations", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Check every applied file first: an edited one stops the run before anything is applied.
    for migration in migrations {
        if let Some((_, sum)) = applied.iter().find(|(name, _)| *name == migration.name) {
            if *sum != migration.checksum {
                return Err(MigrateError::Edited {
                    name: migration.name.clone(),
                    applied: sum.clone(),
                    now: migration.checksum.clone(),
                });
            }
        }
    }
    let mut done = Vec::new();
    for migration in migrations {
        if applied.iter().any(|(name, _)| *name == migration.name) {
            continue;
        }
        let apply_error = |source| MigrateError::Apply {
            name: migration.name.clone(),
            source,
        };
        let transaction = client.transaction().await.map_err(apply_error)?;
        transaction
            .batch_execute(&migration.sql)
            .await
            .map_err(apply_error)?;
        transaction
            .execute(
                "INSERT INTO regiongate.migrations (name, checksum) VALUES ($1, $2)",
                &[&migration.name, &migration.checksum],
            )
            .await
            .map_err(apply_error)?;
        transaction.commit().await.map_err(apply_error)?;
        tracing::info!(migration = %migration.name, "migration applied");
        done.push(migration.name.clone());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_read_in_name_order_with_checksums() {
        let dir = std::env::temp_dir().join(format!("views-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0002_b.sql"), "SELECT 2;").unwrap();
        std::fs::write(dir.join("0001_a.sql"), "SELECT 1;").unwrap();
        std::fs::write(dir.join("notes.txt"), "not a migration").unwrap();
        let found = read_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["0001_a.sql", "0002_b.sql"]);
        assert_eq!(found[0].checksum.len(), 64);
        assert_ne!(found[0].checksum, found[1].checksum);
    }
}
