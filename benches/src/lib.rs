//! What the benchmark programs in `src/bin` share.

use anyhow::{Context, Result};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

/// A tokio-postgres client for `url`, its connection driven in the background.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| url.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A gateway in this process with `servers` (and more YAML), user app/app by SCRAM, a pool of 16; its port.
pub async fn start_gateway(servers: &str) -> Result<u16> {
    let yaml = format!(
        "listen: 127.0.0.1:0\n{servers}auth: {{ method: scram-sha-256, users: [ {{ name: app, password: app }} ] }}\npool: {{ size: 16 }}\n"
    );
    let config =
        regiongate::config::Config::parse(&yaml, "bench").map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = regiongate::Gateway::bind(config).await?;
    let port = gateway.local_addr().port();
    tokio::spawn(gateway.run(std::future::pending()));
    Ok(port)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn now_utc() -> String {
    let output = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    output
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in benches/README.md.
pub fn write_section(name: &str, text: &str) -> Result<()> {
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

/// The first argument, a number of seconds, or `default`; and as a duration.
pub fn seconds_argument(default: u64) -> Result<(u64, Duration)> {
    let seconds = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(default);
    Ok((seconds, Duration::from_secs(seconds)))
}

/// The routing benchmarks' topology: a primary in us-east (120 ms round trip from here), a replica in eu-west
/// (1 ms) and one in ap-south (40 ms), each behind a latency relay; an `app` user and database with a table
/// `items (id, qty)` of `rows` rows. Also the gateway's YAML for its servers.
pub async fn three_regions(rows: i32) -> Result<(testbed::Topology, String)> {
    use testbed::{RegionSpec, Topology};
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
        &format!("CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL); INSERT INTO items SELECT g, 0 FROM generate_series(1, {rows}) g; ALTER TABLE items OWNER TO app"),
    )?;
    let servers = topology.gateway_yaml("app");
    Ok((topology, servers))
}
