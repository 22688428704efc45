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
    #[arg(long, short)]
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
        None => {
            let file = cli.config.context(
                "no configuration: run `regiongate --config FILE`, or `regiongate demo`",
            )?;
            let config = Config::load(&file)?;
            serve(config)
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

fn serve(config: Config) -> Result<()> {
    runtime(config.workers)?.block_on(async move {
        let gateway = Gateway::bind(config.clone())
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        gateway.run(shutdown_signal()).await;
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

/// A local PostgreSQL 15 cluster (from the testbed) with a demo user, and the gateway in front of it.
fn demo(listen: &str) -> Result<()> {
    let cluster = testbed::Cluster::start(&testbed::ClusterOptions::default())?;
    cluster.create_user_and_db("app", "app", "app")?;
    let yaml = format!(
        "listen: {listen}\nprimary: postgres://127.0.0.1:{}/app\nauth:\n  method: scram-sha-256\n  users:\n    - {{ name: app, password: app }}\n",
        cluster.port()
    );
    let config = Config::parse(&yaml, "demo")?;
    println!(
        "PostgreSQL 15 is running on 127.0.0.1:{} (data in {}).",
        cluster.port(),
        cluster.data_dir().display()
    );
    println!("regiongate listens on {listen}. Try:\n\n    psql 'postgres://app:app@{listen}/app'\n\nCtrl-C stops both.");
    let result = serve(config);
    drop(cluster);
    result
}
