//! Insert batching against real PostgreSQL: many clients' single-row INSERTs become multi-row statements, each
//! client is answered with exactly its own outcome, and nothing acknowledged is lost.
//!
//! Several tests hold a table lock from a direct session so that a batch in flight waits on the primary: rows
//! arriving meanwhile must queue, which makes "these rows share a batch" deterministic instead of a race.

mod common;

use common::{direct, sqlstate, PASSWORD};
use regiongate::metrics::METRICS;
use std::sync::Arc;
use std::time::Duration;

fn batched(table: &str, outcome: &str) -> u64 {
    METRICS
        .batched_rows
        .with_label_values(&[table, outcome])
        .get()
}

/// Batches of `table` that ended with `outcome`, however they were sent.
fn batches(table: &str, outcome: &str) -> u64 {
    ["values", "copy_text", "copy_binary"]
        .iter()
        .map(|form| batches_as(table, form, outcome))
        .sum()
}

fn batches_as(table: &str, form: &str, outcome: &str) -> u64 {
    METRICS
        .batches
        .with_label_values(&[table, form, outcome])
        .get()
}

/// A gateway batching `table` (created with `columns`) in a fresh database. Every row is queued (`alone:
/// false`) unless `extra` says otherwise: most tests here are about what happens to rows in batches.
async fn batching_gateway(table: &str, columns: &str, extra: &str) -> common::TestGateway {
    let alone = if extra.contains("alone:") {
        ""
    } else {
        "  alone: false\n"
    };
    let gw = common::gateway(
        "batch",
        &format!("batching:\n  tables: [{table}]\n{alone}{extra}"),
    )
    .await;
    let owner = gw.connect().await;
    owner
        .batch_execute(&format!("CREATE TABLE {table} ({columns})"))
        .await
        .unwrap();
    gw
}

/// Waits until `rows` rows are queued (not yet in a batch) at the gateway.
async fn queued(gw: &common::TestGateway, rows: usize) {
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            gw.shared.batcher.queued() >= rows
        })
        .await,
        "expected {rows} queued rows, have {}",
        gw.shared.batcher.queued()
    );
}

/// A direct session holding a lock that makes inserts into `table` wait.
async fn lock_table(database: &str, table: &str) -> tokio_postgres::Client {
    let locker = direct(database).await;
    locker
        .batch_execute(&format!("BEGIN; LOCK TABLE {table} IN SHARE MODE"))
        .await
        .unwrap();
    locker
}

