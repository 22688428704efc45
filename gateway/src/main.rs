//! The `regiongate` command line: run the gateway, check a configuration, or run a local demo.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use regiongate::config::Config;
use regiongate::Gateway;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "regiongate", version, about = "A PostgreSQL gateway")]
struct Cli {
    /// Run with this configuration file.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit.
    CheckConfig { file: PathBuf },
    /// Apply the pending migrations (`*.sql` in name order) to the primary of `--config`.
    Migrate {
        /// The folder of migration files.
        #[arg(long, default_value = "migrations")]
        dir: PathBuf,
    },
    /// Start a throwaway local PostgreSQL and run the gateway in front of it.
    Demo {
        /// Where clients connect.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Some(Command::CheckConfig { file }) => {
            let config = Config::load(&file)?;
            regiongate::tls::configured_acceptor(&config)?;
            println!(
                "{}: ok ({} users, pool mode {:?}, size {})",
                file.display(),
                config.auth.users.len(),
                config.pool.mode,
                config.pool.size
            );
            Ok(())
        }
        Some(Command::Demo { listen }) => demo(&listen),
        Some(Command::Migrate { dir }) => {
            let file = cli.config.context(
                "migrate needs the gateway's configuration: regiongate migrate --config FILE",
            )?;
            let config = Config::load(&file)?;
            migrate(&config, &dir)
        }
        None => {
            let file = cli.config.context(
                "no configuration: run `regiongate --config FILE`, or `regiongate demo`",
            )?;
            let config = Config::load(&file)?;
            serve(config, Some(file))
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if workers > 0 {
            builder.worker_threads(workers);
        }
        builder.enable_all().build()?
    };
    Ok(runtime)
}

fn serve(config: Config, path: Option<PathBuf>) -> Result<()> {
    runtime(config.workers)?.block_on(async move {
        let gateway = Gateway::bind_from(config, path).await?;
        let shared = gateway.shared.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                return;
            };
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = shared.reload();
            }
        });
        gateway.run(shutdown_signal()).await;
        Ok(())
    })
}

/// Applies pending migrations on the primary, as the gateway's side connections log in.
fn migrate(config: &Config, dir: &std::path::Path) -> Result<()> {
    runtime(1)?.block_on(async {
        let mut client = regiongate::primary_connection(config, "regiongate migrate")
            .connect()
            .await
            .with_context(|| format!("cannot connect to the primary {}", config.primary.url))?;
        let applied = views::migrate::run(&mut client, dir).await?;
        if applied.is_empty() {
            println!("{}: nothing to apply", dir.display());
        }
        for name in applied {
            println!("applied {name}");
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

/// A multi-region topology on this machine (from the testbed): a primary in us-east, replicas in eu-west and
/// ap-south, each behind a latency relay, and the gateway in front of them with eu-west as its home region.
fn demo(listen: &str) -> Result<()> {
    use std::time::Duration;
    use testbed::{RegionSpec, Topology};
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
    let yaml = format!(
        "listen: {listen}\nhome_region: eu-west\n{}auth:\n  method: scram-sha-256\n  users:\n    - {{ name: app, password: app }}\n\
         admin: {{ users: [ app ] }}\nmetrics: {{ listen: '127.0.0.1:9930' }}\n",
        topology.gateway_yaml("app")
    );
    let config = Config::parse(&yaml, "demo")?;
    println!("\nTopology (one-way latency from this gateway):");
    println!("  primary   us-east   {}  40 ms", topology.primary.addr());
    for (region, node) in topology.replicas() {
        let delay = if region == "eu-west" { "1 ms" } else { "60 ms" };
        println!("  replica   {region:<9} {}  {delay}", node.addr());
    }
    println!(
        "\nregiongate listens on {listen} (home region eu-west). Try:\n\n    \
         psql 'postgres://app:app@{listen}/app' -c 'SELECT inet_server_port(), pg_is_in_recovery()'\n    \
         psql 'postgres://app:app@{listen}/app' -c 'CREATE TABLE t (x int); INSERT INTO t VALUES (1)'\n\n\
         Reads go to eu-west, writes to us-east. The admin console: psql 'postgres://app:app@{listen}/regiongate' \
         -c 'SHOW REPLICAS'; metrics: curl http://127.0.0.1:9930/metrics. Ctrl-C stops everything."
    );
    let result = serve(config, None);
    drop(topology);
    result
}
