//! Materialized views against real PostgreSQL: scheduled refreshes, readers during CONCURRENTLY refreshes,
//! failures, several gateways, migrations, the demo views from a Python dashboard stack, and reads of views
//! served by a lagging replica whose copy of the views is fresh.

mod common;

use common::{direct, eventually, gateway_for, PASSWORD};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Everything the gateways of this test binary log, for the tests that check an event was logged.
fn captured_log() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOG: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static std::sync::Mutex<Vec<u8>> = Box::leak(Box::default());
        struct Writer(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for Writer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter("info")
            .with_writer(move || Writer(log))
            .try_init();
        log
    })
}

/// Runs a command on the admin console with psql.
fn admin(gw: &common::TestGateway, command: &str) -> std::process::Output {
    Command::new("psql")
        .env("PGPASSWORD", PASSWORD)
        .args(["-h", "127.0.0.1", "-p", &gw.addr.port().to_string()])
        .args([
            "-U",
            &gw.database,
            "-d",
            "regiongate",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-c", command])
        .output()
        .expect("running psql")
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The successful refreshes of a view in the history: (slot, gateway).
async fn successes(database: &str, view: &str) -> Vec<(Option<SystemTime>, String)> {
    direct(database)
        .await
        .query(
            "SELECT slot, gateway FROM regiongate.view_refreshes \
             WHERE view_name = $1 AND error IS NULL ORDER BY id",
            &[&view],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_on_a_one_second_schedule_is_refreshed_every_second() {
    let database = common::fresh_database("views_tick");
    let setup = direct(&database).await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE sales (region text, amount int); ALTER TABLE sales OWNER TO {database};
             INSERT INTO sales VALUES ('eu-west', 10)"
        ))
        .await
        .unwrap();
    let gw = gateway_for(
        &database,
        &format!(
            "{}views:\n  - {{ name: sales_by_region, query: 'SELECT region, sum(amount) AS total FROM sales GROUP BY region', \
             unique_key: [region], schedule: every 1s }}\n",
            common::own_user(&database)
        ),
    )
    .await;
    let client = gw.connect().await;
    // Created on start, with the data of that moment.
    let created = eventually(Duration::from_secs(10), || async {
        client
            .query_opt(
                "SELECT total FROM sales_by_region WHERE region = 'eu-west'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, i64>(0) == 10)
    })
    .await;
    assert!(created, "the view was not created");
    setup
        .execute("INSERT INTO sales VALUES ('eu-west', 5)", &[])
        .await
        .unwrap();
    let written = Instant::now();
    let refreshed = eventually(Duration::from_secs(5), || async {
        client
            .query_one(
                "SELECT total FROM sales_by_region WHERE region = 'eu-west'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 15
    })
    .await;
    assert!(refreshed, "the new row never showed in the view");
    assert!(
        written.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        written.elapsed()
    );
    // Three more runs, one per second, each for the next slot of the schedule.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let slots: Vec<SystemTime> = successes(&database, "sales_by_region")
        .await
        .into_iter()
        .filter_map(|(slot, _)| slot)
        .collect();
    assert!(slots.len() >= 4, "{slots:?}");
    // Runs are named by their one-second slots. A run that overran its second makes the scheduler skip the
    // slot it overran (a loaded machine can do that), so gaps are whole seconds, not always one.
    for pair in slots.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        assert!(
            gap.subsec_nanos() == 0 && gap >= Duration::from_secs(1),
            "{slots:?}"
        );
    }
    // Each ran on time: it started before its second was over.
    let late: Vec<f64> = direct(&database)
        .await
        .query(
            "SELECT extract(epoch FROM started_at - slot)::float8 FROM regiongate.view_refreshes \
             WHERE slot IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        late.iter().all(|l| (0.0..1.0).contains(l)),
        "started late: {late:?}"
    );
    let show = text(&admin(&gw, "SHOW VIEWS"));
    assert!(
        show.contains("sales_by_region") && show.contains("every 1s"),
        "{show}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_during_concurrent_refreshes_never_see_an_error_or_an_empty_view() {
    let database = common::fresh_database("views_readers");
    let setup = direct(&database).await;
    // Each refresh takes at least 1.5 s (the sleep runs once per refresh).
    setup
        .batch_execute(&format!(
            "CREATE TABLE items (id int PRIMARY KEY, price int);
             INSERT INTO items SELECT i, i FROM generate_series(1, 1000) i;
             CREATE FUNCTION slow() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 0 FROM pg_sleep(1.5)';
             ALTER TABLE items OWNER TO {database}; ALTER FUNCTION slow() OWNER TO {database};"
        ))
        .await
        .unwrap();
    let gw = gateway_for(
        &database,
        &format!(
            "{}views:\n  - {{ name: priced, query: 'SELECT id, price + s.zero AS price FROM items CROSS JOIN (SELECT slow() AS zero) s', \
             unique_key: [id], schedule: every 1s }}\n",
            common::own_user(&database)
        ),
    )
    .await;
    let client = gw.connect().await;
    let ready = eventually(Duration::from_secs(10), || async {
        client
            .query_one("SELECT count(*) FROM priced", &[])
            .await
            .is_ok()
    })
    .await;
    assert!(ready, "the view was not created");
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let slowest_ms = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let client = gw.connect().await;
        let (stop, reads, slowest_ms) = (stop.clone(), reads.clone(), slowest_ms.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let row = client
                    .query_one("SELECT count(*), sum(price) FROM priced", &[])
                    .await
                    .unwrap_or_else(|e| panic!("a reader saw an error: {e}"));
                slowest_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                assert_eq!(row.get::<_, i64>(0), 1000, "a reader saw a partial view");
                assert_eq!(row.get::<_, i64>(1), 500_500);
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Scheduled refreshes run meanwhile, and an operator's REFRESH VIEW too.
    let started = Instant::now();
    let manual = tokio::task::spawn_blocking({
        let port = gw.addr.port();
        let database = database.clone();
        move || {
            let gw_like = (port, database);
            Command::new("psql")
                .env("PGPASSWORD", PASSWORD)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &gw_like.0.to_string(),
                    "-U",
                    &gw_like.1,
                ])
                .args(["-d", "regiongate", "-X", "-c", "REFRESH VIEW priced"])
                .output()
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    let manual = manual.await.unwrap();
    let refreshes = successes(&database, "priced").await.len();
    assert!(
        refreshes >= 3,
        "{refreshes} refreshes in {:?}",
        started.elapsed()
    );
    // REFRESH VIEW waited for any refresh in flight, then ran: never two at once.
    assert!(text(&manual).contains("REFRESH VIEW"), "{}", text(&manual));
    // CONCURRENTLY: a reader never waited for a refresh (each holds the view for at least 1.5 s; the margin
    // is for a loaded machine).
    let slowest = slowest_ms.load(Ordering::Relaxed);
    assert!(
        slowest < 1000,
        "a read took {slowest} ms: readers were blocked"
    );
    assert!(reads.load(Ordering::Relaxed) > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_refresh_is_reported_and_the_old_contents_stay_served() {
    let database = common::fresh_database("views_broken");
    let setup = direct(&database).await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE base (k int PRIMARY KEY, v int); INSERT INTO base VALUES (1, 10), (2, 20);
             CREATE TABLE switch (divisor int); INSERT INTO switch VALUES (1);
             ALTER TABLE base OWNER TO {database}; ALTER TABLE switch OWNER TO {database};"
        ))
        .await
        .unwrap();
    let log = captured_log();
    let gw = gateway_for(
        &database,
        &format!(
            "{}views:\n  - {{ name: ratio, query: 'SELECT k, v / (SELECT divisor FROM switch) AS v FROM base', \
             unique_key: [k], schedule: every 1s }}\n  \
             - {{ name: misspelt, query: 'SELEC k FROM base', schedule: every 1s }}\n",
            common::own_user(&database)
        ),
    )
    .await;
    let client = gw.connect().await;
    let ready = eventually(Duration::from_secs(10), || async {
        client
            .query_one("SELECT sum(v) FROM ratio", &[])
            .await
            .is_ok()
    })
    .await;
    assert!(ready, "the view was not created");
    let failures = || {
        views::metrics::REFRESH_FAILURES
            .with_label_values(&["ratio"])
            .get()
    };
    let failures_before = failures();
    // The definition now divides by zero, and new data arrives that the view will not get.
    setup
        .batch_execute("UPDATE switch SET divisor = 0; INSERT INTO base VALUES (3, 30)")
        .await
        .unwrap();
    let manual = admin(&gw, "REFRESH VIEW ratio");
    assert!(!manual.status.success());
    assert!(
        text(&manual).contains("22012 division by zero"),
        "{}",
        text(&manual)
    );
    let reported = eventually(Duration::from_secs(5), || async {
        failures() >= failures_before + 3
    })
    .await;
    assert!(
        reported,
        "failures counted: {}",
        failures() - failures_before
    );
    let errors: Vec<String> = direct(&database)
        .await
        .query(
            "SELECT error FROM regiongate.view_refreshes WHERE view_name = 'ratio' AND error IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(errors.len() >= 3, "{errors:?}");
    assert!(
        errors.iter().all(|e| e.contains("division by zero")),
        "{errors:?}"
    );
    // Logged, with the view and the SQLSTATE as fields.
    let logged = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(
        logged.lines().any(|l| l.contains("view refresh failed")
            && l.contains("\"view\":\"ratio\"")
            && l.contains("\"sqlstate\":\"22012\"")),
        "{logged}"
    );
    // A definition that does not even parse: the view cannot be created, and each run says why.
    let misspelt: Vec<String> = direct(&database)
        .await
        .query(
            "SELECT error FROM regiongate.view_refreshes WHERE view_name = 'misspelt'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !misspelt.is_empty() && misspelt.iter().all(|e| e.contains("42601")),
        "{misspelt:?}"
    );
    assert!(logged.contains("cannot create the view"), "{logged}");
    // The last good contents are still served.
    let row = client
        .query_one("SELECT count(*), sum(v) FROM ratio", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2, 30));
    let show = text(&admin(&gw, "SHOW VIEWS"));
    assert!(show.contains("division by zero"), "{show}");
    let metrics = regiongate::metrics::METRICS.render();
    assert!(
        metrics.contains("regiongate_view_refresh_failures_total{view=\"ratio\"}"),
        "{metrics}"
    );
    // Fixed: the next run succeeds.
    setup
        .batch_execute("UPDATE switch SET divisor = 1")
        .await
        .unwrap();
    let recovered = eventually(Duration::from_secs(5), || async {
        client
            .query_one("SELECT sum(v) FROM ratio", &[])
            .await
            .unwrap()
            .get::<_, Option<i64>>(0)
            == Some(60)
    })
    .await;
    assert!(recovered, "the view did not recover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_refresh_each_view_once_per_run() {
    let database = common::fresh_database("views_two");
    let setup = direct(&database).await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE events (kind text); INSERT INTO events VALUES ('a'), ('b');
             ALTER TABLE events OWNER TO {database};"
        ))
        .await
        .unwrap();
    let yaml = |name: &str| {
        format!(
            "name: {name}\n\
             auth: {{ method: scram-sha-256, users: [ {{ name: {database}, password: {PASSWORD} }} ] }}\n\
             views:\n  - {{ name: kinds, query: 'SELECT kind, count(*) AS n FROM events GROUP BY kind', unique_key: [kind], schedule: every 1s }}\n  \
             - {{ name: total, query: 'SELECT count(*) AS n FROM events', schedule: every 1s }}\n"
        )
    };
    let a = gateway_for(&database, &yaml("gateway-a")).await;
    let b = gateway_for(&database, &yaml("gateway-b")).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    drop((a, b));
    for view in ["kinds", "total"] {
        let runs: Vec<(SystemTime, String)> = successes(&database, view)
            .await
            .into_iter()
            .filter_map(|(slot, gateway)| slot.map(|s| (s, gateway)))
            .collect();
        assert!(runs.len() >= 4, "{view}: {runs:?}");
        let mut slots: Vec<SystemTime> = runs.iter().map(|(s, _)| *s).collect();
        slots.sort();
        let before = slots.len();
        slots.dedup();
        assert_eq!(
            slots.len(),
            before,
            "{view}: a run was refreshed twice: {runs:?}"
        );
        // And runs are the schedule's: whole seconds apart.
        for pair in slots.windows(2) {
            let gap = pair[1].duration_since(pair[0]).unwrap();
            assert!(
                gap.subsec_nanos() == 0 && gap >= Duration::from_secs(1),
                "{view}: {runs:?}"
            );
        }
    }
    // Both gateways tried every run; the loser of each found it taken (busy or already done).
    let lost: u64 = ["busy", "already-done"]
        .iter()
        .map(|outcome| {
            views::metrics::REFRESHES
                .with_label_values(&["kinds", outcome])
                .get()
        })
        .sum();
    assert!(lost >= 3, "the second gateway never competed: {lost}");
}

fn write_config(database: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "regiongate-views-{database}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("regiongate.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nprimary: postgres://{database}:{PASSWORD}@127.0.0.1:{}/{database}\n\
             auth: {{ method: scram-sha-256, users: [ {{ name: {database}, password: {PASSWORD} }} ] }}\n",
            common::cluster().port()
        ),
    )
    .unwrap();
    path
}

fn migrate(config: &std::path::Path, dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_regiongate"))
        .arg("migrate")
        .arg("--config")
        .arg(config)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("running regiongate migrate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_pending_files_once_and_refuses_an_edited_one() {
    let database = common::fresh_database("views_migrate");
    let config = write_config(&database);
    let dir = config.parent().unwrap().join("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("0001_a.sql"), "CREATE TABLE a (x int);").unwrap();
    std::fs::write(
        dir.join("0002_b.sql"),
        "CREATE TABLE b (x int); INSERT INTO b VALUES (1);",
    )
    .unwrap();
    let first = migrate(&config, &dir);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("applied 0002_b.sql"),
        "{}",
        text(&first)
    );
    let again = migrate(&config, &dir);
    assert!(
        text(&again).contains("nothing to apply"),
        "{}",
        text(&again)
    );

    // A failing file rolls back whole and is not recorded.
    std::fs::write(
        dir.join("0003_c.sql"),
        "CREATE TABLE c (x int); SELECT 1/0;",
    )
    .unwrap();
    let failed = migrate(&config, &dir);
    assert!(!failed.status.success());
    assert!(
        text(&failed).contains("0003_c.sql: 22012"),
        "{}",
        text(&failed)
    );
    std::fs::write(dir.join("0003_c.sql"), "CREATE TABLE c (x int);").unwrap();
    assert!(migrate(&config, &dir).status.success());

    // An applied file edited afterwards stops the run before anything else is applied.
    std::fs::write(dir.join("0002_b.sql"), "CREATE TABLE b (x int, y int);").unwrap();
    std::fs::write(dir.join("0004_d.sql"), "CREATE TABLE d (x int);").unwrap();
    let edited = migrate(&config, &dir);
    assert!(!edited.status.success());
    assert!(
        text(&edited).contains("0002_b.sql was applied with checksum"),
        "{}",
        text(&edited)
    );
    let client = direct(&database).await;
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["a", "b", "c"]);
    let applied: i64 = client
        .query_one("SELECT count(*) FROM regiongate.migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 3);
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_views_serve_a_sqlalchemy_dashboard_through_the_gateway() {
    let database = common::fresh_database("views_demo");
    let config = write_config(&database);
    let migrations = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
    let applied = migrate(&config, std::path::Path::new(migrations));
    assert!(applied.status.success(), "{}", text(&applied));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../testbed/sql/demo_data.sql");
    let loaded = Command::new("psql")
        .env("PGPASSWORD", PASSWORD)
        .args(["-X", "-q", "-v", "scale=0.01", "-f", script])
        .arg(format!(
            "host=127.0.0.1 port={} user={database} dbname={database}",
            common::cluster().port()
        ))
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{}", text(&loaded));
    assert!(
        text(&loaded).contains("order_items | 30000"),
        "{}",
        text(&loaded)
    );
    let _ = std::fs::remove_dir_all(config.parent().unwrap());

    let gw = gateway_for(
        &database,
        &format!(
            "{}views:\n  - {{ name: daily_sales_by_region, schedule: every 1m }}\n  \
             - {{ name: top_products, schedule: every 1m }}\n  - {{ name: active_customers, schedule: every 1m }}\n",
            common::own_user(&database)
        ),
    )
    .await;
    for view in ["daily_sales_by_region", "top_products", "active_customers"] {
        let refreshed = admin(&gw, &format!("REFRESH VIEW {view}"));
        assert!(refreshed.status.success(), "{}", text(&refreshed));
    }
    let url = format!(
        "postgresql+psycopg://{database}:{PASSWORD}@127.0.0.1:{}/{database}",
        gw.addr.port()
    );
    let dashboard = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/dashboard.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([dashboard, &url])
            .output()
            .expect("python3 (./test.sh provides it, with sqlalchemy and psycopg)")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "dashboard.py (./test.sh installs its packages): {}",
        text(&output)
    );
    let panels: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        panels["revenue_by_region"].as_array().unwrap().len(),
        3,
        "{panels}"
    );
    assert_eq!(
        panels["top_products"].as_array().unwrap().len(),
        10,
        "{panels}"
    );
    assert!(panels["daily_rows"].as_i64().unwrap() > 3 * 300, "{panels}");
    let show = text(&admin(&gw, "SHOW VIEWS"));
    assert!(
        show.contains("daily_sales_by_region") && show.contains("every 1m"),
        "{show}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_reads_use_a_lagging_replica_while_its_copy_of_the_views_is_fresh_enough() {
    use testbed::{RegionSpec, Topology};
    let topology = tokio::task::spawn_blocking(|| {
        let topology = Topology::start(
            "us-east",
            Duration::from_millis(5),
            &[RegionSpec::new("eu-west", 1, Duration::from_millis(1))],
        )
        .expect("starting the topology");
        let primary = &topology.primary.cluster;
        primary.create_user_and_db("app", PASSWORD, "app").unwrap();
        // A view made by a migration (no query in the configuration): the gateway only refreshes it.
        primary
            .psql(
                "app",
                "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2);
                 CREATE MATERIALIZED VIEW totals AS SELECT count(*) AS n FROM t;
                 GRANT SELECT ON t, totals TO app;",
            )
            .unwrap();
        topology
    })
    .await
    .unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nhome_region: eu-west\n{}auth: {{ method: scram-sha-256, users: [ {{ name: app, password: {PASSWORD} }} ] }}\n\
         admin: {{ users: [ app ] }}\nrouting: {{ monitor_interval: 50ms, max_lag: 500ms }}\n\
         views:\n  - {{ name: totals, schedule: every 1h, max_staleness: 5s }}\n",
        topology.gateway_yaml("app")
    );
    let config = regiongate::config::Config::parse(&yaml, "test").unwrap();
    let gateway = regiongate::Gateway::bind(config).await.unwrap();
    let port = gateway.local_addr().port();
    let shared = gateway.shared.clone();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async {
        let _ = stopped.await;
    }));
    let client = common::connect(&format!(
        "host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=app"
    ))
    .await;
    let eu_west = topology.regions[0].replicas[0].cluster.port();
    let primary = topology.primary.cluster.port();
    let served_by = |sql: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(sql, &[]).await.unwrap();
            row.get::<_, i32>(0) as u16
        }
    };
    let view_read = "SELECT inet_server_port(), n FROM totals";
    let table_read = "SELECT inet_server_port(), count(*) FROM t";

    // Refreshed now; once eu-west has replayed the refresh, view reads go there.
    let views = shared.views();
    views.refresh_now("totals").await.unwrap();
    let fresh_there = eventually(Duration::from_secs(20), || async {
        let picture = shared.regions().picture();
        picture.replicas[0].up && views.fits(1, 0, Instant::now())
    })
    .await;
    assert!(fresh_there, "eu-west never saw the refresh");
    assert_eq!(served_by(view_read).await, eu_west);

    // eu-west stops replaying: table reads leave it as soon as it lags over the 500 ms budget, but view reads
    // stay while its copy of the view is younger than the view's max_staleness (5 s).
    let refreshed_at = Instant::now();
    topology.regions[0].replicas[0]
        .cluster
        .pause_replay()
        .unwrap();
    let lagging = eventually(Duration::from_secs(10), || async {
        shared.regions().picture().replicas[0]
            .lag
            .is_some_and(|l| l > Duration::from_secs(1))
    })
    .await;
    assert!(lagging, "{:?}", shared.regions().picture());
    assert_eq!(served_by(table_read).await, primary);
    assert_eq!(served_by(view_read).await, eu_west);
    assert!(
        refreshed_at.elapsed() < Duration::from_secs(4),
        "the test itself was too slow"
    );

    // Past max_staleness, view reads go to the primary too.
    let moved = eventually(Duration::from_secs(10), || async {
        served_by(view_read).await == primary
    })
    .await;
    assert!(moved, "view reads stayed on a replica with a stale copy");
    assert!(refreshed_at.elapsed() >= Duration::from_secs(4));
    let routed = regiongate::metrics::METRICS
        .routed
        .with_label_values(&["eu-west", "replica", "view-fresh"])
        .get();
    assert!(routed >= 2, "{routed}");

    // Replay resumes and a new refresh arrives: back to eu-west.
    topology.regions[0].replicas[0]
        .cluster
        .resume_replay()
        .unwrap();
    views.refresh_now("totals").await.unwrap();
    let back = eventually(Duration::from_secs(10), || async {
        served_by(view_read).await == eu_west
    })
    .await;
    assert!(back, "view reads did not return to eu-west");
    let show = stdout_of_show_views(port);
    assert!(show.contains("staleness_eu-west"), "{show}");
    println!("{show}");
}

