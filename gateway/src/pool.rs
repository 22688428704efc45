//! Server connections and their pools.
//!
//! A pool holds the connections to one server for one (database, user). Checking out takes a permit (the
//! pool's size bounds connections, open or being opened), then the most recently used idle connection
//! (warm caches, and the others can age out), or opens a new one. A [`Lease`] owns the connection while a
//! client uses it: [`Lease::release`] returns it idle and clean; dropping a lease closes the connection, so a
//! connection in an unknown state can never reach the next client. A client that leaves its connection in a
//! transaction or with session state has it cleaned up by [`Lease::clean_up`] before anyone else gets it.

use crate::auth::ServerLoginError;
use crate::config::{PoolConfig, ServerUrl};
use crate::metrics::METRICS;
use crate::protocol::PgError;
use crate::server::{OwnError, ServerConn, ServerCredentials};
pub use crate::settings::Settings;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// ParameterStatus name/value pairs a server sent at login.
pub type ServerParameters = Arc<Vec<(String, String)>>;

/// A client's startup parameters and `-c` options, in the order it sent them.
pub type StartupParameters = Vec<(String, String)>;

/// A client's startup parameters as this server takes them ([`Pool::login_state`]).
#[derive(Debug)]
pub struct LoginState {
    /// The client's reset values: its session settings right after login.
    pub reset: Settings,
    /// The ParameterStatus messages a direct connection would have sent, made once per login state: each new
    /// client of it gets a copy.
    pub parameter_status: bytes::Bytes,
}

/// Why a pool could not give a connection.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Every connection of the pool stayed busy for the checkout timeout.
    #[error("no server connection free in pool {pool} (size {size}) within {waited:?}")]
    Exhausted {
        pool: String,
        size: usize,
        waited: Duration,
    },
    /// The server refused the login (authentication, an unknown database, too many connections).
    #[error("server {server}: {message}")]
    Refused {
        server: ServerUrl,
        code: String,
        message: String,
    },
    /// No connection could be opened (refused, timed out, TLS, a broken login exchange).
    #[error("cannot connect to server {server}: {reason}")]
    Unreachable { server: ServerUrl, reason: String },
}

impl CheckoutError {
    /// What a client whose request needed the connection is told. A server's refusal keeps its SQLSTATE
    /// (authentication and unknown-database errors are the client's to see).
    pub fn to_client(&self) -> PgError {
        let code: std::borrow::Cow<'static, str> = match self {
            CheckoutError::Exhausted { .. } => "53300".into(),
            CheckoutError::Refused { code, .. } => code.clone().into(),
            CheckoutError::Unreachable { .. } => "08006".into(),
        };
        PgError {
            severity: "ERROR",
            code,
            message: format!("regiongate: {self}"),
            ..PgError::error("08006", "")
        }
    }
}

/// Which pool: server, database and the client's user (whose credentials the server connections use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolKey {
    pub server: ServerUrl,
    pub database: String,
    pub user: String,
}

/// A pool key's parts, owned or borrowed: the pool map is searched with borrowed ones, so that finding a
/// pool (every read routed to a replica does) allocates nothing.
pub trait KeyParts {
    fn parts(&self) -> (&ServerUrl, &str, &str);
}

impl KeyParts for PoolKey {
    fn parts(&self) -> (&ServerUrl, &str, &str) {
        (&self.server, &self.database, &self.user)
    }
}

