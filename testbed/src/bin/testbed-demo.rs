//! `testbed-demo`: a multi-region topology on this machine and the gateway in front of it, for trying
//! regiongate by hand. A primary in us-east and replicas in eu-west and ap-south, each behind a latency
//! relay; the gateway runs as a child process (the `regiongate` binary) with eu-west as its home region.
//!
//! ```text
//! cargo build --release -p regiongate -p testbed && target/release/testbed-demo [--listen 127.0.0.1:6432]
//! ```
//!
//! The gateway is a separate process, not a library call, so that the testbed does not depend on the
//! gateway (the gateway's tests depend on the testbed). It is found as `$REGIONGATE`, else next to this
//! executable (where cargo builds both), else on `PATH`. Ctrl-C or SIGTERM stops the gateway and removes
//! the clusters.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use testbed::{RegionSpec, Topology};

const USAGE: &str = "usage: testbed-demo [--listen ADDR]   (ADDR defaults to 127.0.0.1:6432)";

fn main() -> Result<()> {
    let listen = listen_address()?;
    // Before any thread starts (the relays run on threads), so that every thread inherits the mask and
    // these signals reach only `wait_for_stop`. The gateway is started with the mask emptied again.
    let signals = block_signals()?;
    println!("Starting PostgreSQL 15: a primary and three streaming replicas...");
    let topology = Topology::start(
        "us-east",
        Duration::from_millis(40),
        &[
            RegionSpec::new("eu-west", 1, Duration::from_millis(1)),
            RegionSpec::new("ap-south", 2, Duration::from_millis(60)),
        ],
    )?;
    topology
        .primary
        .cluster
        .create_user_and_db("app", "app", "app")?;
    // The demo shop (migrations/0002, 0003) with its three dashboard views refreshed every minute, and the
    // events table's single-row inserts batched.
    let yaml = format!(
        "listen: {listen}\nhome_region: eu-west\n{}auth:\n  method: scram-sha-256\n  users:\n    - {{ name: app, password: app }}\n\
         admin: {{ users: [ app ] }}\nmetrics: {{ listen: '127.0.0.1:9930' }}\n\
         batching: {{ tables: [ events ] }}\n\
         views:\n  - {{ name: daily_sales_by_region, schedule: every 1m }}\n  - {{ name: top_products, schedule: every 1m }}\n  \
         - {{ name: active_customers, schedule: every 1m }}\n",
        topology.gateway_yaml("app")
    );
    // The file holds the superuser's password; tempfile creates it readable by its owner only.
    let mut config = tempfile::Builder::new()
        .prefix("regiongate-demo-")
        .suffix(".yaml")
        .tempfile()
        .context("writing the gateway's configuration")?;
    config.write_all(yaml.as_bytes())?;
    config.flush()?;

    let binary = regiongate_binary();
    load_demo_shop(&binary, config.path(), &topology)?;
    let mut command = Command::new(&binary);
    command.arg("--config").arg(config.path());
    // A child inherits the signal mask across exec, and the gateway must see SIGTERM to stop.
    // SAFETY: between fork and exec only async-signal-safe calls: sigemptyset and pthread_sigmask.
    unsafe {
        command.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            match libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) {
                0 => Ok(()),
                error => Err(std::io::Error::from_raw_os_error(error)),
            }
        });
    }
    let mut gateway = command.spawn().with_context(|| {
        format!(
            "starting {} (build it with `cargo build --release -p regiongate`, or set REGIONGATE)",
            binary.display()
        )
    })?;
    let result = ready(&mut gateway, &listen)
        .and_then(|()| {
            print_help(&topology, &listen);
            wait_for_stop(&signals, &mut gateway)
        })
        .and(stop(&mut gateway));
    // The clusters stop and their directories go when the topology is dropped.
    drop(topology);
    result
}

fn listen_address() -> Result<String> {
    let mut listen = "127.0.0.1:6432".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().context(USAGE)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    Ok(listen)
}

/// The repository this binary was built from: its migrations and the demo data script.
fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The demo shop: the schema and views (`regiongate migrate`) and a small data set (scale 0.01: 1k customers,
/// 10k orders), loaded on the primary before the gateway starts, so that the views, `SHOW VIEWS` and the N+1
/// example work at once.
fn load_demo_shop(
    binary: &std::path::Path,
    config: &std::path::Path,
    topology: &Topology,
) -> Result<()> {
    let repository = repository();
    println!("Creating the demo shop: regiongate migrate, then testbed/sql/demo_data.sql (scale 0.01)...");
    let migrated = Command::new(binary)
        .arg("migrate")
        .arg(config)
        .arg("--dir")
        .arg(repository.join("migrations"))
        .status()
        .with_context(|| format!("running {} migrate", binary.display()))?;
    if !migrated.success() {
        bail!("regiongate migrate failed ({migrated})");
    }
    let loaded = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "scale=0.01",
            "-f",
        ])
        .arg(repository.join("testbed/sql/demo_data.sql"))
        .arg(topology.primary.cluster.url("app"))
        .stdout(std::process::Stdio::null())
        .status()
        .context("running psql")?;
    if !loaded.success() {
        bail!("loading the demo data failed ({loaded})");
    }
    Ok(())
}

