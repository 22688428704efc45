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
    ("SHOW STATS", "totals since start"),
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
            ["PAUSE"] => {
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
                Response::Execution(Tag::new("PAUSE"))
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
                    c.user.clone(),
                    c.database.clone(),
                    c.application_name.clone(),
                    if server.is_some() { "active" } else { "idle" }.to_string(),
                    server.map(|s| s.addr.to_string()).unwrap_or_default(),
                    server.map(|s| s.pid.to_string()).unwrap_or_default(),
                    c.pinned().unwrap_or("").to_string(),
                    c.checkouts
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .to_string(),
                    age(c.connected_at),
                ]
            })
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

fn stats() -> Response {
    let rows = vec![
        ("clients_accepted", METRICS.clients_accepted.get()),
        ("clients_connected", METRICS.client_connections.get() as u64),
        (
            "server_connections",
            METRICS.server_connections.get() as u64,
        ),
        ("transactions", METRICS.transactions.get()),
        ("pool_timeouts", METRICS.pool_timeouts.get()),
        ("server_connect_errors", METRICS.server_connect_errors.get()),
        ("server_connections_lost", METRICS.server_lost.get()),
        ("slow_statements", METRICS.slow_statements.get()),
    ];
    table(
        &["stat", "value"],
        rows.into_iter()
            .map(|(k, v)| vec![k.to_string(), v.to_string()])
            .collect(),
    )
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
