//! What a session tells about its requests: how long each took (histogram, slow-statement log), how many
//! rows it returned, the statement timeout's clock, and the statements the N+1 detector is fed.

use crate::clients::ClientEntry;
use crate::config::Config;
use crate::fingerprint::{self, Recent};
use crate::metrics::METRICS;
use crate::nplus1;
use crate::protocol;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Query's shape, and the range of its message that is its text (found once, used by routing, N+1
/// detection and the session's tracking).
pub struct Query {
    pub shape: fingerprint::ShapeId,
    pub text: std::ops::Range<usize>,
}

pub struct Observer {
    /// When the oldest unanswered request (Query, Sync, FunctionCall) was sent, for the latency histogram
    /// and slow-statement log.
    started: Option<Instant>,
    /// When the last request was answered: the server connection's idle-since when it goes back to the
    /// pool right after, so that a transaction reads the clock twice, not three or four times.
    pub last_answer: Instant,
    /// The statement text of the last Query or Bind, for the slow-statement log.
    last_statement: Option<Bytes>,
    /// DataRows relayed for the current request.
    pub rows: u64,
    /// N+1 detection: whether it is on, and its state, boxed at the first statement (a client that never
    /// runs one does not carry it).
    detecting: bool,
    detector: Option<Box<nplus1::Detector>>,
    /// The shapes of this client's recent Query texts (computing a shape anew costs a lexer pass); boxed on
    /// first use, so that a client that never queries does not carry its 1.8 KB.
    recent_shapes: Option<Box<Recent>>,
    /// The configuration the session follows: `log.slow_statement`, `limits.statement_timeout` and `nplus1`
    /// are read in it (one pointer, where copies of them took 56 bytes of every idle client).
    config: Arc<Config>,
    /// Whether the request in flight was cancelled for `limits.statement_timeout` already.
    pub timed_out: bool,
}

impl Observer {
    pub fn new(config: Arc<Config>) -> Observer {
        Observer {
            started: None,
            last_answer: Instant::now(),
            last_statement: None,
            rows: 0,
            detecting: config.nplus1.enabled,
            detector: None,
            recent_shapes: None,
            config,
            timed_out: false,
        }
    }

    /// A reload: the session follows the new configuration from its next transaction (N+1 detection turned
    /// on or off included).
    pub fn follow(&mut self, config: Arc<Config>) {
        self.detecting = config.nplus1.enabled;
        self.config = config;
    }

    /// `limits.statement_timeout` (zero: none).
    pub fn statement_timeout(&self) -> Duration {
        self.config.limits.statement_timeout
    }

    /// The shape of a Query's text.
    #[inline]
    pub fn shape(&mut self, text: &[u8]) -> fingerprint::ShapeId {
        self.recent_shapes
            .get_or_insert_with(Box::default)
            .shape_id(text)
    }

    /// A whole Query message's shape and where its text is (None: it has no NUL-terminated text).
    #[inline]
    pub fn query(&mut self, message: &[u8]) -> Option<Query> {
        let text = protocol::query_text(protocol::body(message))?;
        let start = protocol::HEADER_LEN;
        Some(Query {
            shape: self.shape(text),
            text: start..start + text.len(),
        })
    }

    /// Whether N+1 detection is on (statements are shaped at Parse for it).
    #[inline]
    pub fn detecting(&self) -> bool {
        self.detecting
    }

    /// Stops feeding the N+1 detector (a replay sends statements the client ran once already); returns what
    /// [`Observer::resume_detection`] restores.
    pub fn pause_detection(&mut self) -> bool {
        std::mem::take(&mut self.detecting)
    }

    pub fn resume_detection(&mut self, detecting: bool) {
        self.detecting = detecting;
    }

    /// A request (Query, Sync, FunctionCall) was sent: its clock starts, unless an older one still runs.
    #[inline]
    pub fn request_sent(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
    }

