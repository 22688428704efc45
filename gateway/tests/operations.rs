//! Operating the gateway: the admin console from psql, the metrics listener (checked by Prometheus's own
//! parser), configuration reload under load, SIGHUP, PAUSE/RESUME, BAN/UNBAN.

mod common;

use common::PASSWORD;
use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::Duration;

fn psql_as(port: u16, user: &str, database: &str, sql: &str) -> Output {
    Command::new("psql")
        .env("PGPASSWORD", PASSWORD)
        .args([
            "-X",
            "-A",
            "-F",
            "|",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            database,
            "-c",
            sql,
        ])
        .output()
        .expect("running psql")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "psql failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A config file for a fresh database with an admin user `ops` and a metrics listener.
fn write_config(
    dir: &std::path::Path,
    database: &str,
    extra: &str,
) -> (std::path::PathBuf, u16, u16) {
    let port = testbed::free_port().unwrap();
    let metrics = testbed::free_port().unwrap();
    let path = dir.join("regiongate.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:{port}\nprimary: postgres://127.0.0.1:{}/{database}\n\
             auth:\n  method: scram-sha-256\n  users:\n    - {{ name: {database}, password: {PASSWORD} }}\n    - {{ name: ops, password: {PASSWORD}, server_user: {database} }}\n\
             admin: {{ users: [ ops ] }}\nmetrics: {{ listen: '127.0.0.1:{metrics}' }}\n{extra}",
            common::cluster().port()
        ),
    )
    .unwrap();
    (path, port, metrics)
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("regiongate-ops-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start_from_file(path: &std::path::Path) -> std::sync::Arc<regiongate::Shared> {
    let config = regiongate::config::Config::load(path).unwrap();
    let gateway = regiongate::Gateway::bind_from(config, Some(path.to_path_buf()))
        .await
        .unwrap();
    let shared = gateway.shared.clone();
    tokio::spawn(gateway.run(std::future::pending()));
    shared
}

fn http_get(port: u16, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_answers_every_show_from_psql() {
    let database = common::fresh_database("console");
    let dir = temp_dir("console");
    let (path, port, _) = write_config(&dir, &database, "");
    let _shared = start_from_file(&path).await;
    // A client with a transaction open, so that there is something to see.
    let client = common::connect(&format!(
        "host=127.0.0.1 port={port} user={database} password={PASSWORD} dbname={database} application_name=console-test"
    ))
    .await;
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let console = tokio::task::spawn_blocking(move || {
        let show =
            |what: &str| stdout(&psql_as(port, "ops", "regiongate", &format!("SHOW {what}")));
        let pools = show("POOLS");
        assert!(
            pools.starts_with("database|user|server|mode|size|open|idle|in_use|waiting"),
            "{pools}"
        );
        assert!(
            pools.contains(&format!("{database}|{database}|")),
            "{pools}"
        );
        let clients = show("CLIENTS");
        assert!(
            clients.contains("console-test") && clients.contains("active"),
            "{clients}"
        );
        let servers = show("SERVERS");
        assert!(servers.contains("active"), "{servers}");
        let replicas = show("REPLICAS");
        assert!(replicas.contains("primary|"), "{replicas}");
        assert!(show("REGIONS").starts_with("order|region"));
        let routes = show("ROUTES");
        assert!(routes.contains("primary|no-replicas|"), "{routes}");
        let stats = show("STATS");
        assert!(stats.contains("transactions|"), "{stats}");
        let config = show("CONFIG");
        assert!(
            config.contains("pool.size|20") && !config.contains(PASSWORD),
            "{config}"
        );
        assert!(show("HELP").contains("RELOAD"));
        // Unknown commands and non-admins get clear errors.
        let unknown = psql_as(port, "ops", "regiongate", "SHOW NONSENSE");
        assert!(!unknown.status.success());
        assert!(String::from_utf8_lossy(&unknown.stderr).contains("SHOW HELP"));
        let intruder = psql_as(port, &database, "regiongate", "SHOW POOLS");
        assert!(!intruder.status.success());
        assert!(
            String::from_utf8_lossy(&intruder.stderr).contains("not an admin"),
            "{intruder:?}"
        );
    });
    console.await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_promtool_and_health_endpoints_answer() {
    let database = common::fresh_database("metrics");
    let dir = temp_dir("metrics");
    let (path, port, metrics_port) = write_config(&dir, &database, "");
    let _shared = start_from_file(&path).await;
    let client = common::connect(&format!(
        "host=127.0.0.1 port={port} user={database} password={PASSWORD} dbname={database}"
    ))
    .await;
    for _ in 0..10 {
        client.query_one("SELECT 1", &[]).await.unwrap();
    }
    let _ = client.batch_execute("SELECT 1/0").await;
    let (status, body) = tokio::task::spawn_blocking(move || http_get(metrics_port, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    for name in [
        "regiongate_client_connections",
        "regiongate_server_connections",
        "regiongate_pool_wait_seconds_bucket",
        "regiongate_request_seconds_bucket{role=\"primary\"",
        "regiongate_routed_total",
        "regiongate_server_checkouts_total",
        "regiongate_server_errors_total{class=\"22\"}",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    // Prometheus's own parser and linter.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; ./test.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let (health, _) = tokio::task::spawn_blocking(move || http_get(metrics_port, "/healthz"))
        .await
        .unwrap();
    assert!(health.contains("200"));
    let (ready, _) = tokio::task::spawn_blocking(move || http_get(metrics_port, "/readyz"))
        .await
        .unwrap();
    assert!(ready.contains("200"), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_pgbench_load_drops_no_client_and_refuses_a_bad_file() {
    let database = common::fresh_database("reload");
    let dir = temp_dir("reload");
    let (path, port, _) = write_config(&dir, &database, "pool: { size: 4 }\n");
    let shared = start_from_file(&path).await;
    let bench = {
        let database = database.clone();
        move |args: &[&str]| common::pgbench(port, &database, args)
    };
    let init = tokio::task::spawn_blocking({
        let bench = bench.clone();
        move || bench(&["-i", "-s", "1", "-q"])
    })
    .await
    .unwrap();
    assert!(init.status.success());
    let load =
        tokio::task::spawn_blocking(move || bench(&["-S", "-c", "8", "-j", "2", "-T", "6", "-n"]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A valid change: bigger pool, new budget. Through the console...
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("size: 4", "size: 6");
    std::fs::write(&path, text + "routing: { max_lag: 3s }\n").unwrap();
    let reload = tokio::task::spawn_blocking(move || psql_as(port, "ops", "regiongate", "RELOAD"))
        .await
        .unwrap();
    stdout(&reload);
    assert_eq!(shared.config.load().pool.size, 6);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // ...an invalid file is refused, with its error, and the old configuration stays.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("size: 6", "size: lots")).unwrap();
    let refused = tokio::task::spawn_blocking(move || psql_as(port, "ops", "regiongate", "RELOAD"))
        .await
        .unwrap();
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(
        error.contains("pool.size") && error.contains("not reloaded"),
        "{error}"
    );
    assert_eq!(shared.config.load().pool.size, 6);
    std::fs::write(&path, good).unwrap();
    let output = load.await.unwrap();
    let all = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{all}");
    assert!(!all.contains("aborted") && !all.contains("error"), "{all}");
    assert!(
        all.contains("number of failed transactions: 0 ") || !all.contains("failed transactions"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_pause_holds_transactions_until_resume() {
    let database = common::fresh_database("sighup");
    let dir = temp_dir("sighup");
    let (path, port, _) = write_config(&dir, &database, "pool: { size: 3 }\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_regiongate"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let ready = common::eventually(Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(ready);
    let config_line = move || stdout(&psql_as(port, "ops", "regiongate", "SHOW CONFIG"));
    let shown = tokio::task::spawn_blocking(config_line).await.unwrap();
    assert!(shown.contains("pool.size|3"), "{shown}");
    // Values as the configuration spells them, not as Rust names them.
    for value in [
        "pool.mode|transaction",
        "auth.method|scram-sha-256",
        "pool.checkout_timeout|5s",
        "routing.max_lag|1s",
    ] {
        assert!(shown.contains(value), "{value} not in:\n{shown}");
    }
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("size: 3", "size: 5");
    std::fs::write(&path, text).unwrap();
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let reloaded = common::eventually(Duration::from_secs(10), || async move {
        tokio::task::spawn_blocking(config_line)
            .await
            .unwrap()
            .contains("pool.size|5")
    })
    .await;
    assert!(reloaded, "SIGHUP did not reload");

    // PAUSE: a new transaction waits until RESUME.
    stdout(
        &tokio::task::spawn_blocking(move || psql_as(port, "ops", "regiongate", "PAUSE"))
            .await
            .unwrap(),
    );
    let client = common::connect(&format!(
        "host=127.0.0.1 port={port} user={database} password={PASSWORD} dbname={database}"
    ))
    .await;
    let query = tokio::spawn(async move {
        client
            .query_one("SELECT 42", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!query.is_finished(), "a transaction ran while paused");
    stdout(
        &tokio::task::spawn_blocking(move || psql_as(port, "ops", "regiongate", "RESUME"))
            .await
            .unwrap(),
    );
    let value = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(value, 42);
    child.kill().unwrap();
    let _ = child.wait();
}

/// The metric names in a PromQL text: `regiongate_…` and `process_…`, with a histogram's series suffix
/// taken off.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts_name = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_name && (rest.starts_with("regiongate_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..len];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(base.to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_is_there_from_the_start_and_the_shipped_rules_and_dashboard_use_only_them(
) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules = root.join("deploy/prometheus/regiongate-alerts.yml");
    let checked = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (Debian package prometheus; ./test.sh installs it)");
    assert!(
        checked.status.success(),
        "promtool check rules: {}{}",
        stdout(&checked),
        String::from_utf8_lossy(&checked.stderr)
    );
    let database = common::fresh_database("deploy");
    let replica = common::cluster().start_replica().expect("a replica");
    let dir = temp_dir("deploy");
    let (path, port, metrics) = write_config(
        &dir,
        &database,
        &format!(
            "regions:\n  - {{ name: eu-west, replicas: [ 'postgres://127.0.0.1:{}/{database}' ] }}\n\
             routing: {{ monitor_interval: 100ms }}\n\
             batching: {{ tables: [ events ] }}\n\
             views:\n  - {{ name: counted, query: 'SELECT 1 AS x', schedule: every 1s }}\n",
            replica.port()
        ),
    );
    let gateway = common::Process::start(&path, metrics, "deploy").await;
    // Before any client: every family is there (a counter at 0), the build and the process too.
    let (_, body) = gateway.http("/metrics").unwrap();
    let families = |body: &str| -> std::collections::BTreeSet<String> {
        body.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(str::to_string)
            .collect()
    };
    let at_start = families(&body);
    for family in [
        "regiongate_routed_total",
        "regiongate_errors_total",
        "regiongate_server_errors_total",
        "regiongate_clients_refused_total",
        "regiongate_cancel_requests_total",
        "regiongate_transactions_total",
        "regiongate_stale_reads_total",
        "regiongate_drain_clients_total",
        "regiongate_batched_rows_total",
        "regiongate_batches_total",
        "regiongate_server_logins_total",
        "regiongate_view_refresh_failures_total",
        "regiongate_view_refreshes_total",
        "regiongate_failovers_total",
        "regiongate_nplus1_episodes_total",
        "regiongate_writer_up",
        "regiongate_node_role",
        "regiongate_replica_up",
        "regiongate_routing_max_lag_seconds",
        "regiongate_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            at_start.contains(family),
            "{family} missing at start:\n{body}"
        );
    }
    assert!(
        body.contains(&format!(
            "regiongate_build_info{{commit=\"{}\",version=\"{}\"}} 1",
            env!("REGIONGATE_COMMIT"),
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
    // Once the replica was measured and the view refreshed, every name the dashboard and the alert rules
    // query is one the gateway exports.
    let mut body = String::new();
    let measured = common::eventually(Duration::from_secs(30), || {
        let fetched = gateway.http("/metrics").map(|(_, b)| b).unwrap_or_default();
        body = fetched.clone();
        async move {
            fetched.contains("regiongate_replica_lag_seconds{")
                && fetched.contains("regiongate_view_staleness_seconds{")
                && fetched.contains("regiongate_view_refresh_seconds_bucket{")
        }
    })
    .await;
    assert!(
        measured,
        "no lag or view staleness measured:\n{body}\n{}",
        gateway.log()
    );
    let exported = families(&body);
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/regiongate.json")).unwrap();
    let queries: Vec<String> = {
        let json: serde_json::Value =
            serde_json::from_str(&dashboard).expect("the dashboard is JSON");
        json["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["targets"].as_array().unwrap().clone())
            .map(|t| t["expr"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(queries.len() >= 20, "{queries:?}");
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    for (source, text) in [
        ("dashboard", queries.join("\n")),
        ("alert rules", rules_text),
    ] {
        let used = metric_names(&text);
        assert!(used.len() > 5, "{source}: {used:?}");
        let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{source} queries metrics the gateway does not export: {unknown:?}"
        );
    }
    let _ = port;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_commands_pgbouncer_users_know() {
    let database = common::fresh_database("pgb");
    let dir = temp_dir("pgb");
    let (path, port, _) = write_config(&dir, &database, "batching: { tables: [ events ] }\n");
    let _shared = start_from_file(&path).await;
    let url =
        format!("host=127.0.0.1 port={port} user={database} password={PASSWORD} dbname={database}");
    let client = common::connect(&url).await;
    client.query_one("SELECT 1", &[]).await.unwrap();
    let show = move |what: &str| {
        let what = what.to_string();
        tokio::task::spawn_blocking(move || stdout(&psql_as(port, "ops", "regiongate", &what)))
    };
    let version = show("SHOW VERSION").await.unwrap();
    assert!(
        version.contains(&format!(
            "regiongate {} (commit ",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
    let databases = show("SHOW DATABASES").await.unwrap();
    assert!(
        databases.starts_with("name|host|port|database|pool_size|min_pool_size|pool_mode|current_connections|paused|users")
            && databases.contains(&format!("\n{database}|127.0.0.1|")),
        "{databases}"
    );
    let users = show("SHOW USERS").await.unwrap();
    assert!(users.contains("ops|transaction|true|"), "{users}");
    let lists = show("SHOW LISTS").await.unwrap();
    assert!(
        lists.contains("pools|1") && lists.contains("console_clients|1"),
        "{lists}"
    );
    // The console's own session is a client.
    let clients = show("SHOW CLIENTS").await.unwrap();
    assert!(clients.contains("|ops|regiongate||console|"), "{clients}");
    let config = show("SHOW CONFIG").await.unwrap();
    for key in [
        "batching.tables|events",
        "batching.max_rows|",
        "tls.mode|disable",
        "server_tls.mode|",
        "limits.statement_timeout|",
        "routing.ban_time|",
        "pool.connect_timeout|",
    ] {
        assert!(config.contains(key), "{key} missing: {config}");
    }
    assert!(show("SHOW STATS")
        .await
        .unwrap()
        .starts_with("stat|value|per_second"));

    // SUSPEND (as PAUSE) holds the next transaction: its client shows as waiting, and its pool counts it.
    show("SUSPEND").await.unwrap();
    let held = {
        let client = common::connect(&url).await;
        tokio::spawn(async move {
            client
                .query_one("SELECT 2", &[])
                .await
                .map(|r| r.get::<_, i32>(0))
        })
    };
    let waiting = common::eventually(Duration::from_secs(5), || async {
        let clients = show("SHOW CLIENTS").await.unwrap();
        let pools = show("SHOW POOLS").await.unwrap();
        clients.contains("|waiting|")
            && pools
                .lines()
                .any(|l| l.starts_with(&format!("{database}|")) && l.ends_with("|1"))
    })
    .await;
    assert!(
        waiting,
        "{}\n{}",
        show("SHOW CLIENTS").await.unwrap(),
        show("SHOW POOLS").await.unwrap()
    );
    show("RESUME").await.unwrap();
    assert_eq!(held.await.unwrap().unwrap(), 2);

    // A login to a database that does not exist leaves no pool behind.
    let missing = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user={database} password={PASSWORD} dbname=no_such_db"
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("no such database");
    assert_eq!(common::sqlstate(&missing), "3D000");
    assert!(!show("SHOW POOLS").await.unwrap().contains("no_such_db"));

    // KILL ends the database's sessions, idle ones too, and closes its server connections.
    show(&format!("KILL {database}")).await.unwrap();
    let killed = client.query_one("SELECT 1", &[]).await.unwrap_err();
    let code = common::sqlstate(&killed);
    assert!(code == "57P01" || killed.is_closed(), "{killed}");
    show("WAIT_CLOSE").await.unwrap();
    let pools = show("SHOW POOLS").await.unwrap();
    assert!(
        !pools.contains(&format!("{database}|{database}|")),
        "{pools}"
    );
    // New clients are welcome again.
    let again = common::connect(&url).await;
    again.query_one("SELECT 1", &[]).await.unwrap();
}
