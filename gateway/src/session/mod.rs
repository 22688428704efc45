//! One client connection, from startup to goodbye: accept → startup/auth → loop { read client messages →
//! forward (checking out a server connection when one is needed) → relay answers until ReadyForQuery →
//! release the server connection when the client is idle }.
//!
//! Transaction pooling makes a client's session span many server connections, so the session keeps what a
//! single PostgreSQL backend would remember and recreates it where it is missing: prepared statements
//! ([`statements`]), settings and identity ([`settings`]); what cannot move (LISTEN, temporary tables, WITH
//! HOLD cursors, session advisory locks) pins the client to its server connection for the rest of its session.
//!
//! The concerns, one module each:
//! - [`startup`]: first packets, TLS, authentication, the login state;
//! - [`duplex`]: the bytes each way, backpressure and waiting for sockets;
//! - [`requests`]: what each client message asks for (statements renamed, settings noted, pins);
//! - [`relay`]: the server's answers, through the pure [`state::ProtocolState`] that says whose each is;
//! - [`lease`]: checking out a server connection, giving it the session's settings, and releasing it;
//! - [`observe`]: timing, the slow-statement log, N+1 detection;
//! - [`routing`] and [`batching`]: where an idle client's next exchange goes;
//! - [`replay`]: a transaction on a replica, recorded so that it can move to the primary at its first write.

use crate::clients::ClientHandle;
use crate::metrics::METRICS;
use crate::pool::{Lease, Pool};
use crate::protocol::{self, tag, PgError, TxStatus};
use crate::Shared;
use bytes::Buf;
use duplex::{Duplex, IoEvent, Watch, HIGH_WATER};
use routing::{Reads, Route};
use state::ProtocolState;
use statements::Statements;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tracing::Instrument;

/// An event about this session, at info level or above: with the client's address, user and database.
/// (The session's span carries them at debug level only: entered at every poll of the session's task, an
/// enabled span cost about 540 instructions per transaction, 7%, and about 300 bytes per idle client.)
macro_rules! event {
    ($session:expr, $level:ident, $($rest:tt)+) => {{
        let entry = &$session.handle.entry;
        tracing::$level!(client = %entry.addr, user = %entry.user, database = %entry.database, $($rest)+)
    }};
}

mod batching;
mod duplex;
mod lease;
mod observe;
mod relay;
mod replay;
mod requests;
mod routing;
mod settings;
mod shutdown;
mod startup;
mod state;
mod statements;

pub use statements::StatementNames;

/// For the fuzz targets: the extended-protocol exchange reader of insert batching.
#[doc(hidden)]
pub fn fuzz_extended(data: &[u8]) {
    batching::fuzz(data);
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
    /// The client is told this, then the connection closes. (Boxed: every await that may end the session
    /// returns an `End`, and its size is room in the session's future.)
    Fatal(Box<PgError>),
    /// The gateway shuts down: the client is told 57P01, then the connection closes.
    Drained(crate::drain::Outcome),
}

struct Session {
    shared: Arc<Shared>,
    io: Duplex,
    /// What the server connection owes, and to whom.
    state: ProtocolState,
    statements: Statements,
    settings: settings::Tracker,
    observer: observe::Observer,
    reads: Reads,
    lease: Option<Lease>,
    route: Option<Route>,
    /// The primary's pool for this client's database and user.
    pool: Arc<Pool>,
    /// The regions' writer epoch `pool` follows (0: look again; see [`Session::primary_pool`]).
    /// (u32: the low half is enough to notice a change; the session's size is what an idle client costs.)
    writer_epoch: u32,
    /// The reload generation `config`, `pool`, `replicas` and `regions` were read in.
    pool_generation: u64,
    /// The configuration the session follows (limits, batching; one pointer where copies of what the session
    /// reads in it would take room in every idle client).
    config: Arc<crate::config::Config>,
    /// Whether any replica is configured (read routing is on).
    replicas: bool,
    /// The regions in force (replaced by a reload only; their live picture changes inside).
    regions: Arc<regions::Regions>,
    /// This client's registration: cancel key, and what the console shows.
    handle: ClientHandle,
    pinned: Option<&'static str>,
    /// After an error the gateway answered (a failed checkout, a write refused): drop extended-protocol
    /// messages up to the next Sync, then answer it with this status.
    discard_until_sync: Option<TxStatus>,
    /// The server sent FATAL: the connection is ending, so nothing more is sent on it.
    server_fatal: bool,
    /// The server's FATAL went to the client: the session ends with it, quietly.
    fatal_forwarded: bool,
    /// Insert batching's state, made at the session's first look at a statement for it (boxed: most
    /// sessions never batch, and an idle client's size is what it costs).
    batch: Option<Box<batching::Batching>>,
    shutdown: shutdown::Shutdown,
}

