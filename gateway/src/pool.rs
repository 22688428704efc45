//! Server connections and their pools.
//!
//! A pool holds the connections to one server for one (database, user). Checking out takes a permit (the
//! pool's size bounds connections, open or being opened), then the most recently used idle connection
//! (warm caches, and the others can age out), or opens a new one. A [`Lease`] owns the connection while a
//! client uses it: [`Lease::release`] returns it idle and clean; dropping a lease closes the connection, so a
//! connection in an unknown state can never reach the next client.

use crate::auth::{login_to_server, ServerLoginError};
use crate::config::{PoolConfig, ServerUrl};
use crate::metrics::METRICS;
use crate::protocol::PgError;
use crate::tls::Stream;
use bytes::BytesMut;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Session settings as the SET statements that produce them, by setting name. Shared by pointer so the
/// common case (server already matches client) is a pointer comparison.
pub type Settings = Arc<std::collections::BTreeMap<String, String>>;

/// One logged-in connection to a PostgreSQL server.
pub struct ServerConn {
    pub stream: Stream,
    /// Bytes read from the server but not yet handled.
    pub read_buf: BytesMut,
    pub addr: SocketAddr,
    /// The server's own cancel key for this connection.
    pub pid: i32,
    pub secret: i32,
    /// Named prepared statements that exist (or are being created) on this connection, by server-side name.
    pub prepared: HashSet<Arc<str>>,
    /// The session settings applied to this connection.
    pub settings: Settings,
    /// Whether the connection's unnamed statement is the one the current client last parsed.
    pub unnamed_valid: bool,
    /// Our picture of the connection may be wrong (a statement we sent for a client failed, or the server
    /// said FATAL): close it instead of returning it to the pool.
    pub discard: bool,
    created: Instant,
    idle_since: Instant,
}

impl ServerConn {
    /// Opens and logs in.
    async fn connect(
        url: &ServerUrl,
        credentials: &ServerCredentials,
        database: &str,
    ) -> Result<(ServerConn, Vec<(String, String)>), ServerLoginError> {
        let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
        tcp.set_nodelay(true)?;
        let addr = tcp.peer_addr()?;
        let mut stream = crate::tls::connect_server(tcp, &credentials.tls, &url.host)
            .await
            .map_err(ServerLoginError::Protocol)?;
        let mut read_buf = BytesMut::with_capacity(16 * 1024);
        let end_point = stream.server_end_point();
        let login = login_to_server(
            &mut stream,
            &mut read_buf,
            &credentials.user,
            credentials.password.as_deref(),
            database,
            end_point,
        )
        .await?;
        METRICS
            .server_logins
            .with_label_values(&[login.method, if stream.is_tls() { "yes" } else { "no" }])
            .inc();
        let now = Instant::now();
        Ok((
            ServerConn {
                stream,
                read_buf,
                addr,
                pid: login.pid,
                secret: login.secret,
                prepared: HashSet::new(),
                settings: Settings::default(),
                unnamed_valid: false,
                discard: false,
                created: now,
                idle_since: now,
            },
            login.parameters,
        ))
    }

    /// False when the server closed the connection or sent something while idle (a FATAL on shutdown or
    /// termination).
    fn looks_alive(&mut self) -> bool {
        self.stream.is_quiet()
    }
}

/// ParameterStatus name/value pairs a server sent at login.
pub type ServerParameters = Arc<Vec<(String, String)>>;

/// Which pool: server, database and the client's user (whose credentials the server connections use).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub server: ServerUrl,
    pub database: String,
    pub user: String,
}

/// How server connections of a pool log in.
#[derive(Clone)]
pub struct ServerCredentials {
    pub user: String,
    pub password: Option<String>,
    pub tls: regions::ServerTls,
}

