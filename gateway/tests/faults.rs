//! Bad input and faults: each gets a clear PostgreSQL error, never a hang, a panic or a leak.

mod common;

use common::{direct, gateway, gateway_for, sqlstate};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A raw protocol connection, for sending what no driver would.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: std::net::SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw(stream)
    }

    fn startup(&mut self, user: &str, database: &str) {
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for (k, v) in [("user", user), ("database", database)] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        self.0.write_all(&packet).unwrap();
    }

    /// Reads messages until one with `tag` (returned) or the connection closes (None).
    fn read_until(&mut self, tag: u8) -> Option<Vec<u8>> {
        loop {
            let (t, body) = self.read_message()?;
            if t == tag {
                return Some(body);
            }
        }
    }

    fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        self.0.read_exact(&mut header).ok()?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.0.read_exact(&mut body).ok()?;
        Some((header[0], body))
    }

    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.0.read(&mut byte), Ok(0) | Err(_))
    }
}

fn error_code(body: &[u8]) -> String {
    let mut fields = body.split(|b| *b == 0);
    fields
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .unwrap_or_default()
}

async fn trust_gateway(prefix: &str, extra: &str) -> common::TestGateway {
    let database = common::fresh_database(prefix);
    gateway_for(
        &database,
        &format!("auth:\n  method: trust\n  users: [ {{ name: {database}, server_password: {} }} ]\n{extra}", common::PASSWORD),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_with_08p01_and_the_gateway_stays_up() {
    let gw = trust_gateway("big", "limits: { max_message_size: 4096 }\n").await;
    let addr = gw.addr;
    let db = gw.database.clone();
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(addr);
        raw.startup(&db, &db);
        raw.read_until(b'Z').expect("login");
        // A Query claiming 1 MB: refused from its header, before the gateway reads or allocates the body.
        let mut message = vec![b'Q'];
        message.extend_from_slice(&(1_000_000i32).to_be_bytes());
        message.extend_from_slice(b"SELECT 1");
        raw.0.write_all(&message).unwrap();
        let error = raw.read_until(b'E').expect("an ErrorResponse");
        assert_eq!(error_code(&error), "08P01");
        assert!(String::from_utf8_lossy(&error).contains("max_message_size"));
        assert!(raw.closed());
    })
    .await
    .unwrap();
    // Everyone else carries on.
    let client = gw.connect().await;
    client.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unsupported_protocols_get_clear_errors() {
    let gw = trust_gateway("garbage", "").await;
    let addr = gw.addr;
    let db = gw.database.clone();
    tokio::task::spawn_blocking(move || {
        // Protocol 2.0.
        let mut raw = Raw::connect(addr);
        let mut packet = 8i32.to_be_bytes().to_vec();
        packet.extend_from_slice(&(2i32 << 16).to_be_bytes());
        raw.0.write_all(&packet).unwrap();
        let (tag, body) = raw.read_message().unwrap();
        assert_eq!((tag, error_code(&body).as_str()), (b'E', "0A000"));
        assert!(raw.closed());

        // An HTTP request.
        let mut raw = Raw::connect(addr);
        raw.0
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (tag, body) = raw.read_message().unwrap();
        assert_eq!((tag, error_code(&body).as_str()), (b'E', "08P01"));
        assert!(raw.closed());

        // A negative length after login.
        let mut raw = Raw::connect(addr);
        raw.startup(&db, &db);
        raw.read_until(b'Z').unwrap();
        raw.0.write_all(&[b'Q', 0xff, 0xff, 0xff, 0xf0]).unwrap();
        let error = raw.read_until(b'E').unwrap();
        assert_eq!(error_code(&error), "08P01");
        assert!(raw.closed());

        // An unknown message type after login.
        let mut raw = Raw::connect(addr);
        raw.startup(&db, &db);
        raw.read_until(b'Z').unwrap();
        raw.0.write_all(&[b'?', 0, 0, 0, 4]).unwrap();
        let error = raw.read_until(b'E').unwrap();
        assert_eq!(error_code(&error), "08P01");
        assert!(raw.closed());

        // Half a startup packet, then silence and a close: nothing to report, nothing left open.
        let mut raw = Raw::connect(addr);
        raw.0.write_all(&[0, 0]).unwrap();
        drop(raw);
    })
    .await
    .unwrap();
    let client = gw.connect().await;
    client.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_dying_mid_query_gives_an_error_and_the_next_transaction_works() {
    let gw = gateway("die", "pool: { size: 2 }\n").await;
    let client = gw.connect().await;
    let admin = direct(&gw.database).await;
    let db = gw.database.clone();
    let killer = tokio::spawn(async move {
        let found = common::eventually(Duration::from_secs(5), || async {
            let rows = admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'SELECT pg_sleep(30)%' AND pid <> pg_backend_pid()",
                    &[&db],
                )
                .await
                .unwrap();
            !rows.is_empty()
        })
        .await;
        assert!(found, "the sleeping backend never showed up");
    });
    let error = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .unwrap_err();
    killer.await.unwrap();
    let code = sqlstate(&error);
    assert!(code == "57P01" || code.starts_with("08"), "{code}: {error}");
    // The session survives (it was not inside a transaction) and the next query gets a healthy connection.
    let v: i32 = client.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    // Inside a transaction the state is gone: the client connection is closed with a FATAL error.
    client.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    direct(&gw.database)
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let error = client.batch_execute("SELECT 1").await.unwrap_err();
    assert!(client.is_closed() || error.code().is_some(), "{error}");
    let fresh = gw.connect().await;
    fresh.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_answers_53300_naming_the_pool_after_the_checkout_timeout() {
    let gw = gateway("exhaust", "pool: { size: 1, checkout_timeout: 300ms }\n").await;
    let holder = gw.connect().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = gw.connect().await;
    let started = std::time::Instant::now();
    let simple = waiter.batch_execute("SELECT 1").await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(sqlstate(&simple), "53300");
    let message = simple.as_db_error().unwrap().message().to_string();
    assert!(message.contains(&gw.database), "{message}");
    let extended = waiter.query("SELECT $1::int", &[&1]).await.unwrap_err();
    assert_eq!(sqlstate(&extended), "53300");
    holder.batch_execute("COMMIT").await.unwrap();
    let v: i32 = waiter
        .query_one("SELECT $1::int", &[&5])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_clients_coming_and_going_leak_no_server_connection() {
    // trust: the test is about churn, and a debug build's SCRAM client would dominate its time.
    let gw = trust_gateway("churn", "pool: { size: 8, checkout_timeout: 20s }\n").await;
    let setup = gw.connect().await;
    setup
        .batch_execute("CREATE TABLE churn (x int)")
        .await
        .unwrap();
    let config = gw.config();
    let batch = |n: usize| {
        let config = config.clone();
        async move {
            let tasks = (0..n).map(|i| {
                let config = config.clone();
                async move {
                    let client = common::connect(&config).await;
                    match i % 3 {
                        0 => {
                            client
                                .batch_execute("INSERT INTO churn VALUES (1)")
                                .await
                                .unwrap();
                        }
                        1 => {
                            // Leaves in the middle of a transaction.
                            client
                                .batch_execute("BEGIN; INSERT INTO churn VALUES (2)")
                                .await
                                .unwrap();
                        }
                        _ => {
                            let _ = client.query_one("SELECT $1::int", &[&1]).await.unwrap();
                        }
                    }
                }
            });
            // 50 at a time.
            let mut tasks = tasks.collect::<Vec<_>>();
            while !tasks.is_empty() {
                let chunk: Vec<_> = tasks.drain(..tasks.len().min(50)).collect();
                futures_util::future::join_all(chunk).await;
            }
        }
    };
    batch(600).await;
    let rss_before = rss_kib();
    batch(1500).await;
    let rss_after = rss_kib();
    assert!(gw.open_server_connections() <= 8);
    let admin = direct(&gw.database).await;
    let clean = common::eventually(Duration::from_secs(10), || async {
        let row = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%'), count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 0 && row.get::<_, i64>(1) <= 8
    })
    .await;
    assert!(
        clean,
        "server connections left dirty or beyond the pool size"
    );
    // Uncommitted inserts (every third client) never became visible.
    let twos: i64 = admin
        .query_one("SELECT count(*) FROM churn WHERE x = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(twos, 0);
    let ones: i64 = admin
        .query_one("SELECT count(*) FROM churn WHERE x = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ones, 700);
    // Memory: the second, larger wave grows the process by less than a few MB (the test's own clients included).
    assert!(
        rss_after < rss_before + 24 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
