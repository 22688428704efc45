//! A session is the client's own under transaction pooling: identity, settings and temporary objects never
//! cross to another client, and each client keeps what a direct connection would have. Most tests share one
//! server connection between clients (`pool.size: 1`) and log in as a superuser, so that roles and session
//! authorization can be switched, and compare with a direct connection where PostgreSQL's own answer is the
//! reference.

mod common;

use common::{cluster, fresh_database, gateway_for, sqlstate, TestGateway};
use tokio_postgres::{Client, SimpleQueryMessage};

/// A gateway whose only user is the cluster's superuser, in front of a fresh database.
async fn superuser_gateway(prefix: &str, extra: &str) -> TestGateway {
    let database = fresh_database(prefix);
    let yaml = format!(
        "auth: {{ method: scram-sha-256, users: [ {{ name: postgres, password: {} }} ] }}\n{extra}",
        testbed::SUPERUSER_PASSWORD
    );
    gateway_for(&database, &yaml).await
}

/// A connection string through the gateway as the superuser, with `options` (`-c name=value ...`).
fn through(gw: &TestGateway, options: &str) -> String {
    format!(
        "host={} port={} user=postgres password={} dbname={} options='{options}'",
        gw.addr.ip(),
        gw.addr.port(),
        testbed::SUPERUSER_PASSWORD,
        gw.database
    )
}

/// The same straight to PostgreSQL.
fn direct_to(database: &str, options: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname={database} options='{options}'",
        cluster().port(),
        testbed::SUPERUSER_PASSWORD,
    )
}

async fn connect(config: &str) -> Client {
    common::connect(config).await
}

