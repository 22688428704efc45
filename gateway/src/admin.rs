//! The admin console: `psql -h GATEWAY -d regiongate -U <admin user>`, in the manner of PgBouncer's.
//!
//! The gateway authenticates the client as for any session, then hands the socket to pgwire's server API:
//! pgwire frames the console's messages and runs the simple-query protocol; [`Console`] answers the commands.

use crate::metrics::METRICS;
use crate::tls::Stream;
use crate::Shared;
use async_trait::async_trait;
use futures_util::{stream, Sink};
use pgwire::api::portal::Format;
use pgwire::api::query::SimpleQueryHandler;
use pgwire::api::results::{DataRowEncoder, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, DefaultClient, NoopHandler, PgWireConnectionState, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::tokio::server::{process_error, process_message, PgWireMessageServerCodec};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::codec::Framed;

/// The database name that opens the console.
pub const DATABASE: &str = "regiongate";

const HELP: &[(&str, &str)] = &[
    (
        "SHOW POOLS",
        "server connection pools: size, open, idle, in use, waiting clients",
    ),
    (
        "SHOW CLIENTS",
        "connected clients: address, user, database, application, state, server",
    ),
    (
        "SHOW SERVERS",
        "server connections: pool, backend pid, state, client",
    ),
    (
        "SHOW REGIONS",
        "regions nearest first, with their replicas' health",
    ),
    (
        "SHOW REPLICAS",
        "the primary and every replica: role, region, state, lag, round trip",
    ),
    (
        "SHOW ROUTES",
        "routing decisions by region, role and reason; transactions by start and outcome",
    ),
    (
        "SHOW STATS",
        "totals since start, and per second and averages over the last 15 s",
    ),
    ("SHOW VERSION", "the gateway's version and commit"),
    (
        "SHOW DATABASES",
        "each database clients use: where its primary is, pool size and mode, connections",
    ),
    ("SHOW USERS", "configured users and their pool mode"),
    ("SHOW LISTS", "how many databases, users, pools, clients and server connections"),
    (
        "KILL db",
        "end every client session of database db and close its server connections",
    ),
    ("SUSPEND", "as PAUSE (the online restart hands sockets over with RESTART instead)"),
    (
        "WAIT_CLOSE",
        "wait until the server connections of pools a reload, failover or KILL dropped are closed",
    ),
    ("SHOW CONFIG", "the configuration in force (no secrets)"),
    (
        "SHOW NPLUS1",
        "N+1 query patterns found: statement, parent, episodes, time spent, suggested fix",
    ),
    (
        "SHOW VIEWS",
        "materialized views: last refresh, duration, rows, next run, last error, staleness per region",
    ),
    ("REFRESH VIEW name", "refresh a materialized view now"),
    (
        "RELOAD",
        "re-read the configuration file; an invalid file is refused and the old one stays",
    ),
    (
        "RELOAD USERS",
        "forget the users auth.query looked up: their next login asks the primary again",
    ),
    ("BAN host:port", "no reads to that replica until UNBAN"),
    ("UNBAN host:port", "lift a ban"),
    (
        "PAUSE",
        "hold new transactions and wait until no server connection is in use",
    ),
    ("RESUME", "let transactions run again"),
    (
        "SHOW STATE",
        "serving, draining or cutting; during a shutdown: since when, the deadline, clients left, and how sessions ended",
    ),
    (
        "SHUTDOWN",
        "drain as on SIGTERM: accept no one, let transactions finish up to shutdown_timeout, then exit",
    ),
    (
        "RESTART",
        "as SIGUSR2: start a new process with the same arguments on the same address, then drain this one",
    ),
];

/// The console sessions open now (SHOW CLIENTS lists them, with state `console`).
#[derive(Default)]
pub struct Consoles {
    next: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<Vec<(u64, std::net::SocketAddr, String, SystemTime)>>,
}

/// A console session's place in [`Consoles`], given up when dropped.
pub struct ConsoleEntry<'a> {
    consoles: &'a Consoles,
    id: u64,
}

impl Consoles {
    pub fn open(&self, addr: std::net::SocketAddr, user: &str) -> ConsoleEntry<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.open.lock().unwrap_or_else(|p| p.into_inner()).push((
            id,
            addr,
            user.to_string(),
            SystemTime::now(),
        ));
        ConsoleEntry { consoles: self, id }
    }

    fn list(&self) -> Vec<(std::net::SocketAddr, String, SystemTime)> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, addr, user, at)| (*addr, user.clone(), *at))
            .collect()
    }
}

impl Drop for ConsoleEntry<'_> {
    fn drop(&mut self) {
        self.consoles
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, ..)| *id != self.id);
    }
}

