//! regiongate: a PostgreSQL gateway. This crate is the binary's library: the client↔server path (protocol,
//! pooling, sessions), configuration and metrics. `main.rs` is only the command line.

pub mod admin;
pub mod auth;
pub mod auth_query;
pub mod batch;
pub mod clients;
pub mod config;
pub mod drain;
pub mod fingerprint;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod lexer;
pub mod limits;
pub mod metrics;
pub mod nplus1;
pub mod pool;
pub mod protocol;
pub mod restart;
pub mod route;
pub mod scram;
pub mod server;
pub mod session;
pub mod settings;
pub mod sql;
pub mod tls;

use crate::auth::{Credentials, Startup};
use crate::clients::Clients;
use crate::config::ServerUrl;
use crate::config::{Config, ConfigError};
use crate::metrics::METRICS;
use crate::pool::{Pool, PoolKey};
use crate::protocol::PgError;
use crate::route::Classifier;
use crate::server::ServerCredentials;
use crate::session::StatementNames;
use arc_swap::ArcSwap;
use bytes::BytesMut;
use regions::{Regions, SideConnect, SideLogin};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// What every session shares: the configuration in force, pools, clients, statement names, the regions.
/// Everything a reload changes is an immutable snapshot swapped whole.
pub struct Shared {
    pub config: ArcSwap<Config>,
    pub credentials: ArcSwap<Credentials>,
    /// What looked-up users' logins proved, for their server connections (kept across reloads).
    pub learned_secrets: auth_query::LearnedSecrets,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub clients: Arc<Clients>,
    pub statement_names: StatementNames,
    /// N+1 patterns seen so far.
    pub nplus1: nplus1::Patterns,
    /// Insert batching: queues and the pools their flushes use.
    pub batcher: batch::Batcher,
    /// Connection rates and failed logins, by client address.
    pub admission: limits::Admission,
    regions: ArcSwap<Regions>,
    monitors: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Materialized views: refresh schedulers and freshness probes (replaced whole when a reload changes
    /// the views or the topology).
    views: ArcSwap<views::Views>,
    pub classifier: ArcSwap<Classifier>,
    /// Transaction shapes that wrote recently: they start on the primary.
    pub writing_shapes: route::WritingShapes,
    /// Client-facing TLS, when configured (replaced by a reload).
    pub tls: ArcSwap<Option<tokio_rustls::TlsAcceptor>>,
    /// The file the configuration came from, for RELOAD and SIGHUP.
    pub config_path: Option<std::path::PathBuf>,
    /// Serializes reloads.
    reloading: Mutex<()>,
    /// PAUSE: new transactions wait while this is true; the flag is what every checkout reads, the channel
    /// what waiting sessions wake on.
    paused: tokio::sync::watch::Sender<bool>,
    paused_flag: std::sync::atomic::AtomicBool,
    /// Bumped by every reload that took effect, so sessions know to look their pools up again.
    generation: std::sync::atomic::AtomicU64,
    /// The shutdown: its phase, deadline and counts.
    pub drain: drain::Drain,
    /// How to start this process again (online restart); set by the binary only.
    pub relaunch: std::sync::OnceLock<restart::Relaunch>,
    /// Admin console sessions open now, for SHOW CLIENTS (they are not clients: no pool, no limit, no drain).
    pub consoles: admin::Consoles,
    /// Pools dropped from the map (a reload, a failover, KILL) whose connections may still be open, for
    /// WAIT_CLOSE.
    closing: Mutex<Vec<std::sync::Weak<Pool>>>,
}

/// What the views runtime needs from a configuration: the views, and where the primary and replicas are
/// (replicas in the regions crate's order, so that indexes are `ReplicaId`s). Refreshes run on `writer`, the
/// node that takes writes (after a failover, a promoted replica), else on the configured primary.
fn views_setup(config: &Config, writer: &regions::Writer) -> views::Setup {
    let login = side_login(config);
    let target = |url: &ServerUrl, region: &str| {
        let side = side_connection(url, &login, "regiongate views");
        views::Target {
            region: region.to_string(),
            config: side.config,
            tls: side.tls,
        }
    };
    views::Setup {
        views: config.views.clone(),
        primary: match writer {
            regions::Writer::Node { url, region, .. } => {
                target(url, region.as_deref().unwrap_or("primary"))
            }
            regions::Writer::Refused { .. } => target(
                &config.primary.url,
                config.primary.region.as_deref().unwrap_or("primary"),
            ),
        },
        replicas: config
            .regions
            .iter()
            .flat_map(|r| r.replicas.iter().map(|url| target(url, &r.name)))
            .collect(),
        gateway: config.gateway_name(),
        monitor_interval: config.routing.monitor_interval,
    }
}

fn new_classifier(config: &Config) -> Arc<Classifier> {
    Classifier::with_views(
        &config.routing.side_effect_functions,
        config
            .views
            .iter()
            .map(|v| (v.schema().to_string(), v.relation().to_string()))
            .collect(),
    )
}

fn new_regions(config: &Config) -> Arc<Regions> {
    Regions::new(
        &config.primary,
        config.home_region.as_deref(),
        &config.regions,
        &config.routing,
        &config.gateway_name(),
        side_login(config),
    )
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this gateway was not started from a file")]
    NoFile,
    /// The file does not read, parse or validate, or its certificate does not load.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Shared {
    /// `tls` is the client-facing acceptor built from `config` ([`tls::configured_acceptor`]).
    pub fn new(
        config: Config,
        tls: Option<tokio_rustls::TlsAcceptor>,
        config_path: Option<std::path::PathBuf>,
    ) -> Arc<Shared> {
        METRICS.prime(&config);
        Arc::new(Shared {
            regions: ArcSwap::new(new_regions(&config)),
            monitors: Mutex::new(Vec::new()),
            // Not started: with its views emptied, the runtime has no tasks; `start_views` starts the real one.
            views: ArcSwap::new(views::Views::start(views::Setup {
                views: Vec::new(),
                ..views_setup(&config, &regions::Writer::default())
            })),
            classifier: ArcSwap::new(new_classifier(&config)),
            writing_shapes: route::WritingShapes::default(),
            credentials: ArcSwap::from_pointee(Credentials::new(&config)),
            learned_secrets: Default::default(),
            tls: ArcSwap::from_pointee(tls),
            batcher: batch::Batcher::new(config.batching.max_queued_rows),
            admission: limits::Admission::default(),
            config: ArcSwap::from_pointee(config),
            pools: Mutex::new(HashMap::new()),
            clients: Arc::default(),
            statement_names: StatementNames::default(),
            nplus1: nplus1::Patterns::default(),
            config_path,
            reloading: Mutex::new(()),
            paused: tokio::sync::watch::channel(false).0,
            paused_flag: std::sync::atomic::AtomicBool::new(false),
            generation: std::sync::atomic::AtomicU64::new(0),
            drain: drain::Drain::default(),
            relaunch: std::sync::OnceLock::new(),
            consoles: Default::default(),
            closing: Mutex::new(Vec::new()),
        })
    }

    /// The regions in force (replaced whole by a reload).
    pub fn regions(&self) -> Arc<Regions> {
        self.regions.load_full()
    }

    /// Whether any replica is configured; cheap enough for every message.
    pub fn has_replicas(&self) -> bool {
        self.regions.load().has_replicas()
    }

    /// The views in force.
    pub fn views(&self) -> Arc<views::Views> {
        self.views.load_full()
    }

    fn start_views(&self, config: &Config) {
        let writer = self.regions().writer();
        let old = self
            .views
            .swap(views::Views::start(views_setup(config, &writer)));
        old.stop();
    }

    fn start_monitors(&self) {
        let tasks = self.regions.load().spawn_monitors();
        let old = std::mem::replace(
            &mut *self.monitors.lock().unwrap_or_else(|p| p.into_inner()),
            tasks,
        );
        for task in old {
            task.abort();
        }
    }

    /// Re-reads the configuration file and swaps it in: credentials, budgets, regions and replicas (with new
    /// monitors), pool settings. Pools whose server left the configuration, or whose settings changed, are
    /// dropped from the map: sessions pick up fresh pools at their next transaction, and the old pools close
    /// their connections as they come back. An invalid file changes nothing.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let (new, acceptor) = Config::load(path)
            .and_then(|new| {
                let acceptor = tls::configured_acceptor(&new)?;
                Ok((new, acceptor))
            })
            .inspect_err(|e| {
                tracing::error!(error = %e, "configuration reload refused; the old configuration stays");
            })?;
        let old = self.config.load_full();
        let servers: Vec<ServerUrl> = std::iter::once(new.primary.url.clone())
            .chain(new.regions.iter().flat_map(|r| r.replicas.iter().cloned()))
            .collect();
        if old.auth.method != new.auth.method {
            // What logins proved under one method must not open connections for clients of another (trust).
            self.learned_secrets.forget_all();
        }
        // A pool stays only if its connections log in as the new configuration would have them: a user now
        // looked up with auth.query must not inherit connections made as its former `server_user`.
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, pool| {
                let keep = servers.contains(&key.server)
                    && pool.config() == &new.pool
                    && pool.tls() == &new.server_tls
                    && pool.credentials().same_login(&self.credentials_in(
                        &new,
                        &key.server,
                        &key.user,
                    ));
                if !keep {
                    self.closing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Arc::downgrade(pool));
                }
                keep
            });
        // Side connections (monitors, views) are opened by the tasks these restart.
        let topology_changed = format!(
            "{:?}{:?}{:?}{:?}{:?}{:?}",
            old.primary, old.home_region, old.regions, old.routing, old.name, old.server_tls
        ) != format!(
            "{:?}{:?}{:?}{:?}{:?}{:?}",
            new.primary, new.home_region, new.regions, new.routing, new.name, new.server_tls
        );
        self.credentials.store(Arc::new(Credentials::new(&new)));
        self.tls.store(Arc::new(acceptor));
        self.classifier.store(new_classifier(&new));
        if topology_changed {
            let regions = new_regions(&new);
            regions.inherit(&self.regions.load());
            self.regions.store(regions);
            self.start_monitors();
        }
        let views_changed = old.views != new.views;
        if views_changed || topology_changed {
            self.start_views(&new);
        }
        METRICS.prime(&new);
        self.config.store(Arc::new(new));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        tracing::info!(topology_changed, views_changed, "configuration reloaded");
        METRICS.reloads.inc();
        Ok(())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// PAUSE (true) holds new transactions; RESUME (false) releases them.
    pub fn pause(&self, paused: bool) {
        self.paused_flag
            .store(paused, std::sync::atomic::Ordering::SeqCst);
        self.paused.send_replace(paused);
        tracing::info!(paused, "pause state changed");
    }

    /// Waits while the gateway is paused.
    pub async fn wait_unpaused(&self) {
        let mut receiver = self.paused.subscribe();
        let _ = receiver.wait_for(|paused| !paused).await;
    }

    pub fn is_paused(&self) -> bool {
        self.paused_flag.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The primary's pool for a client's database and user: the node that takes writes now, else the
    /// configured primary.
    pub fn pool_for(&self, startup: &Startup) -> Arc<Pool> {
        let primary = match self.regions().writer() {
            regions::Writer::Node { url, .. } => url,
            regions::Writer::Refused { .. } => self.config.load().primary.url.clone(),
        };
        self.pool(&primary, &startup.user, &startup.database)
    }

    /// What a client's startup parameters come to (see [`Pool::login_state`]), and the primary's pool for
    /// it. A login needs no primary: while none answers, any reachable replica gives the same answer
    /// (settings and reported parameters are the cluster's).
    pub async fn login(
        &self,
        startup: &Startup,
        parameters: &[(String, String)],
    ) -> (Arc<Pool>, Result<Arc<pool::LoginState>, PgError>) {
        let regions = self.regions();
        let primary = self.pool_for(startup);
        let on_primary = match regions.writer() {
            regions::Writer::Node { .. } => primary.login_state(parameters).await,
            regions::Writer::Refused { why } => {
                Err(PgError::fatal("57P03", format!("regiongate: {why}")))
            }
        };
        let error = match on_primary {
            Err(error) if error.code.starts_with("08") || error.code.starts_with("57P") => error,
            Err(error) => {
                // 3D000 (no such database), 28xxx (no such role, a wrong password): nothing to keep a pool for.
                self.forget_if_unused(&primary);
                return (primary, Err(error));
            }
            answered => return (primary, answered),
        };
        let picture = regions.picture();
        let mut replicas: Vec<&regions::ReplicaStatus> =
            picture.replicas.iter().filter(|r| r.up).collect();
        replicas.sort_by_key(|r| picture.region_order.iter().position(|o| *o == r.region));
        for replica in replicas {
            let pool = self.pool(&replica.url, &startup.user, &startup.database);
            if let Ok(login) = pool.login_state(parameters).await {
                tracing::info!(user = %startup.user, replica = %replica.url, primary_error = %error.message, "login served by a replica: the primary did not answer");
                return (primary, Ok(login));
            }
        }
        (primary, Err(error))
    }

    /// Pools of a server that no longer takes writes: out of the map (sessions look theirs up again), idle
    /// connections closed, transactions held on them ended (see [`Pool::retire`]).
    fn retire_primary(&self, server: &ServerUrl) {
        let retired = self.retire_pools(|key| key.server == *server);
        tracing::info!(%server, pools = retired, "pools of the former primary retired");
    }

    /// Retires the pools whose key matches (see [`Pool::retire`]); how many.
    pub fn retire_pools(&self, matches: impl Fn(&PoolKey) -> bool) -> usize {
        let mut retired = Vec::new();
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, pool| {
                let keep = !matches(key);
                if !keep {
                    pool.retire();
                    retired.push(Arc::downgrade(pool));
                }
                keep
            });
        let count = retired.len();
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(retired);
        count
    }

    /// Server connections of pools dropped from the map that are still open (WAIT_CLOSE waits for 0).
    pub fn closing_connections(&self) -> u64 {
        let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
        closing.retain(|pool| pool.upgrade().is_some_and(|p| p.open_connections() > 0));
        closing
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .map(|p| p.open_connections())
            .sum()
    }

    /// A pool that logins show to be useless (its database does not exist, its user cannot log in) leaves the
    /// map, so that it does not linger in SHOW POOLS.
    fn forget_if_unused(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if pool.open_connections() == 0
            && pools.get(&pool.key).is_some_and(|p| Arc::ptr_eq(p, pool))
        {
            pools.remove(&pool.key);
        }
    }

    /// The pool for a server, database and (client) user, created on first use.
    pub fn pool(&self, server: &ServerUrl, user: &str, database: &str) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let parts = (server, database, user);
        if let Some(pool) = pools.get(&parts as &dyn pool::KeyParts) {
            return pool.clone();
        }
        let key = PoolKey {
            server: server.clone(),
            database: database.to_string(),
            user: user.to_string(),
        };
        let config = self.config.load();
        let pool = Pool::new(
            key.clone(),
            self.server_credentials(server, user),
            config.pool.clone(),
        );
        pool::spawn_maintenance(&pool);
        pools.insert(key, pool.clone());
        pool
    }

    /// How connections to `server` log in for a client user: the user's `server_user`/`server_password`, its
    /// own password, else the server URL's password, else the primary URL's. A user looked up with
    /// `auth.query` logs in as itself, with what its latest client login proved.
    pub fn server_credentials(&self, server: &ServerUrl, user: &str) -> ServerCredentials {
        self.credentials_in(&self.config.load(), server, user)
    }

    /// [`Shared::server_credentials`] under `config`.
    fn credentials_in(&self, config: &Config, server: &ServerUrl, user: &str) -> ServerCredentials {
        let entry = config.user(user);
        if entry.is_none() && config.auth.query_user.is_some() {
            return ServerCredentials {
                user: user.to_string(),
                password: None,
                learned: Some(self.learned_secrets.of(user)),
                tls: config.server_tls.clone(),
            };
        }
        ServerCredentials {
            learned: None,
            user: entry
                .and_then(|u| u.server_user.clone())
                .unwrap_or_else(|| user.to_string()),
            password: entry
                .and_then(|u| {
                    u.server_password
                        .clone()
                        .or_else(|| u.plain_password().map(str::to_string))
                })
                .or_else(|| server.password.clone())
                .or_else(|| config.primary.url.password.clone()),
            tls: config.server_tls.clone(),
        }
    }

    /// Every pool, for the admin console and tests.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Retires the pools of each node that stops taking writes (a failover, a split brain, an outage), and moves
