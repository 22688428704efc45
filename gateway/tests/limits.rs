//! Limits that protect the gateway and its servers: failed logins per address, connection rates, idle clients,
//! prepared statements per client; and credentials never reach the logs.

mod common;

use common::{sqlstate, PASSWORD};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_postgres::NoTls;

/// Everything the gateway logs in this test binary, at every level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let writer = move || Capture(sink.clone());
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(writer)
            .try_init();
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects as the test database's own user with `password`; the error's SQLSTATE and message when refused.
async fn login(gw: &common::TestGateway, password: &str) -> Result<tokio_postgres::Client, String> {
    login_as(gw, &gw.database, password).await
}

/// Connects as `user` (to its own database) with `password`; the error's SQLSTATE and message when refused.
async fn login_as(
    gw: &common::TestGateway,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, String> {
    let config = format!(
        "host={} port={} user={user} password={password} dbname={user}",
        gw.addr.ip(),
        gw.addr.port(),
    );
    match tokio_postgres::connect(&config, NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Ok(client)
        }
        Err(error) => Err(format!(
            "{} {}",
            sqlstate(&error),
            error
                .as_db_error()
                .map_or_else(|| error.to_string(), |e| e.message().to_string())
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_slow_one_user_from_one_address_and_the_right_password_gets_in() {
    let logs = captured_logs();
    // Two users behind one address (a NAT, a load balancer): ann guesses, bob does not.
    let (ann, bob) = (
        common::fresh_database("limits"),
        common::fresh_database("limits"),
    );
    let gw = common::gateway_for(
        &ann,
        &format!(
            "auth: {{ method: scram-sha-256, users: [ {{ name: {ann}, password: {PASSWORD} }}, \
             {{ name: {bob}, password: {PASSWORD} }} ] }}\n\
             limits: {{ max_failed_logins: 3, failed_login_window: 6s }}\n"
        ),
    )
    .await;
    let wrong = "wrong-horse-battery-staple";
    for _ in 0..3 {
        let refused = login_as(&gw, &ann, wrong).await.unwrap_err();
        assert!(refused.starts_with("28P01"), "{refused}");
    }
    // Locked: the next attempt within 6 s / 3 is refused before any SCRAM exchange, right password or not.
    let refused = login_as(&gw, &ann, PASSWORD).await.unwrap_err();
    assert!(refused.starts_with("28000"), "{refused}");
    assert!(refused.contains("too many failed logins"), "{refused}");
    // The other user from the same address is not locked out.
    login_as(&gw, &bob, PASSWORD)
        .await
        .expect("another user from the same address");
    // One attempt per 2 s is let through: a wrong password there fails as usual, the right one gets in.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let refused = login_as(&gw, &ann, wrong).await.unwrap_err();
    assert!(refused.starts_with("28P01"), "{refused}");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    login_as(&gw, &ann, PASSWORD)
        .await
        .expect("the right password, on an attempt let through");
    // And that success forgives: the user is not locked any more.
    assert!(login_as(&gw, &ann, wrong)
        .await
        .unwrap_err()
        .starts_with("28P01"));
    login_as(&gw, &ann, PASSWORD).await.expect("forgiven");
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("login refused"),
        "the refusals were not logged"
    );
    assert!(!logs.contains(wrong), "a password reached the logs");
    assert!(!logs.contains(PASSWORD), "a password reached the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_login_forgives_earlier_failures() {
    let gw = common::gateway("limits", "limits: { max_failed_logins: 2 }\n").await;
    assert!(login(&gw, "nope").await.is_err());
    assert!(login(&gw, PASSWORD).await.is_ok());
    assert!(login(&gw, "nope").await.is_err());
    assert!(
        login(&gw, PASSWORD).await.is_ok(),
        "one failure after a success must not lock out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_rate_of_one_address_get_53300() {
    let gw = common::gateway("limits", "limits: { client_connection_rate: 3 }\n").await;
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        outcomes.push(login(&gw, PASSWORD).await.map(|_| ()));
    }
    let refused: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        !refused.is_empty(),
        "eight connections at once all got in at 3/s"
    );
    assert!(
        refused
            .iter()
            .all(|r| r.starts_with("53300") && r.contains("client_connection_rate")),
        "{refused:?}"
    );
    assert!(outcomes.iter().filter(|o| o.is_ok()).count() >= 3);
    // A second later the bucket has refilled.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(login(&gw, PASSWORD).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_disconnected_with_the_postgres_codes() {
    let gw = common::gateway("limits", "limits: { client_idle_timeout: 300ms }\n").await;
    for (begin, code) in [(false, "57P05"), (true, "25P03")] {
        let (client, connection) = tokio_postgres::connect(&gw.config(), NoTls).await.unwrap();
        let ended = tokio::spawn(connection);
        if begin {
            client.batch_execute("BEGIN").await.unwrap();
        }
        // Activity keeps it alive.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.simple_query("SELECT 1").await.unwrap();
        }
        let error = tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("an idle client was not disconnected")
            .unwrap()
            .expect_err("the connection must end with an error");
        assert_eq!(sqlstate(&error), code, "{error}");
    }
    // The server connection of the abandoned transaction went back clean.
    let db = gw.connect().await;
    let status: String = db.query_one("SELECT 'usable'", &[]).await.unwrap().get(0);
    assert_eq!(status, "usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_prepared_statement_limit_is_disconnected_with_53400() {
    let gw = common::gateway("limits", "limits: { max_prepared_statements: 5 }\n").await;
    let db = gw.connect().await;
    let mut statements = Vec::new();
    for i in 0..5 {
        statements.push(db.prepare(&format!("SELECT {i}")).await.unwrap());
    }
    let error = db.prepare("SELECT 5").await.unwrap_err();
    assert_eq!(sqlstate(&error), "53400", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_statement_timeout_is_cancelled_with_57014_and_the_session_goes_on() {
    let gw = common::gateway("limits", "limits: { statement_timeout: 300ms }\n").await;
    let db = gw.connect().await;
    let started = std::time::Instant::now();
    let error = db.simple_query("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(sqlstate(&error), "57014", "{error}");
    let message = error.as_db_error().unwrap().message().to_string();
    assert!(message.contains("statement timeout"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not cancelled in time"
    );
    // The extended protocol too, and the session (and its next request) carry on.
    let error = db.query("SELECT pg_sleep(10)", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&error), "57014", "{error}");
    let n: i32 = db.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(n, 7);
    let quick: Vec<_> = db.simple_query("SELECT pg_sleep(0.1)").await.unwrap();
    assert!(!quick.is_empty());
}

/// PostgreSQL answers each encryption request once; a second one is a packet of an unknown protocol, refused
/// at once (never left waiting for the startup timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_encryption_request_is_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = common::gateway("limits_double_ssl", "").await;
    for code in [80877103i32, 80877104] {
        let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut request = Vec::new();
        request.extend_from_slice(&8i32.to_be_bytes());
        request.extend_from_slice(&code.to_be_bytes());
        socket.write_all(&request).await.unwrap();
        let mut answer = [0u8; 1];
        socket.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N", "{code}");
        socket.write_all(&request).await.unwrap();
        let mut refusal = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut refusal))
            .await
            .expect("an answer, not a wait for the startup timeout")
            .unwrap();
        assert_eq!(refusal.first(), Some(&b'E'), "{code}: {refusal:?}");
        let text = String::from_utf8_lossy(&refusal);
        assert!(text.contains("0A000"), "{text}");
        assert!(
            text.contains("unsupported frontend protocol 1234."),
            "{text}"
        );
    }
}

/// Bare TCP connections that never send a startup packet.
fn bare_sockets(addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_log_in_take_no_client_place() {
    let gw = common::gateway("bare", "limits: { max_clients: 2 }\n").await;
    let _bare = bare_sockets(gw.addr, 60);
    // max_clients counts clients from the end of their login.
    let first = login(&gw, PASSWORD)
        .await
        .expect("60 bare sockets do not lock a client out");
    let _second = login(&gw, PASSWORD).await.expect("two clients fit");
    let refused = login(&gw, PASSWORD).await.unwrap_err();
    assert!(
        refused.starts_with("53300") && refused.contains("limits.max_clients is 2"),
        "{refused}"
    );
    drop(first);
    let again = common::eventually(Duration::from_secs(5), || async {
        login(&gw, PASSWORD).await.is_ok()
    })
    .await;
    assert!(again, "a client's place frees when it leaves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_in_progress_are_bounded_and_time_out() {
    let gw = common::gateway(
        "pending",
        "limits: { max_pending_logins: 5, login_timeout: 1s }\n",
    )
    .await;
    let bare = bare_sockets(gw.addr, 5);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = login(&gw, PASSWORD).await.unwrap_err();
    assert!(
        refused.starts_with("53300") && refused.contains("limits.max_pending_logins is 5"),
        "{refused}"
    );
    // The bare sockets are closed at the login timeout, and logins go through again.
    let closed = tokio::task::spawn_blocking(move || {
        bare.into_iter().all(|mut socket| {
            use std::io::Read;
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            // Closed: end of stream, or reset; a read that times out means the socket was left open.
            match socket.read(&mut [0u8; 16]) {
                Ok(n) => n == 0,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        })
    })
    .await
    .unwrap();
    assert!(closed);
    assert!(login(&gw, PASSWORD).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_raises_max_clients_applies_to_the_next_login() {
    let database = common::fresh_database("reload_max");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regiongate.yaml");
    let yaml = |max: usize| {
        format!(
            "listen: 127.0.0.1:0\nprimary: postgres://127.0.0.1:{}/{database}\n{}limits: {{ max_clients: {max} }}\n",
            common::cluster().port(),
            common::own_user(&database)
        )
    };
    std::fs::write(&path, yaml(1)).unwrap();
    let config = regiongate::config::Config::load(&path).unwrap();
    let gateway = regiongate::Gateway::bind_from(config, Some(path.clone()))
        .await
        .unwrap();
    let (addr, shared) = (gateway.local_addr(), gateway.shared.clone());
    tokio::spawn(gateway.run(std::future::pending()));
    let connect = || async {
        tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={database} password={PASSWORD} dbname={database}",
                addr.port()
            ),
            NoTls,
        )
        .await
        .map(|(client, connection)| {
            tokio::spawn(connection);
            client
        })
        .map_err(|e| sqlstate(&e))
    };
    let _first = connect().await.unwrap();
    assert_eq!(connect().await.unwrap_err(), "53300");
    std::fs::write(&path, yaml(2)).unwrap();
    shared.reload().unwrap();
    let _second = connect().await.expect("the raised limit is in force");
    assert_eq!(connect().await.unwrap_err(), "53300");
}

/// A reload reaches clients already connected, from their next transaction: a statement timeout set by it
/// cancels a connected client's long statement, and one removed by it no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_statement_timeout_applies_to_connected_clients_from_their_next_transaction() {
    let database = common::fresh_database("reload_limits");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regiongate.yaml");
    let yaml = |timeout: &str| {
        format!(
            "listen: 127.0.0.1:0\nprimary: postgres://127.0.0.1:{}/{database}\n{}limits: {{ statement_timeout: {timeout} }}\n",
            common::cluster().port(),
            common::own_user(&database)
        )
    };
    std::fs::write(&path, yaml("0")).unwrap();
    let config = regiongate::config::Config::load(&path).unwrap();
    let gateway = regiongate::Gateway::bind_from(config, Some(path.clone()))
        .await
        .unwrap();
    let (addr, shared) = (gateway.local_addr(), gateway.shared.clone());
    tokio::spawn(gateway.run(std::future::pending()));
    let (db, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={database} password={PASSWORD} dbname={database}",
            addr.port()
        ),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    db.simple_query("SELECT pg_sleep(0.6)").await.unwrap();
    std::fs::write(&path, yaml("300ms")).unwrap();
    shared.reload().unwrap();
    let error = db.simple_query("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(sqlstate(&error), "57014", "{error}");
    std::fs::write(&path, yaml("0")).unwrap();
    shared.reload().unwrap();
    db.simple_query("SELECT pg_sleep(0.6)")
        .await
        .expect("no statement timeout after the second reload");
}