/// `$REGIONGATE`, else `regiongate` next to this executable, else `regiongate` from `PATH`.
fn regiongate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REGIONGATE") {
        return PathBuf::from(path);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("regiongate")));
    match beside {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("regiongate"),
    }
}

/// Waits until the gateway accepts connections, so that the help is printed when it is true.
fn ready(gateway: &mut Child, listen: &str) -> Result<()> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen}: an address like 127.0.0.1:6432"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = gateway.try_wait()? {
            bail!("regiongate exited before accepting clients ({status})");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("regiongate does not accept clients on {listen} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_help(topology: &Topology, listen: &str) {
    // The gateway reaches each server through its latency relay: SHOW REPLICAS and the log name the relay's
    // address, `SELECT inet_server_port()` the server's own port; both are listed.
    println!("\nTopology (one-way latency from this gateway):");
    println!("  role      region    address (relay)   server port  latency");
    println!(
        "  primary   us-east   {:<17} {:<12} 40 ms",
        topology.primary.addr().to_string(),
        topology.primary.cluster.port()
    );
    for (region, node) in topology.replicas() {
        let delay = if region == "eu-west" { "1 ms" } else { "60 ms" };
        println!(
            "  replica   {region:<9} {:<17} {:<12} {delay}",
            node.addr().to_string(),
            node.cluster.port()
        );
    }
    let app = format!("postgres://app:app@{listen}/app");
    let console = format!("postgres://app:app@{listen}/regiongate");
    println!(
        "\nregiongate listens on {listen} (home region eu-west), in front of a demo shop. Try:\n\n\
         Where a query goes (a read: the replica in eu-west; the NOTICE says why):\n    \
         psql '{app}' -c 'SET regiongate.explain = on' -c 'SELECT count(*) FROM orders' -c 'SELECT inet_server_port()'\n\n\
         A dashboard view, refreshed every minute on the primary, read from the nearest fresh replica:\n    \
         psql '{app}' -c 'SELECT * FROM daily_sales_by_region ORDER BY day DESC LIMIT 5'\n    \
         psql '{console}' -c 'SHOW VIEWS'\n\n\
         An ORM's N+1 loop (a customer, then each order one query at a time), and the report:\n    \
         psql '{app}' -c 'SELECT name FROM customers WHERE id = 1' -c 'SELECT status FROM orders WHERE id = 1' \\\n      \
         -c 'SELECT status FROM orders WHERE id = 2' -c 'SELECT status FROM orders WHERE id = 3' \\\n      \
         -c 'SELECT status FROM orders WHERE id = 4' -c 'SELECT status FROM orders WHERE id = 5'\n    \
         psql '{console}' -c 'SHOW NPLUS1'\n\n\
         The console also has SHOW REPLICAS, SHOW ROUTES and SHOW HELP; metrics: curl http://127.0.0.1:9930/metrics.\n\
         Ctrl-C stops everything."
    );
}

/// Blocks SIGINT, SIGTERM and SIGCHLD in this thread (and so in every thread it starts), for
/// [`wait_for_stop`] to take them with `sigwait`.
fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD] {
            libc::sigaddset(&mut set, signal);
        }
        let error = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if error != 0 {
            bail!(
                "blocking signals: {}",
                std::io::Error::from_raw_os_error(error)
            );
        }
        Ok(set)
    }
}

/// Returns on Ctrl-C or SIGTERM; fails if the gateway exits on its own first. SIGCHLD wakes it for every
/// child that exits (the testbed's `pg_ctl` and `psql` runs too), so it looks whether that was the gateway.
fn wait_for_stop(signals: &libc::sigset_t, gateway: &mut Child) -> Result<()> {
    loop {
        let mut signal = 0;
        // SAFETY: `signals` is an initialised set, blocked in every thread (see `block_signals`).
        let error = unsafe { libc::sigwait(signals, &mut signal) };
        if error != 0 {
            bail!(
                "waiting for signals: {}",
                std::io::Error::from_raw_os_error(error)
            );
        }
        if signal != libc::SIGCHLD {
            println!("\nStopping the gateway and removing the clusters...");
            return Ok(());
        }
        if let Some(status) = gateway.try_wait()? {
            bail!("regiongate exited ({status})");
        }
    }
}

/// Stops the gateway with SIGTERM (it stops accepting and exits), or SIGKILL if it is still there after 10 s.
fn stop(gateway: &mut Child) -> Result<()> {
    if gateway.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = libc::pid_t::try_from(gateway.id()).context("the gateway's process id")?;
    // SAFETY: kill has no memory effects; `pid` is our child, not yet reaped, so it is not reused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            gateway.kill()?;
            gateway.wait()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
