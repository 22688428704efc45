//! One client connection, from startup to goodbye: accept → startup/auth → loop { read client messages →
//! forward (checking out a server connection when one is needed) → relay answers until ReadyForQuery →
//! release the server connection when the client is idle }.
//!
//! Transaction pooling makes a client's session span many server connections, so the session keeps what a
//! single PostgreSQL backend would remember and recreates it where it is missing:
//! - named prepared statements (protocol-level Parse and SQL-level PREPARE) are tracked per client and
//!   prepared on whichever server connection runs their Bind/Describe/EXECUTE, under server-side names the
//!   gateway chooses (see [`StatementNames`]);
//! - settings and identity (startup parameters, SET, RESET, `set_config`, SET ROLE, SET SESSION
//!   AUTHORIZATION) are read back from the server after a request that may have changed them, and replayed
//!   as values, before anything else, where a server connection's differ (see [`crate::settings`]);
//! - what cannot move (LISTEN, temporary tables, WITH HOLD cursors, session advisory locks) pins the client
//!   to its server connection for the rest of its session.
//!
//! The gateway's own messages (a re-prepare, a settings capture) are sent before the client's and their
//! answers are swallowed: [`Pending`] mirrors, in order, each message whose answer must be matched
//! (ParseComplete, ReadyForQuery), so every answer from the server is attributed to the right request.

use crate::auth::{authenticate_client, read_first_packet, FirstPacket, Startup, StartupError};
use crate::clients::{ClientHandle, ClientInfo, ServerTarget};
use crate::config::{PoolMode, TlsMode};
use crate::metrics::METRICS;
use crate::pool::{Lease, OwnError, Pool, ServerConn, Settings};
use crate::protocol::{self, PgError};
use crate::settings::SessionSettings;
use crate::sql::{self, Kind};
use crate::tls::Stream;
use crate::Shared;
use routing::{Reads, Route};

mod batching;
mod routing;

/// For the fuzz targets: the extended-protocol exchange reader of insert batching.
#[doc(hidden)]
pub fn fuzz_extended(data: &[u8]) {
    batching::fuzz(data);
}
use bytes::{Buf, Bytes, BytesMut};
use pgwire::messages::startup::Authentication;
use pgwire::messages::Message;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

/// Stop reading from one side while this much is waiting to be written to the other (backpressure).
const HIGH_WATER: usize = 256 * 1024;
/// How long a client may take to send its startup packet and authenticate.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Server-side names for protocol-level prepared statements, by content (query text and parameter types):
/// every client that prepares the same statement shares one server-side statement per server connection, so
/// a statement prepared by one client is ready for the next.
#[derive(Default)]
pub struct StatementNames {
    names: Mutex<HashMap<Bytes, Arc<str>>>,
    next: AtomicU64,
}

/// Past this many distinct statements the map starts over; names are never reused, so nothing collides.
const MAX_STATEMENT_NAMES: usize = 100_000;