impl KeyParts for (&ServerUrl, &str, &str) {
    fn parts(&self) -> (&ServerUrl, &str, &str) {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for PoolKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

// Owned and borrowed keys hash and compare by their parts alike, as `Borrow` requires.
impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

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
    slots: Slots,
    /// ParameterStatus values of the first server connection, reported to clients at login.
    server_parameters: Mutex<Option<ServerParameters>>,
    /// What each set of startup parameters comes to on this server (see [`Pool::login_state`]).
    logins: Mutex<std::collections::HashMap<StartupParameters, Arc<LoginState>>>,
    /// Server connections open right now (idle or leased).
    open: AtomicU64,
    /// Clients waiting for a connection right now.
    waiting: AtomicU64,
    /// Its server no longer takes writes (a failover): no connection goes back idle, and a session that
    /// holds one ends its transaction with an error (see [`Pool::retire`]).
    retired: std::sync::atomic::AtomicBool,
}

impl Pool {
    pub fn new(key: PoolKey, credentials: ServerCredentials, config: PoolConfig) -> Arc<Pool> {
        let name = format!("{}@{} on {}", key.user, key.database, key.server);
        Arc::new(Pool {
            name,
            key,
            credentials,
            slots: Slots::new(config.size),
            config,
            idle: Mutex::new(Vec::new()),
            server_parameters: Mutex::new(None),
            logins: Mutex::new(std::collections::HashMap::new()),
            open: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The TLS settings its connections were opened with (a reload that changes them replaces the pool).
    pub fn credentials(&self) -> &ServerCredentials {
        &self.credentials
    }

    pub fn tls(&self) -> &regions::ServerTls {
        &self.credentials.tls
    }

    /// The common checkout, without a future: a free slot and a live idle connection, both at hand. None
    /// otherwise (nothing is taken): [`Pool::checkout`] waits or opens one.
    pub fn checkout_now(self: &Arc<Self>) -> Option<Lease> {
        if !self.slots.try_take() {
            return None;
        }
        let conn = loop {
            let Some(mut conn) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                self.slots.give();
                return None;
            };
            if conn.looks_alive() {
                break conn;
            }
            self.closed_one();
        };
        METRICS.pool_wait_seconds.observe_zero(0);
        Some(Lease {
            conn: Some(conn),
            pool: self.clone(),
        })
    }

    /// A connection for a client: waits up to the checkout timeout for a free slot, then reuses an idle
    /// connection or opens one.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, CheckoutError> {
        // The slot is held by the lease, which gives it back when dropped.
        if self.slots.try_take() {
            // The common case, counted without reading the clock.
            METRICS.pool_wait_seconds.observe_zero(0);
        } else if !Box::pin(self.wait_for_slot()).await {
            // (Boxed, as is the opening of a connection: rare, and a session's future is as large as the
            // largest thing it awaits, which every idle client would carry.)
            METRICS.pool_timeouts.inc();
            tracing::warn!(pool = %self.name, size = self.config.size, "pool exhausted: checkout timed out");
            return Err(CheckoutError::Exhausted {
                pool: self.name.clone(),
                size: self.config.size,
                waited: self.config.checkout_timeout,
            });
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
                None => break Box::pin(self.open_connection()).await?,
            }
        };
        lease.conn = Some(conn);
        Ok(lease)
    }

    /// Waits up to the checkout timeout for a slot, counted as waiting meanwhile. True when it got one.
    async fn wait_for_slot(&self) -> bool {
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let taken = self.slots.take(self.config.checkout_timeout).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        METRICS
            .pool_wait_seconds
            .observe(0, started.elapsed().as_secs_f64());
        taken
    }

    async fn open_connection(&self) -> Result<Box<ServerConn>, CheckoutError> {
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
            Ok((mut conn, parameters)) => {
                conn.retire_at = conn.created.checked_add(self.config.max_lifetime);
                self.open.fetch_add(1, Ordering::Relaxed);
                METRICS.server_connections.inc();
                let mut cached = self
                    .server_parameters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if cached.is_none() {
                    *cached = Some(Arc::new(parameters));
                }
                tracing::debug!(pool = %self.name, pid = conn.pid(), "server connection opened");
                Ok(Box::new(conn))
            }
            Err(error) => {
                METRICS.server_connect_errors.inc();
                tracing::warn!(pool = %self.name, %error, "cannot open a server connection");
                Err(match error {
                    ServerLoginError::Server { code, message } => CheckoutError::Refused {
                        server: self.key.server.clone(),
                        code,
                        message,
                    },
                    other => CheckoutError::Unreachable {
                        server: self.key.server.clone(),
                        reason: other.to_string(),
                    },
                })
            }
        }
    }

    /// What a client's startup parameters (and `-c` options) come to on this server: its reset values as the
    /// server prints them, and the ParameterStatus values to tell it at login. They are applied on a server
    /// connection once per distinct set of parameters (and remembered), so that a value the server normalizes
    /// (`iso,dmy` → `ISO, DMY`) is reported and replayed as a direct connection would have it, and a parameter
    /// the server refuses after connection start (`log_disconnections`) refuses the login instead of vanishing.
    pub async fn login_state(
        self: &Arc<Self>,
        parameters: &[(String, String)],
    ) -> Result<Arc<LoginState>, PgError> {
        /// Distinct parameter sets remembered; past it the map starts over.
        const MAX_LOGINS: usize = 1024;
        if let Some(state) = self
            .logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(parameters)
        {
            return Ok(state.clone());
        }
        let mut lease = self.checkout().await.map_err(|e| e.to_client())?;
        let conn = lease.conn();
        let sql = crate::settings::startup_sql(parameters);
        let answer = match conn.run_own(&sql).await {
            Ok(answer) => answer,
            Err(OwnError::Server(error)) => {
                // The whole query was one implicit transaction: the connection is as it was.
                lease.release();
                return Err(PgError {
                    severity: "FATAL",
                    message: format!(
                        "{} (regiongate applies startup parameters on pooled server connections, after their start)",
                        error.message
                    ),
                    ..error
                });
            }
            Err(OwnError::Io(error)) => {
                return Err(PgError::fatal(
                    "08006",
                    format!(
                        "regiongate: server {} was lost during login: {error}",
                        self.key.server
                    ),
                ))
            }
        };
        let state: Settings = Arc::new(crate::settings::from_capture(
            &answer.rows,
            conn.login_user(),
        ));
        conn.captured_settings(state.clone());
        lease.release();
        let mut reported: Vec<(String, String)> = self
            .server_parameters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .cloned()
            .unwrap_or_default();
        for (name, value) in answer.reported {
            match reported.iter_mut().find(|(n, _)| *n == name) {
                Some(entry) => entry.1 = value,
                None => reported.push((name, value)),
            }
        }
        let mut parameter_status = bytes::BytesMut::new();
        for (name, value) in &reported {
            crate::protocol::parameter_status_message(
                &mut parameter_status,
                name.as_bytes(),
                value.as_bytes(),
            );
        }
        let login = Arc::new(LoginState {
            reset: state,
            parameter_status: parameter_status.freeze(),
        });
        let mut logins = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        if logins.len() >= MAX_LOGINS {
            logins.clear();
        }
        logins.insert(parameters.to_vec(), login.clone());
        Ok(login)
    }