/// Serves one accepted connection until it closes: its login here, its session in a task of its own, so
/// that the login's large future and locals are gone while the session lives (an idle client costs what its
/// session's task holds).
pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let mut live = shared.drain.live();
    // Counted by `admit`; over when the login is.
    let pending = shared.admission.pending_login();
    // Boxed: the login's future is large and done with before the session starts.
    let Some(logged_in) = Box::pin(startup::log_in(&shared, tcp, peer, &mut live, pending)).await
    else {
        return;
    };
    let (mut session, lease, hello, span) = Session::new(&shared, logged_in, peer);
    // A session-mode connection gets the client's settings before the client hears it is ready.
    if let Some(mut lease) = lease {
        if let Err(mut error) = session
            .settings
            .bring(&mut lease)
            .instrument(span.clone())
            .await
        {
            error.severity = "FATAL";
            Box::pin(session.end(End::Fatal(Box::new(error))).instrument(span)).await;
            return;
        }
        session.take_lease(lease, Route::Primary);
    }
    session.io.greet(hello);
    // The drain counts the connection on in the session's task.
    live.hand_over();
    // Without the span when it is off (debug level): a disabled span still takes 56 bytes in the task, and
    // the task's size is what an idle client costs.
    if span.is_disabled() {
        tokio::spawn(session.live());
    } else {
        tokio::spawn(session.live().instrument(span));
    }
}

impl Session {
    /// The session's task: serves the client until the end. (Not an `async fn`: one would copy the session
    /// from its argument into a local, and hold both for the session's life.)
    #[allow(clippy::manual_async_fn)] // on purpose, see above
    fn live(mut self) -> impl std::future::Future<Output = ()> {
        async move {
            let shared = self.shared.clone();
            let _live = shared.drain.taken_over();
            let end = self.run().await;
            // Boxed: once per session, and it would otherwise take room in every session's future.
            Box::pin(self.end(end)).await;
        }
    }

    /// The session is over: the client is told why (when it is still there to hear it), and the server
    /// connection goes back.
    #[allow(clippy::manual_async_fn)] // as `live`: the session is not copied
    fn end(mut self, end: End) -> impl std::future::Future<Output = ()> {
        async move {
            METRICS.client_connections.dec();
            let shared = self.shared.clone();
            if !matches!(end, End::Drained(_))
                && shared.drain.phase() != crate::drain::Phase::Serving
            {
                shared.drain.ended(crate::drain::Outcome::Left);
            }
            let error = match end {
                End::Client => {
                    tracing::debug!("client disconnected");
                    None
                }
                End::Backend => {
                    event!(self, info, "the server ended the session's backend");
                    Some(None)
                }
                End::Fatal(error) => {
                    event!(self, info, code = %error.code, reason = %error.message, "closing client connection");
                    Some(Some(error))
                }
                End::Drained(outcome) => {
                    event!(self, info, outcome = ?outcome, "closing client connection: the gateway shuts down");
                    shared.drain.ended(outcome);
                    Some(Some(Box::new(shutdown::terminated())))
                }
            };
            if let Some(error) = error {
                let mut last = std::mem::take(&mut self.io.to_client);
                if let Some(error) = error {
                    METRICS.error_sent(&error.code);
                    error.encode(&mut last);
                }
                self.io.goodbye(&last).await;
            }
            self.finish();
        }
    }
}