impl StatementNames {
    fn name_for(&self, content: &Bytes) -> Arc<str> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(name) = names.get(content) {
            return name.clone();
        }
        if names.len() >= MAX_STATEMENT_NAMES {
            names.clear();
        }
        let name: Arc<str> = self.fresh("s").into();
        names.insert(content.clone(), name.clone());
        name
    }

    /// After a schema change (or the server saying a statement's result type changed), statements are
    /// prepared anew under fresh names: one prepared before it may no longer describe what its text means
    /// now ("cached plan must not change result type"), and a client preparing that text now must get what a
    /// direct connection would. Old names stay valid for the clients that prepared them, as on one backend.
    fn forget_all(&self) {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// A name no server connection has seen.
    fn fresh(&self, kind: &str) -> String {
        format!("__rg_{kind}{}", self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// A protocol-level prepared statement as the client named it.
struct Statement {
    server_name: Arc<str>,
    /// The Parse body after the statement name: query text and parameter types, sent verbatim.
    parse_rest: Bytes,
    /// What running it does to the session.
    effect: StatementEffect,

    /// Where it may run (when read routing is on).
    class: Option<crate::route::Class>,
    /// Its fingerprint hash and whether it reads (when N+1 detection is on), computed once at Parse.
    shape: u64,
    reads: bool,
    /// The INSERT it is, when its rows can be batched.
    batch: Option<Arc<crate::batch::Insert>>,
}

/// What running a protocol-level statement does to the session.
#[derive(Clone)]
enum StatementEffect {
    None,
    Pin(&'static str),
    Change(Touch),
}

/// A SQL-level prepared statement (PREPARE name AS ...).
struct SqlPrepared {
    server_name: Arc<str>,
    /// The PREPARE statement under the server-side name, to run on connections that lack it.
    prepare: String,
    /// What running it does to the settings (it calls `set_config`).
    touch: Option<Touch>,
}

/// What a statement may do to the session's settings: the server is asked afterwards (a capture), and a
/// RESET is followed by the client's own reset values.
#[derive(Clone, Debug, Default)]
struct Touch {
    /// Custom settings it names (`app.tenant`): invisible in `pg_settings`, so a capture asks for them.
    custom: Vec<String>,
    /// Parameters (zero-based) whose values name settings, as in `set_config($1, $2, false)`.
    parameters: Vec<usize>,
    /// It resets settings to their defaults.
    reset: Reset,
}

/// Settings a request resets, whose connection-time values the client must get back.
#[derive(Clone, Debug, Default, PartialEq)]
enum Reset {
    #[default]
    Nothing,
    Names(Vec<String>),
    All,
}

impl Reset {
    fn add(&mut self, other: Reset) {
        match (&mut *self, other) {
            (_, Reset::Nothing) | (Reset::All, _) => {}
            (Reset::Names(names), Reset::Names(more)) => names.extend(more),
            (this, other) => *this = other,
        }
    }
}

/// The gateway's own requests: their answers never reach the client.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Own {
    /// A re-prepare, a deferred BEGIN, a SQL-level PREPARE: nothing to read.
    Plain,
    /// The WAL position after a write: its DataRow is read.
    Position,
    /// The session's settings ([`crate::settings::capture_sql`]): its DataRows are read.
    Capture,
    /// The client's reset values after its RESET: its ParameterStatus messages are the client's, and its
    /// failure (the client's transaction failed meanwhile) changes nothing.
    Restore,
}

/// A name the gateway put in place of the client's, in a Query it rewrote, in characters: where the client's
/// was, how long it was, and how long the replacement is (for error positions).
#[derive(Clone, Copy, Debug, Default)]
struct Shift {
    at: usize,
    was: usize,
    now: usize,
}

/// An error position (1-based, in characters) in a rewritten Query, as a position in the client's text.
fn unshift(position: usize, shifts: &[Shift]) -> usize {
    let mut moved: isize = 0;
    let zero_based = position.saturating_sub(1) as isize;
    for shift in shifts {
        let start = shift.at as isize + moved;
        if zero_based < start {
            break;
        }
        if zero_based < start + shift.now as isize {
            return shift.at + 1; // inside the replacement: the client's name starts here
        }
        moved += shift.now as isize - shift.was as isize;
    }
    (zero_based - moved).max(0) as usize + 1
}

/// A request whose answer is still to come, in the order the server will answer.
enum Pending {
    /// A Parse: answered by ParseComplete (or skipped after an error). `name` is the server-side statement it
    /// creates, forgotten again if the Parse fails.
    Parse {
        swallow: bool,
        name: Option<Arc<str>>,
    },
    /// A Sync, Query or FunctionCall: answered by ReadyForQuery.
    Ready {
        /// The gateway's own, or the client's (None).
        own: Option<Own>,
        /// Query and FunctionCall: an error does not skip later messages.
        simple: bool,
        failed: bool,
        /// What little requests carry (boxed: most carry nothing, and the queue moves its entries).
        extra: Option<Box<Extra>>,
    },
}

/// What a client's request may carry besides its place in the queue.
#[derive(Default)]
struct Extra {
    /// Settings the request resets.
    reset: Reset,
    /// Names the gateway replaced in the client's Query.
    shifts: Vec<Shift>,
}

impl Pending {
    /// A client's request answered by ReadyForQuery.
    fn client(simple: bool, reset: Reset) -> Pending {
        Pending::Ready {
            own: None,
            simple,
            failed: false,
            extra: (reset != Reset::Nothing).then(|| {
                Box::new(Extra {
                    reset,
                    shifts: Vec::new(),
                })
            }),
        }
    }

    /// One of the gateway's own simple queries.
    fn own(own: Own) -> Pending {
        Pending::Ready {
            own: Some(own),
            simple: true,
            failed: false,
            extra: None,
        }
    }

    fn is_own(&self, kind: Own) -> bool {
        matches!(self, Pending::Ready { own: Some(own), .. } if *own == kind)
    }

    fn swallowed(&self) -> bool {
        matches!(self, Pending::Ready { own: Some(_), .. })
    }
}

/// What the client's bytes need next.
enum Progress {
    /// Everything complete was handled; wait for I/O.
    Idle,
    /// The next message needs a server connection.
    NeedServer,
    /// Exchanges were taken for insert batching: queue them and await their answers.
    Batched,
    /// The client said goodbye.
    Terminate,
}

/// Why a session ended.
enum End {
    /// Client disconnected or terminated.
    Client,
    /// The server ended the session's backend and the client was sent its FATAL (still to be written).
    Backend,
    /// The client is told this, then the connection closes.
    Fatal(PgError),
}

struct Session {
    shared: Arc<Shared>,
    client: Stream,
    /// Client bytes not yet handled.
    from_client: BytesMut,
    to_client: BytesMut,
    to_server: BytesMut,
    /// The primary's pool for this client's database and user.
    pool: Arc<Pool>,
    /// The reload generation `pool`, `replicas`, `regions`, `slow_after` and `batching` were read in.
    pool_generation: u64,
    /// Whether any replica is configured (read routing is on).
    replicas: bool,
    /// The regions in force (replaced by a reload only; their live picture changes inside).
    regions: Arc<regions::Regions>,
    /// `log.slow_statement`.
    slow_after: Duration,
    /// Whether any table is configured for insert batching (no statement is looked at for it otherwise).
    batching: bool,
    lease: Option<Lease>,
    route: Option<Route>,
    reads: Reads,
    /// This client's registration: cancel key, and what the console shows.
    handle: ClientHandle,
    max_message_size: usize,
    /// `limits.max_prepared_statements` and `limits.client_idle_timeout`.
    max_prepared_statements: usize,
    client_idle_timeout: Duration,
    /// `limits.statement_timeout`, and whether the request in flight was cancelled for it already.
    statement_timeout: Duration,
    timed_out: bool,

    pending: VecDeque<Pending>,
    /// Extended-protocol messages were sent since the last Sync: the server is inside that exchange.
    in_exchange: bool,
    /// Settings reset by statements bound since the last Sync.
    segment_reset: Reset,
    /// A request that may have changed settings was sent: read them back before the connection goes.
    settings_touched: bool,
    /// The rows of a settings capture under way.
    capture_rows: Vec<Vec<Option<String>>>,
    /// A capture failed: what the session's settings are is unknown, so it cannot go on.
    settings_lost: bool,
    /// A capture was sent: the client's next message waits for the connection's release.
    capturing: bool,
    /// The last capture failed once and was sent again.
    capture_retried: bool,
    /// The server's FATAL went to the client: the session ends with it, quietly.
    fatal_forwarded: bool,
    /// Custom settings the client named (a capture asks for them).
    custom_settings: std::collections::BTreeSet<String>,
    /// The session's settings right after login: what RESET returns to.
    reset_values: Settings,
    /// The last ReadyForQuery status: I (idle), T (in a transaction), E (failed transaction).
    status: u8,
    /// Bytes left of a client message streamed through before it is complete (large CopyData), and
    /// whether they go to the server or are dropped.
    client_skip: usize,
    client_skip_forward: bool,
    /// Bytes left of a server message streamed through before it is complete (large DataRow).
    server_skip: usize,
    /// After a failed checkout: drop extended-protocol messages up to the next Sync, then answer it.
    discard_until_sync: bool,
    /// The server sent FATAL: the connection is ending, so nothing more is sent on it.
    server_fatal: bool,
    /// When the oldest unanswered request (Query, Sync, FunctionCall) was sent, for the latency histogram
    /// and slow-statement log.
    request_started: Option<std::time::Instant>,
    /// When the last request was answered: the server connection's idle-since when it goes back to the
    /// pool right after, so that a transaction reads the clock twice, not three or four times.
    last_answer: std::time::Instant,
    /// The statement text of the last Query or Bind, for the slow-statement log.
    last_statement: Option<Bytes>,
    /// DataRows relayed for the current request.
    rows: u64,
    /// N+1 detection (None when off).
    detector: Option<crate::nplus1::Detector>,
    /// The shapes of this client's recent Query texts (computing a shape anew costs a lexer pass).
    recent_shapes: crate::fingerprint::Recent,
    nplus1: crate::nplus1::Settings,

    statements: HashMap<Bytes, Arc<Statement>>,
    unnamed: Option<Arc<Statement>>,
    sql_prepared: HashMap<String, Arc<SqlPrepared>>,
    settings: Settings,
    pinned: Option<&'static str>,
    /// Exchanges taken for insert batching, not yet answered.
    batched: Vec<batching::Waiting>,
    /// What batch keys of this session carry, made once per change of `settings` (the first): database,
    /// user, and the settings without what does not matter to a batch.
    batch_identity: Option<(Settings, Arc<str>, Arc<str>, crate::batch::SettingsKey)>,
}

/// Serves one accepted connection until it closes.
pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let (startup, mut client) =
        match tokio::time::timeout(STARTUP_TIMEOUT, first_packet(&shared, tcp)).await {
            Ok(Ok(Some(pair))) => pair,
            Ok(Ok(None)) => return,
            Ok(Err((client, error))) => return refuse(client, error).await,
            Err(_) => return, // the client went quiet during startup: nothing to tell it
        };
    let mode = shared.config.load().tls.mode;
    if mode == TlsMode::Require && !client.is_tls() {
        let error = PgError::fatal(
            "28000",
            "regiongate requires TLS (tls.mode: require): connect with sslmode=require or stricter",
        );
        return refuse(client, StartupError::Refused(error)).await;
    }
    let limits = shared.config.load().limits.clone();
    if let Err(error) = shared.admission.login_allowed(peer.ip(), &limits) {
        tracing::warn!(client = %peer, user = %startup.user, "login refused: too many failed logins from this address");
        return refuse(client, StartupError::Refused(error)).await;
    }
    let credentials = shared.credentials.load_full();
    let auth = authenticate_client(&mut client, &credentials, &startup);
    match tokio::time::timeout(STARTUP_TIMEOUT, auth).await {
        Ok(Ok(())) => shared.admission.login_succeeded(peer.ip()),
        Ok(Err(error)) => {
            if let StartupError::Refused(e) = &error {
                // The message names the user, never a password or proof.
                tracing::warn!(client = %peer, user = %startup.user, code = %e.code, reason = %e.message, "login refused");
                if matches!(&*e.code, "28P01" | "28000") {
                    shared.admission.login_failed(peer.ip(), &limits);
                }
            }
            return refuse(client, error).await;
        }
        Err(_) => {
            return refuse(
                client,
                StartupError::Refused(PgError::fatal("08P01", "authentication timed out")),
            )
            .await
        }
    }
    if startup.database == crate::admin::DATABASE {
        return admin_session(shared, client, peer, &startup).await;
    }
    let pool = shared.pool_for(&startup);
    let startup_parameters: Vec<(String, String)> = startup
        .parameters
        .iter()
        .chain(startup.options.iter())
        .cloned()
        .collect();
    let login = match pool.login_state(&startup_parameters).await {
        Ok(login) => login,
        Err(mut error) => {
            error.severity = "FATAL";
            tracing::info!(client = %peer, user = %startup.user, code = %error.code, reason = %error.message, "login refused by the server");
            return refuse(client, StartupError::Refused(error)).await;
        }
    };
    // Session mode is one client, one backend, from the start: the client gets the backend's own pid (with a
    // secret of the gateway's), so that pg_terminate_backend, NOTIFY's sender pid and the like match.
    let session_lease = if pool.config().mode == PoolMode::Session {
        match pool.checkout().await {
            Ok(lease) => Some(lease),
            Err(mut error) => {
                error.severity = "FATAL";
                return refuse(client, StartupError::Refused(error)).await;
            }
        }
    } else {
        None
    };
    let backend_pid = session_lease.as_ref().map(|lease| lease.pid());
    let handle = shared.clients.register(
        backend_pid,
        ClientInfo {
            addr: peer,
            user: startup.user.clone(),
            database: startup.database.clone(),
            application_name: startup
                .parameters
                .iter()
                .find(|(k, _)| k == "application_name")
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
        },
    );
    let mut hello = BytesMut::new();
    let _ = Authentication::Ok.encode(&mut hello);
    // As the server reported them with the client's parameters applied (`iso,dmy` is `ISO, DMY`).
    for (name, value) in &login.reported {
        protocol::parameter_status_message(&mut hello, name.as_bytes(), value.as_bytes());
    }
    protocol::backend_key_data(&mut hello, handle.pid, handle.secret);
    protocol::ready_for_query(&mut hello, b'I');

    let config = shared.config.load();
    let span = tracing::info_span!("session", client = %peer, user = %startup.user, database = %startup.database);
    span.in_scope(|| tracing::debug!("client logged in"));
    METRICS.client_connections.inc();
    let mut session = Session {
        shared: shared.clone(),
        client,

        from_client: BytesMut::with_capacity(8 * 1024),
        to_client: BytesMut::with_capacity(16 * 1024),
        to_server: BytesMut::with_capacity(8 * 1024),
        pinned: (pool.config().mode == PoolMode::Session).then_some("session pool mode"),
        reads: Reads {
            budget: config.routing.budget_for(&startup.user, &startup.database),
            ..Reads::default()
        },
        pool_generation: shared.generation(),
        replicas: shared.has_replicas(),
        regions: shared.regions(),
        slow_after: config.log.slow_statement,
        batching: !config.batching.tables.is_empty(),
        pool,
        lease: None,
        route: None,
        handle,
        max_message_size: config.limits.max_message_size,
        max_prepared_statements: config.limits.max_prepared_statements,
        client_idle_timeout: config.limits.client_idle_timeout,
        statement_timeout: config.limits.statement_timeout,
        timed_out: false,
        pending: VecDeque::with_capacity(8),
        in_exchange: false,
        segment_reset: Reset::Nothing,
        settings_touched: false,
        capture_rows: Vec::new(),
        settings_lost: false,
        capturing: false,
        capture_retried: false,
        fatal_forwarded: false,
        custom_settings: login.reset.custom_names().cloned().collect(),
        reset_values: login.reset.clone(),
        status: b'I',
        client_skip: 0,
        client_skip_forward: false,
        server_skip: 0,
        discard_until_sync: false,
        server_fatal: false,
        request_started: None,
        last_answer: std::time::Instant::now(),
        last_statement: None,
        rows: 0,
        detector: config.nplus1.enabled.then(crate::nplus1::Detector::default),
        recent_shapes: Default::default(),
        nplus1: crate::nplus1::Settings {
            threshold: config.nplus1.threshold,
            window: config.nplus1.window,
            log_parameters: config.nplus1.log_parameters,
        },
        statements: HashMap::new(),
        unnamed: None,
        sql_prepared: HashMap::new(),
        settings: login.reset.clone(),
        batched: Vec::new(),
        batch_identity: None,
    };
    let end = async {
        if let Some(mut lease) = session_lease {
            if let Err(mut error) = session.bring_settings(&mut lease).await {
                error.severity = "FATAL";
                return End::Fatal(error);
            }
            session.take_lease(lease, Route::Primary);
        }
        let client = &mut session.client;
        if client.write_all(&hello).await.is_err() || client.flush().await.is_err() {
            return End::Client;
        }
        session.run().await
    }
    .instrument(span.clone())
    .await;
    METRICS.client_connections.dec();
    match end {
        End::Client => span.in_scope(|| tracing::debug!("client disconnected")),
        End::Backend => {
            span.in_scope(|| tracing::info!("the server ended the session's backend"));
            let (client, out) = (&mut session.client, &session.to_client);
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                client.write_all(out).await?;
                client.flush().await
            })
            .await;
        }
        End::Fatal(error) => {
            span.in_scope(|| tracing::info!(code = %error.code, reason = %error.message, "closing client connection"));
            METRICS.error_sent(&error.code);
            let mut out = BytesMut::new();
            error.encode(&mut out);
            let client = &mut session.client;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                client.write_all(&out).await?;
                client.flush().await
            })
            .await;
        }
    }
    session.finish();
}

