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
    // In a DO block, with SET ROLE too.
    let block = connect(&through(&gw, "")).await;
    block
        .batch_execute(&format!(
            "DO $$ BEGIN PERFORM set_config('app.tenant', '5', false); EXECUTE 'SET ROLE {low}'; END $$"
        ))
        .await
        .unwrap();
    assert_eq!(one(&other, seen).await, "");
    assert_eq!(one(&other, "SELECT current_user").await, "postgres");
    assert_eq!(one(&block, seen).await, "5");
    assert_eq!(one(&block, "SELECT current_user").await, low);
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
        // A RESET in a request that fails, or before a ROLLBACK, is rolled back with it.
        for (reset, fails, expected) in [
            ("RESET work_mem", false, "7MB"),
            ("SET work_mem TO DEFAULT", false, "7MB"),
            ("RESET work_mem; SELECT 1/0", true, "9MB"),
            ("BEGIN; RESET work_mem; ROLLBACK", false, "9MB"),
        ] {
            client.batch_execute("SET work_mem = '9MB'").await.unwrap();
            let result = client.batch_execute(reset).await;
            assert_eq!(result.is_err(), fails, "{reset}: {result:?}");
            assert_eq!(one(client, "SHOW work_mem").await, expected, "{reset}");
        }
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
            .expect("python3 (./test.sh provides it, with psycopg)");
        assert!(
            output.status.success(),
            "(./test.sh installs psycopg) {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let direct = run(cluster().port());
    assert_eq!(direct, "ISO, DMY|Europe/Rome|UTF8\n2024-01-02\n");
    assert_eq!(run(gw.addr.port()), direct);
}

/// What a session is, as one row: identity, the settings clients change most, and a custom setting.
const OBSERVE: &str = "SELECT concat_ws('|', session_user, current_user, current_setting('role'), \
    current_setting('search_path'), current_setting('work_mem'), current_setting('DateStyle'), \
    current_setting('TimeZone'), current_setting('application_name'), \
    COALESCE(current_setting('app.tenant', true), ''), current_setting('default_transaction_read_only'), \
    current_setting('statement_timeout'))";

/// One random step of a session: a statement from the ways clients change their session.
fn random_statement(rng: &mut impl rand::Rng, roles: &[String], client: usize) -> String {
    let n = rng.random_range(1..10);
    let role = &roles[rng.random_range(0..roles.len())];
    let pick = |rng: &mut dyn rand::RngCore, options: &[&str]| {
        options[rand::Rng::random_range(rng, 0..options.len())].to_string()
    };
    match rng.random_range(0..32) {
        0 => format!("SET work_mem = '{n}MB'"),
        1 => pick(
            rng,
            &[
                "SET search_path = public",
                "SET search_path = pg_catalog, public",
                "SET SCHEMA 'pg_catalog'",
            ],
        ),
        2 => pick(
            rng,
            &[
                "SET datestyle = 'SQL, DMY'",
                "SET datestyle TO iso",
                "SET datestyle TO ymd",
                "SET datestyle = German",
            ],
        ),
        3 => pick(
            rng,
            &[
                "SET TIME ZONE 'Europe/Rome'",
                "SET timezone = 'UTC'",
                "SET TIME ZONE LOCAL",
            ],
        ),
        4 => format!("SET application_name = 'app{n}'"),
        5 => pick(
            rng,
            &[
                "RESET work_mem",
                "RESET search_path",
                "RESET datestyle",
                "SET work_mem TO DEFAULT",
            ],
        ),
        6 => "RESET ALL".into(),
        7 => format!("SET SESSION AUTHORIZATION {role}"),
        8 => pick(
            rng,
            &[
                "RESET SESSION AUTHORIZATION",
                "SET SESSION AUTHORIZATION postgres",
                "SET SESSION AUTHORIZATION DEFAULT",
            ],
        ),
        9 => format!("SET ROLE {role}"),
        10 => pick(rng, &["RESET ROLE", "SET ROLE NONE"]),
        11 => format!("SELECT set_config('work_mem', '{n}MB', false)"),
        12 => format!("SELECT set_config('app.tenant', '{n}', false)"),
        13 => format!("SELECT set_config('app.tenant', '{n}', true)"),
        14 => "SELECT * FROM set_config('search_path', 'pg_catalog', false)".into(),
        15 => format!("BEGIN; SET work_mem = '{n}MB'; ROLLBACK"),
        16 => format!("BEGIN; SET LOCAL work_mem = '{n}MB'; COMMIT"),
        17 => format!("BEGIN; SET statement_timeout = '{n}s'; COMMIT"),
        18 => format!("SET work_mem = '{n}MB'; SELECT 1/0"),
        19 => "BEGIN; RESET ALL; ROLLBACK".into(),
        20 => pick(
            rng,
            &[
                "SET default_transaction_read_only = on",
                "RESET default_transaction_read_only",
            ],
        ),
        21 => "RESET app.tenant".into(),
        22 => format!("BEGIN; SET SESSION AUTHORIZATION {role}; COMMIT"),
        23 => format!("PREPARE c{client}_{n} AS SELECT {n}"),
        24 => format!("EXECUTE c{client}_{n}"),
        25 => format!("EXPLAIN (COSTS OFF) EXECUTE c{client}_{n}"),
        26 => format!("SELECT 1 FROM (SELECT 1) t WHERE EXECUTE c{client}_{n}"),
        // Through the extended protocol (see `run`).
        27 => format!("extended:app.tenant:{n}"),
        // set_config where the first word says nothing of settings.
        28 => format!("PREPARE c{client}_{n} AS SELECT set_config('app.tenant', 'p{n}', false)"),
        29 => format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT set_config('work_mem', '{n}MB', false)"),
        30 => format!("DO $$ BEGIN SET app.tenant = 'do{n}'; END $$"),
        _ => format!("DEALLOCATE c{client}_{n}"),
    }
}

