//! N+1 detection with real clients: a SQLAlchemy application with lazy relationships (reported) and with
//! eager loading (not), pgbench -S with 16 clients (not), and a loop typed into psql (reported).

mod common;

use common::{gateway, PASSWORD};
use std::process::Command;

async fn orm_shop(gw: &common::TestGateway, mode: &'static str) {
    let url = format!(
        "postgresql+psycopg://{db}:{PASSWORD}@127.0.0.1:{}/{db}",
        gw.addr.port(),
        db = gw.database
    );
    tokio::task::spawn_blocking(move || run_orm_shop(&url, mode))
        .await
        .unwrap();
}

fn run_orm_shop(url: &str, mode: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/orm_shop.py");
    let output = Command::new("python3")
        .args([script, url, mode])
        .output()
        .expect("python3 (./test.sh provides it, with sqlalchemy and psycopg)");
    assert!(
        output.status.success(),
        "orm_shop.py {mode} (./test.sh installs its packages): {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_lazy_loading_is_reported_and_eager_loading_is_not() {
    let gw = gateway("orm", "").await;
    orm_shop(&gw, "setup").await;
    orm_shop(&gw, "eager").await;
    assert!(
        gw.shared.nplus1.top().is_empty(),
        "eager loading reported: {:?}",
        gw.shared.nplus1.top()
    );

    orm_shop(&gw, "lazy").await;
    let reported = common::eventually(std::time::Duration::from_secs(5), || async {
        !gw.shared.nplus1.top().is_empty()
    })
    .await;
    assert!(reported, "the lazy-loading loop was not reported");
    let patterns = gw.shared.nplus1.top();
    assert_eq!(patterns.len(), 1, "{patterns:?}");
    let pattern = &patterns[0];
    assert!(pattern.normalized.contains("FROM orders"), "{pattern:?}");
    assert!(pattern.normalized.contains("customer_id"), "{pattern:?}");
    assert!(pattern.parent.contains("FROM customers"), "{pattern:?}");
    assert_eq!(
        pattern.statements, 20,
        "one query per customer: {pattern:?}"
    );
    assert_eq!(pattern.application_name, "orm-shop-lazy");
    assert!(pattern.suggestion.contains("ANY($1)"), "{pattern:?}");

    // The same report in the admin console.
    let console = common::connect(&format!(
        "host=127.0.0.1 port={} user={db} password={PASSWORD} dbname=regiongate",
        gw.addr.port(),
        db = gw.database
    ))
    .await;
    let rows = console.simple_query("SHOW NPLUS1").await.unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row in SHOW NPLUS1");
    assert_eq!(row.get("statements"), Some("20"));
    eprintln!(
        "SHOW NPLUS1: fingerprint={:?} statement={:?} parent={:?} episodes={:?} statements={:?} total_ms={:?} suggestion={:?}",
        row.get("fingerprint"),
        row.get("statement"),
        row.get("parent"),
        row.get("episodes"),
        row.get("statements"),
        row.get("total_ms"),
        row.get("suggestion")
    );
    let metrics = regiongate::metrics::METRICS.render();
    assert!(
        metrics.contains("regiongate_nplus1_episodes_total{fingerprint=\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_is_not_n_plus_one_but_a_psql_loop_is() {
    let gw = gateway("hot", "pool: { size: 4 }\n").await;
    let bench = |args: &[&str]| common::pgbench(gw.addr.port(), &gw.database, args);
    assert!(bench(&["-i", "-s", "1", "-q"]).status.success());
    for mode in ["simple", "prepared"] {
        let output = bench(&["-S", "-M", mode, "-c", "16", "-j", "2", "-t", "200", "-n"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        gw.shared.nplus1.top().is_empty(),
        "pgbench -S reported: {:?}",
        gw.shared.nplus1.top()
    );

    // A person's loop in psql: one parent query, then one query per account.
    let mut script = String::from("SELECT bid FROM pgbench_branches;\n");
    for aid in 1..=8 {
        script.push_str(&format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {aid};\n"
        ));
    }
    let port = gw.addr.port().to_string();
    let psql = |input: &[&str]| {
        let output = Command::new("psql")
            .env("PGPASSWORD", PASSWORD)
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                &gw.database,
                "-d",
                &gw.database,
            ])
            .args(input)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    // Sent as one multi-statement Query (psql -c), the loop is one round trip: not N+1.
    psql(&["-c", &script]);
    assert!(
        gw.shared.nplus1.top().is_empty(),
        "{:?}",
        gw.shared.nplus1.top()
    );
    // Typed statement by statement (psql -f sends each one as it reads it): N+1.
    let path = std::env::temp_dir().join(format!("nplus1-loop-{}.sql", std::process::id()));
    std::fs::write(&path, &script).unwrap();
    psql(&["-f", path.to_str().unwrap()]);
    let reported = common::eventually(std::time::Duration::from_secs(5), || async {
        !gw.shared.nplus1.top().is_empty()
    })
    .await;
    assert!(reported, "the psql loop was not reported");
    let patterns = gw.shared.nplus1.top();
    assert_eq!(patterns.len(), 1, "{patterns:?}");
    assert_eq!(patterns[0].statements, 8);
    assert_eq!(
        patterns[0].normalized,
        "SELECT abalance FROM pgbench_accounts WHERE aid = ?"
    );
}