/// The client's first packets: the StartupMessage (with the stream, upgraded to TLS if the client asked and
/// TLS is configured), or None after a CancelRequest was handled.
async fn first_packet(
    shared: &Shared,
    tcp: TcpStream,
) -> Result<Option<(Startup, Stream)>, (Stream, StartupError)> {
    let acceptor = shared.tls.load_full();
    let mut client = Stream::Plain(tcp);
    let offer_tls = acceptor.is_some() && shared.config.load().tls.mode != TlsMode::Disable;
    let mut first = read_first_packet(&mut client, offer_tls).await;
    if let (Ok(FirstPacket::Tls), Some(acceptor)) = (&first, acceptor.as_ref()) {
        let Stream::Plain(tcp) = client else {
            unreachable!("TLS is offered on plain connections only")
        };
        client = match acceptor.accept(tcp).await {
            Ok(tls) => Stream::Tls(Box::new(tls.into())),
            Err(error) => {
                // No TLS session to send an error over: the client sees its handshake fail.
                tracing::info!(%error, "TLS handshake failed");
                METRICS
                    .clients_refused
                    .with_label_values(&["tls_handshake"])
                    .inc();
                return Ok(None);
            }
        };
        // Offered again only to be refused below, as PostgreSQL refuses a second SSLRequest.
        first = read_first_packet(&mut client, true).await;
    }
    match first {
        Ok(FirstPacket::Startup(startup)) => Ok(Some((startup, client))),
        Ok(FirstPacket::Cancel { pid, secret }) => {
            shared.clients.cancel(pid, secret).await;
            Ok(None)
        }
        Ok(FirstPacket::Tls) => Err((
            client,
            StartupError::Refused(PgError::fatal(
                "0A000",
                "unsupported frontend protocol 1234.5679: server supports 3.0 (an SSLRequest inside TLS)",
            )),
        )),
        Err(error) => Err((client, error)),
    }
}

/// An authenticated client asked for the admin console: admins get it, others a clear refusal.
async fn admin_session(
    shared: Arc<Shared>,
    mut client: Stream,
    peer: SocketAddr,
    startup: &Startup,
) {
    let config = shared.config.load_full();
    if !config.admin.users.contains(&startup.user) {
        tracing::warn!(client = %peer, user = %startup.user, "admin console refused");
        let error = PgError::fatal(
            "42501",
            format!(
                "permission denied: user \"{}\" is not an admin of this gateway (admin.users)",
                startup.user
            ),
        );
        return refuse(client, StartupError::Refused(error)).await;
    }
    let mut hello = BytesMut::new();
    let _ = Authentication::Ok.encode(&mut hello);
    for (name, value) in [
        ("server_version", "15.0 (regiongate admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        protocol::parameter_status_message(&mut hello, name.as_bytes(), value.as_bytes());
    }
    protocol::backend_key_data(&mut hello, 0, 0);
    protocol::ready_for_query(&mut hello, b'I');
    if client.write_all(&hello).await.is_ok() && client.flush().await.is_ok() {
        tracing::info!(client = %peer, user = %startup.user, "admin console opened");
        crate::admin::serve(shared, client, peer).await;
    }
}

async fn refuse(mut client: Stream, error: StartupError) {
    if let StartupError::Refused(error) = error {
        METRICS
            .clients_refused
            .with_label_values(&[&*error.code])
            .inc();
        let mut out = BytesMut::new();
        error.encode(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            client.write_all(&out).await?;
            client.flush().await
        })
        .await;
    }
}

impl Session {
    async fn run(&mut self) -> End {
        loop {
            match self.process_client() {
                Ok(Progress::Idle) => {}
                Ok(Progress::NeedServer) => {
                    self.attach().await;
                    continue;
                }
                Ok(Progress::Batched) => {
                    if let Err(end) = self.run_batched().await {
                        return end;
                    }
                    continue;
                }
                Ok(Progress::Terminate) => return End::Client,
                Err(fatal) => return End::Fatal(fatal),
            }
            if let Err(end) = self.flush_eagerly() {
                return end;
            }
            if self.maybe_release() && self.has_complete_message() {
                continue; // a message waited for this release (a write behind replica reads)
            }
            if let Err(end) = self.wait_io().await {
                return end;
            }
        }
    }

    fn has_complete_message(&self) -> bool {
        matches!(protocol::peek_header(&self.from_client), Some(Ok((_, len))) if self.from_client.len() >= len)
    }

    fn conn(&mut self) -> &mut ServerConn {
        self.lease
            .as_mut()
            .expect("called with a server attached")
            .conn()
    }

    // ---- client → server -------------------------------------------------------------------------------

    /// Handles every complete client message in the buffer, as far as it can without waiting.
    fn process_client(&mut self) -> Result<Progress, PgError> {
        loop {
            if self.client_skip > 0 {
                let n = self.client_skip.min(self.from_client.len());
                if n == 0 {
                    return Ok(Progress::Idle);
                }
                if self.client_skip_forward {
                    self.to_server.extend_from_slice(&self.from_client[..n]);
                }
                self.from_client.advance(n);
                self.client_skip -= n;
                continue;
            }
            // While the session's settings are read back, its next request waits: it is decided (routed,
            // batched) with them, after the connection is released.
            if self.to_server.len() >= HIGH_WATER || self.reads.draining || self.capturing {
                return Ok(Progress::Idle);
            }
            let (tag, len) = match protocol::peek_header(&self.from_client) {
                None => return Ok(Progress::Idle),
                Some(Err(bad)) => {
                    return Err(PgError::fatal(
                        "08P01",
                        format!("invalid message length {}", bad.0),
                    ))
                }
                Some(Ok(header)) => header,
            };
            if len > self.max_message_size {
                return Err(PgError::fatal(
                    "08P01",
                    format!(
                        "message of {len} bytes exceeds the gateway's max_message_size ({} bytes)",
                        self.max_message_size
                    ),
                ));
            }
            let complete = self.from_client.len() >= len;
            // CopyData can be large; stream it rather than buffer it whole.
            let streamable = matches!(tag, b'd')
                || self.discard_until_sync
                || self.lease.is_none() && is_copy(tag);
            if !complete && streamable {
                self.client_skip_forward = !self.discard_until_sync && self.lease.is_some();
                self.client_skip = len;
                continue;
            }
            if !complete {
                self.from_client.reserve(len - self.from_client.len());
                return Ok(Progress::Idle);
            }
            if self.discard_until_sync {
                self.from_client.advance(len);
                if tag == b'S' {
                    self.discard_until_sync = false;
                    protocol::ready_for_query(&mut self.to_client, b'I');
                }
                continue;
            }
            if tag == b'X' {
                return Ok(Progress::Terminate);
            }
            if self.lease.is_none() {
                if is_copy(tag) {
                    // Copy messages outside a COPY (say, after the server failed the COPY) are ignored,
                    // as PostgreSQL ignores them.
                    self.from_client.advance(len);
                    continue;
                }
                if tag == b'Q' && self.defer_begin(len) {
                    continue;
                }
                if matches!(tag, b'Q' | b'P' | b'B') && self.take_batchable()? {
                    return Ok(Progress::Batched);
                }
                return Ok(Progress::NeedServer);
            }
            // A Query's shape serves routing (its cache key), N+1 detection and the session's own tracking
            // (a plain statement needs no closer look): compute it once.
            let shape = if tag == b'Q' {
                protocol::query_text(protocol::body(&self.from_client[..len]))
                    .map(|text| self.recent_shapes.shape_id(text))
            } else {
                None
            };
            if !self.admit(tag, len, shape.map(|s| s.hash)) {
                return Ok(Progress::Idle);
            }
            let message = self.from_client.split_to(len).freeze();
            self.remember_for_retry(&message);
            self.handle_message(tag, message, shape)?;
        }
    }

    fn handle_message(
        &mut self,
        tag: u8,
        message: Bytes,
        shape: Option<crate::fingerprint::ShapeId>,
    ) -> Result<(), PgError> {
        if matches!(tag, b'Q' | b'S' | b'F') && self.request_started.is_none() {
            self.request_started = Some(std::time::Instant::now());
        }
        match tag {
            b'Q' => {
                // `process_client` shapes every Query whose text it can find.
                let text =
                    protocol::query_text(protocol::body(&message)).map(|t| message.slice_ref(t));
                let (Some(text), Some(shape)) = (text, shape) else {
                    return Err(PgError::fatal("08P01", "invalid Query message"));
                };
                self.observe_statement(shape.hash, shape.reads(), &text, &text);
                self.on_query(&message, &text, shape)?;
                self.last_statement = Some(text);
            }
            b'P' => self.on_parse(message)?,
            b'B' | b'D' => self.on_statement_use(tag, message)?,
            b'C' => self.on_close(message)?,
            b'E' | b'H' => {
                self.to_server.extend_from_slice(&message);
                self.in_exchange = true;
            }
            b'S' => {
                self.to_server.extend_from_slice(&message);
                let reset = std::mem::take(&mut self.segment_reset);
                self.pending.push_back(Pending::client(false, reset));
                self.in_exchange = false;
            }
            b'F' => {
                // A function called by OID may change anything: read the settings back afterwards.
                self.settings_touched = true;
                self.to_server.extend_from_slice(&message);
                self.pending
                    .push_back(Pending::client(true, Reset::Nothing));
            }
            b'd' | b'c' | b'f' => self.to_server.extend_from_slice(&message),
            other => {
                return Err(PgError::fatal(
                    "08P01",
                    format!("invalid frontend message type {other}"),
                ))
            }
        }
        Ok(())
    }

