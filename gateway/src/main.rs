//! The `regiongate` command line: run the gateway, check a configuration, or apply migrations. (A local
//! demo topology with the gateway in front of it is the testbed's `testbed-demo`.)

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
    /// Validate a configuration file and exit: `check-config FILE` or `check-config --config FILE`.
    CheckConfig { file: Option<PathBuf> },
    /// Apply the pending migrations (`*.sql` in name order) to the primary: `migrate FILE` or
    /// `migrate --config FILE`.
    Migrate {
        file: Option<PathBuf>,
        /// The folder of migration files; by default the `migrations` shipped beside the binary (or in the
        /// repository it was built in), else `./migrations`.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// The configuration file a subcommand names, as a positional FILE or with `--config`.
fn config_file(
    positional: Option<PathBuf>,
    flag: Option<PathBuf>,
    command: &str,
) -> Result<PathBuf> {
    positional.or(flag).with_context(|| {
        format!("{command} needs the gateway's configuration: regiongate {command} FILE (or --config FILE)")
    })
}

/// Where migrations are when `--dir` is not given: beside the binary (an installation), in the repository a
/// `target/<profile>/` binary was built in, else `./migrations`.
fn default_migrations() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let candidates = exe.iter().flat_map(|exe| {
        exe.ancestors()
            .skip(1)
            .take(4)
            .map(|dir| dir.join("migrations"))
            .collect::<Vec<_>>()
    });
    candidates
        .into_iter()
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| PathBuf::from("migrations"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Some(Command::CheckConfig { file }) => {
            let file = config_file(file, cli.config, "check-config")?;
            let config = Config::load(&file)?;
            regiongate::tls::configured_acceptor(&config)?;
            println!(
                "{}: ok ({} users, pool mode {}, size {})",
                file.display(),
                config.auth.users.len(),
                config.pool.mode,
                config.pool.size
            );
            Ok(())
        }
        Some(Command::Migrate { file, dir }) => {
            let file = config_file(file, cli.config, "migrate")?;
            let config = Config::load(&file)?;
            migrate(&config, &dir.unwrap_or_else(default_migrations))
        }
        None => {
            let file = cli.config.context(
                "no configuration: run `regiongate --config FILE` (or, for a local demo topology, `testbed-demo`)",
            )?;
            let config = Config::load(&file)?;
            serve(config, Some(file))
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::new(log_filter(std::env::var("RUST_LOG").ok()));
    // Colours only for a terminal: a log file or a collector gets plain `key=value` fields.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The log filter for `RUST_LOG`. A bare level (`debug`) is the gateway's own: its crates log at that level
/// and the libraries it uses at `warn`, so that `RUST_LOG=debug` shows each routing decision without
/// sqlparser's tokens or the side connections' server NOTICEs. A filter with directives is taken as written.
fn log_filter(rust_log: Option<String>) -> String {
    let given = rust_log.unwrap_or_default();
    let level = match given.trim() {
        "" => "info",
        level if !level.contains(['=', ',', '[']) => level,
        _ => return given,
    };
    format!("warn,regiongate={level},regions={level},views={level}")
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
        match regiongate::restart::Relaunch::current() {
            Ok(relaunch) => {
                let _ = gateway.shared.relaunch.set(relaunch);
            }
            Err(error) => tracing::warn!(%error, "cannot find this binary: online restart is off"),
        }
        regiongate::restart::report_ready_when_ready(gateway.shared.clone());
        tokio::spawn(restart_on_sigusr2(gateway.shared.clone()));
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
        tokio::spawn(shutdown_signals(gateway.shared.clone()));
        gateway.run(std::future::pending()).await;
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

/// SIGUSR2: online restart (a new process on the same address, then this one drains).
async fn restart_on_sigusr2(shared: std::sync::Arc<regiongate::Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        tracing::error!("cannot install the SIGUSR2 handler: online restart by signal is off");
        return;
    };
    while usr2.recv().await.is_some() {
        if let Err(error) = regiongate::restart::restart(&shared, "SIGUSR2").await {
            tracing::error!(%error, "SIGUSR2: not restarted");
        }
    }
}

/// SIGTERM drains (up to `shutdown_timeout`), SIGINT drains with at most 5 s, a second signal cuts at once.
async fn shutdown_signals(shared: std::sync::Arc<regiongate::Shared>) {
    use std::time::Duration;
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install the SIGTERM and SIGINT handlers");
        return;
    };
    let mut first = true;
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        let configured = shared.config.load().shutdown_timeout;
        let timeout = match (first, name) {
            (false, _) => Duration::ZERO,
            (true, "SIGINT") => configured.min(Duration::from_secs(5)),
            (true, _) => configured,
        };
        first = false;
        shared.drain.request(timeout, name);
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn a_bare_level_is_the_gateway_s_and_libraries_stay_at_warn() {
        let ours = |level: &str| format!("warn,regiongate={level},regions={level},views={level}");
        assert_eq!(log_filter(None), ours("info"));
        assert_eq!(log_filter(Some("debug".into())), ours("debug"));
        assert_eq!(
            log_filter(Some("info,sqlparser=trace".into())),
            "info,sqlparser=trace"
        );
        assert_eq!(
            log_filter(Some("regiongate=debug".into())),
            "regiongate=debug"
        );
    }
}
