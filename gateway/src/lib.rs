//! regiongate: a PostgreSQL gateway. This crate is the binary's library: the client↔server path (protocol,
//! pooling, sessions), configuration and metrics. `main.rs` is only the command line.

pub mod auth;
pub mod cancel;
pub mod config;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod route;
pub mod session;
pub mod sql;

use crate::auth::{Credentials, Startup};
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::config::ServerUrl;
use crate::metrics::METRICS;
use crate::pool::{Pool, PoolKey, ServerCredentials};
use crate::protocol::PgError;
use crate::route::Classifier;
use crate::session::StatementNames;
use arc_swap::ArcSwap;
use bytes::BytesMut;
use regions::{Regions, SideLogin};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What every session shares: the current configuration, pools, cancel keys, statement names.
pub struct Shared {
    pub config: ArcSwap<Config>,
    pub credentials: ArcSwap<Credentials>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub cancels: Arc<CancelRegistry>,
    pub statement_names: StatementNames,
    pub regions: Arc<Regions>,
    pub classifier: Arc<Classifier>,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        let regions = Regions::new(
            &config.primary,
            config.home_region.as_deref(),
            &config.regions,
            &config.routing,
            &config.gateway_name(),
            side_login(&config),
        );
        Arc::new(Shared {
            regions,
            classifier: Classifier::new(&config.routing.side_effect_functions),
            credentials: ArcSwap::from_pointee(Credentials::new(&config)),
            config: ArcSwap::from_pointee(config),
            pools: Mutex::new(HashMap::new()),
            cancels: Arc::default(),
            statement_names: StatementNames::default(),
        })
    }

    /// The primary's pool for a client's database and user.
    pub fn pool_for(&self, startup: &Startup) -> Arc<Pool> {
        let primary = self.config.load().primary.url.clone();
        self.pool(&primary, &startup.user, &startup.database)
    }

    /// The pool for a server, database and (client) user, created on first use.
    pub fn pool(&self, server: &ServerUrl, user: &str, database: &str) -> Arc<Pool> {
        let key = PoolKey {
            server: server.clone(),
            database: database.to_string(),
            user: user.to_string(),
        };
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(&key) {
            return pool.clone();
        }
        let config = self.config.load();
        let entry = config.user(user);
        let credentials = ServerCredentials {
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
        };
        let pool = Pool::new(key.clone(), credentials, config.pool.clone());
        pool::spawn_maintenance(&pool);
        pools.insert(key, pool.clone());
        pool
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
    }
}

/// A bound gateway, ready to serve.
pub struct Gateway {
    pub shared: Arc<Shared>,
    listener: TcpListener,
}

impl Gateway {
    pub async fn bind(config: Config) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(config.listen).await?;
        let shared = Shared::new(config);
        shared.regions.spawn_monitors();
        Ok(Gateway { shared, listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Accepts clients until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let max_clients = self.shared.config.load().limits.max_clients;
        let slots = Arc::new(Semaphore::new(max_clients));
        tokio::pin!(shutdown);
        tracing::info!(listen = %self.local_addr(), "regiongate is accepting clients");
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            METRICS.clients_accepted.inc();
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tokio::spawn(refuse_too_many(stream, max_clients));
                continue;
            };
            let shared = self.shared.clone();
            tokio::spawn(async move {
                session::serve(shared, stream, peer).await;
                drop(slot);
            });
        }
        tracing::info!("regiongate stopped accepting clients");
    }
}

async fn refuse_too_many(mut stream: tokio::net::TcpStream, max_clients: usize) {
    let error = PgError::fatal(
        "53300",
        format!("regiongate: too many client connections (limits.max_clients is {max_clients})"),
    );
    METRICS.clients_refused.with_label_values(&["53300"]).inc();
    let mut out = BytesMut::new();
    error.encode(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}