/// view refreshes to a promoted node, for as long as the gateway lives; a reload's new regions are followed
/// within a second.
async fn follow_writer(shared: std::sync::Weak<Shared>) {
    // Where view refreshes run: they follow a failover (not an outage: they wait for the primary's return).
    let mut views_on: Option<ServerUrl> = shared
        .upgrade()
        .map(|s| s.config.load().primary.url.clone());
    loop {
        let Some(regions) = shared.upgrade().map(|s| s.regions()) else {
            return;
        };
        let mut changes = regions.writer_changes();
        loop {
            let now = changes.borrow_and_update().url().cloned();
            let Some(strong) = shared.upgrade() else {
                return;
            };
            for former in regions.take_former_writers() {
                if now.as_ref() != Some(&former) {
                    strong.retire_primary(&former);
                }
            }
            if now.is_some() && now != views_on {
                tracing::info!(primary = ?now.as_ref().map(|u| u.to_string()), "view refreshes follow the new primary");
                strong.start_views(&strong.config.load());
                views_on = now.clone();
            }
            drop(strong);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    let Some(current) = shared.upgrade().map(|s| s.regions()) else { return };
                    if !Arc::ptr_eq(&current, &regions) {
                        break;
                    }
                }
            }
        }
    }
}

/// How the gateway logs in for its own work (replica monitors, heartbeat): the primary URL's user and
/// password, else the first configured user's server credentials.
fn side_login(config: &Config) -> SideLogin {
    let url = &config.primary.url;
    let first = config.auth.users.first();
    let user = url
        .user
        .clone()
        .or_else(|| first.map(|u| u.server_user.clone().unwrap_or_else(|| u.name.clone())))
        .unwrap_or_else(|| "postgres".to_string());
    let password = url.password.clone().or_else(|| {
        first.and_then(|u| {
            u.server_password
                .clone()
                .or_else(|| u.plain_password().map(str::to_string))
        })
    });
    SideLogin {
        user,
        password,
        database: url
            .database
            .clone()
            .unwrap_or_else(|| "postgres".to_string()),
        tls: config.server_tls.clone(),
    }
}