    /// `shape`: what the fingerprint lexer found in the Query's text.
    fn on_query(
        &mut self,
        message: &[u8],
        text: &[u8],
        shape: crate::fingerprint::ShapeId,
    ) -> Result<(), PgError> {
        if sql::changes_schema(&shape) {
            self.shared.statement_names.forget_all();
        }
        if sql::plainly_other(&shape) {
            // Most queries: nothing in them for the session to track.
            self.to_server.extend_from_slice(message);
            self.pending
                .push_back(Pending::client(true, Reset::Nothing));
            return Ok(());
        }
        let mut reset = Reset::Nothing;
        let mut rewrites: Vec<(std::ops::Range<usize>, Arc<str>)> = Vec::new();
        for range in sql::split(text) {
            let kind = sql::classify(text, range.clone());
            // A set_config in a statement classified by its head (PREPARE, EXPLAIN, CREATE ... AS, DECLARE)
            // changes settings all the same.
            let touch = touch_of(&kind).or_else(|| hidden_set_config(text, range.clone()));
            if let Some(touch) = &touch {
                self.touched(touch);
                reset.add(touch.reset.clone());
            }
            if !self.sql_prepared.is_empty()
                && !matches!(
                    kind,
                    Kind::Execute { .. } | Kind::Prepare { .. } | Kind::Deallocate { .. }
                )
            {
                // EXPLAIN EXECUTE p, CREATE TABLE t AS EXECUTE p.
                for (name, at) in sql::executed_names(text, range.clone()) {
                    if let Some(prepared) = self.sql_prepared.get(&name).cloned() {
                        if let Some(touch) = &prepared.touch {
                            self.touched(touch);
                        }
                        self.ensure_sql_prepared(&prepared);
                        rewrites.push((at, prepared.server_name.clone()));
                    }
                }
            }
            match kind {
                Kind::Other | Kind::Set { .. } | Kind::Reset { .. } | Kind::SetConfig { .. } => {}
                Kind::Pin(reason) => self.pin(reason),
                Kind::Prepare { name, at } if self.sql_prepared.contains_key(&name) => {
                    // PostgreSQL refuses a second PREPARE of a name with 42P05 and keeps the first: let the
                    // server say so, under the name the first has there.
                    let existing = self.sql_prepared[&name].clone();
                    self.ensure_sql_prepared(&existing);
                    rewrites.push((at, existing.server_name.clone()));
                }
                Kind::Prepare { name, at } => {
                    let prepared_touch = touch;
                    let server_name: Arc<str> = self.shared.statement_names.fresh("q").into();
                    let mut prepare =
                        String::from_utf8_lossy(&text[range.start..at.start]).into_owned();
                    prepare.push_str(&server_name);
                    prepare.push_str(&String::from_utf8_lossy(&text[at.end..range.end]));
                    self.conn().prepared.insert(server_name.clone());
                    rewrites.push((at, server_name.clone()));
                    self.sql_prepared.insert(
                        name,
                        Arc::new(SqlPrepared {
                            server_name,
                            prepare,
                            touch: prepared_touch,
                        }),
                    );
                }
                Kind::Execute { name, at } => {
                    if let Some(prepared) = self.sql_prepared.get(&name).cloned() {
                        if let Some(touch) = &prepared.touch {
                            self.touched(touch);
                        }
                        self.ensure_sql_prepared(&prepared);
                        rewrites.push((at, prepared.server_name.clone()));
                    }
                }
                Kind::Deallocate {
                    name: Some((name, at)),
                } => {
                    if let Some(prepared) = self.sql_prepared.remove(&name) {
                        self.ensure_sql_prepared(&prepared);
                        self.conn().prepared.remove(&prepared.server_name);
                        rewrites.push((at, prepared.server_name.clone()));
                    } else if let Some(server_name) = self.deallocate_protocol_statement(&name) {
                        // A protocol-level statement deallocated in SQL (libpq before 17 evicts this way).
                        rewrites.push((at, server_name));
                    }
                }
                Kind::Deallocate { name: None } => self.forget_prepared_statements(),
                Kind::DiscardAll => self.forget_prepared_statements(),
            }
        }
        let mut request = Pending::client(true, reset);
        if rewrites.is_empty() {
            self.to_server.extend_from_slice(message);
        } else {
            rewrites.sort_by_key(|(range, _)| range.start);
            let mut rewritten = Vec::with_capacity(text.len() + 16);
            let mut at = 0;
            let mut shifts = Vec::with_capacity(rewrites.len());
            let chars = |bytes: &[u8]| String::from_utf8_lossy(bytes).chars().count();
            for (range, name) in &rewrites {
                shifts.push(Shift {
                    at: chars(&text[..range.start]),
                    was: chars(&text[range.clone()]),
                    now: name.chars().count(),
                });
                rewritten.extend_from_slice(&text[at..range.start]);
                rewritten.extend_from_slice(name.as_bytes());
                at = range.end;
            }
            rewritten.extend_from_slice(&text[at..]);
            protocol::query(&mut self.to_server, &String::from_utf8_lossy(&rewritten));
            if let Pending::Ready { extra, .. } = &mut request {
                extra.get_or_insert_with(Box::default).shifts = shifts;
            }
        }
        self.pending.push_back(request);
        Ok(())
    }

    /// A statement that may change settings is on its way: note what a capture must ask for.
    fn touched(&mut self, touch: &Touch) {
        self.settings_touched = true;
        for name in &touch.custom {
            if !self.custom_settings.contains(name) {
                self.custom_settings.insert(name.clone());
            }
        }
    }

    /// `DEALLOCATE name` of a protocol-level statement: the client forgets it, and the server-side name to
    /// deallocate instead, made to exist on this connection first (a Parse and Sync of the gateway's own), as
    /// PostgreSQL would find it. None when the client has no such statement, or mid-exchange.
    fn deallocate_protocol_statement(&mut self, name: &str) -> Option<Arc<str>> {
        if self.in_exchange || !self.statements.contains_key(name.as_bytes()) {
            return None;
        }
        let statement = self.statements.remove(name.as_bytes())?;
        let conn = self.conn();
        if !conn.prepared.remove(&statement.server_name) {
            protocol::parse_renamed(
                &mut self.to_server,
                statement.server_name.as_bytes(),
                &statement.parse_rest,
            );
            protocol::sync(&mut self.to_server);
            self.pending.push_back(Pending::Parse {
                swallow: true,
                name: None,
            });
            self.pending.push_back(Pending::own(Own::Plain));
        }
        Some(statement.server_name.clone())
    }

    /// Runs a SQL-level PREPARE first on a server connection that lacks it (its answers swallowed).
    fn ensure_sql_prepared(&mut self, prepared: &SqlPrepared) {
        if self.conn().prepared.insert(prepared.server_name.clone()) {
            self.send_own_query(&prepared.prepare, Own::Plain);
        }
    }

    /// Sends a query of the gateway's own ahead of what follows; its answers never reach the client.
    fn send_own_query(&mut self, sql: &str, own: Own) {
        protocol::query(&mut self.to_server, sql);
        self.pending.push_back(Pending::own(own));
    }

    /// DEALLOCATE ALL and DISCARD ALL drop every prepared statement of the server session.
    fn forget_prepared_statements(&mut self) {
        self.statements.clear();
        self.sql_prepared.clear();
        let conn = self.conn();
        conn.prepared.clear();
        conn.unnamed_valid = false;
    }

    /// A new named statement must fit within `limits.max_prepared_statements`; past it the client is
    /// disconnected (its statements would otherwise grow without bound in the gateway's memory).
    fn check_statement_room(&self, name: &[u8]) -> Result<(), PgError> {
        if self.statements.len() < self.max_prepared_statements
            || self.statements.contains_key(name)
        {
            return Ok(());
        }
        Err(PgError::fatal(
            "53400",
            format!(
                "regiongate: too many prepared statements on this connection (limits.max_prepared_statements \
                 is {}); close or deallocate the ones no longer used",
                self.max_prepared_statements
            ),
        ))
    }

    /// A client's statement from its Parse: what it does, where it may run, its fingerprint, whether it can
    /// be batched, and its server-side name (shared by every client preparing the same content).
    fn new_statement(&mut self, name: &[u8], parse_rest: Bytes) -> Arc<Statement> {
        let text = protocol::cstr(&parse_rest)
            .map(|(t, _)| t)
            .unwrap_or_default();
        let effect = statement_effect(text);
        // One shape for both routing's cache and N+1 detection, computed once per prepared statement.
        let fingerprint = (self.detector.is_some() || self.routing_enabled())
            .then(|| crate::fingerprint::shape_id(text));
        let class = fingerprint
            .as_ref()
            .filter(|_| self.routing_enabled())
            .map(|shape| {
                self.shared
                    .classifier
                    .load()
                    .classify_shaped(text, shape.hash)
            });
        let (shape, reads) = fingerprint.map_or((0, false), |s| (s.hash, s.reads()));
        let batch =
            crate::batch::analyze(text, &self.shared.config.load().batching.tables).map(Arc::new);
        let server_name = if name.is_empty() {
            Arc::from("")
        } else {
            self.shared.statement_names.name_for(&parse_rest)
        };
        Arc::new(Statement {
            server_name,
            parse_rest,
            effect,
            class,
            shape,
            reads,
            batch,
        })
    }

    fn on_parse(&mut self, message: Bytes) -> Result<(), PgError> {
        let body = protocol::body(&message);
        let (name, rest) =
            protocol::cstr(body).ok_or_else(|| PgError::fatal("08P01", "invalid Parse message"))?;
        let renamed = self.sql_prepared_in_parse(rest);
        let rest: &[u8] = renamed.as_deref().unwrap_or(rest);
        let rest_bytes = match &renamed {
            Some(renamed) => renamed.clone(),
            None => message.slice_ref(rest),
        };
        let statement = self.new_statement(name, rest_bytes);
        self.in_exchange = true;
        if name.is_empty() {
            self.unnamed = Some(statement);
            self.conn().unnamed_valid = true;
            if renamed.is_some() {
                protocol::parse_renamed(&mut self.to_server, b"", rest);
            } else {
                self.to_server.extend_from_slice(&message);
            }
            self.pending.push_back(Pending::Parse {
                swallow: false,
                name: None,
            });
            return Ok(());
        }
        self.check_statement_room(name)?;
        let server_name = statement.server_name.clone();
        self.statements.insert(message.slice_ref(name), statement);
        let conn = self.conn();
        if conn.prepared.contains(&server_name) {
            // This server connection has the statement already. The client still expects its own
            // ParseComplete and any parse error, so parse the text into the unnamed slot instead.
            conn.unnamed_valid = false;
            protocol::parse_renamed(&mut self.to_server, b"", rest);
            self.pending.push_back(Pending::Parse {
                swallow: false,
                name: None,
            });
        } else {
            conn.prepared.insert(server_name.clone());
            protocol::parse_renamed(&mut self.to_server, server_name.as_bytes(), rest);
            self.pending.push_back(Pending::Parse {
                swallow: false,
                name: Some(server_name),
            });
        }
        Ok(())
    }