    /// Its server was the primary and no longer is: idle connections close now, leased ones when they come
    /// back, and sessions holding one end their transaction with an error (none continues elsewhere).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for _ in &idle {
            self.closed_one();
        }
    }

    #[inline]
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Takes a connection back, idle since `now`.
    fn checkin(&self, mut conn: Box<ServerConn>, now: Instant) {
        conn.checked_in(now);
        // Retire a connection past its lifetime, or holding too many statements (rather than track which are
        // still wanted).
        if self.is_retired()
            || conn.retire_at.is_some_and(|at| now >= at)
            || conn.statement_count() > self.config.max_prepared_statements
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
            let now = Instant::now();
            let mut i = 0;
            while i < idle.len() {
                let idle_count = idle.len();
                let conn = &mut idle[i];
                let too_old = conn.retire_at.is_some_and(|at| now >= at);
                let idle_too_long = now.saturating_duration_since(conn.idle_since)
                    >= self.config.idle_timeout
                    && idle_count > keep;
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
        while !self.is_retired() {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).len();
            if idle >= self.config.min_idle {
                break;
            }
            if !self.slots.try_take() {
                break;
            }
            let slot = Held(&self.slots);
            let opened = self.open_connection().await;
            drop(slot);
            match opened {
                Ok(conn) => self.checkin(conn, Instant::now()),
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

    /// A client of this pool waits before its checkout (held by PAUSE): counted with the pool's waiters.
    pub fn waiting_outside(&self, waiting: bool) {
        if waiting {
            self.waiting.fetch_add(1, Ordering::Relaxed);
        } else {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Backend pid and idle time of each idle connection, for the console.
    pub fn idle_list(&self) -> Vec<(i32, Duration)> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| (c.pid(), c.idle_since.elapsed()))
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
    #[inline]
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until released")
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The server's process id for this connection.
    pub fn pid(&self) -> i32 {
        self.conn.as_ref().map_or(0, |conn| conn.pid())
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

impl Lease {
    /// Returns a connection its client left in a transaction (`rollback`) or with session state it cannot
    /// pass on (`reset`: DISCARD ALL), once cleaned up in the background; one that cannot be cleaned within a
    /// few seconds is closed.
    pub fn clean_up(mut self, rollback: bool, reset: bool) {
        tokio::spawn(async move {
            let cleaned = self.conn().clean_up(rollback, reset);
            match tokio::time::timeout(Duration::from_secs(5), cleaned).await {
                Ok(Ok(())) => self.release(),
                _ => tracing::debug!("could not reset a server connection; closing it"),
            }
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.closed_one();
        }
        // After a release: the connection is idle in the pool before the slot frees, for the next waiter.
        self.pool.slots.give();
    }
}

/// A pool's slots: at most `size` connections are leased at once. A free slot is taken and given back with
/// one atomic operation each. A checkout that finds none waits in `queue`, a semaphore that gets a slot only
/// when one is given back while a checkout waits, and hands it on in the order they came. (A semaphore alone
/// takes its lock at every give-back: about 90 instructions per transaction.) A slot given back while
/// someone waits is free for an instant before it moves to the queue: a checkout that comes just then may
/// take it first.
struct Slots {
    free: AtomicUsize,
    /// Checkouts waiting in `queue` (or about to).
    queued: AtomicUsize,
    queue: Semaphore,
}

impl Slots {
    fn new(size: usize) -> Slots {
        Slots {
            free: AtomicUsize::new(size),
            queued: AtomicUsize::new(0),
            queue: Semaphore::new(0),
        }
    }

    /// Takes a slot without waiting, if one is free (or left in the queue, see [`Slots::give`]).
    #[inline]
    fn try_take(&self) -> bool {
        self.take_free()
            || self
                .queue
                .try_acquire()
                .map(|permit| permit.forget())
                .is_ok()
    }

    /// Takes a free slot, if there is one. (The first load is sequentially consistent too: it is the
    /// waiting checkout's look for a free slot in [`Slots::give`]'s handshake.)
    #[inline]
    fn take_free(&self) -> bool {
        let mut free = self.free.load(Ordering::SeqCst);
        loop {
            if free == 0 {
                return false;
            }
            match self.free.compare_exchange_weak(
                free,
                free - 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => free = now,
            }
        }
    }

    /// Gives a slot back: to the queue when a checkout waits there, else to the free ones.
    ///
    /// The slot is made free first and `queued` read after, while a waiting checkout counts itself in
    /// `queued` first and looks for a free slot after, all sequentially consistent: of the two, at least one
    /// sees the other, so no checkout waits in the queue while a slot sits free. A slot can reach the queue
    /// after its waiter left (the waiter took another, or timed out): the queue's semaphore then holds it
    /// with nobody waiting, and [`Slots::try_take`] takes it from there.
    #[inline]
    fn give(&self) {
        self.free.fetch_add(1, Ordering::SeqCst);
        if self.queued.load(Ordering::SeqCst) > 0 && self.take_free() {
            self.queue.add_permits(1);
        }
    }

    /// Waits up to `timeout` for a slot; true when it took one.
    async fn take(&self, timeout: Duration) -> bool {
        /// Counts the checkout in `queued` until its wait ends, however it ends (a dropped future too).
        struct Queued<'a>(&'a AtomicUsize);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        let _queued = Queued(&self.queued);
        self.try_take()
            || match tokio::time::timeout(timeout, self.queue.acquire()).await {
                Ok(Ok(permit)) => {
                    permit.forget();
                    true
                }
                _ => false,
            }
    }
}

/// A slot held outside a lease (maintenance opening a connection): given back however that ends.
struct Held<'a>(&'a Slots);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.give();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn a_slot_given_back_goes_to_the_checkout_waiting_for_it() {
        let slots = Arc::new(Slots::new(1));
        assert!(slots.try_take());
        assert!(!slots.try_take());
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "took a slot that was not free");
        slots.give();
        assert!(tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the waiter was not woken")
            .unwrap());
        // The one slot is the waiter's now.
        assert!(!slots.try_take());
    }

    #[tokio::test]
    async fn a_checkout_waits_no_longer_than_its_timeout() {
        let slots = Slots::new(1);
        assert!(slots.try_take());
        let started = Instant::now();
        assert!(!slots.take(Duration::from_millis(100)).await);
        assert!(started.elapsed() >= Duration::from_millis(100));
        // A slot given back after the waiter left is not lost.
        slots.give();
        assert!(slots.try_take() || slots.take(Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn a_wait_given_up_leaves_nothing_behind() {
        let slots = Slots::new(1);
        assert!(slots.try_take());
        // A checkout whose future is dropped while it waits (its session went away).
        let mut wait = Box::pin(slots.take(Duration::from_secs(10)));
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut wait)
            .await
            .is_err());
        assert_eq!(slots.queued.load(Ordering::SeqCst), 1);
        drop(wait);
        assert_eq!(slots.queued.load(Ordering::SeqCst), 0);
        slots.give();
        assert!(
            slots.take_free(),
            "the slot went to a queue nobody waits in"
        );
    }

    #[tokio::test]
    async fn a_slot_left_in_the_queue_is_taken_without_waiting() {
        let slots = Slots::new(0);
        // As a give whose waiter had just left leaves it.
        slots.queue.add_permits(1);
        assert!(slots.try_take());
        assert!(!slots.try_take());
    }

    /// Many checkouts on several threads: never more than `size` slots held at once, none lost, and every
    /// checkout gets one (each holds it briefly, far shorter than the timeout).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn slots_are_never_held_past_the_size_nor_lost() {
        const SIZE: usize = 3;
        let slots = Arc::new(Slots::new(SIZE));
        let held = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (slots, held) = (slots.clone(), held.clone());
                tokio::spawn(async move {
                    for _ in 0..200 {
                        assert!(slots.try_take() || slots.take(Duration::from_secs(10)).await);
                        assert!(
                            held.fetch_add(1, Ordering::SeqCst) < SIZE,
                            "more slots held than the size"
                        );
                        tokio::task::yield_now().await;
                        held.fetch_sub(1, Ordering::SeqCst);
                        slots.give();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Every slot is back: free, or in the queue for the next waiter.
        let mut back = 0;
        while slots.try_take() || slots.take(Duration::from_millis(50)).await {
            back += 1;
        }
        assert_eq!(back, SIZE);
    }
}
