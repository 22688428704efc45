//! Throwaway PostgreSQL 15 clusters for tests, demos and benchmarks.
//!
//! A [`Cluster`] is a real `postgres` process: `initdb` into a temporary directory, a free loopback port,
//! stopped and deleted on drop. PostgreSQL refuses to run as root, so when the caller is root (CI is) every
//! server-side command runs as the `postgres` system user through `setpriv`.
//!
//! Everything here is synchronous on purpose: tests call it from any runtime (or none) and the work is a
//! handful of process spawns.

pub mod links;
pub mod relay;
pub mod topology;

pub use relay::Relay;
pub use topology::{RegionSpec, Topology};

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where Debian puts the PostgreSQL 15 server binaries; `PG_BIN` overrides it.
pub fn pg_bin_dir() -> PathBuf {
    std::env::var_os("PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// The password of the `postgres` superuser in every cluster the testbed makes.
pub const SUPERUSER_PASSWORD: &str = "postgres";

/// How clients on TCP authenticate to a cluster (pg_hba `host` lines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostAuth {
    Trust,
    Md5,
    ScramSha256,
}

impl HostAuth {
    fn hba_name(self) -> &'static str {
        match self {
            HostAuth::Trust => "trust",
            HostAuth::Md5 => "md5",
            HostAuth::ScramSha256 => "scram-sha-256",
        }
    }
}

/// What kind of cluster to start.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub host_auth: HostAuth,
    /// Extra `postgresql.conf` lines, `name = value`.
    pub settings: Vec<(String, String)>,
    /// Serve TLS with this certificate chain and key (PEM files, copied into the cluster), and accept TCP
    /// clients over TLS only (`hostssl` lines). Replicas of the cluster inherit both.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            host_auth: HostAuth::ScramSha256,
            settings: Vec::new(),
            tls: None,
        }
    }
}