    /// A Parse whose text runs a SQL-level prepared statement of this client (`EXECUTE p`, as drivers that
    /// prepare everything send it): the Parse body with the server-side name, the statement made ready on
    /// this connection, and the client pinned to it (the name lives there). None when there is no such name.
    fn sql_prepared_in_parse(&mut self, rest: &[u8]) -> Option<Bytes> {
        if self.sql_prepared.is_empty() {
            return None;
        }
        let (text, after) = protocol::cstr(rest)?;
        let range = sql::split(text).next()?;
        let mut names = sql::executed_names(text, range);
        names.retain(|(name, _)| self.sql_prepared.contains_key(name));
        if names.is_empty() {
            return None;
        }
        // Preparing one here takes a simple Query, which cannot go in the middle of an extended exchange:
        // then the server answers for the name as it is (26000).
        let missing = names.iter().any(|(name, _)| {
            let server_name = &self.sql_prepared[name].server_name;
            !self
                .lease
                .as_mut()
                .is_some_and(|l| l.conn().prepared.contains(server_name))
        });
        if missing && self.in_exchange {
            return None;
        }
        let mut renamed = BytesMut::with_capacity(rest.len() + 16);
        let mut at = 0;
        for (name, range) in names {
            let prepared = self.sql_prepared[&name].clone();
            self.ensure_sql_prepared(&prepared);
            renamed.extend_from_slice(&text[at..range.start]);
            renamed.extend_from_slice(prepared.server_name.as_bytes());
            at = range.end;
        }
        renamed.extend_from_slice(&text[at..]);
        renamed.extend_from_slice(b"\0");
        renamed.extend_from_slice(after);
        self.pin("SQL-level PREPARE/EXECUTE through the extended protocol");
        Some(renamed.freeze())
    }

    /// Bind and Describe name a statement: prepare it on this server connection if it lacks it, and use the
    /// server-side name.
    fn on_statement_use(&mut self, tag: u8, message: Bytes) -> Result<(), PgError> {
        let body = protocol::body(&message);
        let invalid = || {
            PgError::fatal(
                "08P01",
                format!(
                    "invalid {} message",
                    if tag == b'B' { "Bind" } else { "Describe" }
                ),
            )
        };
        // Bind: portal name, statement name, ...; Describe: 'S' or 'P', name.
        let (head, name, rest) = if tag == b'B' {
            let (portal, after) = protocol::cstr(body).ok_or_else(invalid)?;
            let (name, rest) = protocol::cstr(after).ok_or_else(invalid)?;
            (&body[..portal.len() + 1], name, rest)
        } else {
            let (&kind, after) = body.split_first().ok_or_else(invalid)?;
            if kind != b'S' {
                self.to_server.extend_from_slice(&message);
                self.in_exchange = true;
                return Ok(());
            }
            let (name, rest) = protocol::cstr(after).ok_or_else(invalid)?;
            (&body[..1], name, rest)
        };
        self.in_exchange = true;
        if name.is_empty() {
            if let Some(unnamed) = self.unnamed.clone() {
                if !self.conn().unnamed_valid {
                    protocol::parse_renamed(&mut self.to_server, b"", &unnamed.parse_rest);
                    self.pending.push_back(Pending::Parse {
                        swallow: true,
                        name: None,
                    });
                    self.conn().unnamed_valid = true;
                }
                if tag == b'B' {
                    self.bound(&unnamed, rest);
                }
            }
            self.to_server.extend_from_slice(&message);
            return Ok(());
        }
        let Some(statement) = self.statements.get(name).cloned() else {
            // Not a statement of this client: the server answers 26000 (does not exist).
            self.to_server.extend_from_slice(&message);
            return Ok(());
        };
        if self.conn().prepared.insert(statement.server_name.clone()) {
            protocol::parse_renamed(
                &mut self.to_server,
                statement.server_name.as_bytes(),
                &statement.parse_rest,
            );
            self.pending.push_back(Pending::Parse {
                swallow: true,
                name: Some(statement.server_name.clone()),
            });
        }
        if tag == b'B' {
            self.bound(&statement, rest);
        }
        protocol::renamed(
            &mut self.to_server,
            tag,
            head,
            statement.server_name.as_bytes(),
            rest,
        );
        Ok(())
    }

    /// A Bind of `statement` with `parameters` (the rest of the Bind message): it will run.
    fn bound(&mut self, statement: &Statement, parameters: &[u8]) {
        self.statement_effects(&statement.effect);
        if let StatementEffect::Change(touch) = &statement.effect {
            for &n in &touch.parameters {
                // A name is text in either format; a parameter that is not a custom name needs no asking.
                match protocol::bind_parameter(parameters, n) {
                    Some(Some(name)) if name.contains(&b'.') => {
                        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
                        self.custom_settings.insert(name);
                    }
                    _ => {}
                }
            }
        }
        let text =
            protocol::cstr(&statement.parse_rest).map(|(t, _)| statement.parse_rest.slice_ref(t));
        if let (Some(text), true) = (&text, self.detector.is_some()) {
            self.observe_statement(statement.shape, statement.reads, text, parameters);
        }
        self.last_statement = text;
    }

    /// Feeds the N+1 detector one statement about to run; `values` are what tells one run of it from another.
    fn observe_statement(&mut self, shape: u64, read: bool, text: &Bytes, values: &[u8]) {
        let Some(detector) = self.detector.as_mut() else {
            return;
        };
        let sample = self
            .nplus1
            .log_parameters
            .then(|| String::from_utf8_lossy(&values[..values.len().min(200)]).into_owned());
        let origin = nplus1_origin(&self.handle.entry);
        detector.observe(
            crate::nplus1::Statement {
                shape,
                read,
                text,
                values: crate::fingerprint::hash_bytes(values),
                sample,
                // A Query has just started the request clock: no second reading.
                at: self.request_started.unwrap_or_else(std::time::Instant::now),
            },
            &self.nplus1,
            &self.shared.nplus1,
            &origin,
        );
    }

    fn statement_effects(&mut self, effect: &StatementEffect) {
        match effect {
            StatementEffect::None => {}
            StatementEffect::Pin(reason) => self.pin(reason),
            StatementEffect::Change(touch) => {
                self.touched(touch);
                self.segment_reset.add(touch.reset.clone());
            }
        }
    }

    fn on_close(&mut self, message: Bytes) -> Result<(), PgError> {
        let body = protocol::body(&message);
        let (&kind, after) = body
            .split_first()
            .ok_or_else(|| PgError::fatal("08P01", "invalid Close message"))?;
        let (name, _) = protocol::cstr(after)
            .ok_or_else(|| PgError::fatal("08P01", "invalid Close message"))?;
        if kind == b'S' {
            if name.is_empty() {
                self.unnamed = None;
                self.conn().unnamed_valid = false;
            } else if let Some(statement) = self.statements.remove(name) {
                // Close it on the server too, so that a session preparing and closing statements does not
                // grow the server's memory. Another client that shares it prepares it again when it needs it.
                let conn = self.conn();
                if conn.prepared.remove(&statement.server_name) {
                    protocol::renamed(
                        &mut self.to_server,
                        b'C',
                        b"S",
                        statement.server_name.as_bytes(),
                        b"",
                    );
                    self.in_exchange = true;
                    return Ok(());
                }
            }
        }
        // Not on this server connection: closing a name that does not exist still yields the CloseComplete
        // the client expects.
        self.to_server.extend_from_slice(&message);
        self.in_exchange = true;
        Ok(())
    }

    fn pin(&mut self, reason: &'static str) {
        if self.pinned.is_none() {
            tracing::info!(
                reason,
                "client pinned to its server connection for the rest of the session"
            );
            self.pinned = Some(reason);
        }
    }

    // ---- server connection lifecycle -------------------------------------------------------------------

    /// Routes the client's next exchange and checks out a server connection for it; on failure answers that
    /// request with the error. A replica that cannot give a connection is banned and the choice made again.
    async fn attach(&mut self) {
        // Let the client see answers already due before it waits for a connection.
        if !self.to_client.is_empty() {
            let _ = self.client.write_all(&self.to_client).await;
            let _ = self.client.flush().await;
            self.to_client.clear();
        }
        if self.shared.is_paused() {
            self.shared.wait_unpaused().await;
        }
        self.follow_reload();
        let regions = self.regions.clone();
        let mut attempts = 0;
        let mut stale_checkouts = 0;
        let mut replays_failed = 0;
        let result = loop {
            attempts += 1;
            let decision = if stale_checkouts >= 3 {
                // Replicas kept going over the budget while connections were found for them.
                regions::Decision {
                    target: regions::Target::Primary,
                    reason: regions::Reason::OverBudget,
                    region: regions.primary_region.clone(),
                    fresh_until: None,
                }
            } else {
                match self.decide(&regions) {
                    Ok(decision) => decision,
                    Err(error) => break Err(error),
                }
            };
            self.record(&decision, &regions);
            let (pool, route) = self.target_pool(&decision, &regions);
            match pool.checkout().await {
                // A replica fits the read's budget at the decision; waiting for a free connection, or opening
                // one (a TCP and authentication exchange over the link), takes time during which a replica
                // whose replay stalled grows staler. Past the instant it goes over the budget, the connection
                // goes back unused (it is idle and clean) and the read is routed again, so that no read starts
                // on data older than its budget.
                Ok(lease)
                    if decision
                        .fresh_until
                        .is_some_and(|until| std::time::Instant::now() > until) =>
                {
                    lease.release();
                    stale_checkouts += 1;
                }
                Ok(mut lease) => match self.bring_settings(&mut lease).await {
                    Ok(()) => break Ok((lease, route)),
                    // The connection is closed (dropped); another may take the settings, once.
                    Err(error) if replays_failed == 0 => {
                        replays_failed += 1;
                        tracing::warn!(code = %error.code, reason = %error.message, "retrying the session's settings on another server connection");
                    }
                    Err(error) => break Err(error),
                },
                Err(error) => match route {
                    Route::Replica(in_flight) if attempts <= 3 => {
                        regions.ban(in_flight.id(), &error.message);
                    }
                    _ => break Err(error),
                },
            }
        };
        match result {
            Ok((lease, route)) => self.take_lease(lease, route),
            Err(error) => {
                METRICS.error_sent(&error.code);
                error.encode(&mut self.to_client);
                match protocol::peek_header(&self.from_client) {
                    Some(Ok((b'Q' | b'F', len))) => {
                        self.from_client.advance(len);
                        protocol::ready_for_query(&mut self.to_client, self.status);
                    }
                    _ => self.discard_until_sync = true,
                }
            }
        }
    }

    /// The session holds a server connection (with its settings) from now on, until it is released.
    fn take_lease(&mut self, mut lease: Lease, route: Route) {
        let conn = lease.conn();
        self.handle.entry.set_server(Some(ServerTarget {
            addr: conn.addr,
            pid: conn.pid,
            secret: conn.secret,
        }));
        if matches!(route, Route::Replica(_)) {
            self.reads.retry_input = Some(BytesMut::new());
        }
        self.route = Some(route);
        self.lease = Some(lease);
        self.send_deferred_begin();
        METRICS.transactions.inc();
    }

