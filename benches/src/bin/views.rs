//! Dashboard queries on the raw tables against the same panels read from their materialized views, through
//! the gateway, on the demo e-commerce data at its default scale (1M orders, ~3M order items).
//!
//! Starts a throwaway PostgreSQL 15, applies `migrations/`, loads `testbed/sql/demo_data.sql`, starts a gateway
//! with the three demo views configured, refreshes each once (REFRESH VIEW's path), then runs each panel's
//! query through the gateway: raw first, then from the view, and prints a Markdown table for
//! benches/README.md. Run from the repository root:
//!
//!     cargo run --release -p benches --bin views [-- SCALE [RAW_RUNS [VIEW_RUNS]]]

use anyhow::{bail, Context, Result};
use benches::connect;
use regiongate::config::Config;
use regiongate::Gateway;
use std::time::{Duration, Instant};
use testbed::{Cluster, ClusterOptions};
use tokio_postgres::Client;

/// (panel, query on the raw tables, the same panel from its view, whether both must agree exactly: a panel
/// relative to now() moves between the refresh and the raw query, so only its shape is compared).
const PANELS: &[(&str, &str, &str, bool)] = &[
    (
        "revenue per day and region, last 30 days",
        "SELECT date_trunc('day', o.created_at)::date AS day, o.region, sum(oi.quantity * oi.unit_price) AS revenue \
         FROM orders o JOIN order_items oi ON oi.order_id = o.id \
         WHERE o.created_at >= current_date - 30 GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT day, region, revenue FROM daily_sales_by_region WHERE day >= current_date - 30 ORDER BY 1, 2",
        true,
    ),
    (
        "revenue per region, all time",
        "SELECT o.region, sum(oi.quantity * oi.unit_price) FROM orders o JOIN order_items oi ON oi.order_id = o.id \
         GROUP BY 1 ORDER BY 1",
        "SELECT region, sum(revenue) FROM daily_sales_by_region GROUP BY 1 ORDER BY 1",
        true,
    ),
    (
        "top 10 products by revenue",
        "SELECT p.id, p.name, sum(oi.quantity * oi.unit_price) AS revenue FROM order_items oi \
         JOIN products p ON p.id = oi.product_id GROUP BY p.id, p.name ORDER BY revenue DESC, p.id LIMIT 10",
        "SELECT product_id, name, revenue FROM top_products ORDER BY revenue DESC, product_id LIMIT 10",
        true,
    ),
    (
        "the 20 most active customers of a region (orders in 30 days)",
        "SELECT c.id, count(*) AS orders_30d FROM customers c JOIN orders o ON o.customer_id = c.id \
         WHERE o.created_at > now() - interval '30 days' AND c.region = 'eu-west' \
         GROUP BY c.id ORDER BY orders_30d DESC, c.id LIMIT 20",
        "SELECT customer_id, orders_30d FROM active_customers WHERE region = 'eu-west' \
         ORDER BY orders_30d DESC, customer_id LIMIT 20",
        false,
    ),
];

const VIEWS_YAML: &str = "views:
  - { name: daily_sales_by_region, schedule: every 5m }
  - { name: top_products, schedule: every 5m }
  - { name: active_customers, schedule: every 5m }
";