/// A running PostgreSQL cluster on 127.0.0.1.
pub struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    /// `initdb`, configure, start, and wait until it accepts connections.
    pub fn start(options: &ClusterOptions) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("regiongate-pg-")
            .tempdir()
            .context("creating the cluster directory")?;
        give_to_postgres_user(dir.path())?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        give_to_postgres_user(&pwfile)?;
        run_checked(
            pg_command("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
                .args(["--auth-local=trust", "--auth-host"])
                .arg(options.host_auth.hba_name())
                .arg("--pwfile")
                .arg(&pwfile),
            "initdb",
        )?;
        let mut conf = String::from(
            "listen_addresses = '127.0.0.1'\n\
             max_connections = 300\n\
             fsync = off\n\
             full_page_writes = off\n\
             shared_buffers = 64MB\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             hot_standby = on\n\
             logging_collector = off\n",
        );
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            dir.path().display()
        ));
        for (name, value) in &options.settings {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        if let Some((cert, key)) = &options.tls {
            // PostgreSQL refuses a key others can read; the copies are the server's own.
            let (cert_copy, key_copy) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::copy(cert, &cert_copy).context("copying the TLS certificate")?;
            std::fs::copy(key, &key_copy).context("copying the TLS key")?;
            std::fs::set_permissions(
                &key_copy,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            give_to_postgres_user(&cert_copy)?;
            give_to_postgres_user(&key_copy)?;
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                cert_copy.display(),
                key_copy.display()
            ));
        }
        append(&data.join("postgresql.conf"), &conf)?;
        // Replication connections from loopback, for the replicas that later issues add.
        append(
            &data.join("pg_hba.conf"),
            &format!(
                "host replication all 127.0.0.1/32 {}\n",
                options.host_auth.hba_name()
            ),
        )?;
        if options.tls.is_some() {
            let hba = data.join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba)?;
            let ssl_only: String = text
                .lines()
                .map(|line| match line.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{line}\n"),
                })
                .collect();
            std::fs::write(&hba, ssl_only)?;
        }

        start_on_free_port(dir)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres:postgres@127.0.0.1:PORT/DB`
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Runs SQL as the superuser with `psql` over TCP and returns its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let output = run_checked(
            Command::new("psql")
                .env("PGPASSWORD", SUPERUSER_PASSWORD)
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                ])
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    database,
                ])
                .args(["-c", sql]),
            "psql",
        )?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_string())
    }

    /// Creates a login role with a password (stored as SCRAM, PostgreSQL's default) and a database it owns.
    pub fn create_user_and_db(&self, user: &str, password: &str, database: &str) -> Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}' SUPERUSER"),
        )?;
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{database}\" OWNER \"{user}\""),
        )?;
        Ok(())
    }

    /// A streaming replica of this cluster (`pg_basebackup -R -X stream -c fast`), started and accepting reads.
    pub fn start_replica(&self) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("regiongate-replica-")
            .tempdir()
            .context("creating the replica directory")?;
        give_to_postgres_user(dir.path())?;
        let data = dir.path().join("data");
        run_checked(
            pg_command("pg_basebackup")
                .env("PGPASSWORD", SUPERUSER_PASSWORD)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                ])
                .arg(&data)
                // Without -c fast it waits for a spread checkpoint: 90 s instead of under one.
                .args(["-R", "-X", "stream", "-c", "fast"]),
            "pg_basebackup",
        )?;
        append(
            &data.join("postgresql.conf"),
            &format!("unix_socket_directories = '{}'\n", dir.path().display()),
        )?;
        start_on_free_port(dir)
    }

    /// Pauses WAL replay on a replica: its lag grows from now on.
    pub fn pause_replay(&self) -> Result<()> {
        self.psql("postgres", "SELECT pg_wal_replay_pause()")
            .map(|_| ())
    }

    pub fn resume_replay(&self) -> Result<()> {
        self.psql("postgres", "SELECT pg_wal_replay_resume()")
            .map(|_| ())
    }

    /// Stops the server immediately (no shutdown checkpoint), as a crash would.
    pub fn stop_immediate(&self) -> Result<()> {
        run_checked(
            pg_command("pg_ctl").arg("-D").arg(self.data_dir()).args([
                "-m",
                "immediate",
                "-w",
                "stop",
            ]),
            "pg_ctl stop",
        )?;
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&self) -> Result<()> {
        pg_ctl_start(self.dir.path(), self.port)
    }
}

/// Starts the server of a prepared directory on a free port. A port that was free a moment ago can be taken by
/// the time postgres binds it, so a few are tried.
fn start_on_free_port(dir: tempfile::TempDir) -> Result<Cluster> {
    let mut last_error = None;
    for _ in 0..5 {
        let port = free_port()?;
        match pg_ctl_start(dir.path(), port) {
            Ok(()) => {
                spawn_reaper(dir.path());
                return Ok(Cluster { dir, port });
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("postgres did not start")))
}

/// Stops the cluster and deletes its directory once this process is gone, however it ended (a panic in a
/// test, a killed test run, a cluster kept in a `static` whose Drop never runs).
fn spawn_reaper(dir: &Path) {
    let pg_ctl = pg_bin_dir().join("pg_ctl");
    let stop = if is_root() {
        format!(
            "setpriv --reuid=postgres --regid=postgres --init-groups -- {}",
            pg_ctl.display()
        )
    } else {
        pg_ctl.display().to_string()
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         {stop} -D '{dir}/data' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display()
    );
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

fn pg_ctl_start(dir: &Path, port: u16) -> Result<()> {
    let log = dir.join("postgres.log");
    run_checked(
        pg_command("pg_ctl")
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(format!("-p {port}"))
            .args(["-w", "-t", "60", "start"]),
        "pg_ctl start",
    )
    .map(|_| ())
    .with_context(|| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "server log:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A command for a PostgreSQL server binary, run as the `postgres` user when we are root.
pub fn pg_command(program: &str) -> Command {
    let path = pg_bin_dir().join(program);
    if is_root() {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(path)
            // root's HOME is no place for the postgres user: libpq (pg_basebackup, a replica's WAL receiver)
            // looks for client certificates under it, fails on the permissions and gives up on TLS.
            .env("HOME", "/nonexistent");
        command
    } else {
        Command::new(path)
    }
}

fn give_to_postgres_user(path: &Path) -> Result<()> {
    if is_root() {
        run_checked(
            Command::new("chown").arg("postgres:postgres").arg(path),
            "chown",
        )?;
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn run_checked(command: &mut Command, what: &str) -> Result<Output> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// A loopback TCP port that nothing listens on right now.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