    /// Gives a server connection this session's settings and identity, and waits for the server to confirm,
    /// so that the client's statement never runs where they failed to apply (it would run with another
    /// client's identity). On failure the connection is marked for closing.
    async fn bring_settings(&mut self, lease: &mut Lease) -> Result<(), PgError> {
        let conn = lease.conn();
        if Arc::ptr_eq(&conn.settings, &self.settings) {
            return Ok(()); // the common case: nothing to compare
        }
        if *conn.settings == *self.settings {
            // Same settings in two allocations: both keep the one at the lower address. Every meeting spreads
            // the lowest, so clients and connections with equal settings converge on one Arc, and later
            // checkouts compare pointers only. (Adopting the connection's alone does not converge: a
            // connection keeps the first Arc it was given, and clients go on comparing at every checkout.)
            if Arc::as_ptr(&conn.settings) < Arc::as_ptr(&self.settings) {
                self.settings = conn.settings.clone();
            }
            conn.settings = self.settings.clone();
            return Ok(());
        }
        let change = crate::settings::change_sql(&conn.settings, &self.settings);
        METRICS.settings_replays.inc();
        match conn.run_own(&change).await {
            Ok(_) => {
                conn.settings = self.settings.clone();
                Ok(())
            }
            Err(failure) => {
                conn.discard = true;
                METRICS.settings_replay_failures.inc();
                tracing::warn!(server = %conn.addr, pid = conn.pid, reason = %failure, "could not give a server connection this session's settings; closing it");
                let (code, message) = match failure {
                    OwnError::Server(error) => (error.code, error.message),
                    OwnError::Io(error) => ("08006".into(), error.to_string()),
                };
                Err(PgError {
                    severity: "ERROR",
                    code,
                    message: format!(
                        "regiongate: this session's settings could not be restored on a server connection \
                         ({message}); the statement was not run"
                    ),
                    detail: None,
                })
            }
        }
    }

    /// Rereads what the session keeps of the configuration after a reload (an atomic load otherwise).
    fn follow_reload(&mut self) {
        if self.pool_generation != self.shared.generation() {
            // A reload may have replaced the primary's pool (new settings or a new primary).
            self.pool_generation = self.shared.generation();
            let (user, database) = (self.pool.key.user.clone(), self.pool.key.database.clone());
            let config = self.shared.config.load_full();
            self.pool = self.shared.pool(&config.primary.url, &user, &database);
            self.replicas = self.shared.has_replicas();
            self.regions = self.shared.regions();
            self.slow_after = config.log.slow_statement;
            self.batching = !config.batching.tables.is_empty();
        }
    }

    /// Returns the server connection to the pool once the client is idle between transactions. True when it
    /// did.
    fn maybe_release(&mut self) -> bool {
        let Some(lease) = self.lease.as_mut() else {
            return false;
        };
        if self.pinned.is_some()
            || self.status != b'I'
            || !self.pending.is_empty()
            || self.in_exchange
            || self.server_skip > 0
            || (self.client_skip > 0 && self.client_skip_forward)
            || !self.to_server.is_empty()
        {
            return false;
        }
        if !lease.conn().read_buf.is_empty()
            || self.capture_settings()
            || self.capture_write_position()
        {
            return false;
        }
        let discard = self.conn().discard;
        self.capturing = false;
        self.handle.entry.set_server(None);
        self.route = None;
        self.reads.draining = false;
        self.reads.retry_input = None;
        self.reads.exclude = None;
        let lease = self.lease.take().expect("checked above");
        if discard {
            drop(lease);
        } else {
            lease.release_at(self.last_answer);
        }
        true
    }

    /// After a request that may have changed settings, asks the server what the session's settings now are,
    /// before the connection goes back to the pool. True when it did.
    fn capture_settings(&mut self) -> bool {
        if !std::mem::take(&mut self.settings_touched) {
            return false;
        }
        METRICS.settings_captures.inc();
        let custom = self.custom_settings.iter();
        let sql = crate::settings::capture_sql(custom);
        self.capture_rows.clear();
        self.send_own_query(&sql, Own::Capture);
        self.capturing = true;
        true
    }

    /// The capture's answer is complete: the connection holds what the server said, the client that over
    /// its reset values.
    fn settings_captured(&mut self) {
        let rows = std::mem::take(&mut self.capture_rows);
        let conn = self.conn();
        let held = crate::settings::from_capture(&rows, &conn.login_user);
        let session = SessionSettings::over(held.clone(), &self.reset_values);
        let held = Arc::new(held);
        self.conn().settings = held.clone();
        self.settings = if session == *held {
            held
        } else {
            Arc::new(session)
        };
        self.session_budget_changed();
    }

    /// The server connection broke. Clients outside a transaction get an error for each request in flight
    /// and keep their session; inside a transaction (or pinned) the session state is gone, so the client
    /// connection is closed, as PostgreSQL would.
    fn server_lost(&mut self, reason: &str) -> Result<(), End> {
        METRICS.server_lost.inc();
        let server = self
            .lease
            .as_mut()
            .map(|l| l.conn().addr.to_string())
            .unwrap_or_default();
        tracing::warn!(%server, reason, status = %(self.status as char), "server connection lost");
        let retried = self.status == b'I' && self.retry_elsewhere(reason);
        self.lease = None;
        self.route = None;
        self.reads.draining = false;
        self.capturing = false;
        self.handle.entry.set_server(None);
        self.server_skip = 0;
        self.to_server.clear();
        if retried {
            return Ok(());
        }
        self.reads.retry_input = None;
        // Settings changed since the last capture went with the connection, as the session would have.
        let settings_lost = std::mem::take(&mut self.settings_touched)
            || self.pending.iter().any(|p| p.is_own(Own::Capture));
        if self.fatal_forwarded {
            return Err(End::Backend);
        }
        if self.status != b'I' || self.pinned.is_some() || settings_lost {
            let gone = if self.status != b'I' {
                "the session's transaction is gone"
            } else {
                "the session's settings are gone"
            };
            return Err(End::Fatal(PgError::fatal(
                "08006",
                format!("regiongate: the server connection was lost ({reason}); {gone}"),
            )));
        }
        let error = PgError::error(
            "08006",
            format!(
                "regiongate: the server connection was lost ({reason}) while running this request"
            ),
        );
        for entry in std::mem::take(&mut self.pending) {
            if let Pending::Ready {
                own: None, failed, ..
            } = entry
            {
                if !failed {
                    METRICS.error_sent(&error.code);
                    error.encode(&mut self.to_client);
                }
                protocol::ready_for_query(&mut self.to_client, b'I');
            }
        }
        if self.in_exchange {
            // Messages since the last Sync were lost; the client's Sync will get its ReadyForQuery from the next
            // server connection, and this error first.
            error.encode(&mut self.to_client);
            self.in_exchange = false;
        }
        self.segment_reset = Reset::Nothing;
        Ok(())
    }

    /// Cleans up after the client left: an idle connection goes back to the pool; one in a transaction or
    /// with pinned session state is rolled back and reset first; one mid-request is closed.
    fn finish(&mut self) {
        if let Some(mut detector) = self.detector.take() {
            let origin = nplus1_origin(&self.handle.entry);
            detector.finish(&self.nplus1, &self.shared.nplus1, &origin);
        }
        let Some(mut lease) = self.lease.take() else {
            return;
        };
        self.handle.entry.set_server(None);
        let busy = !self.pending.is_empty()
            || self.in_exchange
            || self.server_skip > 0
            || self.client_skip > 0
            || !lease.conn().read_buf.is_empty()
            || lease.conn().discard;
        if busy {
            if !self.pending.is_empty() && !lease.conn().discard {
                // A request is running for a client that is gone: stop it now rather than when the server
                // next writes to the closed socket (a pg_sleep holding row locks would run on). The closed
                // connection then ends the backend, which rolls its transaction back.
                let conn = lease.conn();
                let target = ServerTarget {
                    addr: conn.addr,
                    pid: conn.pid,
                    secret: conn.secret,
                };
                tracing::info!(
                    server_pid = target.pid,
                    "client left mid-request: cancelling it on the server"
                );
                tokio::spawn(async move {
                    crate::clients::cancel_server(target).await;
                    drop(lease);
                });
            }
            return; // dropping the lease closes the connection
        }
        if self.status == b'I' && self.pinned.is_none() && !self.settings_touched {
            lease.release();
            return;
        }
        let rollback = self.status != b'I';
        let reset = self.pinned.is_some();
        // The session's changes since its last capture are not known: reset them too.
        let reset = reset || self.settings_touched;
        tokio::spawn(async move {
            let conn = lease.conn();
            let cleaned = async {
                if rollback {
                    conn.run_own("ROLLBACK").await?;
                }
                if reset {
                    conn.run_own("DISCARD ALL").await?;
                    conn.prepared.clear();
                    conn.settings = Settings::default();
                }
                Ok::<_, OwnError>(())
            };
            match tokio::time::timeout(Duration::from_secs(5), cleaned).await {
                Ok(Ok(())) => lease.release(),
                _ => tracing::debug!("could not reset a server connection; closing it"),
            }
        });
    }

    // ---- server → client -------------------------------------------------------------------------------

    /// Relays complete server messages from the connection's read buffer, acting on the few that matter.
    fn process_server(&mut self) -> Result<(), End> {
        let mut buf = std::mem::take(&mut self.conn().read_buf);
        let mut run_start = 0;
        let mut i = 0;
        let mut lost = None;
        loop {
            if self.server_skip > 0 {
                let n = self.server_skip.min(buf.len() - i);
                i += n;
                self.server_skip -= n;
                if self.server_skip > 0 {
                    break;
                }
                continue;
            }
            let (tag, len) = match protocol::peek_header(&buf[i..]) {
                None => break,
                Some(Ok(header)) => header,
                Some(Err(bad)) => {
                    lost = Some(format!("invalid message length {} from the server", bad.0));
                    break;
                }
            };
            let swallowing = self.pending.front().is_some_and(Pending::swallowed);
            if !swallowing && is_passthrough(tag) {
                self.rows += u64::from(tag == b'D');
                let available = buf.len() - i;
                if available < len {
                    self.server_skip = len - available;
                    i = buf.len();
                    break;
                }
                i += len;
                continue;
            }
            if buf.len() - i < len {
                buf.reserve(len - (buf.len() - i));
                break;
            }
            match self.on_server_message(tag, &buf[i..i + len]) {
                Action::Forward => i += len,
                Action::Drop => {
                    self.to_client.extend_from_slice(&buf[run_start..i]);
                    i += len;
                    run_start = i;
                }
                Action::Replace(replacement) => {
                    self.to_client.extend_from_slice(&buf[run_start..i]);
                    self.to_client.extend_from_slice(&replacement);
                    i += len;
                    run_start = i;
                }
            }
            if std::mem::take(&mut self.server_fatal) {
                // Do not wait for the close: a request sent meanwhile would be lost with the connection.
                lost = Some("the server ended the connection".to_string());
                break;
            }
        }
        self.to_client.extend_from_slice(&buf[run_start..i]);
        buf.advance(i);
        self.conn().read_buf = buf;
        if self.reads.retry_input.is_some() && !self.to_client.is_empty() {
            self.answered();
        }
        if self.settings_lost {
            return Err(End::Fatal(PgError::fatal(
                "08006",
                "regiongate: could not read this session's settings back from its server connection; \
                 the session cannot go on without them",
            )));
        }
        match lost {
            Some(reason) => self.server_lost(&reason),
            None => Ok(()),
        }
    }

