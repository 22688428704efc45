//! ORM-style transactions in a multi-region topology: `routing.transactions: validated` (transactions start
//! where their first statement belongs and move to the primary, validated, at their first write) against
//! `primary` (every transaction that may write runs on the primary).
//!
//! A primary in us-east (120 ms round trip from the gateway), a replica in eu-west, the clients' and the
//! gateway's home region (1 ms), and one in ap-south (40 ms), each behind a latency relay. Clients run
//! transactions as an ORM session sends them (BEGIN, statements, COMMIT): 90% only read (two point SELECTs),
//! 10% read a row, then update it from what they read. Both gateways run side by side on the same topology,
//! in turn, twice. The table goes into benches/README.md.
//!
//!     cargo run --release -p benches --bin transactions [-- SECONDS]

use anyhow::Result;
use benches::{connect, ms, now_utc, percentile, start_gateway, write_section};
use regiongate::metrics::METRICS;
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;
const ROWS: i32 = 10_000;
/// One transaction in this many reads, then writes.
const WRITE_EVERY: u64 = 10;

#[derive(Default)]
struct Outcome {
    read_only: Vec<Duration>,
    /// Read-only transactions right after the client's own write: read-your-writes sends their reads to a
    /// server that shows the write, the primary when the home replica has not replayed it yet.
    read_after_write: Vec<Duration>,
    read_write: Vec<Duration>,
    aborted: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let (seconds, duration) = benches::seconds_argument(20)?;
    // Held to the end: dropping it stops the servers.
    let (_topology, regions) = benches::three_regions(ROWS).await?;
    let mut gateways = Vec::new();
    for mode in ["validated", "primary"] {
        let port = start_gateway(&format!(
            "home_region: eu-west\n{regions}routing: {{ transactions: {mode} }}\n"
        ))
        .await?;
        gateways.push((mode, port));
    }
    // Let the monitors measure every replica before timing anything.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let counters = ["read-only", "moved", "aborted"].map(|outcome| {
        METRICS
            .transactions_routed
            .with_label_values(&["replica", outcome])
    });
    let predicted = METRICS
        .transactions_routed
        .with_label_values(&["primary", "predicted"]);
    let mut results: Vec<(&str, Outcome, [u64; 4])> = Vec::new();
    for round in 0..2 {
        for &(mode, port) in &gateways {
            eprintln!("round {round}: routing.transactions: {mode}");
            let before = [0, 1, 2].map(|i| counters[i].get());
            let predicted_before = predicted.get();
            let url = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
            let outcome = run(&url, duration).await?;
            let counted = [
                counters[0].get() - before[0],
                counters[1].get() - before[1],
                counters[2].get() - before[2],
                predicted.get() - predicted_before,
            ];
            results.push((mode, outcome, counted));
        }
    }

    let mut table = String::from(
        "| routing.transactions | transactions | read-only: started on a replica | read-only median ms | read-only p99 ms | right after the client's write: median ms | p99 ms | read-then-write | median ms | p99 ms | moved | predicted | aborted (40001) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for mode in ["validated", "primary"] {
        let runs: Vec<_> = results.iter().filter(|r| r.0 == mode).collect();
        let mut read_only: Vec<Duration> =
            runs.iter().flat_map(|r| r.1.read_only.clone()).collect();
        let mut read_write: Vec<Duration> =
            runs.iter().flat_map(|r| r.1.read_write.clone()).collect();
        let mut after_write: Vec<Duration> = runs
            .iter()
            .flat_map(|r| r.1.read_after_write.clone())
            .collect();
        after_write.sort();
        read_only.sort();
        read_write.sort();
        let aborted: u64 = runs.iter().map(|r| r.1.aborted).sum();
        let counted = |i: usize| runs.iter().map(|r| r.2[i]).sum::<u64>();
        let total = read_only.len() + after_write.len() + read_write.len() + aborted as usize;
        table.push_str(&format!(
            "| {mode} | {total} | {:.1}% | {:.2} | {:.2} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {} | {aborted} ({:.2}%) |\n",
            counted(0) as f64 * 100.0 / (read_only.len() + after_write.len()).max(1) as f64,
            ms(percentile(&read_only, 0.5)),
            ms(percentile(&read_only, 0.99)),
            ms(percentile(&after_write, 0.5)),
            ms(percentile(&after_write, 0.99)),
            read_write.len(),
            ms(percentile(&read_write, 0.5)),
            ms(percentile(&read_write, 0.99)),
            counted(1),
            counted(3),
            aborted as f64 * 100.0 / total.max(1) as f64,
        ));
    }
    let text = format!(
        "Run on {}: {} cores; {seconds} s per mode and round, 2 rounds, interleaved; {CLIENTS} clients in eu-west, \
         each running ORM-style transactions back to back (BEGIN, statements, COMMIT): 9 in 10 read two rows by \
         primary key, 1 in 10 reads a row and updates it from what it read (its first statement differs from the \
         read-only ones', so that the prediction learns it). Relays: eu-west (home) 1 ms round trip, ap-south \
         40 ms, primary (us-east) 120 ms. The read-only transaction a client runs right after its own write is \
         shown apart: read-your-writes sends it where the write shows, the primary while the home replica has \
         not replayed it.\n\n{table}",
        now_utc(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    println!("{text}");
    write_section("transactions", &text)?;
    Ok(())
}

/// Runs the clients against `url` for `duration`.
async fn run(url: &str, duration: Duration) -> Result<Outcome> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let client = connect(url).await?;
        tasks.push(tokio::spawn(async move {
            let read = client
                .prepare("SELECT qty FROM items WHERE id = $1")
                .await?;
            let read_for_update = client
                .prepare("SELECT qty, id FROM items WHERE id = $1")
                .await?;
            let update = client
                .prepare("UPDATE items SET qty = $1 WHERE id = $2")
                .await?;
            let mut outcome = Outcome::default();
            let mut id = (i as i32 * 7919) % ROWS + 1;
            let mut n: u64 = i as u64;
            let mut wrote = false;
            while Instant::now() < deadline {
                n += 1;
                id = id % ROWS + 1;
                let started = Instant::now();
                client.batch_execute("BEGIN").await?;
                if n.is_multiple_of(WRITE_EVERY) {
                    let qty: i32 = client.query_one(&read_for_update, &[&id]).await?.get(0);
                    match client.execute(&update, &[&(qty + 1), &id]).await {
                        Ok(_) => {
                            client.batch_execute("COMMIT").await?;
                            outcome.read_write.push(started.elapsed());
                            wrote = true;
                        }
                        Err(e) if e.code().map(|c| c.code()) == Some("40001") => {
                            client.batch_execute("ROLLBACK").await?;
                            outcome.aborted += 1;
                        }
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    client.query_one(&read, &[&id]).await?;
                    client.query_one(&read, &[&(id % ROWS + 1)]).await?;
                    client.batch_execute("COMMIT").await?;
                    let list = if std::mem::take(&mut wrote) {
                        &mut outcome.read_after_write
                    } else {
                        &mut outcome.read_only
                    };
                    list.push(started.elapsed());
                }
            }
            Ok::<_, anyhow::Error>(outcome)
        }));
    }
    let mut all = Outcome::default();
    for task in tasks {
        let outcome = task.await??;
        all.read_only.extend(outcome.read_only);
        all.read_after_write.extend(outcome.read_after_write);
        all.read_write.extend(outcome.read_write);
        all.aborted += outcome.aborted;
    }
    Ok(all)
}
