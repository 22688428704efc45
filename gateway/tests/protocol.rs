//! The gateway is transparent to a real driver (tokio-postgres): simple and extended protocol, binary and text
//! values of many types, prepared statements across transactions and server connections, COPY, cancel,
//! errors, session settings and what pins a client.

mod common;

use common::{direct, gateway, sqlstate};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::SimpleQueryMessage;

/// Numeric's binary form, passed through untouched: proves the gateway does not alter binary values.
#[derive(Debug, PartialEq)]
struct RawNumeric(Vec<u8>);

impl<'a> FromSql<'a> for RawNumeric {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawNumeric(raw.to_vec()))
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

impl ToSql for RawNumeric {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
    tokio_postgres::types::to_sql_checked!();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_values_of_many_types_round_trip() {
    let gw = gateway("types", "").await;
    let client = gw.connect().await;
    let json = serde_json::json!({"a": [1, 2, {"b": null}], "é": "ü"});
    let id = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
    let when = chrono::DateTime::parse_from_rfc3339("2026-11-28T12:34:56.789012Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let bytes: Vec<u8> = (0..=255).collect();
    let ints = vec![1i32, -2, i32::MAX];
    // numeric 12345.678 in PostgreSQL's binary form, fetched from the server directly.
    let numeric: RawNumeric = direct(&gw.database)
        .await
        .query_one("SELECT 12345.678::numeric", &[])
        .await
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "SELECT $1::int8, $2::text, $3::bytea, $4::jsonb, $5::int4[], $6::timestamptz, $7::uuid, $8::numeric, $8::numeric::text",
            &[&i64::MIN, &"naïve 'quotes' \u{1F600}", &bytes, &json, &ints, &when, &id, &numeric],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), i64::MIN);
    assert_eq!(row.get::<_, &str>(1), "naïve 'quotes' \u{1F600}");
    assert_eq!(row.get::<_, Vec<u8>>(2), bytes);
    assert_eq!(row.get::<_, serde_json::Value>(3), json);
    assert_eq!(row.get::<_, Vec<i32>>(4), ints);
    assert_eq!(row.get::<_, chrono::DateTime<chrono::Utc>>(5), when);
    assert_eq!(row.get::<_, uuid::Uuid>(6), id);
    assert_eq!(row.get::<_, RawNumeric>(7), numeric);
    assert_eq!(row.get::<_, &str>(8), "12345.678");