impl Session {
    async fn run(&mut self) -> End {
        loop {
            // Out of the match: the result would be kept, with the room of its error, across its arms' awaits.
            let progress = match self.process_client() {
                Ok(progress) => progress,
                Err(fatal) => return End::Fatal(Box::new(fatal)),
            };
            match progress {
                Progress::Idle => {}
                Progress::NeedServer => {
                    // A KILL that came while the session was not waiting for its client (its login, a
                    // pipelined request) ends it before the next request runs.
                    if self.handle.entry.is_killed() {
                        event!(self, info, "session ended by the admin console's KILL");
                        return End::Fatal(Box::new(shutdown::killed()));
                    }
                    self.shutdown.grace = false;
                    self.attach().await;
                    continue;
                }
                Progress::Batched => {
                    self.shutdown.grace = false;
                    if let Err(end) = Box::pin(self.run_batched()).await {
                        return end;
                    }
                    continue;
                }
                Progress::Terminate => return End::Client,
            }
            if let Err(end) = self.flush_now() {
                return end;
            }
            if self.reads.moving && self.state.quiet() {
                // Boxed: rare, and large.
                if let Err(end) = Box::pin(self.move_to_primary()).await {
                    return end;
                }
                continue;
            }
            if self.maybe_release() && self.io.has_complete_message() {
                continue; // a message waited for this release (a write behind replica reads)
            }
            if let Some(end) = self.drained() {
                return end;
            }
            if !self.shutdown.registered {
                // At the session's first wait, and after each phase change (a wake takes the waker).
                crate::drain::register(&self.handle.entry.kick).await;
                self.shutdown.registered = true;
            }
            if let Err(end) = self.wait_io().await {
                return end;
            }
            // A request that came while the connection's release waited (for a settings capture, say) is
            // decided after the release: it may open a transaction, or need another server.
            if self.lease.is_some() && self.state.settled() && self.io.has_complete_message() {
                self.maybe_release();
            }
        }
    }

    /// Handles every complete client message in the buffer, as far as it can without waiting.
    fn process_client(&mut self) -> Result<Progress, PgError> {
        loop {
            let io = &mut self.io;
            if io.client_skip > 0 {
                let n = io.client_skip.min(io.from_client.len());
                if n == 0 {
                    return Ok(Progress::Idle);
                }
                if io.client_skip_forward {
                    io.to_server.extend_from_slice(&io.from_client[..n]);
                }
                io.from_client.advance(n);
                io.client_skip -= n;
                continue;
            }
            // While the session's settings are read back, its next request waits: it is decided (routed,
            // batched) with them, after the connection is released.
            if io.to_server.len() >= HIGH_WATER
                || self.reads.draining
                || self.reads.moving
                || self.settings.capturing()
            {
                return Ok(Progress::Idle);
            }
            let (message_tag, len) = match protocol::peek_header(&io.from_client) {
                None => return Ok(Progress::Idle),
                Some(Err(bad)) => {
                    return Err(PgError::fatal(
                        "08P01",
                        format!("invalid message length {}", bad.0),
                    ))
                }
                Some(Ok(header)) => header,
            };
            let max = self.config.limits.max_message_size;
            if len > max {
                let text = format!(
                    "message of {len} bytes exceeds the gateway's max_message_size ({max} bytes)"
                );
                return Err(PgError::fatal("08P01", text));
            }
            let complete = io.from_client.len() >= len;
            // CopyData can be large; stream it rather than buffer it whole.
            let streamable = message_tag == tag::COPY_DATA
                || self.discard_until_sync.is_some()
                || self.lease.is_none() && is_copy(message_tag);
            if !complete && streamable {
                io.client_skip_forward = self.discard_until_sync.is_none() && self.lease.is_some();
                io.client_skip = len;
                continue;
            }
            if !complete {
                io.from_client.reserve(len - io.from_client.len());
                return Ok(Progress::Idle);
            }
            if let Some(status) = self.discard_until_sync {
                io.from_client.advance(len);
                if message_tag == tag::SYNC {
                    self.discard_until_sync = None;
                    protocol::ready_for_query(&mut io.to_client, status);
                }
                continue;
            }
            if message_tag == tag::TERMINATE {
                return Ok(Progress::Terminate);
            }
            if self.lease.is_none() {
                if is_copy(message_tag) {
                    // Copy messages outside a COPY (say, after the server failed the COPY) are ignored,
                    // as PostgreSQL ignores them.
                    io.from_client.advance(len);
                    continue;
                }
                if message_tag == tag::QUERY && self.defer_begin(len) {
                    continue;
                }
                if matches!(message_tag, tag::QUERY | tag::PARSE | tag::BIND)
                    && self.take_batchable()?
                {
                    return Ok(Progress::Batched);
                }
                return Ok(Progress::NeedServer);
            }
            // A Query's shape serves routing (its cache key), N+1 detection and the session's own tracking
            // (a plain statement needs no closer look): compute it once.
            let query = if message_tag == tag::QUERY {
                self.observer.query(&io.from_client[..len])
            } else {
                None
            };
            if self.lease.as_ref().is_some_and(|l| l.pool().is_retired()) {
                if let Some(error) = self.primary_lost() {
                    return Err(error);
                }
            }
            if !self.admit(message_tag, len, query.as_ref().map(|q| q.shape.hash)) {
                return Ok(Progress::Idle);
            }
            let message = self.io.from_client.split_to(len).freeze();
            self.remember(&message);
            self.handle_message(message_tag, message, query)?;
        }
    }