#[tokio::main]
async fn main() -> Result<()> {
    let arg = |i: usize, default: &str| {
        std::env::args()
            .nth(i)
            .unwrap_or_else(|| default.to_string())
    };
    let scale = arg(1, "1");
    let raw_runs: usize = arg(2, "7").parse()?;
    let view_runs: usize = arg(3, "101").parse()?;
    eprintln!("starting PostgreSQL...");
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(&ClusterOptions {
            // A server sized for analytics, so that the raw queries are not held back by spills to disk.
            settings: vec![
                ("shared_buffers".into(), "1GB".into()),
                ("work_mem".into(), "64MB".into()),
                ("max_wal_size".into(), "4GB".into()),
            ],
            ..ClusterOptions::default()
        })
    })
    .await??;
    cluster.create_user_and_db("app", "app", "app")?;
    let direct = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=app",
        cluster.port()
    );
    let mut client = connect(&direct).await?;
    let applied = views::migrate::run(&mut client, std::path::Path::new("migrations")).await?;
    eprintln!("migrations applied: {applied:?}");

    eprintln!("loading the demo data at scale {scale}...");
    let started = Instant::now();
    let output = std::process::Command::new("psql")
        .env("PGPASSWORD", "app")
        .args([
            "-X",
            "-q",
            "-v",
            &format!("scale={scale}"),
            "-f",
            "testbed/sql/demo_data.sql",
        ])
        .arg(&direct)
        .output()
        .context("running psql")?;
    let load_time = started.elapsed();
    if !output.status.success() {
        bail!("demo_data.sql: {}", String::from_utf8_lossy(&output.stderr));
    }
    let counts: Vec<(String, i64)> = client
        .query(
            "SELECT 'customers', count(*) FROM customers UNION ALL SELECT 'products', count(*) FROM products \
             UNION ALL SELECT 'orders', count(*) FROM orders UNION ALL SELECT 'order_items', count(*) FROM order_items \
             UNION ALL SELECT 'events', count(*) FROM events",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let yaml = format!(
        "listen: 127.0.0.1:0\nprimary: postgres://app:app@127.0.0.1:{}/app\n\
         auth: {{ method: scram-sha-256, users: [ {{ name: app, password: app }} ] }}\nadmin: {{ users: [ app ] }}\n{VIEWS_YAML}",
        cluster.port()
    );
    let config = Config::parse(&yaml, "bench").map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = Gateway::bind(config).await?;
    let port = gateway.local_addr().port();
    let shared = gateway.shared.clone();
    tokio::spawn(gateway.run(std::future::pending()));
    let mut refreshes = Vec::new();
    for view in ["daily_sales_by_region", "top_products", "active_customers"] {
        match shared.views().refresh_now(view).await? {
            views::Outcome::Refreshed {
                rows,
                took,
                concurrently,
            } => refreshes.push(format!(
                "{view} {:.0} ms ({rows} rows{})",
                ms(took),
                if concurrently { ", CONCURRENTLY" } else { "" }
            )),
            other => bail!("{view}: {other:?}"),
        }
    }

    let through = connect(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=app"
    ))
    .await?;
    let mut rows = Vec::new();
    for (panel, raw, view, exact) in PANELS {
        eprintln!("{panel}...");
        // The same answer both ways (the views were just refreshed and nothing writes).
        let a = rows_of(&through.simple_query(raw).await?);
        let b = rows_of(&through.simple_query(view).await?);
        let first_column = |rows: &[Vec<Option<String>>]| {
            rows.iter().map(|r| r.first().cloned()).collect::<Vec<_>>()
        };
        let agree = if *exact {
            a == b
        } else {
            first_column(&a) == first_column(&b)
        };
        if !agree {
            bail!("{panel}: raw and view disagree:\n{a:?}\n{b:?}");
        }
        let raw_median = median(&through, raw, raw_runs).await?;
        let view_median = median(&through, view, view_runs).await?;
        rows.push((panel, raw_median, view_median));
    }

    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    let now = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()?;
    println!(
        "Run on {}: {} cores, PostgreSQL {version} (shared_buffers 1GB, work_mem 64MB); scale {scale}: {}. \
         Loading the data took {:.1} s (demo_data.sql, including foreign keys, view refreshes and ANALYZE). \
         One refresh each through REFRESH VIEW: {}. Medians through the gateway, one client, after one warm-up run: \
         {raw_runs} runs per raw query, {view_runs} per view query.\n",
        String::from_utf8_lossy(&now.stdout).trim(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        counts.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", "),
        load_time.as_secs_f64(),
        refreshes.join(", "),
    );
    println!("| dashboard panel | raw tables median ms | view median ms | speed-up |");
    println!("|---|---:|---:|---:|");
    for (panel, raw, view) in &rows {
        println!(
            "| {panel} | {:.2} | {:.3} | {:.0}× |",
            ms(*raw),
            ms(*view),
            raw.as_secs_f64() / view.as_secs_f64()
        );
    }
    let total_raw: Duration = rows.iter().map(|r| r.1).sum();
    let total_view: Duration = rows.iter().map(|r| r.2).sum();
    println!(
        "| the four panels together | {:.2} | {:.3} | {:.0}× |",
        ms(total_raw),
        ms(total_view),
        total_raw.as_secs_f64() / total_view.as_secs_f64()
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rows_of(messages: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// One warm-up run, then the median of `runs`.
async fn median(client: &Client, sql: &str, runs: usize) -> Result<Duration> {
    client.simple_query(sql).await?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        client.simple_query(sql).await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}