/// The first column of the first row of a simple query.
async fn one(client: &Client, sql: &str) -> String {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Creates a role unique to this test's database (roles are cluster-wide).
async fn role(admin: &Client, database: &str, name: &str) -> String {
    let role = format!("{database}_{name}");
    admin
        .batch_execute(&format!("CREATE ROLE {role}"))
        .await
        .unwrap();
    role
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_replay_that_fails_never_runs_the_statement() {
    let gw = superuser_gateway("iso_replay_fails", "pool: { size: 1 }\n").await;
    let admin = common::direct(&gw.database).await;
    let gone = role(&admin, &gw.database, "gone").await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE audit (who text); GRANT ALL ON audit TO {gone}"
        ))
        .await
        .unwrap();
    let a = connect(&through(&gw, "")).await;
    let b = connect(&through(&gw, "")).await;
    a.batch_execute(&format!("SET ROLE {gone}")).await.unwrap();
    // b takes the one server connection: a's role is taken off it.
    assert_eq!(one(&b, "SELECT current_user").await, "postgres");
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON audit FROM {gone}; DROP ROLE {gone}"
        ))
        .await
        .unwrap();
    // a's role cannot be given back: a gets an error, and its INSERT never runs under another identity.
    let error = a
        .batch_execute("INSERT INTO audit VALUES (current_user)")
        .await
        .expect_err("the role no longer exists");
    assert_eq!(sqlstate(&error), "22023", "{error:?}");
    assert!(
        error.to_string().contains("not run")
            || format!("{error:?}").contains("the statement was not run"),
        "{error:?}"
    );
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    // The connection that refused was closed; b goes on as itself.
    assert_eq!(one(&b, "SELECT current_user").await, "postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_option_taken_only_at_connection_start_refuses_the_login() {
    for mode in ["transaction", "session"] {
        let gw = superuser_gateway(
            "iso_startup",
            &format!("pool: {{ size: 1, mode: {mode} }}\n"),
        )
        .await;
        let admin = common::direct(&gw.database).await;
        let bob = role(&admin, &gw.database, "bob").await;
        let first = connect(&through(&gw, "")).await;
        first
            .batch_execute(&format!(
                "SET SESSION AUTHORIZATION {bob}; SET search_path = s_other"
            ))
            .await
            .unwrap();
        drop(first);
        // PostgreSQL takes log_disconnections only in the startup packet; the gateway cannot apply it on a
        // pooled connection, so it says so instead of dropping it (or the client's other options) silently.
        let refused = tokio_postgres::connect(
            &through(&gw, "-c log_disconnections=on -c search_path=pg_catalog"),
            tokio_postgres::NoTls,
        )
        .await
        .map(|_| ())
        .expect_err("log_disconnections cannot be applied");
        assert_eq!(sqlstate(&refused), "55P02", "{mode}: {refused:?}");
        assert!(
            format!("{refused:?}").contains("log_disconnections"),
            "{refused:?}"
        );
        let next = connect(&through(&gw, "")).await;
        let seen = one(
            &next,
            "SELECT session_user || '|' || current_user || '|' || current_setting('search_path')",
        )
        .await;
        assert_eq!(seen, "postgres|postgres|\"$user\", public", "{mode}");
        drop(next); // in session mode it holds the only server connection
        let with_options = connect(&through(&gw, "-c search_path=pg_catalog")).await;
        assert_eq!(one(&with_options, "SHOW search_path").await, "pg_catalog");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_back_before_the_role_as_postgresql_orders_them() {
    let gw = superuser_gateway("iso_identity", "pool: { size: 1 }\n").await;
    let admin = common::direct(&gw.database).await;
    let bob = role(&admin, &gw.database, "bob").await;
    let dave = role(&admin, &gw.database, "dave").await;
    admin
        .batch_execute("CREATE TABLE secret (x int); INSERT INTO secret VALUES (1)")
        .await
        .unwrap();
    let a = connect(&through(&gw, "")).await;
    let b = connect(&through(&gw, "")).await;
    a.batch_execute(&format!(
        "SET SESSION AUTHORIZATION postgres; SET ROLE {bob}"
    ))
    .await
    .unwrap();
    for _ in 0..3 {
        let denied = a.simple_query("SELECT x FROM secret").await.unwrap_err();
        assert_eq!(sqlstate(&denied), "42501");
        assert_eq!(
            one(&a, "SELECT session_user || '|' || current_user").await,
            format!("postgres|{bob}")
        );
        // Another client's transaction in between, on the same server connection.
        assert_eq!(one(&b, "SELECT current_user").await, "postgres");
    }
    // RESET SESSION AUTHORIZATION also ends the role, as on one backend.
    a.batch_execute(&format!("SET ROLE {dave}; RESET SESSION AUTHORIZATION"))
        .await
        .unwrap();
    assert_eq!(one(&b, "SELECT current_user").await, "postgres");
    assert_eq!(
        one(&a, "SELECT current_user || '|' || current_setting('role')").await,
        "postgres|none"
    );
    assert_eq!(one(&a, "SELECT x::text FROM secret").await, "1");
    // A session authorization of a non-superuser stays with its client only.
    a.batch_execute(&format!("SET SESSION AUTHORIZATION {bob}"))
        .await
        .unwrap();
    assert_eq!(one(&b, "SELECT session_user").await, "postgres");
    assert_eq!(one(&a, "SELECT session_user").await, bob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_for_the_session_stays_with_its_client() {
    let gw = superuser_gateway("iso_set_config", "pool: { size: 1 }\n").await;
    let admin = common::direct(&gw.database).await;
    let low = role(&admin, &gw.database, "lowpriv").await;
    admin
        .batch_execute("CREATE SCHEMA myschema; CREATE TABLE myschema.mine (x int)")
        .await
        .unwrap();
    let other = connect(&through(&gw, "")).await;

    let read_only = connect(&through(&gw, "")).await;
    one(
        &read_only,
        "SELECT set_config('default_transaction_read_only', 'on', false)",
    )
    .await;
    other
        .batch_execute("CREATE TABLE written_by_other (x int)")
        .await
        .expect("another client is not read-only");
    let refused = read_only
        .batch_execute("CREATE TABLE not_written (x int)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&refused), "25006");

    let lowered = connect(&through(&gw, "")).await;
    one(
        &lowered,
        &format!("SELECT set_config('role', '{low}', false)"),
    )
    .await;
    assert_eq!(one(&other, "SELECT current_user").await, "postgres");
    assert_eq!(one(&lowered, "SELECT current_user").await, low);

    let pathed = connect(&through(&gw, "")).await;
    one(
        &pathed,
        "SELECT * FROM set_config('search_path', 'myschema', false)",
    )
    .await;
    assert_eq!(one(&other, "SHOW search_path").await, "\"$user\", public");
    assert_eq!(one(&pathed, "SELECT count(*)::text FROM mine").await, "0");

    // Custom settings (row-level security keeps tenants in them), literal and as parameters.
    let tenant = connect(&through(&gw, "")).await;
    one(&tenant, "SELECT set_config('app.tenant', '42', false)").await;
    let seen = "SELECT coalesce(current_setting('app.tenant', true), '')";
    assert_eq!(one(&other, seen).await, "");
    assert_eq!(one(&tenant, seen).await, "42");
    let bound = connect(&through(&gw, "")).await;
    bound
        .query("SELECT set_config($1, $2, false)", &[&"app.region", &"eu"])
        .await
        .unwrap();
    let region = "SELECT coalesce(current_setting('app.region', true), '')";
    assert_eq!(one(&other, region).await, "");
    assert_eq!(one(&bound, region).await, "eu");
    // Transaction-local: gone at COMMIT, as directly.
    tenant
        .batch_execute("BEGIN; SELECT set_config('app.tenant', '7', true); COMMIT")
        .await
        .unwrap();
    assert_eq!(one(&tenant, seen).await, "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_returns_to_the_clients_connection_time_values() {
    let gw = superuser_gateway("iso_reset", "pool: { size: 1 }\n").await;
    let options = "-c search_path=pg_catalog -c work_mem=7MB";
    let a = connect(&through(&gw, options)).await;
    let direct = connect(&direct_to(&gw.database, options)).await;
    let b = connect(&through(&gw, "")).await;
    let observe = "SELECT current_setting('search_path') || '|' || current_setting('work_mem')";
    for client in [&a, &direct] {
        client
            .batch_execute("SET work_mem = '8MB'; SET search_path = public")
            .await
            .unwrap();
        client.batch_execute("RESET ALL").await.unwrap();
    }
    assert_eq!(one(&a, observe).await, one(&direct, observe).await);
    assert_eq!(one(&a, observe).await, "pg_catalog|7MB");
    assert_eq!(one(&b, observe).await, "\"$user\", public|4MB");
    assert_eq!(one(&a, observe).await, "pg_catalog|7MB");
    for client in [&a, &direct] {
        client.batch_execute("SET work_mem = '9MB'").await.unwrap();
        client.batch_execute("RESET work_mem").await.unwrap();
        assert_eq!(one(client, "SHOW work_mem").await, "7MB");
        client.batch_execute("SET work_mem = '9MB'").await.unwrap();
        client
            .batch_execute("SET work_mem TO DEFAULT")
            .await
            .unwrap();
        assert_eq!(one(client, "SHOW work_mem").await, "7MB");
        // A RESET in a request that fails is rolled back with it.
        client.batch_execute("SET work_mem = '9MB'").await.unwrap();
        client
            .batch_execute("RESET work_mem; SELECT 1/0")
            .await
            .unwrap_err();
        assert_eq!(one(client, "SHOW work_mem").await, "9MB");
        client
            .batch_execute("BEGIN; RESET work_mem; ROLLBACK")
            .await
            .unwrap();
        assert_eq!(one(client, "SHOW work_mem").await, "9MB");
        client.batch_execute("DISCARD ALL").await.unwrap();
    }
    assert_eq!(one(&a, observe).await, one(&direct, observe).await);
    assert_eq!(one(&b, "SHOW work_mem").await, "4MB");
    assert_eq!(one(&a, observe).await, "pg_catalog|7MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_replayed_as_the_values_the_server_reported() {
    let gw = superuser_gateway("iso_values", "pool: { size: 1 }\n").await;
    let a = connect(&through(&gw, "")).await;
    let b = connect(&through(&gw, "")).await;
    a.batch_execute("SET datestyle = 'SQL, DMY'").await.unwrap();
    // On one backend, `TO ymd` after `TO iso` keeps ISO output: replaying these texts after a's would not.
    b.batch_execute("SET datestyle TO iso").await.unwrap();
    b.batch_execute("SET datestyle TO ymd").await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            one(&a, "SELECT '2024-01-02'::date::text").await,
            "02/01/2024"
        );
        assert_eq!(one(&b, "SHOW datestyle").await, "ISO, YMD");
        assert_eq!(
            one(&b, "SELECT '2024-01-02'::date::text").await,
            "2024-01-02"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_created_in_pg_temp_without_temp_pin_their_client() {
    let gw = superuser_gateway("iso_pg_temp", "pool: { size: 2 }\n").await;
    let a = connect(&through(&gw, "")).await;
    let b = connect(&through(&gw, "")).await;
    a.batch_execute("CREATE TABLE pg_temp.scratch (x int); INSERT INTO pg_temp.scratch VALUES (1)")
        .await
        .unwrap();
    a.batch_execute("SELECT 2 AS x INTO pg_temp.copied")
        .await
        .unwrap();
    for _ in 0..3 {
        let missing = b
            .simple_query("SELECT x FROM pg_temp.scratch")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&missing), "42P01");
        assert_eq!(
            one(&a, "SELECT count(*)::text FROM pg_temp.scratch").await,
            "1"
        );
        assert_eq!(one(&a, "SELECT x::text FROM pg_temp.copied").await, "2");
    }
}

#[test]
fn parameters_at_login_are_reported_as_the_server_spells_them() {
    let gw_runtime = tokio::runtime::Runtime::new().unwrap();
    let gw = gw_runtime.block_on(superuser_gateway("iso_login", ""));
    let script = r#"
import os, sys, psycopg
conn = psycopg.connect(sys.argv[1])
print("|".join(conn.info.parameter_status(p) for p in ["DateStyle", "TimeZone", "client_encoding"]))
print(conn.execute("SELECT '2024-01-02'::date").fetchone()[0].isoformat())
"#;
    let run = |port: u16| {
        let output = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(format!(
                "host=127.0.0.1 port={port} user=postgres password={} dbname={}",
                testbed::SUPERUSER_PASSWORD,
                gw.database
            ))
            .env("PGDATESTYLE", "iso,dmy")
            .env("PGTZ", "europe/rome")
            .env("PGCLIENTENCODING", "utf8")
            .output()
            .expect("python3 with psycopg (pip install 'psycopg[binary]')");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let direct = run(cluster().port());
    assert_eq!(direct, "ISO, DMY|Europe/Rome|UTF8\n2024-01-02\n");
    assert_eq!(run(gw.addr.port()), direct);
}
