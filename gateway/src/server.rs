//! One logged-in connection to a PostgreSQL server, and everything the gateway does on it besides relaying a
//! client's bytes: its own queries (settings replays, captures, cleanups, the WAL position), batches, and the
//! bookkeeping that says what the server session holds (prepared statements, settings, the unnamed statement).
//!
//! The fields are private so that the invariants hold in one place: a statement is noted as prepared when its
//! Parse is sent and forgotten when the server says it failed; settings are changed only through
//! [`ServerConn::replay_settings`] (confirmed by the server) or a capture of what the server says it holds; a
//! connection whose state is unknown is marked with [`ServerConn::discard`] and never reaches another client.

use crate::auth::{login_to_server, ServerLoginError};
use crate::clients::ServerTarget;
use crate::config::ServerUrl;
use crate::metrics::METRICS;
use crate::protocol::{self, tag, PgError};
use crate::settings::Settings;
use crate::tls::Stream;
use bytes::BytesMut;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The query that reads the primary's WAL position after a write, for read-your-writes. Its one DataRow is read
/// by [`wal_position`].
pub const WAL_POSITION: &str = "SELECT pg_catalog.pg_current_wal_lsn()";

/// The WAL position in a DataRow body answering [`WAL_POSITION`] (one text column).
pub fn wal_position(data_row_body: &[u8]) -> Option<regions::Lsn> {
    // int16 column count, int32 length, text.
    let len = i32::from_be_bytes(data_row_body.get(2..6)?.try_into().ok()?);
    let text = data_row_body.get(6..6 + usize::try_from(len).ok()?)?;
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// How server connections of a pool log in.
#[derive(Clone)]
pub struct ServerCredentials {
    pub user: String,
    pub password: Option<String>,
    /// For a user looked up with `auth.query`: what its latest client login proved.
    pub learned: Option<Arc<arc_swap::ArcSwapOption<crate::auth_query::LearnedSecret>>>,
    pub tls: regions::ServerTls,
}

impl ServerCredentials {
    /// Whether connections logged in with these credentials are the same as with `other`'s: the same role,
    /// the same password or the same learned secret, the same TLS.
    pub fn same_login(&self, other: &ServerCredentials) -> bool {
        let learned = match (&self.learned, &other.learned) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.user == other.user
            && self.password == other.password
            && learned
            && self.tls == other.tls
    }
}

/// One logged-in connection to a PostgreSQL server.
pub struct ServerConn {
    stream: Stream,
    /// Bytes read from the server but not yet handled.
    read_buf: BytesMut,
    addr: SocketAddr,
    /// The server's own cancel key for this connection.
    pid: i32,
    secret: i32,
    /// Named prepared statements that exist (or are being created) on this connection, by server-side name.
    prepared: HashSet<Arc<str>>,
    /// The session settings this connection holds.
    settings: Settings,
    /// The session authorization it logged in as (what `RESET SESSION AUTHORIZATION` returns to).
    login_user: String,
    /// Whether the connection's unnamed statement is the one the current client last parsed.
    unnamed_valid: bool,
    /// Our picture of the connection may be wrong (a statement we sent for a client failed, or the server
    /// said FATAL): close it instead of returning it to the pool.
    discard: bool,
    pub(crate) created: Instant,
    /// When the pool retires the connection (its `max_lifetime` after `created`; None: never), set by the
    /// pool that opened it: a comparison at each checkin, where the connection's age would be a subtraction.
    pub(crate) retire_at: Option<Instant>,
    pub(crate) idle_since: Instant,
}

impl ServerConn {
    /// Opens and logs in; also returns the ParameterStatus values the server sent at login.
    pub(crate) async fn connect(
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
        let learned = credentials.learned.as_ref().and_then(|l| l.load_full());
        let login = login_to_server(
            &mut stream,
            &mut read_buf,
            &credentials.user,
            credentials.password.as_deref(),
            learned.as_deref(),
            database,
            end_point,
        )
        .await?;
        METRICS
            .server_logins
            .with_label_values(&[login.method, if stream.is_tls() { "yes" } else { "no" }])
            .inc();
        let now = Instant::now();
        let login_user = login
            .parameters
            .iter()
            .find(|(name, _)| name == "session_authorization")
            .map_or_else(|| credentials.user.clone(), |(_, user)| user.clone());
        Ok((
            ServerConn {
                login_user,
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
                retire_at: None,
                idle_since: now,
            },
            login.parameters,
        ))
    }

    #[inline]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id for this connection.
    #[inline]
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Where a cancel for what runs on this connection goes, with the server's own key.
    #[inline]
    pub fn cancel_target(&self) -> ServerTarget {
        ServerTarget {
            addr: self.addr,
            pid: self.pid,
            secret: self.secret,
        }
    }

    /// The session authorization the connection logged in as.
    pub fn login_user(&self) -> &str {
        &self.login_user
    }

    // ---- what the server session holds -----------------------------------------------------------------

    /// Whether the statement `name` exists (or is being created) here.
    #[inline]
    pub fn has_statement(&self, name: &str) -> bool {
        self.prepared.contains(name)
    }

    /// Notes that a Parse (or PREPARE) creating `name` is on its way. False when it exists already.
    #[inline]
    pub fn note_statement(&mut self, name: Arc<str>) -> bool {
        self.prepared.insert(name)
    }

    /// The statement `name` is gone (closed, deallocated, or its Parse failed). False when it was not here.
    pub fn forget_statement(&mut self, name: &str) -> bool {
        self.prepared.remove(name)
    }

    /// Every prepared statement of the server session is gone (DEALLOCATE ALL, DISCARD ALL).
    pub fn forget_statements(&mut self) {
        self.prepared.clear();
        self.unnamed_valid = false;
    }

    #[inline]
    pub fn statement_count(&self) -> usize {
        self.prepared.len()
    }

    /// Whether the unnamed statement is the current client's last Parse.
    #[inline]
    pub fn unnamed_valid(&self) -> bool {
        self.unnamed_valid
    }

    #[inline]
    pub fn set_unnamed_valid(&mut self, valid: bool) {
        self.unnamed_valid = valid;
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The settings a capture read from this connection's server session.
    pub fn captured_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Whether giving this connection `wanted` takes a replay. When both are equal, they end up sharing one
    /// allocation, the one at the lower address: every meeting spreads the lowest, so clients and connections
    /// with equal settings converge on one Arc and later checkouts compare pointers only. (Adopting the
    /// connection's alone does not converge: a connection keeps the first Arc it was given, and clients would
    /// go on comparing at every checkout.)
    #[inline]
    pub fn settings_differ(&mut self, wanted: &mut Settings) -> bool {
        if Arc::ptr_eq(&self.settings, wanted) {
            return false; // the common case: nothing to compare
        }
        if *self.settings != **wanted {
            return true;
        }
        if Arc::as_ptr(&self.settings) < Arc::as_ptr(wanted) {
            *wanted = self.settings.clone();
        }
        self.settings = wanted.clone();
        false
    }

    /// Changes the server session's settings and identity to `wanted`, and waits for the server to confirm.
    /// On failure the connection is marked for closing: what it holds is unknown.
    pub async fn replay_settings(&mut self, wanted: &Settings) -> Result<(), OwnError> {
        let change = crate::settings::change_sql(&self.settings, wanted);
        match self.run_own(&change).await {
            Ok(_) => {
                self.settings = wanted.clone();
                Ok(())
            }
            Err(failure) => {
                self.discard = true;
                Err(failure)
            }
        }
    }

    /// Marks the connection for closing: its state is not what the gateway thinks.
    pub fn discard(&mut self) {
        self.discard = true;
    }

    #[inline]
    pub fn is_discarded(&self) -> bool {
        self.discard
    }

    /// Whether it can go back to the pool as far as the connection itself knows: nothing unread, nothing in
    /// doubt. (Whether the server owes answers is the session's protocol state.)
    #[inline]
    pub fn is_clean(&self) -> bool {
        self.read_buf.is_empty() && !self.discard
    }

    /// Back in the pool: the unnamed statement belongs to no client any more.
    #[inline]
    pub(crate) fn checked_in(&mut self, now: Instant) {
        self.idle_since = now;
        self.unnamed_valid = false;
    }

    /// Reset for another client after DISCARD ALL.
    fn discarded_all(&mut self) {
        self.prepared.clear();
        self.unnamed_valid = false;
        self.settings = Settings::default();
    }

    // ---- bytes -------------------------------------------------------------------------------------------

    /// The stream and its read buffer, for a session relaying bytes.
    #[inline]
    pub fn io(&mut self) -> (&mut Stream, &mut BytesMut) {
        (&mut self.stream, &mut self.read_buf)
    }

    /// Bytes read from the server and not handled yet.
    #[inline]
    pub fn read_buf(&mut self) -> &mut BytesMut {
        &mut self.read_buf
    }

    /// False when the server closed the connection or sent something while idle (a FATAL on shutdown or
    /// termination).
    pub(crate) fn looks_alive(&mut self) -> bool {
        self.stream.is_quiet()
    }

    /// Sends `bytes` and flushes.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads one request's answers, up to and including its ReadyForQuery, handing each message to `each`.
    /// True at the ReadyForQuery; false when `each` stopped early.
    pub async fn read_answers(
        &mut self,
        mut each: impl FnMut(u8, BytesMut) -> ControlFlow<()>,
    ) -> std::io::Result<bool> {
        loop {
            while let Some(header) = protocol::peek_header(&self.read_buf) {
                let (message_tag, len) = header.map_err(|bad| {
                    std::io::Error::other(format!(
                        "invalid message length {} from the server",
                        bad.0
                    ))
                })?;
                if self.read_buf.len() < len {
                    self.read_buf.reserve(len - self.read_buf.len());
                    break;
                }
                let message = self.read_buf.split_to(len);
                if each(message_tag, message).is_break() {
                    return Ok(false);
                }
                if message_tag == tag::READY_FOR_QUERY {
                    return Ok(true);
                }
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Runs one simple query of the gateway's own on this idle connection and reads its answer up to
    /// ReadyForQuery: the rows (text), the parameters the server reported, and the first error. Its answers
    /// reach no client. An I/O error or a FATAL leaves the connection unusable (marked for closing).
    pub async fn run_own(&mut self, sql: &str) -> Result<OwnAnswer, OwnError> {
        /// The gateway's own queries are small: a server that takes longer is not answering.
        const OWN_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
        let result = match tokio::time::timeout(OWN_QUERY_TIMEOUT, self.exchange_own(sql)).await {
            Ok(result) => result,
            Err(_) => Err(OwnError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {OWN_QUERY_TIMEOUT:?}"),
            ))),
        };
        if matches!(&result, Err(OwnError::Io(_))) {
            self.discard = true;
        }
        result
    }

    async fn exchange_own(&mut self, sql: &str) -> Result<OwnAnswer, OwnError> {
        let mut out = BytesMut::new();
        protocol::query(&mut out, sql);
        self.send(&out).await?;
        let mut answer = OwnAnswer::default();
        let mut failed: Option<PgError> = None;
        let complete = self
            .read_answers(|message_tag, message| {
                let body = protocol::body(&message);
                match message_tag {
                    tag::ERROR_RESPONSE if failed.is_none() => {
                        let error = PgError::from_server(body);
                        let fatal = error.severity != "ERROR";
                        failed = Some(error);
                        if fatal {
                            return ControlFlow::Break(());
                        }
                    }
                    tag::DATA_ROW => answer.rows.push(protocol::data_row_text(body)),
                    tag::PARAMETER_STATUS => {
                        if let Some((name, value)) = protocol::parameter_status(body) {
                            answer.reported.push((
                                String::from_utf8_lossy(name).into_owned(),
                                String::from_utf8_lossy(value).into_owned(),
                            ));
                        }
                    }
                    _ => {}
                }
                ControlFlow::Continue(())
            })
            .await?;
        match failed {
            // A FATAL ends the connection: the caller cannot use it again.
            Some(error) if !complete => Err(OwnError::Io(std::io::Error::other(error.message))),
            Some(error) => Err(OwnError::Server(error)),
            None => Ok(answer),
        }
    }

    /// Makes the connection fit for another client after one left it mid-transaction or with session state:
    /// ROLLBACK, then DISCARD ALL. An error leaves it unusable.
    pub(crate) async fn clean_up(&mut self, rollback: bool, reset: bool) -> Result<(), OwnError> {
        if rollback {
            self.run_own("ROLLBACK").await?;
        }
        if reset {
            self.run_own("DISCARD ALL").await?;
            self.discarded_all();
        }
        Ok(())
    }
}

/// What the server answered to one of the gateway's own queries.
#[derive(Default, Debug)]
pub struct OwnAnswer {
    /// Each DataRow's columns as text (None for NULL).
    pub rows: Vec<Vec<Option<String>>>,
    /// ParameterStatus messages, in order.
    pub reported: Vec<(String, String)>,
}

/// Why one of the gateway's own queries did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum OwnError {
    /// The connection broke (or the server ended it): it cannot be used again.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server refused the query; the connection is idle again.
    #[error("{}: {}", .0.code, .0.message)]
    Server(PgError),
}

impl OwnError {
    /// The SQLSTATE and message to tell a client about it.
    pub fn code_and_message(self) -> (std::borrow::Cow<'static, str>, String) {
        match self {
            OwnError::Server(error) => (error.code, error.message),
            OwnError::Io(error) => ("08006".into(), error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wal_position_is_read_from_its_row() {
        let mut row = BytesMut::new();
        row.extend_from_slice(&1u16.to_be_bytes());
        row.extend_from_slice(&9i32.to_be_bytes());
        row.extend_from_slice(b"0/16B3748");
        assert_eq!(
            wal_position(&row),
            Some("0/16B3748".parse::<regions::Lsn>().unwrap())
        );
        assert_eq!(wal_position(&row[..8]), None);
        assert_eq!(wal_position(b"\0\x01\xff\xff\xff\xff"), None);
    }
}