    /// Waits until a socket is ready, moves bytes, and acts on what happened.
    async fn wait_io(&mut self) -> Result<(), End> {
        if self.lease.is_none() {
            // The client may idle now, and its buffers go to the stock.
            self.observer.unpin();
        }
        let nothing_owed = !self.state.owes_answers() && self.io.to_server.is_empty();
        // (In a block: a local left in scope would be kept across the wait, in every session's future.)
        let idle = {
            let limit = self.config.limits.client_idle_timeout;
            (!limit.is_zero() && (self.lease.is_none() || nothing_owed)).then_some(limit)
        };
        // Inside a transaction with no request in flight the server has nothing to say: its connection dying
        // shows at the next request, which could not have run on it anyway, so its socket is left alone (two
        // polls per statement saved). Outside one it may speak at any time (a notification, a session-mode
        // connection closing) and is watched.
        // A drain wakes a session that waits for its client; one that waits for an answer sees the drain's
        // phase when the answer is in.
        let kick = (!self.state.owes_answers()).then_some(crate::drain::Kicked {
            drain: &self.shared.drain,
            seen: self.shutdown.seen,
            seen_kills: self.shutdown.seen_kills,
        });
        let watch = Watch {
            server: self.state.owes_answers()
                || self.state.status().is_idle()
                || self.pinned.is_some(),
            idle,
            deadline: self.observer.deadline(),
            kick,
        };
        let event = self
            .io
            .wait(self.lease.as_mut().map(Lease::conn), watch)
            .await;
        match event {
            IoEvent::StatementTimeout => {
                self.observer.timed_out = true;
                if let Some(target) = self.handle.entry.server() {
                    event!(
                        self,
                        warn,
                        timeout_ms = self.observer.statement_timeout().as_millis() as u64,
                        statement = %self.observer.statement(200),
                        "statement timeout: cancelling the request on its server"
                    );
                    METRICS.statement_timeouts.inc();
                    tokio::spawn(crate::clients::cancel_server(target));
                }
                Ok(())
            }
            IoEvent::ClientIdle => Err(End::Fatal(Box::new(if self.state.status().is_idle() {
                PgError::fatal(
                    "57P05",
                    "terminating connection due to idle-session timeout (regiongate limits.client_idle_timeout)",
                )
            } else {
                PgError::fatal(
                    "25P03",
                    "terminating connection due to idle-in-transaction timeout (regiongate limits.client_idle_timeout)",
                )
            }))),
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
            IoEvent::Drain(phase) => self.on_drain(phase),
        }
    }
}

fn is_copy(message_tag: u8) -> bool {
    matches!(
        message_tag,
        tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL
    )
}

#[cfg(test)]
mod tests;