    /// When the request in flight passes `limits.statement_timeout` (None: no limit, or cancelled already).
    #[inline]
    pub fn deadline(&self) -> Option<Instant> {
        let started = self.started?;
        let timeout = self.config.limits.statement_timeout;
        (!timeout.is_zero() && !self.timed_out).then(|| started + timeout)
    }

    #[inline]
    pub fn set_statement(&mut self, text: Option<Bytes>) {
        self.last_statement = text;
    }

    /// The last statement, shortened for a log line.
    pub fn statement(&self, max: usize) -> String {
        self.last_statement
            .as_deref()
            .map(|s| String::from_utf8_lossy(&s[..s.len().min(max)]).into_owned())
            .unwrap_or_default()
    }

    /// Feeds the N+1 detector one statement about to run; `values` are what tells one run of it from another.
    pub fn statement_runs(
        &mut self,
        shape: u64,
        read: bool,
        text: &Bytes,
        values: &[u8],
        patterns: &nplus1::Patterns,
        entry: &ClientEntry,
    ) {
        if !self.detecting {
            return;
        }
        let detector = self.detector.get_or_insert_with(Box::default);
        let sample = self
            .config
            .nplus1
            .log_parameters
            .then(|| String::from_utf8_lossy(&values[..values.len().min(200)]).into_owned());
        detector.observe(
            nplus1::Statement {
                shape,
                read,
                text,
                values: fingerprint::hash_bytes(values),
                sample,
                // A Query has just started the request clock: no second reading.
                at: self.started.unwrap_or_else(Instant::now),
            },
            &self.config.nplus1,
            patterns,
            &origin(entry),
        );
    }

    /// A client request got its ReadyForQuery: time it, and log it if it was slow. `more` when another
    /// client request is pipelined behind it.
    pub fn answered(
        &mut self,
        replica: bool,
        server: Option<SocketAddr>,
        more: bool,
        entry: &ClientEntry,
    ) {
        self.timed_out = false;
        let Some(started) = self.started.take() else {
            return;
        };
        self.last_answer = Instant::now();
        let elapsed = self.last_answer.saturating_duration_since(started);
        let rows = std::mem::take(&mut self.rows);
        let role = if replica { "replica" } else { "primary" };
        let server = Server(server);
        tracing::debug!(
            duration_ms = regions::millis(elapsed),
            role,
            %server,
            rows,
            statement = %self.statement(200),
            "request"
        );
        METRICS.request_seconds(replica, elapsed.as_secs_f64());
        if elapsed >= self.config.log.slow_statement {
            METRICS.slow_statements.inc();
            tracing::warn!(
                client = %entry.addr,
                user = %entry.user,
                database = %entry.database,
                duration_ms = regions::millis(elapsed),
                %server,
                role,
                statement = self.statement(500),
                "slow statement"
            );
        }
        if !more {
            // The statement's text is a slice of the client's read buffer: held while the client idles, it
            // would keep that buffer's allocation alive (several KB per idle client) and make the next read
            // allocate a new one.
            self.last_statement = None;
        }
        // A pipelined request behind this one has been waiting since now at the latest.
        if more {
            self.started = Some(Instant::now());
        }
    }

    /// The client is idle: nothing kept refers to its read buffer (see [`nplus1::Detector::unpin`]).
    #[inline]
    pub fn unpin(&mut self) {
        if let Some(detector) = self.detector.as_mut() {
            detector.unpin();
        }
    }

    /// The session ends: a run of N+1 statements in progress is reported.
    pub fn finish(&mut self, patterns: &nplus1::Patterns, entry: &ClientEntry) {
        if let Some(mut detector) = self.detector.take() {
            detector.finish(&self.config.nplus1, patterns, &origin(entry));
        }
    }
}

/// A server address for a log line (formatted only when the line is written).
struct Server(Option<SocketAddr>);

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}

/// Who runs a session's statements, for N+1 reports.
fn origin(entry: &ClientEntry) -> nplus1::Origin<'_> {
    nplus1::Origin {
        user: &entry.user,
        application_name: &entry.application_name,
        client: entry.addr,
    }
}