pub struct Pool {
    pub key: PoolKey,
    /// "user@database on host:port", for errors and logs.
    pub name: String,
    credentials: ServerCredentials,
    config: PoolConfig,
    /// Boxed, so that a checkout and a checkin move a pointer, not the whole connection (a few hundred bytes,
    /// moved several times on the way in and out).
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    permits: Arc<Semaphore>,
    /// ParameterStatus values of the first server connection, reported to clients at login.
    server_parameters: Mutex<Option<ServerParameters>>,
    /// Server connections open right now (idle or leased).
    open: AtomicU64,
    /// Clients waiting for a connection right now.
    waiting: AtomicU64,
}

impl Pool {
    pub fn new(key: PoolKey, credentials: ServerCredentials, config: PoolConfig) -> Arc<Pool> {
        let name = format!("{}@{} on {}", key.user, key.database, key.server);
        Arc::new(Pool {
            name,
            key,
            credentials,
            permits: Arc::new(Semaphore::new(config.size)),
            config,
            idle: Mutex::new(Vec::new()),
            server_parameters: Mutex::new(None),
            open: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The TLS settings its connections were opened with (a reload that changes them replaces the pool).
    pub fn tls(&self) -> &regions::ServerTls {
        &self.credentials.tls
    }

    /// A connection for a client: waits up to the checkout timeout for a free slot, then reuses an idle
    /// connection or opens one.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, PgError> {
        // The slot is held by the lease, which gives it back when dropped (no owned permit: that would clone
        // the semaphore's Arc at every checkout).
        match self.permits.try_acquire() {
            Ok(permit) => {
                // The common case, counted without reading the clock.
                METRICS.pool_wait_seconds.observe(0, 0.0);
                permit.forget();
            }
            Err(_) => match self.wait_for_permit().await {
                Ok(Ok(permit)) => permit.forget(),
                _ => {
                    METRICS.pool_timeouts.inc();
                    tracing::warn!(pool = %self.name, size = self.config.size, "pool exhausted: checkout timed out");
                    return Err(PgError::error(
                        "53300",
                        format!(
                            "regiongate: no server connection free in pool {} (size {}) within {:?}",
                            self.name, self.config.size, self.config.checkout_timeout
                        ),
                    ));
                }
            },
        }
        // From here the lease holds the slot: it goes back however this ends, a dropped future included.
        let mut lease = Lease {
            conn: None,
            pool: self.clone(),
        };
        let conn = loop {
            let candidate = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match candidate {
                // Lifetime is checked at checkin and by maintenance, so a checkout reads no clock.
                Some(mut conn) => {
                    if conn.looks_alive() {
                        break conn;
                    }
                    self.closed_one();
                }
                None => break self.open_connection().await?,
            }
        };
        lease.conn = Some(conn);
        Ok(lease)
    }

    /// Waits up to the checkout timeout for a slot, counted as waiting meanwhile.
    async fn wait_for_permit(
        &self,
    ) -> Result<Result<SemaphorePermit<'_>, tokio::sync::AcquireError>, tokio::time::error::Elapsed>
    {
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let waited =
            tokio::time::timeout(self.config.checkout_timeout, self.permits.acquire()).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        METRICS
            .pool_wait_seconds
            .observe(0, started.elapsed().as_secs_f64());
        waited
    }

    async fn open_connection(&self) -> Result<Box<ServerConn>, PgError> {
        let database = &self.key.database;
        let connect = ServerConn::connect(&self.key.server, &self.credentials, database);
        let result = match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(ServerLoginError::Protocol(format!(
                "connection timed out after {:?}",
                self.config.connect_timeout
            ))),
        };
        match result {
            Ok((conn, parameters)) => {
                self.open.fetch_add(1, Ordering::Relaxed);
                METRICS.server_connections.inc();
                let mut cached = self
                    .server_parameters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if cached.is_none() {
                    *cached = Some(Arc::new(parameters));
                }
                tracing::debug!(pool = %self.name, pid = conn.pid, "server connection opened");
                Ok(Box::new(conn))
            }
            Err(error) => {
                METRICS.server_connect_errors.inc();
                tracing::warn!(pool = %self.name, %error, "cannot open a server connection");
                Err(match error {
                    // Authentication and unknown-database errors keep their SQLSTATE: the client must see them.
                    ServerLoginError::Server { code, message } => PgError {
                        severity: "ERROR",
                        code: code.into(),
                        message: format!("regiongate: server {}: {message}", self.key.server),
                        detail: None,
                    },
                    other => PgError::error(
                        "08006",
                        format!(
                            "regiongate: cannot connect to server {}: {other}",
                            self.key.server
                        ),
                    ),
                })
            }
        }
    }

    /// The server's ParameterStatus values (opening a connection to learn them the first time).
    pub async fn server_parameters(
        self: &Arc<Self>,
    ) -> Result<Arc<Vec<(String, String)>>, PgError> {
        if let Some(parameters) = self
            .server_parameters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(parameters);
        }
        let lease = self.checkout().await?;
        lease.release();
        Ok(self
            .server_parameters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default())
    }