/// Connection settings for the gateway's own side connections to a server (views, migrations).
pub fn side_connection(url: &ServerUrl, login: &SideLogin, application: &str) -> SideConnect {
    regions::monitor::side_connection(url, login, application, Duration::from_secs(5))
}

/// The primary, as the gateway's side connections reach it (for `regiongate migrate`).
pub fn primary_connection(config: &Config, application: &str) -> SideConnect {
    side_connection(&config.primary.url, &side_login(config), application)
}

/// A bound gateway, ready to serve.
pub struct Gateway {
    pub shared: Arc<Shared>,
    listener: TcpListener,
}

impl Gateway {
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        Gateway::bind_from(config, None).await
    }

    /// Binds with the file the configuration came from (for RELOAD and SIGHUP), and starts the monitors and
    /// the metrics listener. A certificate that does not load refuses the configuration before anything is
    /// bound.
    pub async fn bind_from(
        config: Config,
        path: Option<std::path::PathBuf>,
    ) -> Result<Gateway, StartError> {
        let acceptor = tls::configured_acceptor(&config)?;
        let bind = |addr: SocketAddr| async move {
            listen(addr).map_err(|source| StartError::Listen { addr, source })
        };
        let listener = bind(config.listen).await?;
        let metrics_listen = config.metrics.listen;
        let shared = Shared::new(config.clone(), acceptor, path);
        shared.start_monitors();
        tokio::spawn(follow_writer(Arc::downgrade(&shared)));
        tokio::spawn(admin::sample_stats());
        shared.start_views(&config);
        if let Some(addr) = metrics_listen {
            let listener = bind(addr).await?;
            tokio::spawn(http::serve(shared.clone(), listener));
        }
        Ok(Gateway { shared, listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Accepts clients until `shutdown` completes or a drain is requested (`Shared::drain`), then drains:
    /// stops accepting, lets transactions in flight finish up to `shutdown_timeout`, cuts what is left, and
    /// returns when no client is left (see [`drain`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tracing::info!(listen = %self.local_addr(), "regiongate is accepting clients");
        let Gateway { shared, listener } = self;
        let drain = &shared.drain;
        let mut changes = drain.subscribe();
        tokio::pin!(shutdown);
        let mut asked = false;
        while drain.phase() == drain::Phase::Serving {
            let accepted = tokio::select! {
                _ = &mut shutdown, if !asked => {
                    asked = true;
                    drain.request(shared.config.load().shutdown_timeout, "shutdown requested");
                    continue;
                }
                _ = changes.changed() => continue,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => admit(&shared, stream, peer),
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        // Connections already in the listen queue would be reset when the listener closes: they are served
        // (their first request) like any client that arrived before the drain.
        let mut swept = 0;
        if let Ok(listener) = listener.into_std() {
            while let Ok((stream, peer)) = listener.accept() {
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(stream));
                if let Ok(stream) = stream {
                    swept += 1;
                    admit(&shared, stream, peer);
                }
            }
        }
        tracing::info!(
            accepted_from_queue = swept,
            "regiongate stopped accepting clients; new connections go to another process on this port, if any"
        );
        shared.drain_clients(changes).await;
    }
}

/// Serves an accepted connection, unless a limit refuses it (`limits.max_clients` is checked at the end of
/// the login: a socket that does not log in takes no client's place).
fn admit(shared: &Arc<Shared>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    METRICS.clients_accepted.inc();
    let limits = &shared.config.load().limits;
    if let Err(error) = shared.admission.admit(peer.ip(), limits) {
        tokio::spawn(refuse_early(stream, error));
        return;
    }
    if let Err(error) = shared.admission.begin_login(limits) {
        tokio::spawn(refuse_early(stream, error));
        return;
    }
    tokio::spawn(session::serve(shared.clone(), stream, peer));
}

impl Shared {
    /// The drain after the listener closed: waits for the clients, cuts them at the deadline, lets view
    /// refreshes and connection clean-ups finish, and logs what it did.
    async fn drain_clients(&self, mut changes: tokio::sync::watch::Receiver<drain::Phase>) {
        let drain = &self.drain;
        let Some((started, _)) = drain.times() else {
            return;
        };
        self.clients.kick_all();
        let views = self.views();
        views.stop();
        let deadline = || {
            drain
                .times()
                .map_or_else(std::time::Instant::now, |(_, cut)| cut)
        };
        while drain.live_clients() > 0 && std::time::Instant::now() < deadline() {
            let tick = (std::time::Instant::now() + Duration::from_millis(20)).min(deadline());
            tokio::select! {
                _ = tokio::time::sleep_until(tick.into()) => {}
                _ = changes.changed() => {}
            }
        }
        if drain.live_clients() > 0 {
            drain.advance(drain::Phase::Cutting);
            tracing::warn!(
                clients = drain.live_clients(),
                "shutdown timeout: cutting the transactions still open; they roll back"
            );
            self.clients.kick_all();
            // A request still running is cancelled, so that its session reaches the point where it closes.
            for (_, entry) in self.clients.list() {
                if let Some(target) = entry.server() {
                    tokio::spawn(clients::cancel_server(target));
                }
            }
            let give_up = std::time::Instant::now() + Duration::from_secs(5);
            while drain.live_clients() > 0 && std::time::Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // A refresh in flight commits (or fails, and rolls back) before the process exits, up to the
        // deadline; past it the closed connection rolls it back.
        let refreshes = deadline().saturating_duration_since(std::time::Instant::now());
        let settled =
            tokio::time::timeout(refreshes.max(Duration::from_millis(100)), views.settled())
                .await
                .is_ok();
        // Connections of cut transactions are rolled back in the background before they are closed.
        let give_up = std::time::Instant::now() + Duration::from_secs(5);
        while self
            .pools()
            .iter()
            .any(|p| p.open_connections() > p.idle_connections() as u64)
            && std::time::Instant::now() < give_up
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            why = drain.why(),
            clients_closed_idle = drain.count(drain::Outcome::Closed),
            transactions_finished = drain.count(drain::Outcome::Finished),
            transactions_cut = drain.count(drain::Outcome::Cut),
            clients_left = drain.count(drain::Outcome::Left),
            clients_remaining = drain.live_clients(),
            views_settled = settled,
            took_ms = started.elapsed().as_millis() as u64,
            "shutdown complete"
        );
    }
}

/// A listening socket that another process may share (`SO_REUSEPORT`): a new gateway starts on the same
/// address while the old one drains, and the kernel sends new connections to whichever listens.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Refuses a connection before its startup packet: the client reads the error after sending it.
async fn refuse_early(mut stream: tokio::net::TcpStream, error: PgError) {
    let mut out = BytesMut::new();
    error.encode(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}