    fn on_server_message(&mut self, tag: u8, message: &[u8]) -> Action {
        match tag {
            b'1' => {
                // ParseComplete answers the oldest Parse still pending.
                let position = self
                    .pending
                    .iter()
                    .position(|p| matches!(p, Pending::Parse { .. }));
                match position.and_then(|p| self.pending.remove(p)) {
                    Some(Pending::Parse { swallow: true, .. }) => Action::Drop,
                    _ => Action::Forward,
                }
            }
            b'E' => self.on_server_error(message),
            b'Z' => {
                let status = protocol::body(message).first().copied().unwrap_or(b'I');
                self.status = status;
                let mut answered = None;
                while let Some(entry) = self.pending.pop_front() {
                    match entry {
                        Pending::Parse { name, .. } => self.forget_server_statement(name),
                        Pending::Ready {
                            own, failed, extra, ..
                        } => {
                            answered = Some((own, failed, extra));
                            break;
                        }
                    }
                }
                match answered {
                    Some((Some(own), failed, _)) => {
                        if own == Own::Capture {
                            if !failed {
                                self.capture_retried = false;
                                self.settings_captured();
                            } else if !std::mem::replace(&mut self.capture_retried, true) {
                                // A cancel that arrived late (the client's, or the statement timeout's)
                                // can hit the capture: the connection is idle and unchanged, ask again.
                                self.settings_touched = true;
                            } else {
                                self.settings_lost = true;
                            }
                        }
                        Action::Drop
                    }
                    Some((None, _, extra)) => {
                        if let Some(extra) = extra {
                            self.restore_reset_values(extra.reset);
                        }
                        self.request_answered();
                        Action::Forward
                    }
                    None => {
                        self.request_answered();
                        Action::Forward
                    }
                }
            }
            // Notifications are asynchronous and always the client's; so are the parameter changes the
            // restoring of its reset values makes.
            b'A' => Action::Forward,
            b'S' if self.pending.front().is_some_and(|p| p.is_own(Own::Restore)) => Action::Forward,
            b'S' => {
                // A reported setting changed (DateStyle, session_authorization, is_superuser after a change
                // of role, ...), maybe inside a function the gateway cannot see into: read the settings back.
                let action = self.forward_unless_swallowing();
                self.settings_touched |= matches!(action, Action::Forward);
                action
            }
            b'D' if self
                .pending
                .front()
                .is_some_and(|p| p.is_own(Own::Position)) =>
            {
                self.captured(message);
                Action::Drop
            }
            b'D' if self.pending.front().is_some_and(|p| p.is_own(Own::Capture)) => {
                self.capture_rows
                    .push(protocol::data_row_text(protocol::body(message)));
                Action::Drop
            }
            _ => self.forward_unless_swallowing(),
        }
    }

    /// A client request got its ReadyForQuery: time it, and log it if it was slow.
    fn request_answered(&mut self) {
        self.timed_out = false;
        let Some(started) = self.request_started.take() else {
            return;
        };
        self.last_answer = std::time::Instant::now();
        let elapsed = self.last_answer.saturating_duration_since(started);
        let replica = matches!(self.route, Some(Route::Replica(_)));
        let rows = std::mem::take(&mut self.rows);
        tracing::debug!(
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            role = if replica { "replica" } else { "primary" },
            server = %self.lease.as_mut().map(|l| l.conn().addr.to_string()).unwrap_or_default(),
            rows,
            statement = %self.last_statement.as_deref().map(|s| String::from_utf8_lossy(&s[..s.len().min(200)])).unwrap_or_default(),
            "request"
        );
        METRICS.request_seconds(replica, elapsed.as_secs_f64());
        if elapsed >= self.slow_after {
            METRICS.slow_statements.inc();
            let statement = self
                .last_statement
                .as_deref()
                .map(|s| String::from_utf8_lossy(&s[..s.len().min(500)]).into_owned())
                .unwrap_or_default();
            let server = self
                .lease
                .as_mut()
                .map(|l| l.conn().addr.to_string())
                .unwrap_or_default();
            tracing::warn!(
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                %server,
                role = if replica { "replica" } else { "primary" },
                statement,
                "slow statement"
            );
        }
        // A pipelined request behind this one has been waiting since now at the latest.
        if self
            .pending
            .iter()
            .any(|p| matches!(p, Pending::Ready { own: None, .. }))
        {
            self.request_started = Some(std::time::Instant::now());
        }
    }

    fn forward_unless_swallowing(&self) -> Action {
        if self.pending.front().is_some_and(Pending::swallowed) {
            Action::Drop
        } else {
            Action::Forward
        }
    }

    /// After a client's request with a RESET: a pooled connection went back to the server's defaults, the
    /// client's session must be at its connection-time values (the restore checks on the server what is reset
    /// now). Only with nothing pipelined behind the request, which the restore would overtake; otherwise the
    /// next capture and replay correct it.
    fn restore_reset_values(&mut self, reset: Reset) {
        let names = match &reset {
            Reset::Nothing => return,
            Reset::Names(names) => Some(names.as_slice()),
            Reset::All => None,
        };
        if !self.pending.is_empty() || self.in_exchange {
            return;
        }
        if let Some(sql) = self.reset_values.restore_sql(names) {
            self.send_own_query(&sql, Own::Restore);
        }
    }

    fn on_server_error(&mut self, message: &[u8]) -> Action {
        let body = protocol::body(message);
        METRICS.server_error(body);
        let fatal = body
            .windows(6)
            .take(4)
            .any(|w| w == b"FATAL\0" || w.starts_with(b"PANIC\0"));
        // In the extended protocol an error makes the server skip to the next Sync: Parses before it will not
        // be answered, and the statements they were creating do not exist.
        let simple = matches!(
            self.pending.front(),
            Some(Pending::Ready { simple: true, .. })
        );
        let restoring = self.pending.front().is_some_and(|p| p.is_own(Own::Restore));
        if !simple {
            while matches!(self.pending.front(), Some(Pending::Parse { .. })) {
                if let Some(Pending::Parse { name, .. }) = self.pending.pop_front() {
                    self.forget_server_statement(name);
                }
            }
        }
        let mut swallowed = false;
        if let Some(Pending::Ready { own, failed, .. }) = self.pending.front_mut() {
            *failed = true;
            swallowed = own.is_some();
        }
        if fatal {
            self.conn().discard = true;
            self.server_fatal = true;
        }
        if restoring && !fatal {
            // The client's transaction failed after its RESET: rolled back with it, nothing to restore.
            return Action::Drop;
        }
        let capture = self.pending.front().is_some_and(|p| p.is_own(Own::Capture));
        if swallowed && capture && !fatal {
            return Action::Drop; // asked again (see the ReadyForQuery handling)
        }
        if swallowed {
            let (code, text) = protocol::error_fields(body);
            tracing::warn!(code, reason = %text, "a statement the gateway sent for the client failed");
            // Our picture of this connection is wrong; do not hand it to anyone else.
            self.conn().discard = true;
            return Action::Drop;
        }
        if fatal && (self.status != b'I' || self.pinned.is_some()) {
            // The session ends with its backend, as on a direct connection: the client gets the server's own
            // FATAL (57P01 for pg_terminate_backend), and nothing after it.
            self.fatal_forwarded = true;
        }
        if fatal && self.status == b'I' && self.pinned.is_none() {
            // The server connection is going away, but the client's session is not: tell it as an ERROR.
            let (code, text) = protocol::error_fields(body);
            let mut out = BytesMut::new();
            PgError {
                code: code.into(),
                ..PgError::error("08006", text)
            }
            .encode(&mut out);
            return Action::Replace(out.freeze());
        }
        if self.timed_out && protocol::error_fields(body).0 == "57014" {
            // The cancel was the gateway's: say why, as PostgreSQL's own statement_timeout would.
            let mut out = BytesMut::new();
            PgError::error(
                "57014",
                format!(
                    "canceling statement due to statement timeout (regiongate limits.statement_timeout is {})",
                    humantime::format_duration(self.statement_timeout)
                ),
            )
            .encode(&mut out);
            return Action::Replace(out.freeze());
        }
        if duplicate_server_statement(body) {
            // The gateway's picture of the connection's statements is wrong (a Close the server skipped
            // after an error): it cannot prepare that statement there again, so nobody gets it.
            self.conn().discard = true;
        }
        if stale_statement(body) {
            tracing::info!(
                "a prepared statement's result type changed: statements are prepared anew"
            );
            self.shared.statement_names.forget_all();
        }
        if memchr::memmem::find(body, b"__rg_").is_some() || self.front_shifts().is_some() {
            // Say it in the client's words: its statement names, and positions in the text it sent.
            let shifts = self.front_shifts().cloned().unwrap_or_default();
            let replaced = protocol::map_error(
                body,
                |text| self.client_names(text),
                |position| unshift(position, &shifts),
            );
            return Action::Replace(replaced.freeze());
        }
        Action::Forward
    }

    /// How the gateway's renaming moved text in the client's request being answered.
    fn front_shifts(&self) -> Option<&Vec<Shift>> {
        match self.pending.front() {
            Some(Pending::Ready {
                extra: Some(extra), ..
            }) if !extra.shifts.is_empty() => Some(&extra.shifts),
            _ => None,
        }
    }

