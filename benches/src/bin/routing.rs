//! Read latency with region-aware routing against primary-only routing, on a real multi-region topology.
//!
//! A primary in us-east (120 ms round trip from the gateway), a replica in eu-west, the gateway's home region
//! (1 ms), and one in ap-south (40 ms), each behind a latency relay. Two gateways run side by side on the same
//! topology: one routes reads, one sends everything to the primary. Reader clients run point SELECTs while
//! writer clients update rows, through each gateway in turn; the baseline is the same SELECT sent straight to
//! the home replica through its relay. The table goes into benches/README.md.
//!
//!     cargo run --release -p benches --bin routing [-- SECONDS]

use anyhow::Result;
use benches::{connect, ms, now_utc, percentile, start_gateway, write_section};
use std::time::{Duration, Instant};

const READERS: usize = 8;
const WRITERS: usize = 2;
const ROWS: i32 = 10_000;

#[tokio::main]
async fn main() -> Result<()> {
    let (seconds, duration) = benches::seconds_argument(20)?;
    let (topology, regions) = benches::three_regions(ROWS).await?;
    let routed = start_gateway(&format!("home_region: eu-west\n{regions}")).await?;
    let primary_only = start_gateway(&format!(
        "primary: '{}'\n",
        format_args!(
            "postgres://postgres:{}@{}/app",
            testbed::SUPERUSER_PASSWORD,
            topology.primary.addr()
        )
    ))
    .await?;
    // Let the monitors measure every replica before timing anything.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let home = topology.regions[0].replicas[0].addr();
    let direct = format!(
        "host={} port={} user=app password=app dbname=app",
        home.ip(),
        home.port()
    );
    let mut results = Vec::new();
    for round in 0..2 {
        for (name, port) in [
            ("regiongate, routed", routed),
            ("regiongate, primary only", primary_only),
        ] {
            eprintln!("round {round}: {name}");
            let url = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
            let (reads, writes) = run(&url, duration, WRITERS).await?;
            results.push((name, reads, writes));
        }
        eprintln!("round {round}: home replica directly");
        let (reads, writes) = run(&direct, duration, 0).await?;
        results.push(("home replica, direct (baseline)", reads, writes));
    }

    let mut table = String::from(
        "| target | reads | read median ms | read p99 ms | writes | write median ms |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let mut summary = Vec::new();
    for name in [
        "home replica, direct (baseline)",
        "regiongate, routed",
        "regiongate, primary only",
    ] {
        let mut reads: Vec<Duration> = results
            .iter()
            .filter(|r| r.0 == name)
            .flat_map(|r| r.1.clone())
            .collect();
        let mut writes: Vec<Duration> = results
            .iter()
            .filter(|r| r.0 == name)
            .flat_map(|r| r.2.clone())
            .collect();
        reads.sort();
        writes.sort();
        let (median, p99) = (percentile(&reads, 0.5), percentile(&reads, 0.99));
        summary.push((name, median, p99));
        table.push_str(&format!(
            "| {name} | {} | {:.2} | {:.2} | {} | {} |\n",
            reads.len(),
            ms(median),
            ms(p99),
            writes.len(),
            if writes.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", ms(percentile(&writes, 0.5)))
            }
        ));
    }
    let (_, base_median, base_p99) = summary[0];
    let (_, routed_median, routed_p99) = summary[1];
    let text = format!(
        "Run on {}: {} cores; {seconds} s per target and round, 2 rounds, interleaved; {READERS} reader clients \
         (point SELECT by primary key) and {WRITERS} writer clients (UPDATE by primary key) through the gateways, \
         {READERS} readers only for the baseline. Relays: eu-west (home) 1 ms round trip, ap-south 40 ms, primary \
         (us-east) 120 ms.\n\n{table}\nRouted reads against the home replica's round trip: median {:+.1}%, p99 {:+.1}%.\n",
        now_utc(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        (ms(routed_median) / ms(base_median) - 1.0) * 100.0,
        (ms(routed_p99) / ms(base_p99) - 1.0) * 100.0,
    );
    println!("{text}");
    write_section("routing", &text)?;
    drop(topology);
    primary_region(duration.min(Duration::from_secs(10))).await
}

/// A gateway in the primary's own region, which has no replica: reads with `routing.primary_reads: never`
/// (every read crosses to the nearest replica's region, as before the setting existed) against `local`.
async fn primary_region(duration: Duration) -> Result<()> {
    use testbed::{RegionSpec, Topology};
    eprintln!("starting the primary-region topology...");
    let topology = tokio::task::spawn_blocking(|| {
        Topology::start(
            "us-east",
            Duration::from_micros(100),
            &[RegionSpec::new("eu-west", 1, Duration::from_millis(40))],
        )
    })
    .await??;
    let cluster = &topology.primary.cluster;
    cluster.create_user_and_db("app", "app", "app")?;
    cluster.psql(
        "app",
        &format!("CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL); INSERT INTO items SELECT g, 0 FROM generate_series(1, {ROWS}) g; ALTER TABLE items OWNER TO app"),
    )?;
    let servers = topology.gateway_yaml("app");
    let mut ports = Vec::new();
    for mode in ["never", "local"] {
        let yaml = format!(
            "home_region: us-east
routing: {{ primary_reads: {mode} }}
{servers}"
        );
        ports.push((mode, start_gateway(&yaml).await?));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut reads: Vec<(&str, Vec<Duration>)> =
        ports.iter().map(|(m, _)| (*m, Vec::new())).collect();
    for round in 0..2 {
        for (i, (mode, port)) in ports.iter().enumerate() {
            eprintln!("round {round}: primary_reads {mode}");
            let url = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
            reads[i].1.extend(run(&url, duration, 0).await?.0);
        }
    }
    let mut table = String::from(
        "| routing.primary_reads | reads | read median ms | read p99 ms |\n|---|---:|---:|---:|\n",
    );
    for (mode, latencies) in &mut reads {
        latencies.sort();
        table.push_str(&format!(
            "| {mode} | {} | {:.2} | {:.2} |\n",
            latencies.len(),
            ms(percentile(latencies, 0.5)),
            ms(percentile(latencies, 0.99)),
        ));
    }
    let text = format!(
        "Run on {}: {} s per setting and round, 2 rounds, interleaved; {READERS} reader clients (point SELECT by \
         primary key) through a gateway whose home region is the primary's (us-east, 0.2 ms round trip), which \
         has no replica; the nearest replica is eu-west's (80 ms).\n\n{table}",
        now_utc(),
        duration.as_secs(),
    );
    println!("{text}");
    write_section("routing-primary-region", &text)?;
    Ok(())
}

/// Runs readers (and writers) against `url` for `duration`; returns read and write latencies.
async fn run(
    url: &str,
    duration: Duration,
    writers: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for i in 0..READERS + writers {
        let client = connect(url).await?;
        let write = i >= READERS;
        tasks.push(tokio::spawn(async move {
            let statement = if write {
                client
                    .prepare("UPDATE items SET qty = qty + 1 WHERE id = $1")
                    .await?
            } else {
                client
                    .prepare("SELECT qty FROM items WHERE id = $1")
                    .await?
            };
            let mut latencies = Vec::new();
            let mut id = (i as i32 * 7919) % ROWS + 1;
            while Instant::now() < deadline {
                let started = Instant::now();
                if write {
                    client.execute(&statement, &[&id]).await?;
                } else {
                    client.query_one(&statement, &[&id]).await?;
                }
                latencies.push(started.elapsed());
                id = id % ROWS + 1;
            }
            Ok::<_, anyhow::Error>((write, latencies))
        }));
    }
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for task in tasks {
        let (write, latencies) = task.await??;
        if write {
            writes.extend(latencies);
        } else {
            reads.extend(latencies);
        }
    }
    Ok((reads, writes))
}
