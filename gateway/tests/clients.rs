//! Real command-line clients through the gateway: psql running a script, pgbench in all three query modes,
//! authentication both ways, and the `regiongate` binary's own commands.

mod common;

use common::{cluster, gateway, gateway_for, PASSWORD};
use std::process::{Command, Output};

fn psql(gw: &common::TestGateway, args: &[&str]) -> Output {
    Command::new("psql")
        .env("PGPASSWORD", PASSWORD)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args([
            "-p",
            &gw.addr.port().to_string(),
            "-U",
            &gw.database,
            "-d",
            &gw.database,
        ])
        .args(args)
        .output()
        .expect("running psql")
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_with_meta_commands_copy_transactions_and_a_cursor() {
    let gw = gateway("psql", "pool: { size: 2 }\n").await;
    let dir = tempfile_dir();
    let csv = dir.join("items.csv");
    std::fs::write(&csv, "1,apple\n2,pear\n3,plum\n").unwrap();
    let out_csv = dir.join("out.csv");
    let script = format!(
        r#"
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
\copy items FROM '{csv}' WITH (FORMAT csv)
\d items
BEGIN;
INSERT INTO items VALUES (4, 'fig');
SAVEPOINT s;
INSERT INTO items VALUES (5, 'kiwi');
ROLLBACK TO SAVEPOINT s;
COMMIT;
BEGIN;
DECLARE c CURSOR FOR SELECT name FROM items ORDER BY id;
FETCH 2 FROM c;
FETCH ALL FROM c;
CLOSE c;
COMMIT;
\copy (SELECT id, name FROM items ORDER BY id) TO '{out}' WITH (FORMAT csv)
SELECT count(*) AS n FROM items \gset
\echo rows: :n
"#,
        csv = csv.display(),
        out = out_csv.display()
    );
    let script_path = dir.join("script.sql");
    std::fs::write(&script_path, script).unwrap();
    let output = psql(&gw, &["-f", script_path.to_str().unwrap()]);
    let all = text(&output);
    assert!(output.status.success(), "{all}");
    assert!(all.contains("Table \"public.items\""), "{all}");
    assert!(
        all.contains("apple")
            && all.contains("pear")
            && all.contains("plum")
            && all.contains("fig"),
        "{all}"
    );
    assert!(all.contains("rows: 4"), "{all}");
    assert!(!all.contains("kiwi"), "{all}");
    assert_eq!(
        std::fs::read_to_string(&out_csv).unwrap(),
        "1,apple\n2,pear\n3,plum\n4,fig\n"
    );
    // A failing statement gives psql the server's error and exit status.
    let output = psql(&gw, &["-c", "SELECT 1/0"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("division by zero"),
        "{}",
        text(&output)
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "regiongate-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn pgbench(gw: &common::TestGateway, args: &[&str]) -> Output {
    common::pgbench(gw.addr.port(), &gw.database, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_every_query_mode_without_a_failed_transaction() {
    let gw = gateway("pgbench", "pool: { size: 4 }\n").await;
    let init = pgbench(&gw, &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", text(&init));
    for mode in ["simple", "extended", "prepared"] {
        for select_only in [true, false] {
            // Twice as many clients as server connections for single-statement transactions. TPC-B holds a
            // connection for a whole transaction, and pgbench -M prepared prepares each statement with a
            // blocking PQprepare on the thread that drives other clients: with more clients than connections,
            // a client waiting for a connection would stall the thread whose clients hold them (pgbench's own
            // deadlock, the same through any transaction pooler). So TPC-B runs with as many clients as
            // connections.
            let clients = if select_only { "8" } else { "4" };
            let mut args = vec!["-M", mode, "-c", clients, "-j", "2", "-t", "300", "-n"];
            if select_only {
                args.push("-S");
            }
            let output = pgbench(&gw, &args);
            let all = text(&output);
            assert!(output.status.success(), "{mode}: {all}");
            assert!(
                all.contains(&format!(
                    "number of transactions actually processed: {0}/{0}",
                    300 * clients.parse::<u32>().unwrap()
                )),
                "{mode}: {all}"
            );
            assert!(
                !all.contains("number of failed transactions: ")
                    || all.contains("number of failed transactions: 0 "),
                "{mode}: {all}"
            );
        }
    }
    assert!(gw.open_server_connections() <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_methods_and_wrong_passwords() {
    let database = common::fresh_database("auth");
    let verifier = postgres_protocol::password::scram_sha_256(b"verifier-pass");
    // SCRAM against a stored verifier; the server login uses server_password.
    let gw = gateway_for(
        &database,
        &format!(
            "auth:\n  method: scram-sha-256\n  users: [ {{ name: {database}, password: '{verifier}', server_password: {PASSWORD} }} ]\n"
        ),
    )
    .await;
    let ok = |password: &str| {
        format!(
            "host=127.0.0.1 port={} user={database} password={password} dbname={database}",
            gw.addr.port()
        )
    };
    common::connect(&ok("verifier-pass"))
        .await
        .batch_execute("SELECT 1")
        .await
        .unwrap();
    for (user, password) in [(database.as_str(), "wrong"), ("nobody", "verifier-pass")] {
        let config = format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={database}",
            gw.addr.port()
        );
        let error = tokio_postgres::connect(&config, tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        assert_eq!(common::sqlstate(&error), "28P01", "{user}");
    }
    // md5 with a plain password, then with an md5 hash.
    let md5_hash = format!("md5{:x}", md5_of(&format!("{PASSWORD}{database}")));
    for password in [PASSWORD.to_string(), md5_hash] {
        let gw = gateway_for(
            &database,
            &format!("auth:\n  method: md5\n  users: [ {{ name: {database}, password: '{password}', server_password: {PASSWORD} }} ]\n"),
        )
        .await;
        let config = format!(
            "host=127.0.0.1 port={} user={database} password={PASSWORD} dbname={database}",
            gw.addr.port()
        );
        common::connect(&config)
            .await
            .batch_execute("SELECT 1")
            .await
            .unwrap();
        let bad = format!(
            "host=127.0.0.1 port={} user={database} password=nope dbname={database}",
            gw.addr.port()
        );
        let error = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        assert_eq!(common::sqlstate(&error), "28P01");
    }
    // Unknown database: the server's 3D000 reaches the client.
    let gw = gateway_for(
        &database,
        &format!("auth:\n  method: scram-sha-256\n  users: [ {{ name: {database}, password: {PASSWORD} }} ]\n"),
    )
    .await;
    let config = format!(
        "host=127.0.0.1 port={} user={database} password={PASSWORD} dbname=no_such_db",
        gw.addr.port()
    );
    let error = tokio_postgres::connect(&config, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(common::sqlstate(&error), "3D000");
}

fn md5_of(text: &str) -> md5::Digest {
    md5::compute(text.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_login_with_md5_and_trust() {
    for (auth, name) in [
        (testbed::HostAuth::Md5, "md5"),
        (testbed::HostAuth::Trust, "trust"),
    ] {
        let server = testbed::Cluster::start(&testbed::ClusterOptions {
            host_auth: auth,
            ..Default::default()
        })
        .unwrap();
        // Roles made under md5 hashing so md5 login works.
        server
            .psql(
                "postgres",
                "SET password_encryption = 'md5'; CREATE ROLE app LOGIN PASSWORD 'apppw'",
            )
            .unwrap();
        server
            .psql("postgres", "CREATE DATABASE app OWNER app")
            .unwrap();
        let yaml = format!(
            "listen: 127.0.0.1:0\nprimary: postgres://127.0.0.1:{}/app\nauth:\n  method: scram-sha-256\n  users: [ {{ name: app, password: apppw }} ]\n",
            server.port()
        );
        let config = regiongate::config::Config::parse(&yaml, "test").unwrap();
        let gateway = regiongate::Gateway::bind(config).await.unwrap();
        let addr = gateway.local_addr();
        let run = tokio::spawn(gateway.run(std::future::pending()));
        let client = common::connect(&format!(
            "host=127.0.0.1 port={} user=app password=apppw dbname=app",
            addr.port()
        ))
        .await;
        let v: i32 = client.query_one("SELECT 3", &[]).await.unwrap().get(0);
        assert_eq!(v, 3, "{name}");
        run.abort();
    }
    let _ = cluster();
}

#[test]
fn check_config_names_the_bad_key_and_line() {
    let dir = tempfile_dir();
    let good = dir.join("good.yaml");
    std::fs::write(&good, "primary: postgres://127.0.0.1:5432/app\nauth: { method: trust, users: [ { name: app } ] }\n").unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "primary: postgres://127.0.0.1:5432/app\npool:\n  size: 10\n  mode: sometimes\n",
    )
    .unwrap();
    let binary = env!("CARGO_BIN_EXE_regiongate");
    let output = Command::new(binary)
        .args(["check-config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let output = Command::new(binary)
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let all = text(&output);
    assert!(all.contains("pool.mode") && all.contains("line 4"), "{all}");
}

#[test]
fn check_config_messages_point_at_the_right_place_and_say_it_once() {
    let dir = tempfile_dir();
    let binary = env!("CARGO_BIN_EXE_regiongate");
    let check = |name: &str, text: &str, flag: bool| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let mut command = Command::new(binary);
        command.arg("check-config");
        if flag {
            command.arg("--config");
        }
        let output = command.arg(&path).output().unwrap();
        (output.status.success(), self::text(&output))
    };
    let base = "primary: postgres://127.0.0.1:5432/app\nauth: { method: trust }\n";
    // The same file, by position and with --config; `localhost` resolves.
    let good = format!("listen: localhost:6432\n{base}");
    assert!(check("good.yaml", &good, false).0);
    assert!(check("good.yaml", &good, true).0);
    // The second view's name, on line 8, not the first `name:` of the file (line 4).
    let views = format!(
        "{base}views:\n  - name: fine\n    schedule: every 5m\n    query: SELECT 1\n  - schedule: every 5m\n    name: Not-A-Name\n"
    );
    let (ok, all) = check("views.yaml", &views, false);
    assert!(!ok);
    assert!(
        all.contains("views[1].name") && all.contains("line 8"),
        "{all}"
    );
    // The key once, not `pool.size: pool.size: …`.
    let (ok, all) = check("size.yaml", &format!("{base}pool:\n  size: many\n"), false);
    assert!(!ok);
    assert_eq!(all.matches("pool.size").count(), 1, "{all}");
    // A replica without its scheme is told so.
    let (ok, all) = check(
        "scheme.yaml",
        &format!("{base}regions:\n  - {{ name: eu, replicas: [ '127.0.0.1:5433' ] }}\n"),
        false,
    );
    assert!(!ok);
    assert!(all.contains("postgres://127.0.0.1:5433/"), "{all}");
    assert!(!all.contains("relative URL"), "{all}");
    // A cron error shows the expression as written.
    let (ok, all) = check(
        "cron.yaml",
        &format!(
            "{base}views:\n  - {{ name: v, query: SELECT 1, schedule: '*/5 * * * funday' }}\n"
        ),
        false,
    );
    assert!(!ok);
    assert!(
        all.contains("\"*/5 * * * funday\"") && !all.contains("0 */5"),
        "{all}"
    );
    // A missing file, once.
    let output = Command::new(binary)
        .args(["check-config", "/nonexistent/regiongate.yaml"])
        .output()
        .unwrap();
    let all = text(&output);
    assert!(!output.status.success());
    assert_eq!(all.matches("No such file").count(), 1, "{all}");
}
