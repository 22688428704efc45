//! Test harness: one real PostgreSQL 15 cluster per test binary (each test gets its own database in it) and
//! an in-process gateway per test, configured from YAML like a user would.
#![allow(dead_code)]

use regiongate::config::Config;
use regiongate::{Gateway, Shared};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use testbed::{Cluster, ClusterOptions};
use tokio_postgres::{Client, NoTls};

/// The password every test user has, on the server and at the gateway.
pub const PASSWORD: &str = "secret";

pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER
        .get_or_init(|| Cluster::start(&ClusterOptions::default()).expect("starting PostgreSQL 15"))
}

/// A fresh database and login role (both named `name`) in the shared cluster.
pub fn fresh_database(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!("{prefix}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    cluster()
        .create_user_and_db(&name, PASSWORD, &name)
        .expect("creating a test database");
    name
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    pub database: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a gateway in front of a fresh database. `extra` is YAML appended to the config (pool, limits, ...).
pub async fn gateway(prefix: &str, extra: &str) -> TestGateway {
    let database = fresh_database(prefix);
    gateway_for(&database, &format!("{}{extra}", own_user(&database))).await
}

/// The `auth` and `admin` sections for a test database's own role (its name, password PASSWORD) as the only
/// user, and admin.
pub fn own_user(database: &str) -> String {
    format!(
        "auth: {{ method: scram-sha-256, users: [ {{ name: {database}, password: {PASSWORD} }} ] }}\n\
         admin: {{ users: [ {database} ] }}\n"
    )
}

/// Starts a gateway for an existing database with the given auth/pool YAML.
pub async fn gateway_for(database: &str, yaml: &str) -> TestGateway {
    let text = format!(
        "listen: 127.0.0.1:0\nprimary: postgres://127.0.0.1:{}/{database}\n{yaml}",
        cluster().port()
    );
    gateway_from(&text, database).await
}

/// Starts a gateway from a whole configuration file's text; clients log in to `database`.
pub async fn gateway_from(text: &str, database: &str) -> TestGateway {
    let config = Config::parse(text, "test").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let gateway = Gateway::bind(config).await.expect("binding the gateway");
    let addr = gateway.local_addr();
    let shared = gateway.shared.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async {
        let _ = stopped.await;
    }));
    TestGateway {
        addr,
        shared,
        database: database.to_string(),
        stop: Some(stop),
    }
}

impl TestGateway {
    pub fn url(&self) -> String {
        format!(
            "postgres://{db}:{PASSWORD}@{}:{}/{db}",
            self.addr.ip(),
            self.addr.port(),
            db = self.database
        )
    }

    pub fn config(&self) -> String {
        format!(
            "host={} port={} user={db} password={PASSWORD} dbname={db}",
            self.addr.ip(),
            self.addr.port(),
            db = self.database
        )
    }

    /// A tokio-postgres client through the gateway.
    pub async fn connect(&self) -> Client {
        connect(&self.config()).await
    }

    /// Server connections the gateway has open now, across its pools.
    pub fn open_server_connections(&self) -> u64 {
        self.shared
            .pools()
            .iter()
            .map(|p| p.open_connections())
            .sum()
    }
}

pub async fn connect(config: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(config, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting with {config}: {e:?}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A superuser client straight to PostgreSQL, for checking what the gateway did.
pub async fn direct(database: &str) -> Client {
    connect(&format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname={database}",
        cluster().port(),
        testbed::SUPERUSER_PASSWORD
    ))
    .await
}

/// Polls an async condition until it holds or the deadline passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn sqlstate(error: &tokio_postgres::Error) -> String {
    error
        .code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {error}"))
}

/// Runs pgbench against a gateway on `port` as (and in the database of) `database`.
pub fn pgbench(port: u16, database: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("pgbench")
        .env("PGPASSWORD", PASSWORD)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", database])
        .args(args)
        .arg(database)
        .output()
        .expect("running pgbench")
}

/// One gateway process, its log in a file.
pub struct Process {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    pub metrics: u16,
}

impl Process {
    /// Starts the binary on `config` and waits until it is ready (`/readyz`).
    pub async fn start(config: &std::path::Path, metrics: u16, name: &str) -> Process {
        let log = config.with_file_name(format!("{name}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_regiongate"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::from(
                std::fs::File::create(&log).unwrap(),
            ))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let process = Process {
            child,
            log,
            metrics,
        };
        let ready = eventually(Duration::from_secs(15), || async {
            process
                .http("/readyz")
                .map(|(status, _)| status.contains("200"))
                == Some(true)
        })
        .await;
        assert!(ready, "{name} never became ready:\n{}", process.log());
        process
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child we spawned, with a valid signal number.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub fn http(&self, path: &str) -> Option<(String, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        Some((head.lines().next()?.to_string(), body.to_string()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; its status code.
    pub async fn exited(&mut self, within: Duration) -> i32 {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                started.elapsed() < within,
                "the gateway did not exit within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