/// Waits until `n` sessions of `database` wait on a lock.
async fn lock_waiters(database: &str, n: i64) {
    let observer = direct(database).await;
    let waiting = || async {
        observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                &[&database],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert!(
        common::eventually(Duration::from_secs(10), || async { waiting().await >= n }).await,
        "expected {n} inserts waiting on the lock, have {}",
        waiting().await
    );
}

/// Waits until a batch is blocked on the lock, and returns its backend's pid.
async fn blocked_flush(database: &str) -> i32 {
    let observer = direct(database).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = observer
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                &[&database],
            )
            .await
            .unwrap();
        if let Some(row) = rows.first() {
            return row.get(0);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no batch waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_each_insert_a_thousand_rows_exactly_once_in_both_protocols() {
    let table = "events_many";
    let gw = batching_gateway(
        table,
        "id bigserial, client int NOT NULL, seq int NOT NULL, protocol text NOT NULL, note text",
        "  alone: true\n",
    )
    .await;
    const CLIENTS: i32 = 64;
    const ROWS: i32 = 1000;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let config = gw.config();
        tasks.push(tokio::spawn(async move {
            let db = common::connect(&config).await;
            let mut acks = 0u64;
            let note = |seq: i32| format!("it's row {seq}\tof {client}\n");
            let quoted = |seq: i32| note(seq).replace('\'', "''");
            let simple = |sql: String| {
                let db = &db;
                async move {
                    let mut n = 0;
                    for answer in db.simple_query(&sql).await.unwrap() {
                        if let tokio_postgres::SimpleQueryMessage::CommandComplete(rows) = answer {
                            n += rows;
                        }
                    }
                    n
                }
            };
            match client % 4 {
                // Extended protocol, binary parameters (tokio-postgres's choice), a literal in the row: a
                // multi-row INSERT.
                0 => {
                    let insert = db
                        .prepare(
                            "INSERT INTO events_many (client, seq, protocol, note) VALUES ($1, $2, 'extended', $3)",
                        )
                        .await
                        .unwrap();
                    for seq in 0..ROWS {
                        acks += db.execute(&insert, &[&client, &seq, &note(seq)]).await.unwrap();
                    }
                }
                // Extended protocol, one parameter per column: binary COPY.
                2 => {
                    let insert = db
                        .prepare(
                            "INSERT INTO events_many (client, seq, protocol, note) VALUES ($1, $2, $3, $4)",
                        )
                        .await
                        .unwrap();
                    for seq in 0..ROWS {
                        acks += db
                            .execute(&insert, &[&client, &seq, &"extended", &note(seq)])
                            .await
                            .unwrap();
                    }
                }
                // Simple protocol with a number: a multi-row INSERT.
                1 => {
                    for seq in 0..ROWS {
                        acks += simple(format!(
                            "INSERT INTO events_many (client, seq, protocol, note) VALUES ({client}, {seq}, 'simple', '{}')",
                            quoted(seq)
                        ))
                        .await;
                    }
                }
                // Simple protocol, only quoted strings: text COPY.
                _ => {
                    for seq in 0..ROWS {
                        acks += simple(format!(
                            "insert into EVENTS_MANY (client, seq, protocol, note) values ('{client}', '{seq}', 'simple', '{}');",
                            quoted(seq)
                        ))
                        .await;
                    }
                }
            }
            acks
        }));
    }
    for task in tasks {
        assert_eq!(
            task.await.unwrap(),
            ROWS as u64,
            "every row acknowledged once"
        );
    }
    let check = direct(&gw.database).await;
    let row = check
        .query_one(
            "SELECT count(*), count(DISTINCT (client, seq)), \
                    count(*) FILTER (WHERE note = format(E'it''s row %s\tof %s\n', seq, client)), \
                    count(*) FILTER (WHERE protocol = CASE WHEN client % 2 = 0 THEN 'extended' ELSE 'simple' END) \
             FROM events_many",
            &[],
        )
        .await
        .unwrap();
    let total = (CLIENTS * ROWS) as i64;
    assert_eq!(row.get::<_, i64>(0), total, "every row present");
    assert_eq!(row.get::<_, i64>(1), total, "no row twice");
    assert_eq!(row.get::<_, i64>(2), total, "values intact");
    assert_eq!(
        row.get::<_, i64>(3),
        total,
        "each row from its own protocol"
    );
    let rows = batched(table, "committed");
    let count = batches(table, "committed");
    let alone = batched(table, "alone");
    assert_eq!(
        rows + alone,
        total as u64,
        "every row went through batching ({alone} of them alone)"
    );
    assert!(
        alone > 0,
        "no row ran alone, not even the first of its kind"
    );
    for form in ["values", "copy_text", "copy_binary"] {
        assert!(
            batches_as(table, form, "committed") > 0,
            "no batch as {form}"
        );
    }
    assert!(
        rows >= 3 * count,
        "batches were small: {rows} rows in {count} batches"
    );
    eprintln!(
        "{rows} rows in {count} batches ({:.1} rows per batch)",
        rows as f64 / count as f64
    );
}

/// One client's row violates a unique constraint in a batch with nine others: only that client gets 23505.
async fn a_violation_fails_only_its_own_row(simple: bool) {
    let table = if simple { "dup_simple" } else { "dup_extended" };
    let gw = batching_gateway(
        table,
        "id int PRIMARY KEY, note text",
        "  connections: 1\n  max_delay: 5s\n",
    )
    .await;
    let check = direct(&gw.database).await;
    check
        .execute(
            &format!("INSERT INTO {table} VALUES (7, 'there first')"),
            &[],
        )
        .await
        .unwrap();
    // Connect (and prepare) first: preparing an INSERT takes the lock the test is about to hold.
    let mut clients = Vec::new();
    for id in [100].into_iter().chain(1..=10) {
        let db = gw.connect().await;
        let statement = if simple {
            None
        } else {
            Some(
                db.prepare(&format!("INSERT INTO {table} (id, note) VALUES ($1, $2)"))
                    .await
                    .unwrap(),
            )
        };
        clients.push((id, db, statement));
    }
    let locker = lock_table(&gw.database, table).await;
    let mut clients = clients.into_iter();
    let mut insert = || {
        let (id, db, statement) = clients.next().unwrap();
        tokio::spawn(async move {
            match statement {
                None => db
                    .simple_query(&format!(
                        "INSERT INTO {table} (id, note) VALUES ({id}, 'row {id}')"
                    ))
                    .await
                    .map(|_| ()),
                Some(statement) => db
                    .execute(&statement, &[&id, &format!("row {id}")])
                    .await
                    .map(|_| ()),
            }
        })
    };
    // The first row's batch waits on the lock; the next ten queue behind it as one batch.
    let first = insert();
    blocked_flush(&gw.database).await;
    let rest: Vec<_> = (1..=10).map(|_| insert()).collect();
    queued(&gw, 10).await;
    locker.batch_execute("COMMIT").await.unwrap();
    first.await.unwrap().unwrap();
    for (id, task) in (1..=10).zip(rest) {
        match task.await.unwrap() {
            Ok(()) => assert_ne!(id, 7, "the duplicate was accepted"),
            Err(error) => {
                assert_eq!(id, 7, "row {id} failed: {error}");
                assert_eq!(sqlstate(&error), "23505");
                let db_error = error.as_db_error().unwrap();
                assert_eq!(db_error.detail(), Some("Key (id)=(7) already exists."));
            }
        }
    }
    let rows: Vec<(i32, String)> = check
        .query(&format!("SELECT id, note FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut expected: Vec<(i32, String)> = (1..=10)
        .map(|id| {
            let note = if id == 7 {
                "there first".to_string()
            } else {
                format!("row {id}")
            };
            (id, note)
        })
        .collect();
    expected.push((100, "row 100".into()));
    assert_eq!(rows, expected);
    assert_eq!(batches(table, "one_by_one"), 1, "one batch failed");
    assert_eq!(batched(table, "one_by_one"), 10, "its ten rows ran alone");
    assert_eq!(batched(table, "committed"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_violation_in_a_batch_fails_only_its_client_simple_protocol() {
    a_violation_fails_only_its_own_row(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_violation_in_a_batch_fails_only_its_client_extended_protocol() {
    a_violation_fails_only_its_own_row(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_protocol_text_parameters_are_copied_as_text() {
    let table = "events_text";
    let gw = batching_gateway(table, "client int, n int, note text", "").await;
    let script = std::env::temp_dir().join(format!("regiongate-batch-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set n random(1, 1000000)\nINSERT INTO events_text (client, n, note) VALUES (:client_id, :n, :note);\n",
    )
    .unwrap();
    let output = common::pgbench(
        gw.addr.port(),
        &gw.database,
        &[
            "-n",
            "-M",
            "extended",
            "-c",
            "8",
            "-t",
            "200",
            "-D",
            "note=tab\there back\\slash",
            "-f",
            script.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(&script);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row = direct(&gw.database)
        .await
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE note = $1), count(DISTINCT client) FROM events_text",
            &[&"tab\there back\\slash"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1600);
    assert_eq!(row.get::<_, i64>(1), 1600, "values intact");
    assert_eq!(row.get::<_, i64>(2), 8);
    assert_eq!(batched(table, "committed"), 1600);
    assert_eq!(
        batches_as(table, "copy_text", "committed"),
        batches(table, "committed"),
        "text parameters one per column go out as text COPY"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_returning_on_conflict_and_other_tables_are_not_batched() {
    let table = "events_pass";
    let gw = batching_gateway(table, "id serial PRIMARY KEY, note text", "").await;
    let db = gw.connect().await;
    db.batch_execute("CREATE TABLE not_listed (id serial PRIMARY KEY, note text)")
        .await
        .unwrap();
    // Inside a transaction: rolled back with it, so it was never committed on its own.
    db.batch_execute("BEGIN; INSERT INTO events_pass (note) VALUES ('rolled back'); ROLLBACK")
        .await
        .unwrap();
    db.batch_execute("BEGIN").await.unwrap();
    db.execute(
        "INSERT INTO events_pass (note) VALUES ($1)",
        &[&"in a transaction"],
    )
    .await
    .unwrap();
    db.batch_execute("ROLLBACK").await.unwrap();
    // RETURNING answers with the row.
    let id: i32 = db
        .query_one(
            "INSERT INTO events_pass (note) VALUES ('returning') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.execute(
        "INSERT INTO events_pass (id, note) VALUES ($1, 'conflict') ON CONFLICT DO NOTHING",
        &[&id],
    )
    .await
    .unwrap();
    db.execute("INSERT INTO not_listed (note) VALUES ($1)", &[&"elsewhere"])
        .await
        .unwrap();
    let notes: Vec<String> = db
        .query("SELECT note FROM events_pass ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(notes, vec!["returning"]);
    for outcome in ["committed", "one_by_one", "lost"] {
        assert_eq!(batched(table, outcome), 0, "{outcome}");
        assert_eq!(batched("not_listed", outcome), 0, "{outcome}");
    }
    // The same table, autocommit and without RETURNING, is batched: the counter above could have moved.
    db.execute("INSERT INTO events_pass (note) VALUES ($1)", &[&"batched"])
        .await
        .unwrap();
    assert_eq!(batched(table, "committed"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_keep_the_session_settings_they_were_written_under() {
    let table = "events_tz";
    let gw = batching_gateway(table, "client text, at timestamptz", "").await;
    let mut tasks = Vec::new();
    for zone in ["UTC", "Asia/Kolkata", "America/New_York"] {
        let config = gw.config();
        tasks.push(tokio::spawn(async move {
            let db = common::connect(&config).await;
            db.batch_execute(&format!("SET TimeZone = '{zone}'"))
                .await
                .unwrap();
            for _ in 0..50 {
                db.simple_query(&format!(
                    "INSERT INTO events_tz VALUES ('{zone}', '2026-01-01 12:00')"
                ))
                .await
                .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let check = direct(&gw.database).await;
    let rows = check
        .query(
            "SELECT client, count(*), min(at AT TIME ZONE client)::text, max(at AT TIME ZONE client)::text \
             FROM events_tz GROUP BY client ORDER BY client",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        let zone: String = row.get(0);
        assert_eq!(row.get::<_, i64>(1), 50, "{zone}");
        assert_eq!(row.get::<_, String>(2), "2026-01-01 12:00:00", "{zone}");
        assert_eq!(row.get::<_, String>(3), "2026-01-01 12:00:00", "{zone}");
    }
    assert_eq!(batched(table, "committed"), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_primary_connection_mid_flush_loses_no_acknowledged_row() {
    let table = "events_lost";
    let gw = batching_gateway(
        table,
        "client int NOT NULL, seq int NOT NULL",
        "  connections: 1\n",
    )
    .await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Connect and prepare first (preparing an INSERT takes the lock the test is about to hold).
    let mut clients = Vec::new();
    for client in 0..8i32 {
        let db = gw.connect().await;
        let insert = db
            .prepare("INSERT INTO events_lost (client, seq) VALUES ($1, $2)")
            .await
            .unwrap();
        clients.push((client, db, insert));
    }
    let locker = lock_table(&gw.database, table).await;
    let mut tasks = Vec::new();
    for (client, db, insert) in clients {
        let (acked, failed) = (acked.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            for seq in 0..100i32 {
                match db.execute(&insert, &[&client, &seq]).await {
                    Ok(_) => acked.lock().unwrap().push((client, seq)),
                    Err(error) => failed.lock().unwrap().push((client, seq, sqlstate(&error))),
                }
            }
        }));
    }
    // A batch waits on the lock; kill the connection it runs on, then let the rest go.
    let pid = blocked_flush(&gw.database).await;
    let killer = direct(&gw.database).await;
    killer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    locker.batch_execute("COMMIT").await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(!failed.is_empty(), "no client saw the lost connection");
    assert!(
        failed.iter().all(|(_, _, code)| code == "08006"),
        "{failed:?}"
    );
    let present: std::collections::HashSet<(i32, i32)> = direct(&gw.database)
        .await
        .query("SELECT client, seq FROM events_lost", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let acked = acked.lock().unwrap().clone();
    for row in &acked {
        assert!(present.contains(row), "acknowledged row {row:?} is missing");
    }
    // The killed batch was not committed, so its rows are absent (and none is there twice: the set above
    // would hide that, so count too).
    let total: i64 = direct(&gw.database)
        .await
        .query_one("SELECT count(*) FROM events_lost", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total as usize, present.len(), "a row was inserted twice");
    assert_eq!(acked.len() + failed.len(), 800);
    assert_eq!(present.len(), acked.len(), "{failed:?}");
    assert_eq!(batches(table, "lost"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_its_batch_forms_inserts_nothing() {
    let table = "events_gone";
    let gw = batching_gateway(table, "note text", "  connections: 1\n").await;
    let locker = lock_table(&gw.database, table).await;
    // Both rows come from psql, so that they share a batch key (the same session settings).
    let psql = |note: &str| {
        std::process::Command::new("psql")
            .env("PGPASSWORD", PASSWORD)
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &gw.addr.port().to_string(),
            ])
            .args(["-U", &gw.database, "-d", &gw.database])
            .args(["-c", &format!("INSERT INTO events_gone VALUES ('{note}')")])
            .spawn()
            .unwrap()
    };
    let mut first = psql("stays");
    blocked_flush(&gw.database).await;
    // The second INSERT queues behind the blocked batch; then its psql is killed.
    let mut leaver = psql("left");
    queued(&gw, 1).await;
    leaver.kill().unwrap();
    let _ = leaver.wait();
    // Give the gateway a moment to see the closed socket before the queue moves.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            gw.shared.clients.list().len() == 1
        })
        .await
    );
    locker.batch_execute("COMMIT").await.unwrap();
    assert!(first.wait().unwrap().success());
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            gw.shared.batcher.queued() == 0
        })
        .await
    );
    let notes: Vec<String> = direct(&gw.database)
        .await
        .query("SELECT note FROM events_gone", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(notes, vec!["stays"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_new_inserts_wait_and_drops_none() {
    let table = "events_full";
    let gw = batching_gateway(
        table,
        "n int",
        "  connections: 1\n  max_rows: 1\n  max_queued_rows: 2\n",
    )
    .await;
    let full_before = METRICS.batch_queue_full.get();
    let locker = lock_table(&gw.database, table).await;
    let insert = |n: i32| {
        let config = gw.config();
        tokio::spawn(async move {
            let db = common::connect(&config).await;
            db.simple_query(&format!("INSERT INTO events_full VALUES ({n})"))
                .await
                .map(|_| ())
        })
    };
    // One row's batch waits on the lock and one row is queued: the queue is full, so the next five wait.
    let first = insert(0);
    blocked_flush(&gw.database).await;
    let second = insert(1);
    queued(&gw, 1).await;
    let waiting: Vec<_> = (2..7).map(insert).collect();
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            METRICS.batch_queue_full.get() >= full_before + 5
        })
        .await,
        "inserts did not wait for room"
    );
    assert_eq!(
        gw.shared.batcher.queued(),
        1,
        "the queue grew past its bound"
    );
    locker.batch_execute("COMMIT").await.unwrap();
    for task in [first, second].into_iter().chain(waiting) {
        task.await.unwrap().unwrap();
    }
    let count: i64 = direct(&gw.database)
        .await
        .query_one("SELECT count(DISTINCT n) FROM events_full", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 7);
}

/// A client alone runs its rows on its own connection, as without batching: nothing is queued for it. Past
/// `connections` rows of a kind running at once, rows queue, and batches form behind the batch in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_client_runs_its_rows_alone_and_a_crowd_still_batches() {
    let table = "events_alone";
    let gw = batching_gateway(
        table,
        "n int NOT NULL",
        "  alone: true\n  connections: 2\n  max_delay: 60s\n",
    )
    .await;
    let lone = gw.connect().await;
    for n in 0..20 {
        lone.simple_query(&format!("INSERT INTO {table} VALUES ({n})"))
            .await
            .unwrap();
    }
    assert_eq!(batched(table, "alone"), 20);
    assert_eq!(
        batches(table, "committed"),
        0,
        "a lone client's rows were queued"
    );
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(gw.connect().await);
    }
    let locker = lock_table(&gw.database, table).await;
    let mut clients = clients.into_iter();
    let mut tasks = Vec::new();
    let mut insert = |n: i32| {
        let db = clients.next().unwrap();
        tasks.push(tokio::spawn(async move {
            db.simple_query(&format!("INSERT INTO {table} VALUES ({n})"))
                .await
                .map(|_| ())
        }));
    };
    // Two rows run alone (both lanes), each waiting on the lock on its client's connection.
    insert(100);
    lock_waiters(&gw.database, 1).await;
    insert(101);
    lock_waiters(&gw.database, 2).await;
    // The third is queued, and its batch leaves at once (no batch is in flight) to wait on the lock too.
    insert(102);
    lock_waiters(&gw.database, 3).await;
    // The last two queue behind that batch.
    insert(103);
    insert(104);
    queued(&gw, 2).await;
    assert_eq!(batched(table, "alone"), 22);
    locker.batch_execute("COMMIT").await.unwrap();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // A batch's metrics are counted just after its clients are answered.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            batches(table, "committed") >= 2
        })
        .await
    );
    assert_eq!(batched(table, "committed"), 3);
    assert_eq!(
        batches(table, "committed"),
        2,
        "one batch of 1, then one of 2"
    );
    let check = direct(&gw.database).await;
    let row = check
        .query_one(
            &format!("SELECT count(*), count(DISTINCT n) FROM {table}"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (25, 25));
}

/// A lone row's lane is free once it is answered, also when its client keeps the server connection: here a
/// session advisory lock pipelined right behind the insert pins the session for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_row_frees_its_lane_when_answered_even_if_its_session_stays_pinned() {
    let table = "events_lanes";
    let gw = batching_gateway(table, "n int NOT NULL", "  alone: true\n  connections: 1\n").await;
    let pinned = gw.connect().await;
    let insert = format!("INSERT INTO {table} VALUES (1)");
    let (inserted, locked) = tokio::join!(
        pinned.simple_query(&insert),
        pinned.simple_query("SELECT pg_advisory_lock(42)")
    );
    inserted.unwrap();
    locked.unwrap();
    assert_eq!(batched(table, "alone"), 1);
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            gw.shared.batcher.running_alone() == 0
        })
        .await,
        "the lane stayed taken: {} rows running alone",
        gw.shared.batcher.running_alone()
    );
    // With the one lane free, another client's lone row runs alone too, instead of being queued.
    let other = gw.connect().await;
    other
        .simple_query(&format!("INSERT INTO {table} VALUES (2)"))
        .await
        .unwrap();
    assert_eq!(batched(table, "alone"), 2);
    assert_eq!(batches(table, "committed"), 0);
    drop(pinned);
}