fn stdout_of_show_views(port: u16) -> String {
    let output = Command::new("psql")
        .env("PGPASSWORD", PASSWORD)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(["-d", "regiongate", "-X", "-c", "SHOW VIEWS"])
        .output()
        .unwrap();
    text(&output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_creates_and_schedules_views_added_to_the_file() {
    let database = common::fresh_database("views_reload");
    let path = write_config(&database);
    let gateway = regiongate::Gateway::bind_from(
        regiongate::config::Config::load(&path).unwrap(),
        Some(path.clone()),
    )
    .await
    .unwrap();
    let shared = gateway.shared.clone();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async {
        let _ = stopped.await;
    }));
    assert!(shared.views().specs().is_empty());
    let mut yaml = std::fs::read_to_string(&path).unwrap();
    yaml.push_str("views:\n  - { name: answer, query: 'SELECT 42 AS x', schedule: every 1s }\n");
    std::fs::write(&path, yaml).unwrap();
    shared.reload().unwrap();
    let client = direct(&database).await;
    let refreshed = eventually(Duration::from_secs(5), || async {
        successes(&database, "answer")
            .await
            .iter()
            .any(|(slot, _)| slot.is_some())
    })
    .await;
    assert!(refreshed, "the new view was not created and refreshed");
    let x: i32 = client
        .query_one("SELECT x FROM answer", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 42);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