    /// Takes a connection back, idle since `now`.
    fn checkin(&self, mut conn: Box<ServerConn>, now: Instant) {
        conn.idle_since = now;
        conn.unnamed_valid = false;
        // Retire a connection past its lifetime, or holding too many statements (rather than track which are
        // still wanted).
        if now.duration_since(conn.created) >= self.config.max_lifetime
            || conn.prepared.len() > self.config.max_prepared_statements
        {
            self.closed_one();
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    fn closed_one(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        METRICS.server_connections.dec();
    }

    /// Closes idle connections past their idle timeout or lifetime (keeping `min_idle`), and opens
    /// connections up to `min_idle`. Called periodically by the pool's maintenance task.
    pub async fn maintain(self: &Arc<Self>) {
        let expired: Vec<Box<ServerConn>> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let keep = self.config.min_idle;
            let mut expired = Vec::new();
            let mut i = 0;
            while i < idle.len() {
                let idle_count = idle.len();
                let conn = &mut idle[i];
                let too_old = conn.created.elapsed() >= self.config.max_lifetime;
                let idle_too_long =
                    conn.idle_since.elapsed() >= self.config.idle_timeout && idle_count > keep;
                if too_old || idle_too_long || !conn.looks_alive() {
                    expired.push(idle.remove(i));
                } else {
                    i += 1;
                }
            }
            expired
        };
        for _ in &expired {
            self.closed_one();
        }
        drop(expired);
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).len();
            if idle >= self.config.min_idle {
                break;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            match self.open_connection().await {
                Ok(conn) => {
                    drop(permit);
                    self.checkin(conn, Instant::now());
                }
                Err(_) => break,
            }
        }
    }

    pub fn open_connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Backend pid and idle time of each idle connection, for the console.
    pub fn idle_list(&self) -> Vec<(i32, Duration)> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| (c.pid, c.idle_since.elapsed()))
            .collect()
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A server connection checked out of its pool, holding one of the pool's slots until dropped.
pub struct Lease {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
}

impl Lease {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until released")
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Returns the connection to the pool; the caller vouches that it is idle ('I') and clean.
    pub fn release(self) {
        self.release_at(Instant::now());
    }

    /// [`Lease::release`] for a caller that read the clock at the moment the connection went idle.
    pub fn release_at(mut self, now: Instant) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn, now);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.closed_one();
        }
        // After a release: the connection is idle in the pool before the slot frees, for the next waiter.
        self.pool.permits.add_permits(1);
    }
}

/// Runs `maintain` for a pool until the pool is dropped elsewhere.
pub fn spawn_maintenance(pool: &Arc<Pool>) {
    let weak = Arc::downgrade(pool);
    let period =
        (pool.config.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(pool) = weak.upgrade() else { break };
            pool.maintain().await;
        }
    });
}