/// Serves the console on an authenticated connection until the client leaves.
pub async fn serve(shared: Arc<Shared>, stream: Stream, peer: std::net::SocketAddr) {
    let mut framed = Framed::new(
        stream,
        PgWireMessageServerCodec::new(DefaultClient::new(peer, false)),
    );
    framed.set_state(PgWireConnectionState::ReadyForQuery);
    let console = Arc::new(Console { shared });
    let noop = Arc::new(NoopHandler);
    use futures_util::StreamExt;
    while let Some(Ok(message)) = framed.next().await {
        if matches!(
            message,
            pgwire::messages::PgWireFrontendMessage::Terminate(_)
        ) {
            break;
        }
        let extended = message.is_extended_query();
        let result = process_message(
            message,
            &mut framed,
            noop.clone(),
            console.clone(),
            noop.clone(),
            noop.clone(),
            noop.clone(),
        )
        .await;
        if let Err(error) = result {
            if process_error(&mut framed, error, extended).await.is_err() {
                break;
            }
        }
    }
}

struct Console {
    shared: Arc<Shared>,
}

#[async_trait]
impl SimpleQueryHandler for Console {
    async fn do_query<C>(&self, _client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let command = query.trim().trim_end_matches(';').trim();
        let words: Vec<&str> = command.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
        tracing::info!(command, "admin console command");
        let response = match upper.as_slice() {
            ["SHOW", "HELP"] | ["HELP"] => table(
                &["command", "description"],
                HELP.iter()
                    .map(|(c, d)| vec![c.to_string(), d.to_string()])
                    .collect(),
            ),
            ["SHOW", "POOLS"] => self.pools(),
            ["SHOW", "CLIENTS"] => self.clients(),
            ["SHOW", "SERVERS"] => self.servers(),
            ["SHOW", "REGIONS"] => self.regions(),
            ["SHOW", "REPLICAS"] => self.replicas(),
            ["SHOW", "ROUTES"] => routes(),
            ["SHOW", "STATS"] => stats(),
            ["SHOW", "VERSION"] => table(
                &["version"],
                vec![vec![format!(
                    "regiongate {} (commit {})",
                    env!("CARGO_PKG_VERSION"),
                    env!("REGIONGATE_COMMIT")
                )]],
            ),
            ["SHOW", "DATABASES"] => self.databases(),
            ["SHOW", "USERS"] => self.users(),
            ["SHOW", "LISTS"] => self.lists(),
            ["KILL", _] => {
                // As the client wrote it: database names are case-sensitive.
                let database = command.split_whitespace().nth(1).unwrap_or_default();
                let database = database.trim_end_matches(';').trim_matches('"');
                self.shared.drain.note_kill();
                let clients = self.shared.clients.kill_database(database);
                let pools = self.shared.retire_pools(|key| key.database == database);
                tracing::warn!(database, clients, pools, "KILL from the admin console");
                Response::Execution(Tag::new("KILL"))
            }
            ["WAIT_CLOSE"] | ["WAIT_CLOSE", _] => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    let open = self.shared.closing_connections();
                    if open == 0 {
                        break Response::Execution(Tag::new("WAIT_CLOSE"));
                    }
                    if tokio::time::Instant::now() > deadline {
                        break error(
                            "57014",
                            format!("WAIT_CLOSE gave up after 60 s: {open} server connection(s) still open"),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            ["SHOW", "CONFIG"] => self.config(),
            ["SHOW", "NPLUS1"] => self.nplus1(),
            ["SHOW", "VIEWS"] => self.views().await,
            ["REFRESH", "VIEW", _] => {
                // The name as written (lower-cased like an unquoted identifier).
                let name = words[2].trim_matches('"').to_ascii_lowercase();
                match self.shared.views().refresh_now(&name).await {
                    Ok(_) => Response::Execution(Tag::new("REFRESH VIEW")),
                    Err(e) => error(e.sqlstate(), format!("view not refreshed: {e}")),
                }
            }
            ["RELOAD", "USERS"] => {
                if let Some(lookup) = &self.shared.credentials.load().lookup {
                    lookup.forget();
                    tracing::info!("auth.query answers forgotten (RELOAD USERS)");
                }
                Response::Execution(Tag::new("RELOAD"))
            }
            ["RELOAD"] => match self.shared.reload() {
                Ok(()) => Response::Execution(Tag::new("RELOAD")),
                Err(message) => error("F0000", format!("configuration not reloaded: {message}")),
            },
            ["BAN", _] | ["UNBAN", _] => {
                let regions = self.shared.regions();
                match regions
                    .replica_urls
                    .iter()
                    .position(|u| u.to_string() == words[1])
                {
                    Some(id) if upper[0] == "BAN" => {
                        regions.ban_until_unbanned(id);
                        Response::Execution(Tag::new("BAN"))
                    }
                    Some(id) => {
                        regions.unban(id);
                        Response::Execution(Tag::new("UNBAN"))
                    }
                    None => error(
                        "42704",
                        format!(
                            "no replica {:?}; SHOW REPLICAS lists them as host:port",
                            words[1]
                        ),
                    ),
                }
            }
            ["PAUSE"] | ["SUSPEND"] => {
                self.shared.pause(true);
                // Wait (bounded) until every transaction in flight has finished.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while self
                    .shared
                    .clients
                    .list()
                    .iter()
                    .any(|(_, c)| c.server().is_some())
                {
                    if tokio::time::Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Response::Execution(Tag::new(upper[0]))
            }
            ["RESUME"] => {
                self.shared.pause(false);
                Response::Execution(Tag::new("RESUME"))
            }
            ["SHOW", "STATE"] => self.state(),
            ["RESTART"] => {
                match crate::restart::restart(&self.shared, "the admin console's RESTART").await {
                    Ok(_) => Response::Execution(Tag::new("RESTART")),
                    Err(e) => error("55000", format!("not restarted: {e}")),
                }
            }
            ["SHUTDOWN"] => {
                let timeout = self.shared.config.load().shutdown_timeout;
                self.shared
                    .drain
                    .request(timeout, "the admin console's SHUTDOWN");
                Response::Execution(Tag::new("SHUTDOWN"))
            }
            _ => error(
                "42601",
                format!("unknown admin command {command:?}; SHOW HELP lists the commands"),
            ),
        };
        Ok(vec![response])
    }
}

impl Console {
    fn pools(&self) -> Response {
        let mut rows: Vec<Vec<String>> = self
            .shared
            .pools()
            .iter()
            .map(|pool| {
                let open = pool.open_connections();
                let idle = pool.idle_connections() as u64;
                vec![
                    pool.key.database.clone(),
                    pool.key.user.clone(),
                    pool.key.server.to_string(),
                    pool.config().mode.to_string(),
                    pool.config().size.to_string(),
                    open.to_string(),
                    idle.to_string(),
                    open.saturating_sub(idle).to_string(),
                    pool.waiting().to_string(),
                ]
            })
            .collect();
        rows.sort();
        table(
            &[
                "database", "user", "server", "mode", "size", "open", "idle", "in_use", "waiting",
            ],
            rows,
        )
    }

    fn clients(&self) -> Response {
        let rows = self
            .shared
            .clients
            .list()
            .into_iter()
            .map(|(pid, c)| {
                let server = c.server();
                vec![
                    pid.to_string(),
                    c.addr.to_string(),
                    c.user.to_string(),
                    c.database.to_string(),
                    c.application_name.to_string(),
                    if server.is_some() {
                        "active"
                    } else if c.is_waiting() {
                        "waiting"
                    } else {
                        "idle"
                    }
                    .to_string(),
                    server.map(|s| s.addr.to_string()).unwrap_or_default(),
                    server.map(|s| s.pid.to_string()).unwrap_or_default(),
                    c.pinned().unwrap_or("").to_string(),
                    c.checkouts
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .to_string(),
                    age(c.connected_at),
                ]
            })
            .chain(
                self.shared
                    .consoles
                    .list()
                    .into_iter()
                    .map(|(addr, user, at)| {
                        vec![
                            String::new(),
                            addr.to_string(),
                            user,
                            DATABASE.to_string(),
                            String::new(),
                            "console".to_string(),
                            String::new(),
                            String::new(),
                            String::new(),
                            "0".to_string(),
                            age(at),
                        ]
                    }),
            )
            .collect();
        table(
            &[
                "pid",
                "address",
                "user",
                "database",
                "application_name",
                "state",
                "server",
                "server_pid",
                "pinned",
                "transactions",
                "connected_for",
            ],
            rows,
        )
    }

    /// PgBouncer's columns where they mean the same here: name, host, port, database, pool_size,
    /// min_pool_size, pool_mode, current_connections, paused; and the pools' users.
    fn databases(&self) -> Response {
        let config = self.shared.config.load();
        let writer = self.shared.regions().writer();
        let primary = writer.url().unwrap_or(&config.primary.url).clone();
        let mut names: Vec<String> = self
            .shared
            .pools()
            .iter()
            .map(|p| p.key.database.clone())
            .chain(config.primary.url.database.clone())
            .collect();
        names.sort();
        names.dedup();
        let pools = self.shared.pools();
        let rows = names
            .into_iter()
            .map(|name| {
                let of_db: Vec<_> = pools.iter().filter(|p| p.key.database == name).collect();
                let mut users: Vec<&str> = of_db.iter().map(|p| p.key.user.as_str()).collect();
                users.sort();
                users.dedup();
                vec![
                    name.clone(),
                    primary.host.clone(),
                    primary.port.to_string(),
                    name,
                    config.pool.size.to_string(),
                    config.pool.min_idle.to_string(),
                    config.pool.mode.to_string(),
                    of_db
                        .iter()
                        .map(|p| p.open_connections())
                        .sum::<u64>()
                        .to_string(),
                    i32::from(self.shared.is_paused()).to_string(),
                    users.join(", "),
                ]
            })
            .collect();
        table(
            &[
                "name",
                "host",
                "port",
                "database",
                "pool_size",
                "min_pool_size",
                "pool_mode",
                "current_connections",
                "paused",
                "users",
            ],
            rows,
        )
    }

    /// Configured users (PgBouncer's name and pool_mode), and whether each is an admin.
    fn users(&self) -> Response {
        let config = self.shared.config.load();
        let mut rows: Vec<Vec<String>> = config
            .auth
            .users
            .iter()
            .map(|u| {
                vec![
                    u.name.clone(),
                    config.pool.mode.to_string(),
                    config.admin.users.contains(&u.name).to_string(),
                    u.server_user.clone().unwrap_or_default(),
                ]
            })
            .collect();
        for admin in &config.admin.users {
            if !config.auth.users.iter().any(|u| &u.name == admin) {
                rows.push(vec![
                    admin.clone(),
                    String::new(),
                    "true".into(),
                    String::new(),
                ]);
            }
        }
        table(&["name", "pool_mode", "admin", "server_user"], rows)
    }

    /// PgBouncer's SHOW LISTS: how many of each thing the gateway holds.
    fn lists(&self) -> Response {
        let pools = self.shared.pools();
        let clients = self.shared.clients.list();
        let mut databases: Vec<&str> = pools.iter().map(|p| p.key.database.as_str()).collect();
        databases.sort();
        databases.dedup();
        let open: u64 = pools.iter().map(|p| p.open_connections()).sum();
        let idle: u64 = pools.iter().map(|p| p.idle_connections() as u64).sum();
        let used_clients = clients.iter().filter(|(_, c)| c.server().is_some()).count();
        let waiting = clients.iter().filter(|(_, c)| c.is_waiting()).count();
        let rows = [
            ("databases", databases.len()),
            ("users", self.shared.config.load().auth.users.len()),
            ("pools", pools.len()),
            (
                "free_clients",
                clients.len().saturating_sub(used_clients + waiting),
            ),
            ("used_clients", used_clients),
            ("waiting_clients", waiting),
            ("console_clients", self.shared.consoles.list().len()),
            ("free_servers", idle as usize),
            ("used_servers", open.saturating_sub(idle) as usize),
        ];
        table(
            &["list", "items"],
            rows.iter()
                .map(|(k, v)| vec![k.to_string(), v.to_string()])
                .collect(),
        )
    }

    fn servers(&self) -> Response {
        let clients = self.shared.clients.list();
        let mut rows = Vec::new();
        for pool in self.shared.pools() {
            for (pid, idle_for) in pool.idle_list() {
                rows.push(vec![
                    pool.name.clone(),
                    pid.to_string(),
                    "idle".to_string(),
                    String::new(),
                    format!("{:.1}s", idle_for.as_secs_f64()),
                ]);
            }
        }
        for (client_pid, client) in &clients {
            if let Some(server) = client.server() {
                let pool = format!("{}@{} on {}", client.user, client.database, server.addr);
                rows.push(vec![
                    pool,
                    server.pid.to_string(),
                    "active".to_string(),
                    format!("{client_pid} ({})", client.addr),
                    String::new(),
                ]);
            }
        }
        table(&["pool", "server_pid", "state", "client", "idle_for"], rows)
    }

    fn regions(&self) -> Response {
        let regions = self.shared.regions();
        let picture = regions.picture();
        let rows = picture
            .region_order
            .iter()
            .enumerate()
            .map(|(rank, region)| {
                let replicas: Vec<_> = picture
                    .replicas
                    .iter()
                    .filter(|r| &r.region == region)
                    .collect();
                let up = replicas.iter().filter(|r| r.up).count();
                let rtt = replicas.iter().filter(|r| r.up).filter_map(|r| r.rtt).min();
                vec![
                    (rank + 1).to_string(),
                    region.to_string(),
                    (regions.home_region.as_deref() == Some(&**region)).to_string(),
                    replicas.len().to_string(),
                    up.to_string(),
                    rtt.map(|r| format!("{:.3}", r.as_secs_f64() * 1000.0))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &["order", "region", "home", "replicas", "up", "best_rtt_ms"],
            rows,
        )
    }

    fn replicas(&self) -> Response {
        let regions = self.shared.regions();
        let picture = regions.picture();
        let now = std::time::Instant::now();
        let writer = picture.writer.url();
        // `role` is what the configuration says; `discovered` what the node said at its last probe; `writes`
        // whether writes go there now.
        let (configured_role, configured_timeline) = picture.configured_primary;
        let mut rows = vec![vec![
            "primary".to_string(),
            regions.primary_region.as_deref().unwrap_or("").to_string(),
            regions.primary_url.to_string(),
            match configured_role {
                regions::Role::Primary | regions::Role::Standby => "up",
                regions::Role::Down => "down",
                regions::Role::Unknown if regiongate_primary_up() => "up",
                regions::Role::Unknown => "unknown",
            }
            .to_string(),
            configured_role.label().to_string(),
            configured_timeline
                .map(|t| t.to_string())
                .unwrap_or_default(),
            (writer == Some(&regions.primary_url)).to_string(),
            "0".to_string(),
            "0".to_string(),
            String::new(),
            String::new(),
            "0".to_string(),
            match &picture.writer {
                regions::Writer::Refused { why } => why.to_string(),
                regions::Writer::Node { .. } => String::new(),
            },
        ]];
        for r in &picture.replicas {
            let state = if r.banned(now) {
                "banned"
            } else if r.up {
                "up"
            } else {
                "down"
            };
            rows.push(vec![
                "replica".to_string(),
                r.region.to_string(),
                r.url.to_string(),
                state.to_string(),
                r.role.label().to_string(),
                r.timeline.map(|t| t.to_string()).unwrap_or_default(),
                (writer == Some(&r.url)).to_string(),
                r.lag
                    .map(|l| format!("{:.3}", l.as_secs_f64()))
                    .unwrap_or_default(),
                r.lag_bytes.map(|b| b.to_string()).unwrap_or_default(),
                r.rtt
                    .map(|t| format!("{:.3}", t.as_secs_f64() * 1000.0))
                    .unwrap_or_default(),
                r.replay_lsn.map(|l| l.to_string()).unwrap_or_default(),
                regions.in_flight(r.id).to_string(),
                r.error.clone().unwrap_or_default(),
            ]);
        }
        table(
            &[
                "role",
                "region",
                "server",
                "state",
                "discovered",
                "timeline",
                "writes",
                "lag_seconds",
                "lag_bytes",
                "rtt_ms",
                "replay_lsn",
                "in_flight",
                "error",
            ],
            rows,
        )
    }

    async fn views(&self) -> Response {
        let views = self.shared.views();
        let statuses = match views.status().await {
            Ok(statuses) => statuses,
            Err(e) => return error(e.sqlstate(), format!("cannot read the views' history: {e}")),
        };
        // One staleness column per region, in the order of the first view's (primary's region first).
        let regions: Vec<String> = statuses
            .first()
            .map(|s| s.staleness.iter().map(|(r, _)| r.clone()).collect())
            .unwrap_or_default();
        let seconds = |d: Option<Duration>| {
            d.map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_default()
        };
        let rows = statuses
            .iter()
            .map(|s| {
                let mut row = vec![
                    s.name.clone(),
                    s.schedule.clone(),
                    seconds(Some(s.max_staleness)),
                    s.last_refresh
                        .map(|t| format!("{} ago", age(t)))
                        .unwrap_or_default(),
                    s.duration
                        .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
                        .unwrap_or_default(),
                    s.rows.map(|r| r.to_string()).unwrap_or_default(),
                    s.next_run
                        .map(|t| match t.duration_since(SystemTime::now()) {
                            Ok(wait) => format!("in {:.1}s", wait.as_secs_f64()),
                            Err(_) => "now".to_string(),
                        })
                        .unwrap_or_default(),
                    s.last_error.clone().unwrap_or_default(),
                ];
                row.extend(regions.iter().map(|region| {
                    seconds(
                        s.staleness
                            .iter()
                            .find(|(r, _)| r == region)
                            .and_then(|(_, d)| *d),
                    )
                }));
                row
            })
            .collect();
        let mut columns = vec![
            "view".to_string(),
            "schedule".to_string(),
            "max_staleness".to_string(),
            "last_refresh".to_string(),
            "duration_ms".to_string(),
            "rows".to_string(),
            "next_run".to_string(),
            "last_error".to_string(),
        ];
        columns.extend(regions.iter().map(|r| format!("staleness_{r}")));
        let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
        table(&columns, rows)
    }

    fn nplus1(&self) -> Response {
        let rows = self
            .shared
            .nplus1
            .top()
            .into_iter()
            .map(|p| {
                vec![
                    p.fingerprint,
                    p.normalized,
                    p.parent,
                    p.episodes.to_string(),
                    p.statements.to_string(),
                    format!("{:.1}", p.total.as_secs_f64() * 1000.0),
                    p.application_name,
                    p.suggestion.to_string(),
                    age(p.last_seen),
                ]
            })
            .collect();
        table(
            &[
                "fingerprint",
                "statement",
                "parent",
                "episodes",
                "statements",
                "total_ms",
                "application_name",
                "suggestion",
                "last_seen_ago",
            ],
            rows,
        )
    }

    fn config(&self) -> Response {
        let config = self.shared.config.load();
        let mut rows = vec![
            ("listen", config.listen.to_string()),
            ("name", config.gateway_name()),
            ("workers", config.workers.to_string()),
            ("primary", config.primary.url.to_string()),
            (
                "primary.region",
                config.primary.region.clone().unwrap_or_default(),
            ),
            (
                "home_region",
                config.home_region.clone().unwrap_or_default(),
            ),
            ("pool.mode", config.pool.mode.to_string()),
            ("pool.size", config.pool.size.to_string()),
            ("pool.min_idle", config.pool.min_idle.to_string()),
            (
                "pool.checkout_timeout",
                humantime::format_duration(config.pool.checkout_timeout).to_string(),
            ),
            (
                "pool.idle_timeout",
                humantime::format_duration(config.pool.idle_timeout).to_string(),
            ),
            (
                "pool.max_lifetime",
                humantime::format_duration(config.pool.max_lifetime).to_string(),
            ),
            (
                "pool.connect_timeout",
                duration(config.pool.connect_timeout),
            ),
            (
                "pool.max_prepared_statements",
                config.pool.max_prepared_statements.to_string(),
            ),
            ("auth.method", config.auth.method.to_string()),
            (
                "auth.query_user",
                config.auth.query_user.clone().unwrap_or_default(),
            ),
            ("auth.query", config.auth.query.clone()),
            (
                "auth.query_cache_ttl",
                humantime::format_duration(config.auth.query_cache_ttl).to_string(),
            ),
            (
                "auth.users",
                config
                    .auth
                    .users
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("admin.users", config.admin.users.join(", ")),
            (
                "limits.max_message_size",
                config.limits.max_message_size.to_string(),
            ),
            ("limits.max_clients", config.limits.max_clients.to_string()),
            (
                "limits.max_pending_logins",
                config.limits.max_pending_logins.to_string(),
            ),
            (
                "limits.login_timeout",
                humantime::format_duration(config.limits.login_timeout).to_string(),
            ),
            (
                "limits.max_prepared_statements",
                config.limits.max_prepared_statements.to_string(),
            ),
            (
                "limits.client_idle_timeout",
                duration(config.limits.client_idle_timeout),
            ),
            (
                "limits.statement_timeout",
                duration(config.limits.statement_timeout),
            ),
            (
                "limits.connection_rate",
                config.limits.connection_rate.to_string(),
            ),
            (
                "limits.client_connection_rate",
                config.limits.client_connection_rate.to_string(),
            ),
            (
                "limits.max_failed_logins",
                config.limits.max_failed_logins.to_string(),
            ),
            (
                "limits.failed_login_window",
                duration(config.limits.failed_login_window),
            ),
            (
                "shutdown_timeout",
                humantime::format_duration(config.shutdown_timeout).to_string(),
            ),
            (
                "routing.max_lag",
                humantime::format_duration(config.routing.max_lag).to_string(),
            ),
            (
                "routing.read_your_writes",
                config.routing.read_your_writes.to_string(),
            ),
            (
                "routing.when_primary_down",
                match config.routing.when_primary_down {
                    regions::config::WhenPrimaryDown::ServeStale => "serve_stale",
                    regions::config::WhenPrimaryDown::Error => "error",
                }
                .to_string(),
            ),
            (
                "routing.outage_max_lag",
                humantime::format_duration(config.routing.outage_max_lag).to_string(),
            ),
            (
                "routing.when_no_replica_fits",
                format!("{:?}", config.routing.when_no_replica_fits).to_lowercase(),
            ),
            (
                "routing.primary_reads",
                format!("{:?}", config.routing.primary_reads).to_lowercase(),
            ),
            (
                "routing.monitor_interval",
                humantime::format_duration(config.routing.monitor_interval).to_string(),
            ),
            ("routing.ban_time", duration(config.routing.ban_time)),
            (
                "routing.region_order",
                config.routing.region_order.join(", "),
            ),
            (
                "routing.side_effect_functions",
                config.routing.side_effect_functions.join(", "),
            ),
            (
                "routing.transactions.mode",
                format!("{:?}", config.routing.transactions.mode).to_lowercase(),
            ),
            (
                "routing.transactions.max_replay_bytes",
                config.routing.transactions.max_replay_bytes.to_string(),
            ),
            (
                "log.slow_statement",
                humantime::format_duration(config.log.slow_statement).to_string(),
            ),
            ("nplus1.enabled", config.nplus1.enabled.to_string()),
            ("nplus1.threshold", config.nplus1.threshold.to_string()),
            (
                "nplus1.window",
                humantime::format_duration(config.nplus1.window).to_string(),
            ),
            (
                "nplus1.log_parameters",
                config.nplus1.log_parameters.to_string(),
            ),
            ("batching.tables", config.batching.tables.join(", ")),
            ("batching.max_rows", config.batching.max_rows.to_string()),
            ("batching.max_bytes", config.batching.max_bytes.to_string()),
            ("batching.max_delay", duration(config.batching.max_delay)),
            ("batching.alone", config.batching.alone.to_string()),
            (
                "batching.connections",
                config.batching.connections.to_string(),
            ),
            (
                "batching.max_queued_rows",
                config.batching.max_queued_rows.to_string(),
            ),
            ("tls.mode", format!("{:?}", config.tls.mode).to_lowercase()),
            ("tls.cert", path(&config.tls.cert)),
            ("tls.key", path(&config.tls.key)),
            ("server_tls.mode", config.server_tls.mode.to_string()),
            ("server_tls.ca", path(&config.server_tls.ca)),
            ("server_tls.cert", path(&config.server_tls.cert)),
            ("server_tls.key", path(&config.server_tls.key)),
            (
                "metrics.listen",
                config
                    .metrics
                    .listen
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
        ];
        for region in &config.regions {
            let replicas: Vec<String> = region.replicas.iter().map(|r| r.to_string()).collect();
            rows.push((
                "regions",
                format!("{}: {}", region.name, replicas.join(", ")),
            ));
        }
        for budget in &config.routing.budgets {
            rows.push((
                "routing.budgets",
                format!(
                    "user {}, database {}: max_lag {}, transactions {}",
                    budget.user.as_deref().unwrap_or("*"),
                    budget.database.as_deref().unwrap_or("*"),
                    budget.max_lag.map(duration).unwrap_or_else(|| "-".into()),
                    budget
                        .transactions
                        .map(|t| format!("{t:?}").to_lowercase())
                        .unwrap_or_else(|| "-".into()),
                ),
            ));
        }
        for view in &config.views {
            rows.push((
                "views",
                format!(
                    "{}: {}, max_staleness {:?}",
                    view.name,
                    view.schedule,
                    view.max_staleness()
                ),
            ));
        }
        table(
            &["key", "value"],
            rows.into_iter()
                .map(|(k, v)| vec![k.to_string(), v])
                .collect(),
        )
    }
}

fn regiongate_primary_up() -> bool {
    regions::metrics::PRIMARY_UP.get() == 1
}

fn routes() -> Response {
    let mut rows: Vec<Vec<String>> = counts(&METRICS.routed, &["region", "role", "reason"])
        .map(|(labels, count)| [vec!["exchange".to_string()], labels, vec![count]].concat())
        .collect();
    // Transactions that could write: where they started, and how they ended.
    rows.extend(
        counts(&METRICS.transactions_routed, &["start", "outcome"]).map(|(labels, count)| {
            [
                vec!["transaction".to_string(), String::new()],
                labels,
                vec![count],
            ]
            .concat()
        }),
    );
    rows.sort();
    table(&["routed", "region", "role", "reason", "count"], rows)
}

/// Each child of a counter family: the values of `labels`, in that order, and its count.
fn counts(
    family: &prometheus::IntCounterVec,
    labels: &[&str],
) -> impl Iterator<Item = (Vec<String>, String)> {
    use prometheus::core::Collector;
    let mut out = Vec::new();
    for collected in family.collect() {
        for metric in collected.get_metric() {
            let value = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            let values = labels.iter().map(|name| value(name)).collect();
            out.push((
                values,
                (metric.get_counter().get_value() as u64).to_string(),
            ));
        }
    }
    out.into_iter()
}

impl Console {
    /// SHOW STATE: where the gateway is in its life, and what a drain has done so far.
    fn state(&self) -> Response {
        let drain = &self.shared.drain;
        let mut rows = vec![
            ("state", drain.phase().name().to_string()),
            ("clients", drain.live_clients().to_string()),
        ];
        if let Some((started, cut_at)) = drain.times() {
            rows.push(("why", drain.why().to_string()));
            rows.push((
                "draining_for",
                format!("{:.1}s", started.elapsed().as_secs_f64()),
            ));
            rows.push((
                "cut_in",
                format!(
                    "{:.1}s",
                    cut_at
                        .saturating_duration_since(std::time::Instant::now())
                        .as_secs_f64()
                ),
            ));
            for (outcome, count) in drain.counts() {
                rows.push((outcome, count.to_string()));
            }
        }
        table(
            &["field", "value"],
            rows.into_iter()
                .map(|(k, v)| vec![k.to_string(), v])
                .collect(),
        )
    }
}

/// What SHOW STATS counts, in its order.
fn counters() -> [(&'static str, u64); 8] {
    [
        ("clients_accepted", METRICS.clients_accepted.get()),
        ("transactions", METRICS.transactions.get()),
        ("requests", METRICS.request_totals().0),
        ("pool_timeouts", METRICS.pool_timeouts.get()),
        ("server_connect_errors", METRICS.server_connect_errors.get()),
        ("server_connections_lost", METRICS.server_lost.get()),
        ("slow_statements", METRICS.slow_statements.get()),
        ("statement_timeouts", METRICS.statement_timeouts.get()),
    ]
}

/// One reading of the counters, and of the request and pool-wait times (count, sum in seconds).
#[derive(Clone)]
struct Sample {
    at: std::time::Instant,
    counts: [u64; 8],
    requests: (u64, f64),
    waits: (u64, f64),
}

impl Sample {
    fn now() -> Sample {
        Sample {
            at: std::time::Instant::now(),
            counts: counters().map(|(_, v)| v),
            requests: METRICS.request_totals(),
            waits: METRICS.pool_wait_totals(),
        }
    }
}

/// The two latest samples: SHOW STATS's rates and averages are over the interval between them.
static SAMPLES: std::sync::Mutex<Option<(Sample, Sample)>> = std::sync::Mutex::new(None);

/// How often SHOW STATS's rates and averages are computed (PgBouncer: stats_period).
pub const STATS_PERIOD: Duration = Duration::from_secs(15);

/// Samples the counters every [`STATS_PERIOD`], for as long as the runtime runs.
pub async fn sample_stats() {
    let mut ticker = tokio::time::interval(STATS_PERIOD);
    loop {
        ticker.tick().await;
        let sample = Sample::now();
        let mut samples = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
        *samples = Some(match samples.take() {
            Some((_, latest)) => (latest, sample),
            None => (sample.clone(), sample),
        });
    }
}

fn stats() -> Response {
    let interval = SAMPLES.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let per_second = |i: usize| -> String {
        match &interval {
            Some((old, new)) if new.at > old.at => format!(
                "{:.2}",
                new.counts[i].saturating_sub(old.counts[i]) as f64
                    / new.at.duration_since(old.at).as_secs_f64()
            ),
            _ => String::new(),
        }
    };
    let mut rows: Vec<Vec<String>> = counters()
        .iter()
        .enumerate()
        .map(|(i, (name, total))| vec![name.to_string(), total.to_string(), per_second(i)])
        .collect();
    rows.push(vec![
        "clients_connected".into(),
        METRICS.client_connections.get().to_string(),
        String::new(),
    ]);
    rows.push(vec![
        "server_connections".into(),
        METRICS.server_connections.get().to_string(),
        String::new(),
    ]);
    // Averages over the interval, in microseconds (PgBouncer's avg_query_time and avg_wait_time).
    let average = |pick: fn(&Sample) -> (u64, f64)| match &interval {
        Some((old, new)) => {
            let (count, sum) = (pick(new).0 - pick(old).0, pick(new).1 - pick(old).1);
            if count == 0 {
                "0".to_string()
            } else {
                format!("{:.0}", sum / count as f64 * 1e6)
            }
        }
        None => String::new(),
    };
    rows.push(vec![
        "avg_request_us".into(),
        average(|s| s.requests),
        String::new(),
    ]);
    rows.push(vec![
        "avg_wait_us".into(),
        average(|s| s.waits),
        String::new(),
    ]);
    table(&["stat", "value", "per_second"], rows)
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn path(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn age(since: SystemTime) -> String {
    let secs = since.elapsed().unwrap_or_default().as_secs_f64();
    format!("{secs:.1}s")
}

/// A result set of text columns.
fn table(columns: &[&str], rows: Vec<Vec<String>>) -> Response {
    let schema = Arc::new(
        columns
            .iter()
            .map(|c| {
                FieldInfo::new(
                    c.to_string(),
                    None,
                    None,
                    Type::TEXT,
                    Format::UnifiedText.format_for(0),
                )
            })
            .collect::<Vec<_>>(),
    );
    let encoder_schema = schema.clone();
    let rows = rows.into_iter().map(move |row| {
        let mut encoder = DataRowEncoder::new(encoder_schema.clone());
        for value in &row {
            encoder.encode_field(value)?;
        }
        Ok(encoder.take_row())
    });
    Response::Query(QueryResponse::new(schema, stream::iter(rows)))
}

fn error(code: &str, message: String) -> Response {
    Response::Error(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        code.to_string(),
        message,
    )))
}
