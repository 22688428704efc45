//! regiongate: a PostgreSQL gateway. This crate is the binary's library: the client↔server path (protocol,
//! pooling, sessions), configuration and metrics. `main.rs` is only the command line.

pub mod auth;
pub mod cancel;
pub mod config;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod session;
pub mod sql;

use crate::auth::{Credentials, Startup};
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::metrics::METRICS;
use crate::pool::{Pool, PoolKey, ServerCredentials};
use crate::protocol::PgError;
use crate::session::StatementNames;
use arc_swap::ArcSwap;
use bytes::BytesMut;
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
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        Arc::new(Shared {
            credentials: ArcSwap::from_pointee(Credentials::new(&config)),
            config: ArcSwap::from_pointee(config),
            pools: Mutex::new(HashMap::new()),
            cancels: Arc::default(),
            statement_names: StatementNames::default(),
        })
    }

    /// The pool for a client's database and user on the primary, created on first use.
    pub fn pool_for(&self, startup: &Startup) -> Arc<Pool> {
        let config = self.config.load();
        let server = config.primary.url.clone();
        let key = PoolKey {
            server,
            database: startup.database.clone(),
            user: startup.user.clone(),
        };
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(&key) {
            return pool.clone();
        }
        let user = config.user(&startup.user);
        let credentials = ServerCredentials {
            user: user
                .and_then(|u| u.server_user.clone())
                .unwrap_or_else(|| startup.user.clone()),
            password: user
                .and_then(|u| {
                    u.server_password
                        .clone()
                        .or_else(|| u.plain_password().map(str::to_string))
                })
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

/// A bound gateway, ready to serve.
pub struct Gateway {
    pub shared: Arc<Shared>,
    listener: TcpListener,
}

impl Gateway {
    pub async fn bind(config: Config) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Gateway {
            shared: Shared::new(config),
            listener,
        })
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
