//! Shutting down and restarting the gateway binary without cutting clients off (SIGTERM, the console's
//! SHUTDOWN, a second process on the same port), against real PostgreSQL, with psql, pgbench and
//! tokio-postgres.

mod common;

use common::PASSWORD;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

use common::Process;

/// What only the drain tests read of a gateway's log.
trait Summary {
    fn summary(&self, name: &str) -> u64;
}

impl Summary for Process {
    /// The `shutdown complete` line's field `name`.
    fn summary(&self, name: &str) -> u64 {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("shutdown complete"))
            .unwrap_or_else(|| panic!("no summary line in the log:\n{log}"));
        let start = line
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            + name.len()
            + 1;
        line[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// A config file for `database` on `port`, with its own metrics port.
fn write_config(dir: &Path, file: &str, database: &str, port: u16, extra: &str) -> (PathBuf, u16) {
    let metrics = testbed::free_port().unwrap();
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:{port}\nprimary: postgres://127.0.0.1:{}/{database}\n\
             auth:\n  method: scram-sha-256\n  users:\n    - {{ name: {database}, password: {PASSWORD} }}\n\
             admin: {{ users: [ {database} ] }}\nmetrics: {{ listen: '127.0.0.1:{metrics}' }}\n{extra}",
            common::cluster().port()
        ),
    )
    .unwrap();
    (path, metrics)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("regiongate-drain-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh database and one gateway process in front of it, with `extra` in its config.
async fn one_gateway(name: &str, extra: &str) -> (String, u16, Process) {
    let database = common::fresh_database(name);
    let dir = temp_dir(name);
    let port = testbed::free_port().unwrap();
    let (path, metrics) = write_config(&dir, "a.yaml", &database, port, extra);
    let gateway = Process::start(&path, metrics, "a").await;
    (database, port, gateway)
}

/// A client and its connection's outcome (a FATAL the server sent ends it with that error).
async fn client(port: u16, database: &str) -> (Client, tokio::task::JoinHandle<Option<String>>) {
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user={database} password={PASSWORD} dbname={database}"
        ),
        NoTls,
    )
    .await
    .unwrap();
    let ended = tokio::spawn(async move { connection.await.err().map(|e| common::sqlstate(&e)) });
    (client, ended)
}

/// SHOW STATE from the console, as `field=value` lines.
async fn state(console: &Client) -> String {
    console
        .simple_query("SHOW STATE")
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                Some(format!("{}={}\n", row.get(0)?, row.get(1)?))
            }
            _ => None,
        })
        .collect()
}

/// The admin console, as `database`'s user (an admin in these configs).
async fn console(port: u16, database: &str) -> Client {
    let (console, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user={database} password={PASSWORD} dbname=regiongate"
        ),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    console
}

/// The transactions pgbench says it processed.
fn processed(text: &str) -> i64 {
    text.lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap_or_else(|| panic!("no count in pgbench's output:\n{text}"))
        .parse()
        .unwrap()
}