    /// `text` with the server-side names of this client's prepared statements put back as the client's.
    fn client_names(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("__rg_") {
            out.push_str(&rest[..at]);
            let end = rest[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(rest.len(), |n| at + n);
            let server = &rest[at..end];
            let client = self
                .sql_prepared
                .iter()
                .find(|(_, p)| &*p.server_name == server)
                .map(|(name, _)| name.clone())
                .or_else(|| {
                    self.statements
                        .iter()
                        .find(|(_, s)| &*s.server_name == server)
                        .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
                });
            out.push_str(client.as_deref().unwrap_or(server));
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    }

    fn forget_server_statement(&mut self, name: Option<Arc<str>>) {
        if let Some(name) = name {
            if let Some(lease) = self.lease.as_mut() {
                lease.conn().prepared.remove(&name);
            }
        }
    }

    // ---- I/O ---------------------------------------------------------------------------------------------

    /// Writes what can be written without waiting.
    fn flush_eagerly(&mut self) -> Result<(), End> {
        if !self.to_server.is_empty() {
            let mut lost = false;
            if let Some(lease) = self.lease.as_mut() {
                let stream = &mut lease.conn().stream;
                while !self.to_server.is_empty() {
                    match stream.try_write(&self.to_server) {
                        Ok(n) => self.to_server.advance(n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            lost = true;
                            break;
                        }
                    }
                }
            }
            if lost {
                self.server_lost("write failed")?;
            }
        }
        while !self.to_client.is_empty() {
            match self.client.try_write(&self.to_client) {
                Ok(n) => self.to_client.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(End::Client),
            }
        }
        Ok(())
    }

    /// Waits until a socket is ready and moves bytes: reads from the client and the server, and writes
    /// what is waiting for either.
    async fn wait_io(&mut self) -> Result<(), End> {
        let read_client = self.to_server.len() < HIGH_WATER;
        let read_server = self.to_client.len() < HIGH_WATER;
        if self.from_client.capacity() - self.from_client.len() < 4096 {
            self.from_client.reserve(8192);
        }
        let client = stream_io(
            &mut self.client,
            &mut self.from_client,
            &mut self.to_client,
            read_client,
            IoEvent::ClientRead,
            IoEvent::ClientWrite,
        );
        let event = match self.lease.as_mut() {
            Some(lease) => {
                let conn = lease.conn();
                if conn.read_buf.capacity() - conn.read_buf.len() < 4096 {
                    conn.read_buf.reserve(16 * 1024);
                }
                // Inside a transaction with no request in flight the server has nothing to say: its
                // connection dying shows at the next request, which could not have run on it anyway, so its
                // socket is left alone (two polls per statement saved). Outside one it may speak at any
                // time (a notification, a session-mode connection closing) and is watched.
                let expecting = !self.pending.is_empty()
                    || !matches!(self.status, b'T' | b'E')
                    || self.pinned.is_some();
                let server_busy = read_server && expecting
                    || !self.to_server.is_empty()
                    || conn.stream.wants_flush();
                // Only the client can move things on: it is idle inside its transaction.
                let idle = !self.client_idle_timeout.is_zero()
                    && self.pending.is_empty()
                    && self.to_server.is_empty();
                let server = stream_io(
                    &mut conn.stream,
                    &mut conn.read_buf,
                    &mut self.to_server,
                    read_server,
                    IoEvent::ServerRead,
                    IoEvent::ServerWrite,
                );
                let statement_timed = !self.statement_timeout.is_zero()
                    && self.request_started.is_some()
                    && !self.timed_out;
                // Biased: no random branch order to draw; at most one or two are ready at a time anyway.
                tokio::select! {
                    biased;
                    event = server, if server_busy => event,
                    event = client => event,
                    _ = sleep_for(self.client_idle_timeout), if idle => IoEvent::ClientIdle,
                    _ = sleep_until(self.request_started, self.statement_timeout), if statement_timed => IoEvent::StatementTimeout,
                }
            }
            None if self.client_idle_timeout.is_zero() => client.await,
            None => match tokio::time::timeout(self.client_idle_timeout, client).await {
                Ok(event) => event,
                Err(_) => IoEvent::ClientIdle,
            },
        };
        match event {
            IoEvent::StatementTimeout => {
                self.timed_out = true;
                if let Some(target) = self.handle.entry.server() {
                    tracing::warn!(
                        timeout_ms = self.statement_timeout.as_millis() as u64,
                        statement = %self.last_statement.as_deref().map(|s| String::from_utf8_lossy(&s[..s.len().min(200)])).unwrap_or_default(),
                        "statement timeout: cancelling the request on its server"
                    );
                    METRICS.statement_timeouts.inc();
                    tokio::spawn(crate::clients::cancel_server(target));
                }
                Ok(())
            }
            IoEvent::ClientIdle => Err(End::Fatal(if self.status == b'I' {
                PgError::fatal(
                    "57P05",
                    "terminating connection due to idle-session timeout (regiongate limits.client_idle_timeout)",
                )
            } else {
                PgError::fatal(
                    "25P03",
                    "terminating connection due to idle-in-transaction timeout (regiongate limits.client_idle_timeout)",
                )
            })),
            IoEvent::ClientRead(Ok(0))
            | IoEvent::ClientRead(Err(_))
            | IoEvent::ClientWrite(Err(_)) => Err(End::Client),
            IoEvent::ClientRead(Ok(_))
            | IoEvent::ClientWrite(Ok(_))
            | IoEvent::ServerWrite(Ok(_)) => Ok(()),
            IoEvent::ServerRead(Ok(0)) => self.server_lost("the server closed the connection"),
            IoEvent::ServerRead(Err(e)) | IoEvent::ServerWrite(Err(e)) => {
                self.server_lost(&e.to_string())
            }
            IoEvent::ServerRead(Ok(_)) => self.process_server(),
        }
    }
}

/// One side (client or server) of [`Session::wait_io`]: reads into `from` (when `read`), writes `to`, and over
/// TLS flushes records rustls still holds; completes with the first of these that happened, as the caller's
/// event. One future for both directions, because a TLS stream cannot be split into halves that wait
/// independently.
fn stream_io<'a>(
    stream: &'a mut Stream,
    from: &'a mut BytesMut,
    to: &'a mut BytesMut,
    read: bool,
    on_read: fn(std::io::Result<usize>) -> IoEvent,
    on_write: fn(std::io::Result<usize>) -> IoEvent,
) -> impl std::future::Future<Output = IoEvent> + 'a {
    use std::task::Poll;
    use tokio::io::AsyncWrite;
    std::future::poll_fn(move |cx| {
        if read {
            if let Poll::Ready(r) =
                tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *stream), cx, from)
            {
                return Poll::Ready(on_read(r));
            }
        }
        if !to.is_empty() {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut *stream).poll_write(cx, to) {
                if let Ok(n) = r {
                    to.advance(n);
                }
                return Poll::Ready(on_write(r));
            }
        } else if stream.wants_flush() {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut *stream).poll_flush(cx) {
                return Poll::Ready(on_write(r.map(|()| 0)));
            }
        }
        Poll::Pending
    })
}

/// Sleeps for `duration`. Unlike `tokio::time::sleep`, creating it reads no clock: select! creates the
/// futures of disabled branches too, and this one is created at every wait for I/O.
async fn sleep_for(duration: Duration) {
    tokio::time::sleep(duration).await
}

/// Sleeps until `timeout` after `started`.
async fn sleep_until(started: Option<std::time::Instant>, timeout: Duration) {
    if let Some(started) = started {
        tokio::time::sleep_until((started + timeout).into()).await;
    }
}

enum IoEvent {
    /// The request in flight ran past `limits.statement_timeout`.
    StatementTimeout,
    /// The client sent nothing for `limits.client_idle_timeout` while nothing else was going on.
    ClientIdle,
    ClientRead(std::io::Result<usize>),
    ClientWrite(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ServerWrite(std::io::Result<usize>),
}

enum Action {
    Forward,
    Drop,
    Replace(Bytes),
}

fn is_copy(tag: u8) -> bool {
    matches!(tag, b'd' | b'c' | b'f')
}

/// Server messages relayed without a look at their bodies (and streamed through when large).
fn is_passthrough(tag: u8) -> bool {
    matches!(
        tag,
        b'D' | b'T'
            | b't'
            | b'n'
            | b'2'
            | b'3'
            | b's'
            | b'I'
            | b'd'
            | b'c'
            | b'G'
            | b'H'
            | b'W'
            | b'V'
            | b'N'
            | b'A'
    )
}

/// What a Parse's statement does to the session when run.
fn statement_effect(text: &[u8]) -> StatementEffect {
    let Some(range) = sql::split(text).next() else {
        return StatementEffect::None;
    };
    match sql::classify(text, range.clone()) {
        Kind::Pin(reason) => StatementEffect::Pin(reason),
        // SQL-level PREPARE/EXECUTE through Parse would need the same renaming as a Query; keep the client on
        // one server connection instead.
        Kind::Prepare { .. } | Kind::Execute { .. } | Kind::Deallocate { .. } => {
            StatementEffect::Pin("SQL-level PREPARE/EXECUTE through the extended protocol")
        }
        kind => touch_of(&kind)
            .or_else(|| hidden_set_config(text, range))
            .map_or(StatementEffect::None, StatementEffect::Change),
    }
}

/// A set_config call in a statement whose kind says nothing of settings.
fn hidden_set_config(text: &[u8], range: std::ops::Range<usize>) -> Option<Touch> {
    let (names, parameters) = sql::set_config_in(text, range)?;
    touch_of(&Kind::SetConfig { names, parameters })
}

/// Whether an error says a statement of the gateway's naming exists already.
fn duplicate_server_statement(body: &[u8]) -> bool {
    let (code, message) = protocol::error_fields(body);
    code == "42P05" && message.contains("\"__rg_s")
}

/// Whether an error says a prepared statement no longer matches the schema.
fn stale_statement(body: &[u8]) -> bool {
    let (code, message) = protocol::error_fields(body);
    (code == "0A000" && message.starts_with("cached plan must not change result type"))
        || (code == "XX000" && message.starts_with("cache lookup failed for type"))
}

/// What a statement of this kind may do to the session's settings, if anything.
fn touch_of(kind: &Kind) -> Option<Touch> {
    let custom = |name: &String| name.contains('.').then(|| name.clone());
    Some(match kind {
        Kind::Set { name } => Touch {
            custom: custom(name).into_iter().collect(),
            ..Touch::default()
        },
        Kind::Reset { name: Some(name) } => Touch {
            custom: custom(name).into_iter().collect(),
            reset: Reset::Names(vec![name.clone()]),
            ..Touch::default()
        },
        Kind::Reset { name: None } | Kind::DiscardAll => Touch {
            reset: Reset::All,
            ..Touch::default()
        },
        Kind::SetConfig { names, parameters } => Touch {
            custom: names.iter().filter_map(custom).collect(),
            parameters: parameters.clone(),
            reset: Reset::Nothing,
        },
        _ => return None,
    })
}

/// Who runs a session's statements, for N+1 reports.
fn nplus1_origin(entry: &crate::clients::ClientEntry) -> crate::nplus1::Origin<'_> {
    crate::nplus1::Origin {
        user: &entry.user,
        application_name: &entry.application_name,
        client: entry.addr,
    }
}