    // The same values through the simple protocol come back as text.
    let messages = client
        .simple_query(
            "SELECT 1::int8 AS a, 'x'::text AS b, '\\x00ff'::bytea AS c; SELECT NULL::text",
        )
        .await
        .unwrap();
    let rows: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get("c"), Some("\\x00ff"));
    assert_eq!(rows[1].get(0), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_transactions_on_other_server_connections() {
    for size in [1, 2] {
        let gw = gateway("prep", &format!("pool: {{ size: {size} }}\n")).await;
        let setup = gw.connect().await;
        setup
            .batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text); INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 100) g")
            .await
            .unwrap();
        let mut clients = Vec::new();
        let mut statements = Vec::new();
        for _ in 0..4 {
            let client = gw.connect().await;
            // Each client prepares the same two statements, and one of its own.
            let get = client
                .prepare("SELECT v FROM kv WHERE k = $1")
                .await
                .unwrap();
            let count = client
                .prepare("SELECT count(*) FROM kv WHERE k <= $1")
                .await
                .unwrap();
            let own = client
                .prepare(&format!("SELECT $1::int + {}", clients.len()))
                .await
                .unwrap();
            statements.push((get, count, own));
            clients.push(client);
        }
        for round in 0..25 {
            for (i, client) in clients.iter().enumerate() {
                let (get, count, own) = &statements[i];
                let k = (round * 4 + i as i32) % 100 + 1;
                let v: String = client.query_one(get, &[&k]).await.unwrap().get(0);
                assert_eq!(v, format!("v{k}"));
                let n: i64 = client.query_one(count, &[&k]).await.unwrap().get(0);
                assert_eq!(n, k as i64);
                let sum: i32 = client.query_one(own, &[&k]).await.unwrap().get(0);
                assert_eq!(sum, k + i as i32);
            }
        }
        // Inside an explicit transaction too, interleaved with other clients' transactions.
        let mut a = gw.connect().await;
        let get = a.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
        for k in 1..=5 {
            let tx = a.transaction().await.unwrap();
            let v: String = tx.query_one(&get, &[&k]).await.unwrap().get(0);
            assert_eq!(v, format!("v{k}"));
            tx.commit().await.unwrap();
            let other: String = clients[0]
                .query_one(&statements[0].0, &[&(k + 10)])
                .await
                .unwrap()
                .get(0);
            assert_eq!(other, format!("v{}", k + 10));
        }
        assert!(gw.open_server_connections() <= size);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_statement_is_gone_for_the_client_but_not_for_others() {
    let gw = gateway("close", "pool: { size: 1 }\n").await;
    let a = gw.connect().await;
    let b = gw.connect().await;
    let sa = a.prepare("SELECT 42").await.unwrap();
    let sb = b.prepare("SELECT 42").await.unwrap();
    drop(sa); // tokio-postgres sends Close for a dropped statement
    let v: i32 = b.query_one(&sb, &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
    let v: i32 = a.query_one("SELECT 42", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_level_prepare_execute_deallocate_across_transactions() {
    let gw = gateway("sqlprep", "pool: { size: 2 }\n").await;
    let a = gw.connect().await;
    let b = gw.connect().await;
    a.batch_execute("PREPARE twice (int) AS SELECT $1 * 2")
        .await
        .unwrap();
    // b has its own statement of the same name: no clash on shared server connections.
    b.batch_execute("PREPARE twice (int) AS SELECT $1 * 3")
        .await
        .unwrap();
    for i in 0..10 {
        let ra = a
            .simple_query(&format!("EXECUTE twice({i})"))
            .await
            .unwrap();
        let rb = b
            .simple_query(&format!("EXECUTE twice({i})"))
            .await
            .unwrap();
        let value = |m: &[SimpleQueryMessage]| match &m[1] {
            SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(value(&ra), (i * 2).to_string());
        assert_eq!(value(&rb), (i * 3).to_string());
    }
    a.batch_execute("DEALLOCATE twice").await.unwrap();
    let error = a.batch_execute("EXECUTE twice(1)").await.unwrap_err();
    assert_eq!(sqlstate(&error), "26000");
    b.batch_execute("EXECUTE twice(1)").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_and_stay_with_it() {
    let gw = gateway("settings", "pool: { size: 2 }\n").await;
    let a = gw.connect().await;
    let b = gw.connect().await;
    a.batch_execute(
        "CREATE SCHEMA s1; CREATE TABLE s1.only_here (x int); INSERT INTO s1.only_here VALUES (7)",
    )
    .await
    .unwrap();
    a.batch_execute("SET search_path = s1, public; SET statement_timeout = '4s'; SET application_name = 'client-a'")
        .await
        .unwrap();
    // A setting made inside a rolled-back transaction does not stick.
    a.batch_execute("BEGIN; SET work_mem = '7MB'; ROLLBACK")
        .await
        .unwrap();
    for _ in 0..10 {
        // b works in between, on whichever server connection.
        let timeout: String = b
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, "0");
        let x: i32 = a
            .query_one("SELECT x FROM only_here", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(x, 7);
        let timeout: String = a
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, "4s");
        let work_mem: String = a.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(work_mem, "4MB");
        let app: String = a
            .query_one("SHOW application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(app, "client-a");
    }
    a.batch_execute("RESET statement_timeout").await.unwrap();
    let timeout: String = a
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "0");
    a.batch_execute("RESET ALL").await.unwrap();
    let path: String = a.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_eq!(path, "\"$user\", public");
}

/// A session reuses the shape of a text that differs from a recent one only in numbers (fingerprint::Recent):
/// the second SET below gets the first one's shape without lexing, and must still be tracked as a setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_differ_only_in_numbers_are_each_tracked() {
    let gw = gateway("settings_numbers", "pool: { size: 1 }\n").await;
    let a = gw.connect().await;
    let b = gw.connect().await;
    for (sql, expected) in [
        ("SET statement_timeout = 3000", "3s"),
        ("SET statement_timeout = 5000", "5s"),
        ("SELECT 1; SET lock_timeout = 7000", "5s"),
        ("SELECT 2; SET lock_timeout = 9000", "5s"),
    ] {
        a.batch_execute(sql).await.unwrap();
        // b takes the only server connection in between, so a's settings must be re-applied to reach it.
        let timeout: String = b
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, "0", "after {sql}");
        let timeout: String = a
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, expected, "after {sql}");
    }
    let lock: String = a.query_one("SHOW lock_timeout", &[]).await.unwrap().get(0);
    assert_eq!(lock, "9s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let gw = gateway("copy", "").await;
    let client = gw.connect().await;
    client
        .batch_execute("CREATE TABLE c (id int, note text)")
        .await
        .unwrap();
    let sink = client.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut expected = Vec::new();
    for chunk in 0..20 {
        let mut data = String::new();
        for i in 0..5000 {
            let id = chunk * 5000 + i;
            data.push_str(&format!(
                "{id}\tnote number {id} with some padding to make rows longer\n"
            ));
            expected.push(id);
        }
        sink.send(bytes::Bytes::from(data)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 100_000);
    let stream = client
        .copy_out("COPY (SELECT id FROM c ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.map(|c| c.unwrap()).collect().await;
    let text: Vec<u8> = chunks.concat();
    let ids: Vec<i32> = String::from_utf8(text)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(ids, expected);
    // A failed COPY leaves the session usable.
    let error = client
        .copy_in::<_, bytes::Bytes>("COPY c FROM STDIN")
        .await
        .map(|_| ());
    assert!(error.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let gw = gateway("cancel", "pool: { size: 2 }\n").await;
    let client = gw.connect().await;
    let token = client.cancel_token();
    let started = std::time::Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let error = client
        .simple_query("SELECT pg_sleep(20)")
        .await
        .unwrap_err();
    canceller.await.unwrap();
    assert_eq!(sqlstate(&error), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    let v: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_keep_their_sqlstate_and_the_session_goes_on() {
    let gw = gateway("errors", "").await;
    let client = gw.connect().await;
    client
        .batch_execute("CREATE TABLE u (id int PRIMARY KEY)")
        .await
        .unwrap();
    client
        .execute("INSERT INTO u VALUES (1)", &[])
        .await
        .unwrap();
    let cases = [
        ("INSERT INTO u VALUES (1)", "23505"),
        ("SELECT 1/0", "22012"),
        ("SELEC 1", "42601"),
        ("SELECT * FROM missing_table", "42P01"),
    ];
    for (sql, code) in cases {
        let simple = client.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&simple), code, "{sql} (simple)");
        let extended = client.query(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&extended), code, "{sql} (extended)");
    }
    // An error inside a transaction aborts it, as in PostgreSQL.
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        sqlstate(&client.batch_execute("SELECT 1/0").await.unwrap_err()),
        "22012"
    );
    assert_eq!(
        sqlstate(&client.batch_execute("SELECT 1").await.unwrap_err()),
        "25P02"
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM u", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_inside_a_transaction_rolls_it_back() {
    let gw = gateway("dirty", "pool: { size: 1 }\n").await;
    let setup = gw.connect().await;
    setup.batch_execute("CREATE TABLE d (x int)").await.unwrap();
    {
        let client = gw.connect().await;
        client
            .batch_execute("BEGIN; INSERT INTO d VALUES (1)")
            .await
            .unwrap();
        // dropped here without COMMIT
    }
    // With a pool of one, the next client gets that same server connection: it must be clean.
    let other = gw.connect().await;
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            match other.query_one("SELECT count(*) FROM d", &[]).await {
                Ok(row) => row.get::<_, i64>(0) == 0,
                Err(_) => false,
            }
        })
        .await
    );
    let status: String = other
        .query_one("SELECT current_setting('transaction_isolation')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "read committed");
    let idle_in_tx: i64 = direct(&gw.database)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(idle_in_tx, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_temporary_tables_pin_the_client() {
    let gw = gateway("pin", "pool: { size: 3 }\n").await;
    let (listener, mut connection) = tokio_postgres::connect(&gw.config(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    listener.batch_execute("LISTEN news").await.unwrap();
    listener
        .batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    let notifier = gw.connect().await;
    for i in 0..3 {
        notifier
            .batch_execute(&format!("NOTIFY news, 'n{i}'"))
            .await
            .unwrap();
        listener
            .batch_execute(&format!("INSERT INTO scratch VALUES ({i})"))
            .await
            .unwrap();
    }
    for i in 0..3 {
        let payload = tokio::time::timeout(Duration::from_secs(5), notifications.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(payload, format!("n{i}"));
    }
    let n: i64 = listener
        .query_one("SELECT count(*) FROM scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pool_mode_keeps_one_server_connection() {
    let gw = gateway("session", "pool: { mode: session, size: 2 }\n").await;
    let a = gw.connect().await;
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let b = gw.connect().await;
    for _ in 0..5 {
        let again: i32 = a
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(again, pid);
        let other: i32 = b
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(other, pid);
    }
    a.batch_execute("SET work_mem = '9MB'").await.unwrap();
    drop(a);
    // The connection is reset before anyone else gets it.
    let c = gw.connect().await;
    let work_mem: String = c.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(work_mem, "4MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries_in_one_exchange() {
    let gw = gateway("pipeline", "pool: { size: 1 }\n").await;
    let client = gw.connect().await;
    let statement = client.prepare("SELECT $1::int * 10").await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection into one stream of messages.
    let queries = (0..200).map(|i| {
        let client = &client;
        let statement = &statement;
        async move {
            client
                .query_one(statement, &[&i])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }
    });
    let results = futures_util::future::join_all(queries).await;
    assert_eq!(results, (0..200).map(|i| i * 10).collect::<Vec<_>>());
}

/// An idle client holds no buffers: its next bytes are read into a per-thread probe, then into buffers from a
/// per-thread stock that other sessions use too. Queries larger than the probe, sent after the client idled,
/// from several clients at once, must each arrive whole and only at their own session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_queries_arrive_whole_through_shared_buffers() {
    let gw = gateway("idle-buffers", "").await;
    let mut tasks = Vec::new();
    for c in 0..6 {
        let client = gw.connect().await;
        tasks.push(tokio::spawn(async move {
            for round in 0..5 {
                // Long enough to be read in several parts (the probe holds 4 KiB), and the client's own.
                let text = format!("{c}-{round}-").repeat(4000);
                tokio::time::sleep(Duration::from_millis(20)).await;
                let rows = client
                    .simple_query(&format!("SELECT md5('{text}'), length('{text}')"))
                    .await
                    .unwrap();
                let row = first_row(&rows);
                let expected = format!("{:x}", md5::compute(text.as_bytes()));
                assert_eq!(
                    row.get(0),
                    Some(expected.as_str()),
                    "client {c} round {round}"
                );
                assert_eq!(row.get(1), Some(text.len().to_string().as_str()));
                // Small ones in between, answered while buffers go back and forth.
                for i in 0..10 {
                    let rows = client
                        .simple_query(&format!("SELECT '{c}-{i}'"))
                        .await
                        .unwrap();
                    let row = first_row(&rows);
                    assert_eq!(row.get(0), Some(format!("{c}-{i}").as_str()));
                }
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a client's queries were answered within a minute")
            .unwrap();
    }
}

fn first_row(messages: &[SimpleQueryMessage]) -> &tokio_postgres::SimpleQueryRow {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row")
}