/// Runs one step: a simple query, or `extended:NAME:VALUE`, `set_config` with bound parameters.
async fn run(client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    match sql.strip_prefix("extended:") {
        Some(rest) => {
            let (name, value) = rest.split_once(':').expect("extended:NAME:VALUE");
            client
                .query("SELECT set_config($1, $2, false)", &[&name, &value])
                .await
                .map(|_| ())
        }
        None => client.simple_query(sql).await.map(|_| ()),
    }
}

/// The general property: clients sharing one server connection, each changing its identity and settings
/// at random, are each at every step exactly where a direct session that received the same statements is.
/// `ISOLATION_SEED` picks another sequence; `ISOLATION_STEPS` a longer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sessions_sharing_a_server_connection_match_direct_sessions() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(18);
    let steps: usize = std::env::var("ISOLATION_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let gw = superuser_gateway("iso_property", "pool: { size: 1 }\n").await;
    let admin = common::direct(&gw.database).await;
    let mut roles = Vec::new();
    for name in ["alice", "bob", "carol"] {
        roles.push(role(&admin, &gw.database, name).await);
    }
    // alice may become bob; carol is no one's.
    admin
        .batch_execute(&format!("GRANT {} TO {}", roles[1], roles[0]))
        .await
        .unwrap();
    let options = [
        "",
        "-c work_mem=7MB -c search_path=pg_catalog",
        "-c DateStyle=SQL,DMY -c TimeZone=Asia/Tokyo -c app.tenant=3",
    ];
    let mut clients = Vec::new();
    for option in options {
        clients.push((
            connect(&through(&gw, option)).await,
            connect(&direct_to(&gw.database, option)).await,
        ));
    }
    for step in 0..steps {
        let i = rng.random_range(0..clients.len());
        if rng.random_range(0..40) == 0 {
            clients[i] = (
                connect(&through(&gw, options[i])).await,
                connect(&direct_to(&gw.database, options[i])).await,
            );
            continue;
        }
        let sql = random_statement(&mut rng, &roles, i);
        let (through_gateway, direct) = &clients[i];
        // The whole error: SQLSTATE, message (statement names as the client wrote them) and position.
        let outcome = |result: Result<(), tokio_postgres::Error>| match result {
            Ok(()) => "ok".to_string(),
            Err(error) => match error.as_db_error() {
                Some(db) => format!("{} {} {:?}", db.code().code(), db.message(), db.position()),
                None => format!("{error:?}"),
            },
        };
        let got = outcome(run(through_gateway, &sql).await);
        let expected = outcome(run(direct, &sql).await);
        assert_eq!(
            got, expected,
            "step {step} (seed {seed}), client {i}: {sql}"
        );
        let got = one(through_gateway, OBSERVE).await;
        let expected = one(direct, OBSERVE).await;
        assert_eq!(
            got, expected,
            "step {step} (seed {seed}), client {i}, after: {sql}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_rows_follow_the_search_path_set_with_set_config() {
    let gw = superuser_gateway(
        "iso_batch_path",
        "batching:\n  tables: [events]\n  alone: false\n",
    )
    .await;
    let admin = common::direct(&gw.database).await;
    admin
        .batch_execute(
            "CREATE SCHEMA myschema; CREATE TABLE public.events (x int); CREATE TABLE myschema.events (x int)",
        )
        .await
        .unwrap();
    let client = connect(&through(&gw, "")).await;
    one(
        &client,
        "SELECT set_config('search_path', 'myschema', false)",
    )
    .await;
    for x in 0..5 {
        client
            .simple_query(&format!("INSERT INTO events VALUES ({x})"))
            .await
            .unwrap();
    }
    let count = |table: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count("myschema.events").await, 5);
    assert_eq!(count("public.events").await, 0);
    let batched = regiongate::metrics::METRICS
        .batched_rows
        .with_label_values(&["events", "committed"])
        .get();
    assert!(batched >= 5, "the rows went through batching: {batched}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_deallocated_statements_are_freed_on_the_server() {
    let gw = superuser_gateway("iso_close", "pool: { size: 1 }\n").await;
    let client = connect(&through(&gw, "")).await;
    // tokio-postgres closes a statement when it is dropped.
    for i in 0..300 {
        let statement = client.prepare(&format!("SELECT {i}")).await.unwrap();
        client.query(&statement, &[]).await.unwrap();
    }
    let held: i64 = client
        .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .unwrap()
        .get(0);
    assert!(held < 10, "the server still holds {held} statements");
    // DEALLOCATE in SQL of a statement prepared with the protocol (libpq before 17 evicts so).
    let fresh = connect(&through(&gw, "")).await;
    let kept = fresh.prepare("SELECT 'kept'").await.unwrap();
    fresh.query(&kept, &[]).await.unwrap();
    // tokio-postgres shows the statement's name only in its Debug form.
    let debug = format!("{kept:?}");
    let name = debug
        .split("name: \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a statement name");
    let other = connect(&through(&gw, "")).await;
    other.simple_query("SELECT 1").await.unwrap(); // the statement may be anywhere now
    fresh
        .batch_execute(&format!("DEALLOCATE {name}"))
        .await
        .expect("PostgreSQL deallocates a protocol-level statement by name");
    let gone = fresh.query(&kept, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&gone), "26000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepared_statements_run_wherever_postgresql_runs_them() {
    let gw = superuser_gateway("iso_execute", "pool: { size: 2 }\n").await;
    let a = connect(&through(&gw, "")).await;
    let b = connect(&through(&gw, "")).await;
    a.batch_execute("PREPARE s1 AS SELECT 41 + 1 AS answer")
        .await
        .unwrap();
    b.batch_execute("PREPARE s1 AS SELECT 'b'").await.unwrap();
    let plan = one(&a, "EXPLAIN (COSTS OFF) EXECUTE s1").await;
    assert!(plan.contains("Result"), "{plan}");
    a.batch_execute("CREATE TEMP TABLE t AS EXECUTE s1")
        .await
        .unwrap();
    assert_eq!(one(&a, "SELECT answer::text FROM t").await, "42");
    // EXECUTE through the extended protocol (drivers that prepare everything, psql's \gdesc).
    let row = a.query_one("EXECUTE s1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // PostgreSQL's own answers: a duplicate is 42P05 in the client's words, and the first one stays.
    let duplicate = a.simple_query("PREPARE s1 AS SELECT 0").await.unwrap_err();
    assert_eq!(sqlstate(&duplicate), "42P05");
    assert_eq!(
        duplicate.as_db_error().unwrap().message(),
        "prepared statement \"s1\" already exists"
    );
    assert_eq!(one(&a, "EXECUTE s1").await, "42");
    let missing = b.simple_query("SELECT 1; EXECUTE nope").await.unwrap_err();
    assert_eq!(
        missing.as_db_error().unwrap().message(),
        "prepared statement \"nope\" does not exist"
    );
    // An error's position points into the text the client sent, not the renamed one.
    let error = b
        .simple_query("EXECUTE s1; SELECT nosuchcolumn")
        .await
        .unwrap_err();
    let direct = connect(&direct_to(&gw.database, "")).await;
    direct
        .batch_execute("PREPARE s1 AS SELECT 'b'")
        .await
        .unwrap();
    let expected = direct
        .simple_query("EXECUTE s1; SELECT nosuchcolumn")
        .await
        .unwrap_err();
    assert_eq!(
        error.as_db_error().unwrap().position(),
        expected.as_db_error().unwrap().position()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_after_a_schema_change_see_the_new_schema() {
    let gw = superuser_gateway("iso_schema", "pool: { size: 1 }\n").await;
    let first = connect(&through(&gw, "")).await;
    first
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let before = first.prepare("SELECT * FROM t").await.unwrap();
    first.query(&before, &[]).await.unwrap();
    // Through the gateway.
    first
        .batch_execute("ALTER TABLE t ADD COLUMN y int DEFAULT 2")
        .await
        .unwrap();
    let second = connect(&through(&gw, "")).await;
    let rows = second.query("SELECT * FROM t", &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2);
    // Behind the gateway's back: the statement fails once, as a direct one prepared before would, and is
    // prepared anew after that.
    let admin = common::direct(&gw.database).await;
    admin
        .batch_execute("ALTER TABLE t ADD COLUMN z int DEFAULT 3")
        .await
        .unwrap();
    let third = connect(&through(&gw, "")).await;
    let rows = match third.query("SELECT * FROM t", &[]).await {
        Ok(rows) => rows,
        Err(error) => {
            assert_eq!(sqlstate(&error), "0A000", "{error:?}");
            third.query("SELECT * FROM t", &[]).await.unwrap()
        }
    };
    assert_eq!(rows[0].len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_query_has_its_query_cancelled_on_the_server() {
    let gw = superuser_gateway("iso_gone", "pool: { size: 2 }\n").await;
    let admin = common::direct(&gw.database).await;
    admin
        .batch_execute("CREATE TABLE locked (x int); INSERT INTO locked VALUES (1)")
        .await
        .unwrap();
    let (client, connection) = tokio_postgres::connect(&through(&gw, ""), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    client
        .batch_execute("BEGIN; UPDATE locked SET x = 2")
        .await
        .unwrap();
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(20)").await });
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'";
    assert!(
        common::eventually(std::time::Duration::from_secs(5), || async {
            admin
                .query_one(running, &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 1
        })
        .await
    );
    // The client dies: its socket closes.
    driver.abort();
    sleeping.abort();
    let started = std::time::Instant::now();
    assert!(
        common::eventually(std::time::Duration::from_secs(5), || async {
            admin
                .query_one(running, &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
        })
        .await,
        "the query ran on after its client was gone"
    );
    // Its row lock went with it.
    admin
        .batch_execute("SET lock_timeout = '2s'; UPDATE locked SET x = 3")
        .await
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn session_mode_gives_the_client_its_backend_and_the_backends_fatal() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let gw = runtime.block_on(superuser_gateway(
        "iso_session_pid",
        "pool: { mode: session, size: 3 }\n",
    ));
    let script = r#"
import sys, threading, time, psycopg
dsn = sys.argv[1]
conn = psycopg.connect(dsn, autocommit=True)
pid = conn.info.backend_pid
print(conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid)
# The client's cancel key reaches its query.
threading.Timer(0.5, conn.cancel).start()
try:
    conn.execute("SELECT pg_sleep(10)")
    print("not cancelled")
except psycopg.Error as e:
    print(e.sqlstate)
# Another session ends this backend by the pid the client was given.
other = psycopg.connect(dsn, autocommit=True)
print(other.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0])
time.sleep(0.2)
try:
    conn.execute("SELECT 1")
    print("still alive")
except psycopg.Error as e:
    print(e.sqlstate)
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres password={} dbname={}",
            gw.addr.port(),
            testbed::SUPERUSER_PASSWORD,
            gw.database
        ))
        .output()
        .expect("python3 (./test.sh provides it, with psycopg)");
    assert!(
        output.status.success(),
        "(./test.sh installs psycopg) {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "True\n57014\nTrue\n57P01\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_settings_changed_inside_functions_stay_with_their_client() {
    let gw = superuser_gateway("iso_functions", "pool: { size: 1 }\n").await;
    let admin = common::direct(&gw.database).await;
    let low = role(&admin, &gw.database, "low").await;
    // The statements that call these never name set_config: only the server's ParameterStatus tells.
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION style_dmy() RETURNS void LANGUAGE sql \
               AS $$ SELECT set_config('DateStyle', 'SQL, DMY', false) $$; \
             CREATE FUNCTION become_low() RETURNS void LANGUAGE sql \
               AS $$ SELECT set_config('role', '{low}', false) $$"
        ))
        .await
        .unwrap();
    let styled = connect(&through(&gw, "")).await;
    let lowered = connect(&through(&gw, "")).await;
    let other = connect(&through(&gw, "")).await;
    one(&styled, "SELECT style_dmy()::text").await;
    assert_eq!(one(&other, "SHOW DateStyle").await, "ISO, MDY");
    assert_eq!(one(&styled, "SHOW DateStyle").await, "SQL, DMY");
    // A superuser becoming an ordinary role changes is_superuser, which the server reports.
    one(&lowered, "SELECT become_low()::text").await;
    assert_eq!(one(&other, "SELECT current_user").await, "postgres");
    assert_eq!(one(&lowered, "SELECT current_user").await, low);
}
