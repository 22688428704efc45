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
use benches::connect;
use regiongate::config::Config;
use regiongate::Gateway;
use std::time::{Duration, Instant};
use testbed::{RegionSpec, Topology};

const READERS: usize = 8;
const WRITERS: usize = 2;
const ROWS: i32 = 10_000;

#[tokio::main]
async fn main() -> Result<()> {
    let seconds: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    let duration = Duration::from_secs(seconds);
    eprintln!("starting the topology...");
    let topology = tokio::task::spawn_blocking(|| {
        Topology::start(
            "us-east",
            Duration::from_millis(60),
            &[
                RegionSpec::new("eu-west", 1, Duration::from_micros(500)),
                RegionSpec::new("ap-south", 1, Duration::from_millis(20)),
            ],
        )
    })
    .await??;
    topology
        .primary
        .cluster
        .create_user_and_db("app", "app", "app")?;
    topology.primary.cluster.psql(
        "app",
        &format!("CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL); INSERT INTO items SELECT g, 0 FROM generate_series(1, {ROWS}) g; ALTER TABLE items OWNER TO app"),
    )?;

    let regions = topology.gateway_yaml("app");
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
    Ok(())
}

async fn start_gateway(servers: &str) -> Result<u16> {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{servers}auth: {{ method: scram-sha-256, users: [ {{ name: app, password: app }} ] }}\npool: {{ size: 16 }}\n"
    );
    let config = Config::parse(&yaml, "bench").map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = Gateway::bind(config).await?;
    let port = gateway.local_addr().port();
    tokio::spawn(gateway.run(std::future::pending()));
    Ok(port)
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn now_utc() -> String {
    let output = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    output
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in benches/README.md.
fn write_section(name: &str, text: &str) -> Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let readme = std::fs::read_to_string(path).unwrap_or_default();
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let updated = match (readme.find(&begin), readme.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{begin}\n{text}{}", &readme[..b], &readme[e..]),
        _ => format!("{readme}\n{begin}\n{text}{end}\n"),
    };
    std::fs::write(path, updated)?;
    Ok(())
}