async fn count(database: &str, sql: &str) -> i64 {
    common::direct(database)
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_commits_after_sigterm_and_idle_clients_get_57p01() {
    let (database, port, mut gateway) =
        one_gateway("drain_commit", "shutdown_timeout: 20s\n").await;
    let (writer, writer_end) = client(port, &database).await;
    writer
        .batch_execute("CREATE TABLE kept (id int); BEGIN; INSERT INTO kept VALUES (1)")
        .await
        .unwrap();
    let (idle, idle_end) = client(port, &database).await;
    idle.batch_execute("SELECT 1").await.unwrap();
    // The console stays open through the drain (it does not hold it up), to watch it.
    let console = console(port, &database).await;
    assert!(state(&console).await.contains("state=serving"));

    gateway.signal(libc::SIGTERM);
    // Idle outside a transaction: closed at once, with PostgreSQL's words for it.
    let idle_code = tokio::time::timeout(Duration::from_secs(5), idle_end)
        .await
        .expect("the idle client is closed at once")
        .unwrap();
    assert_eq!(idle_code.as_deref(), Some("57P01"));
    // Not ready any more, still healthy; new clients are not accepted.
    let (status, body) = gateway.http("/readyz").unwrap();
    assert!(
        status.contains("503") && body.contains("draining"),
        "{status} {body}"
    );
    assert!(gateway.http("/healthz").unwrap().0.contains("200"));
    assert!(tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={database} password={PASSWORD} dbname={database} connect_timeout=2"),
        NoTls,
    )
    .await
    .is_err());

    let shown = state(&console).await;
    assert!(
        shown.contains("state=draining")
            && shown.contains("closed=1")
            && shown.contains("why=SIGTERM"),
        "{shown}"
    );
    // The transaction goes on, and commits; then its client is closed at the boundary.
    writer
        .batch_execute("INSERT INTO kept VALUES (2)")
        .await
        .unwrap();
    writer
        .batch_execute("COMMIT")
        .await
        .expect("the commit succeeds");
    let writer_code = tokio::time::timeout(Duration::from_secs(5), writer_end)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(writer_code.as_deref(), Some("57P01"));
    assert_eq!(gateway.exited(Duration::from_secs(10)).await, 0);
    assert_eq!(count(&database, "SELECT count(*) FROM kept").await, 2);
    assert_eq!(gateway.summary("transactions_finished"), 1);
    assert_eq!(gateway.summary("clients_closed_idle"), 1);
    assert_eq!(gateway.summary("transactions_cut"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_past_the_timeout_are_cut_rolled_back_and_leave_no_server_connection() {
    let (database, port, mut gateway) = one_gateway("drain_cut", "shutdown_timeout: 1s\n").await;
    let (setup, _) = client(port, &database).await;
    setup
        .batch_execute("CREATE TABLE cut (id int)")
        .await
        .unwrap();
    // One idle in its transaction, one running a long statement in its transaction.
    let (idle, idle_end) = client(port, &database).await;
    idle.batch_execute("BEGIN; INSERT INTO cut VALUES (1)")
        .await
        .unwrap();
    let (sleeper, sleeper_end) = client(port, &database).await;
    sleeper
        .batch_execute("BEGIN; INSERT INTO cut VALUES (2)")
        .await
        .unwrap();
    // The client is kept until its connection ends, so that the end is the gateway's doing.
    let sleeping = tokio::spawn(async move {
        let result = sleeper.batch_execute("SELECT pg_sleep(60)").await;
        (sleeper, result.map_err(|e| common::sqlstate(&e)))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The console's SHUTDOWN drains as SIGTERM does.
    let signalled = Instant::now();
    let console = console(port, &database).await;
    console.simple_query("SHUTDOWN").await.unwrap();
    let idle_code = tokio::time::timeout(Duration::from_secs(10), idle_end)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(idle_code.as_deref(), Some("57P01"));
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "cut before the timeout: {:?}",
        signalled.elapsed()
    );
    // The long statement is stopped, and its client told why, as by a terminated backend.
    let (_sleeper, result) = sleeping.await.unwrap();
    assert_eq!(result.unwrap_err(), "57P01");
    let sleeper_code = tokio::time::timeout(Duration::from_secs(10), sleeper_end)
        .await
        .unwrap()
        .unwrap();
    assert!(sleeper_code.is_some(), "the connection is closed");
    assert_eq!(gateway.exited(Duration::from_secs(10)).await, 0);
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(gateway.summary("transactions_cut"), 2);
    assert_eq!(count(&database, "SELECT count(*) FROM cut").await, 0);
    // No backend of the gateway's is left on the server.
    let check = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}' AND pid <> pg_backend_pid()");
    let gone = common::eventually(Duration::from_secs(5), || async {
        count(&database, &check).await == 0
    })
    .await;
    assert!(
        gone,
        "server connections left: {}",
        count(&database, &check).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_inserts_in_flight_at_sigterm_are_committed_once_and_answered() {
    let database = common::fresh_database("drain_batch");
    let dir = temp_dir("batch");
    let port = testbed::free_port().unwrap();
    let (path, metrics) = write_config(
        &dir,
        "a.yaml",
        &database,
        port,
        "shutdown_timeout: 10s\nbatching: { tables: [events], max_delay: 20ms, alone: false }\n",
    );
    common::direct(&database)
        .await
        .batch_execute(&format!(
            "CREATE TABLE events (client int, seq int); GRANT ALL ON events TO {database}"
        ))
        .await
        .unwrap();
    let mut gateway = Process::start(&path, metrics, "a").await;
    let mut writers = Vec::new();
    for id in 0..8 {
        let (client, _) = client(port, &database).await;
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for seq in 0.. {
                let insert = format!("INSERT INTO events VALUES ({id}, {seq})");
                match client.simple_query(&insert).await {
                    Ok(_) => acknowledged.push(seq),
                    Err(_) => break,
                }
            }
            (id, acknowledged)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, metrics) = gateway.http("/metrics").unwrap();
    let batched: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("regiongate_batched_rows_total{") && l.contains("committed"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(batched > 0.0, "the inserts go through batching:\n{metrics}");
    gateway.signal(libc::SIGTERM);
    assert_eq!(gateway.exited(Duration::from_secs(15)).await, 0);
    let direct = common::direct(&database).await;
    let mut total = 0;
    for writer in writers {
        let (id, acknowledged) = writer.await.unwrap();
        assert!(!acknowledged.is_empty(), "client {id} wrote nothing");
        total += acknowledged.len();
        for seq in acknowledged {
            let copies: i64 = direct
                .query_one(
                    "SELECT count(*) FROM events WHERE client = $1 AND seq = $2",
                    &[&id, &seq],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(copies, 1, "client {id} row {seq}");
        }
    }
    assert_eq!(gateway.summary("transactions_cut"), 0);
    eprintln!(
        "{total} acknowledged rows, each committed once ({batched} batched before the signal)"
    );
}

/// Runs pgbench tpcb-like against `port` while the gateway there is replaced: a second process starts on
/// the same port, then the first gets SIGTERM. Returns pgbench's output and the transactions it counted.
async fn pgbench_through_a_handover(name: &str, reconnect: bool) -> (String, i64, String) {
    let database = common::fresh_database(name);
    let dir = temp_dir(name);
    let port = testbed::free_port().unwrap();
    let (first, first_metrics) = write_config(
        &dir,
        "a.yaml",
        &database,
        port,
        "shutdown_timeout: 20s\npool: { size: 8 }\n",
    );
    let (second, second_metrics) = write_config(
        &dir,
        "b.yaml",
        &database,
        port,
        "shutdown_timeout: 20s\npool: { size: 8 }\n",
    );
    let init = common::pgbench(
        common::cluster().port(),
        &database,
        &["-i", "-q", "-s", "1"],
    );
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut old = Process::start(&first, first_metrics, "a").await;
    let mut args = vec!["-c", "16", "-j", "2", "-T", "6", "-n"];
    if reconnect {
        args.push("-C");
    }
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let db = database.clone();
    let bench = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::pgbench(port, &db, &args)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let new = Process::start(&second, second_metrics, "b").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal(libc::SIGTERM);
    assert_eq!(old.exited(Duration::from_secs(25)).await, 0);
    let output = bench.await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let history = count(&database, "SELECT count(*) FROM pgbench_history").await;
    let processed = processed(&text);
    assert_eq!(
        history, processed,
        "every transaction pgbench counted is in pgbench_history, and no other:\n{text}"
    );
    drop(new);
    (text, processed, old.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_second_gateway_on_the_port_fails_no_transaction_of_pgbench_reconnecting() {
    let (text, processed, log) = pgbench_through_a_handover("drain_handover_c", true).await;
    assert!(
        !text.contains("aborted") && !text.contains("error"),
        "pgbench -C saw a failure:\n{text}\n{log}"
    );
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    assert!(processed > 50, "{text}");
    eprintln!("pgbench -C through a handover: {processed} transactions, 0 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_pgbench_closes_clients_only_between_transactions() {
    let (text, processed, log) = pgbench_through_a_handover("drain_handover", false).await;
    // Each client is closed after a transaction's END: pgbench sees the FATAL at its next BEGIN (command 4
    // of tpcb-like, after four \set), never inside a transaction.
    let aborted: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("aborted in command"))
        .collect();
    assert!(!aborted.is_empty(), "no client was closed:\n{text}\n{log}");
    for line in &aborted {
        assert!(
            line.contains("aborted in command 4 "),
            "closed elsewhere than at a transaction boundary: {line}\n{text}"
        );
    }
    // What they were told (libpq prints the FATAL on a line of its own when it comes as the BEGIN is sent).
    for line in text.lines().filter(|l| l.contains("FATAL")) {
        assert!(
            line.contains("FATAL:  terminating connection due to administrator command"),
            "{line}\n{text}"
        );
    }
    eprintln!(
        "pgbench through a handover: {processed} transactions, {} clients closed at a boundary",
        aborted.len()
    );
}

/// A process the test did not start itself (the new gateway of a restart): stopped when dropped.
struct Adopted(i32);

impl Adopted {
    /// Running (not gone, and not a zombie its new parent has yet to reap).
    fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid the old gateway reported for its replacement.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_restarts_in_place_without_failing_pgbench_reconnecting() {
    let database = common::fresh_database("drain_restart");
    let dir = temp_dir("restart");
    let port = testbed::free_port().unwrap();
    let (path, metrics) = write_config(
        &dir,
        "a.yaml",
        &database,
        port,
        "shutdown_timeout: 20s\npool: { size: 8 }\n",
    );
    let init = common::pgbench(
        common::cluster().port(),
        &database,
        &["-i", "-q", "-s", "1"],
    );
    assert!(init.status.success());
    let mut old = Process::start(&path, metrics, "a").await;
    let db = database.clone();
    let bench = tokio::task::spawn_blocking(move || {
        common::pgbench(port, &db, &["-c", "16", "-j", "2", "-T", "6", "-n", "-C"])
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    old.signal(libc::SIGUSR2);
    assert_eq!(old.exited(Duration::from_secs(40)).await, 0);
    let log = old.log();
    let new_pid: i32 = log
        .lines()
        .find(|l| l.contains("the new process is ready"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap_or_else(|| panic!("no new process in the log:\n{log}"))
        .parse()
        .unwrap();
    let new = Adopted(new_pid);
    assert!(new.alive());
    let output = bench.await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && text.contains("number of failed transactions: 0"),
        "pgbench -C saw a failure:\n{text}\n{log}"
    );
    let history = count(&database, "SELECT count(*) FROM pgbench_history").await;
    let processed = processed(&text);
    assert_eq!(history, processed, "{text}");
    // The new process serves on the same address, and is ready.
    let (client, _) = client(port, &database).await;
    client.batch_execute("SELECT 1").await.unwrap();
    let ready = common::eventually(Duration::from_secs(5), || async {
        old.http("/readyz")
            .is_some_and(|(status, _)| status.contains("200"))
    })
    .await;
    assert!(ready);
    // SAFETY: kill(2) on the new gateway's pid.
    unsafe { libc::kill(new_pid, libc::SIGTERM) };
    let stopped = common::eventually(Duration::from_secs(10), || async { !new.alive() }).await;
    assert!(stopped, "the new gateway did not stop on SIGTERM");
    eprintln!("SIGUSR2 under pgbench -C: {processed} transactions, 0 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_at_once() {
    let (database, port, mut gateway) =
        one_gateway("drain_second", "shutdown_timeout: 60s\n").await;
    let (open, open_end) = client(port, &database).await;
    open.batch_execute("CREATE TABLE second (id int)")
        .await
        .unwrap();
    open.batch_execute("BEGIN; INSERT INTO second VALUES (1)")
        .await
        .unwrap();
    gateway.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        gateway.child.try_wait().unwrap().is_none(),
        "the drain waits for the transaction"
    );
    let second = Instant::now();
    gateway.signal(libc::SIGINT);
    assert_eq!(gateway.exited(Duration::from_secs(10)).await, 0);
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "{:?}",
        second.elapsed()
    );
    let code = open_end.await.unwrap();
    assert_eq!(code.as_deref(), Some("57P01"));
    assert_eq!(gateway.summary("transactions_cut"), 1);
    assert_eq!(count(&database, "SELECT count(*) FROM second").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_refresh_in_flight_at_sigterm_commits_before_the_exit() {
    let database = common::fresh_database("drain_view");
    let dir = temp_dir("view");
    let port = testbed::free_port().unwrap();
    let direct = common::direct(&database).await;
    // Each refresh takes at least 1.5 s (the sleep runs once per refresh), and one follows another.
    direct
        .batch_execute(&format!(
            "CREATE TABLE items (id int PRIMARY KEY, price int);
             INSERT INTO items SELECT i, i FROM generate_series(1, 100) i;
             CREATE FUNCTION slow() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 0 FROM pg_sleep(1.5)';
             ALTER TABLE items OWNER TO {database}; ALTER FUNCTION slow() OWNER TO {database};"
        ))
        .await
        .unwrap();
    let (path, metrics) = write_config(
        &dir,
        "a.yaml",
        &database,
        port,
        "shutdown_timeout: 20s\nviews:\n  - { name: priced, query: 'SELECT id, price + s.zero AS price FROM items CROSS JOIN (SELECT slow() AS zero) s', unique_key: [id], schedule: every 1s }\n",
    );
    let mut gateway = Process::start(&path, metrics, "a").await;
    let refreshed = "SELECT count(*) FROM regiongate.view_refreshes WHERE view_name = 'priced' AND error IS NULL";
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'REFRESH MATERIALIZED VIEW%' AND state = 'active'";
    // (The history table appears with the gateway's first work on the primary.)
    let ready = common::eventually(Duration::from_secs(30), || async {
        let direct = common::direct(&database).await;
        let count = |sql| {
            let direct = &direct;
            async move {
                direct
                    .query_one(sql, &[])
                    .await
                    .map_or(0, |row| row.get::<_, i64>(0))
            }
        };
        count(refreshed).await >= 1 && count(running).await == 1
    })
    .await;
    assert!(ready, "no refresh ran:\n{}", gateway.log());
    let before = count(&database, refreshed).await;
    gateway.signal(libc::SIGTERM);
    assert_eq!(gateway.exited(Duration::from_secs(20)).await, 0);
    assert_eq!(
        count(&database, refreshed).await,
        before + 1,
        "the refresh in flight committed:\n{}",
        gateway.log()
    );
    let failed = "SELECT count(*) FROM regiongate.view_refreshes WHERE view_name = 'priced' AND error IS NOT NULL";
    assert_eq!(count(&database, failed).await, 0);
    assert!(gateway.log().contains("views_settled=true"));
}
