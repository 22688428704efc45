//! Insert batching: group commit at the gateway.
//!
//! Autocommit single-row `INSERT … VALUES (…)` statements into the tables listed in `batching.tables` are not
//! sent to the primary one by one. Rows with the same database, user, session settings, table, column list and
//! parameter types queue together and go out as one multi-row INSERT, so PostgreSQL plans, executes and commits
//! (flushes WAL) once per batch. Each client is answered only when that statement has committed.
//!
//! A row with nothing to batch with (no row of its kind queued, no batch of its kind committing) is not queued:
//! it runs on its client's own connection as if batching were off ([`alone`]), so a few clients wait for
//! nobody and pay nothing for batching. Past `connections` such rows at once, rows queue: a batch leaves at once
//! when no batch of its kind is in flight; otherwise its rows gather while the batches in flight commit, and the
//! next one leaves when one of them finishes, when `max_rows` or `max_bytes` is reached, or when its oldest row
//! has waited `max_delay`.
//!
//! When a batch fails, nothing of it was committed (one statement is atomic), so its rows are run again, each
//! alone and exactly as its client sent it, and every client gets exactly its own outcome: its own success or
//! its own error. If the connection to the primary is lost while a batch runs, whether it committed is unknown;
//! its clients get an error saying so, as a client that lost its own connection during COMMIT would, and
//! nothing is run again (that could insert a row twice).
//!
//! This module knows statements, queues and the primary's connections; the session decides what to hand it.

use crate::metrics::METRICS;
use crate::pool::{Lease, Pool, Settings};
use crate::protocol::{self, tag, PgError};
use crate::server::{self, ServerConn, WAL_POSITION};
use crate::Shared;
use bytes::{BufMut, Bytes, BytesMut};
use regions::{Lsn, ServerUrl};
use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// PostgreSQL accepts at most this many parameters in one statement (the Bind message counts them in 16 bits).
const MAX_PARAMETERS: usize = 65_535;

/// A batchable INSERT, as its text says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The table, folded as PostgreSQL folds identifiers (`public.events`, `events`).
    pub table: Arc<str>,
    /// The column list, folded (`a,b`); empty when the statement names none.
    pub columns: Arc<str>,
    /// The text before the row: `INSERT INTO events (a, b) VALUES `.
    pub prefix: Arc<str>,
    /// The row: `($1, $2)` or `(1, 'x')`.
    pub tuple: Arc<str>,
    /// The highest parameter number in the row (0 when it holds only literals).
    pub params: usize,
    /// `events (a, b)` as written, when the statement names its columns: what a COPY of such rows targets.
    pub copy_target: Option<Arc<str>>,
    /// The row is exactly `($1, …, $n)`: parameter i fills column i.
    pub plain_params: bool,
    /// The row holds only quoted strings and NULLs: the row as a line of COPY text (without the newline).
    pub copy_line: Option<Arc<str>>,
}

/// How a batch is sent: COPY when its rows map one to one onto the columns (measured: a 500-row batch takes
/// PostgreSQL about a sixth of the time as COPY than as a multi-row INSERT, which must parse and plan every
/// row's expressions), else one multi-row INSERT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyForm {
    /// A multi-row INSERT.
    Values,
    /// COPY in text format: rows of quoted strings and NULLs, or text-format parameters.
    Text,
    /// COPY in binary format: binary parameters, whose types the server inferred from the columns (the client
    /// declared none), so their bytes are what COPY expects for those columns.
    Binary,
}

/// Reads a statement as a batchable INSERT into one of `tables`: exactly `INSERT INTO name [(columns)] VALUES
/// (one row)` and at most a `;` after the row, so no RETURNING, no ON CONFLICT, no CTE, no OVERRIDING, no alias
/// and no parameters outside the row. Anything else is not batched.
///
/// A strict reading of tokens rather than a parse: every word outside the row is checked, and what the row
/// holds is the server's to judge (a row it rejects fails its batch, and then only itself). The lexer knows
/// PostgreSQL's quoting, so a parenthesis or keyword inside a string or comment is never taken for syntax.
pub fn analyze(text: &[u8], tables: &[String]) -> Option<Insert> {
    if tables.is_empty() {
        return None;
    }
    let mut at = 0;
    if !keyword(text, &mut at, "insert") || !keyword(text, &mut at, "into") {
        return None;
    }
    let target_start = crate::lexer::skip_space(text, at);
    let table = name(text, &mut at, true)?;
    if !enabled(&table, tables) {
        return None;
    }
    at = crate::lexer::skip_space(text, at);
    let mut columns = Vec::new();
    if text.get(at) == Some(&b'(') {
        at += 1;
        loop {
            columns.push(name(text, &mut at, false)?);
            at = crate::lexer::skip_space(text, at);
            match text.get(at) {
                Some(b',') => at += 1,
                Some(b')') => {
                    at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    let target_end = at;
    if !keyword(text, &mut at, "values") {
        return None;
    }
    let open = crate::lexer::skip_space(text, at);
    let sql = std::str::from_utf8(text).ok()?;
    let head = Insert {
        table: table.into(),
        prefix: sql[..open].into(),
        copy_target: (!columns.is_empty()).then(|| sql[target_start..target_end].trim().into()),
        columns: columns.join(",").into(),
        tuple: Arc::from(""),
        params: 0,
        plain_params: false,
        copy_line: None,
    };
    with_row(sql, &head)
}

/// [`analyze`], for a client that sends the same INSERT again with other values: when `text` begins with
/// `like`'s text up to its row, byte for byte, everything before the row reads the same, and only the row is
/// read anew.
pub fn analyze_like(text: &[u8], tables: &[String], like: Option<&Insert>) -> Option<Insert> {
    match like {
        Some(like) if text.starts_with(like.prefix.as_bytes()) && enabled(&like.table, tables) => {
            // The same bytes up to the row, but not a row where it was (`VALUES(1)`, then `VALUES (2)`).
            with_row(std::str::from_utf8(text).ok()?, like).or_else(|| analyze(text, tables))
        }
        _ => analyze(text, tables),
    }
}

/// The INSERT whose text before the row is `head.prefix`, with the row that follows it in `sql`.
fn with_row(sql: &str, head: &Insert) -> Option<Insert> {
    let text = sql.as_bytes();
    let (tuple, params) = row_tuple(text, head.prefix.len())?;
    let elements = row_elements(text, tuple.clone());
    let plain_params = elements.iter().enumerate().all(|(i, e)| {
        sql[e.clone()]
            .strip_prefix('$')
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()) && n.parse() == Ok(i + 1))
    });
    Some(Insert {
        table: head.table.clone(),
        prefix: head.prefix.clone(),
        tuple: sql[tuple].into(),
        params,
        copy_target: head.copy_target.clone(),
        columns: head.columns.clone(),
        plain_params,
        copy_line: copy_line(sql, &elements).map(Into::into),
    })
}

/// The top-level elements of the row at `tuple` (inside its parentheses, split at commas), trimmed.
fn row_elements(text: &[u8], tuple: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
    let mut elements = Vec::new();
    let (mut i, end) = (tuple.start + 1, tuple.end - 1);
    let mut depth = 0usize;
    let mut start = crate::lexer::skip_space(text, i);
    let mut last = start;
    while i < end {
        i = crate::lexer::skip_space(text, i);
        if i >= end {
            break;
        }
        let token_end = crate::lexer::token_end(text, i);
        match text[i] {
            b'(' | b'[' => depth += 1,
            b')' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                elements.push(start..last);
                start = crate::lexer::skip_space(text, i + 1);
                last = start;
                i += 1;
                continue;
            }
            _ => {}
        }
        last = token_end;
        i = token_end;
    }
    elements.push(start..last);
    elements
}

/// The row as a line of COPY text, when every element is a standard quoted string without backslashes (read by
/// the column's input function, exactly as COPY reads a field) or NULL. Anything else — numbers, casts,
/// expressions, escapes — is left to a multi-row INSERT, whose meaning for it can differ from COPY's.
fn copy_line(sql: &str, elements: &[std::ops::Range<usize>]) -> Option<String> {
    let mut line = Vec::new();
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            line.push(b'\t');
        }
        let text = &sql[element.clone()];
        if text.eq_ignore_ascii_case("null") {
            line.extend_from_slice(b"\\N");
            continue;
        }
        let inner = text.strip_prefix('\'')?.strip_suffix('\'')?;
        if inner.contains('\\') || crate::lexer::token_end(text.as_bytes(), 0) != text.len() {
            return None;
        }
        if inner.contains('\'') {
            copy_escape(&mut line, inner.replace("''", "'").as_bytes());
        } else {
            copy_escape(&mut line, inner.as_bytes());
        }
    }
    String::from_utf8(line).ok()
}

/// Appends a field to a line of COPY text, escaping what COPY would read as syntax. Byte by byte: the
/// bytes are in the session's client encoding, which need not be UTF-8, and pass through unchanged.
fn copy_escape(line: &mut Vec<u8>, value: &[u8]) {
    for &byte in value {
        match byte {
            b'\\' => line.extend_from_slice(b"\\\\"),
            b'\t' => line.extend_from_slice(b"\\t"),
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            other => line.push(other),
        }
    }
}

/// Whether `table` (folded, maybe schema-qualified) is enabled: an entry with a schema must match exactly; one
/// without matches the table in any schema.
pub fn enabled(table: &str, tables: &[String]) -> bool {
    let bare = table.rsplit('.').next().unwrap_or(table);
    tables
        .iter()
        .any(|entry| entry == table || (!entry.contains('.') && entry == bare))
}

/// Consumes the keyword `word` (any case) at `at`, after white space and comments.
fn keyword(text: &[u8], at: &mut usize, word: &str) -> bool {
    let start = crate::lexer::skip_space(text, *at);
    if start >= text.len() {
        return false;
    }
    let end = crate::lexer::token_end(text, start);
    if text[start..end].eq_ignore_ascii_case(word.as_bytes()) {
        *at = end;
        true
    } else {
        false
    }
}

/// Consumes an identifier (or, with `qualified`, a dotted name) at `at`, folded as PostgreSQL folds it:
/// unquoted parts to lower case, quoted parts as written.
fn name(text: &[u8], at: &mut usize, qualified: bool) -> Option<String> {
    let mut folded = String::new();
    loop {
        let start = crate::lexer::skip_space(text, *at);
        let first = *text.get(start)?;
        let end = crate::lexer::token_end(text, start);
        if first == b'"' {
            let inner = text.get(start + 1..end.checked_sub(1)?)?;
            if end <= start + 1 || text[end - 1] != b'"' {
                return None;
            }
            let inner = std::str::from_utf8(inner).ok()?;
            if inner.contains('"') {
                folded.push_str(&inner.replace("\"\"", "\""));
            } else {
                folded.push_str(inner);
            }
        } else if first.is_ascii_alphabetic() || first == b'_' || first >= 0x80 {
            // PostgreSQL folds only ASCII letters in a multibyte encoding (downcase_identifier).
            let part = std::str::from_utf8(&text[start..end]).ok()?;
            let from = folded.len();
            folded.push_str(part);
            folded[from..].make_ascii_lowercase();
        } else {
            return None;
        }
        *at = end;
        let next = crate::lexer::skip_space(text, *at);
        if qualified && text.get(next) == Some(&b'.') {
            *at = next + 1;
            folded.push('.');
            continue;
        }
        return Some(folded);
    }
}

/// The row starting with the `(` at `open`: its range and highest parameter number. None unless only white
/// space, comments and one `;` follow it.
fn row_tuple(text: &[u8], open: usize) -> Option<(std::ops::Range<usize>, usize)> {
    if text.get(open) != Some(&b'(') {
        return None;
    }
    let mut i = open;
    let mut depth = 0usize;
    let mut params = 0;
    let close = loop {
        i = crate::lexer::skip_space(text, i);
        if i >= text.len() {
            return None;
        }
        let end = crate::lexer::token_end(text, i);
        match text[i] {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    break end;
                }
            }
            b'$' => {
                let digits = text[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                if digits > 0 {
                    let n: usize = std::str::from_utf8(&text[i + 1..i + 1 + digits])
                        .ok()?
                        .parse()
                        .ok()?;
                    params = params.max(n);
                    i += 1 + digits;
                    continue;
                }
            }
            _ => {}
        }
        i = end;
    };
    let mut rest = crate::lexer::skip_space(text, close);
    if text.get(rest) == Some(&b';') {
        rest = crate::lexer::skip_space(text, rest + 1);
    }
    (rest == text.len()).then_some((open..close, params))
}

/// Appends `tuple` with every parameter `$n` renumbered `$(n + offset)`; quoted text and comments untouched.
fn push_renumbered(out: &mut String, tuple: &str, offset: usize) {
    if offset == 0 {
        out.push_str(tuple);
        return;
    }
    let text = tuple.as_bytes();
    let mut copied = 0;
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'$' && text.get(i + 1).is_some_and(u8::is_ascii_digit) {
            let digits = text[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            let n: usize = tuple[i + 1..i + 1 + digits].parse().unwrap_or(0);
            out.push_str(&tuple[copied..i]);
            out.push('$');
            out.push_str(&(n + offset).to_string());
            i += 1 + digits;
            copied = i;
            continue;
        }
        i = crate::lexer::token_end(text, i);
    }
    out.push_str(&tuple[copied..]);
}

/// Which rows may share a batch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub database: Arc<str>,
    pub user: Arc<str>,
    /// The session's settings that can change what a row means (TimeZone, DateStyle, search_path, …), so that
    /// a batch runs with the settings each of its rows was written under.
    pub settings: SettingsKey,
    pub table: Arc<str>,
    pub columns: Arc<str>,
    /// Extended protocol: the parameter types as the client declared them (0: let the server infer), one per
    /// parameter. None for rows with literal values (simple protocol).
    pub types: Option<Vec<u32>>,
    pub copy: CopyForm,
}

impl CopyForm {
    fn label(self) -> &'static str {
        match self {
            CopyForm::Values => "values",
            CopyForm::Text => "copy_text",
            CopyForm::Binary => "copy_binary",
        }
    }
}

impl Key {
    /// How rows of this key are sent, given a row's parameter formats (extended protocol).
    pub fn copy_form(insert: &Insert, types: Option<&[u32]>, formats: &[i16]) -> CopyForm {
        if insert.copy_target.is_none() {
            return CopyForm::Values;
        }
        match types {
            None if insert.copy_line.is_some() => CopyForm::Text,
            None => CopyForm::Values,
            Some(types) if !insert.plain_params || types.iter().any(|&t| t != 0) => {
                CopyForm::Values
            }
            Some(_) if formats.iter().all(|&f| f == 1) => CopyForm::Binary,
            Some(_) if formats.iter().all(|&f| f == 0) => CopyForm::Text,
            Some(_) => CopyForm::Values,
        }
    }
}

/// Session settings as part of a batch key, hashed once per session instead of once per row.
#[derive(Clone, Debug)]
pub struct SettingsKey {
    hash: u64,
    pub settings: Settings,
}

impl SettingsKey {
    pub fn new(settings: Settings) -> SettingsKey {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hash = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(&*settings);
        SettingsKey { hash, settings }
    }
}

impl PartialEq for SettingsKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.settings, &other.settings) || self.settings == other.settings)
    }
}

impl Eq for SettingsKey {}

impl std::hash::Hash for SettingsKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// A row's values.
pub enum Values {
    /// Simple protocol: they are literals in the row's tuple.
    Literal,
    /// Extended protocol: a format code per parameter and the parameter values as Bind carries them
    /// (length-prefixed, -1 for NULL), passed on byte for byte.
    Bound { formats: Vec<i16>, values: Bytes },
}

/// One client's row.
pub struct Row {
    pub insert: Arc<Insert>,
    pub values: Values,
    /// The client's own messages for this row, to run it alone if its batch fails: a Query, or Parse, Bind,
    /// [Describe], Execute, Sync with the unnamed statement and portal.
    pub alone: Bytes,
    /// The client did not send a Parse (it bound a statement prepared earlier): when the row runs alone, the
    /// server's ParseComplete is not the client's.
    pub drop_parse_complete: bool,
}

impl Row {
    fn bytes(&self) -> usize {
        self.insert.tuple.len()
            + match &self.values {
                Values::Literal => 0,
                Values::Bound { values, formats } => values.len() + 2 * formats.len(),
            }
    }
}

/// What became of a row.
pub enum Outcome {
    /// Committed with its batch: the client gets `INSERT 0 1`. With the primary's WAL position after the
    /// commit when read-your-writes needs it.
    Committed(Option<Lsn>),
    /// The row ran alone; the server's answers, ending with ReadyForQuery, go to the client as they are.
    Answered(Bytes, Option<Lsn>),
    /// No answer from the server: the client gets this error.
    Failed(PgError),
}

/// A row waiting in a queue. Dropping it (answered or not) frees its slot.
struct Queued {
    row: Row,
    reply: oneshot::Sender<Outcome>,
    arrived: Instant,
    _slot: OwnedSemaphorePermit,
}

/// The rows of one key, and its flushes in flight. Kept while idle (a lone client's rows would otherwise make
/// and drop one per row); idle queues are swept when there are many keys.
pub struct Queue {
    key: Key,
    state: Mutex<QueueState>,
    /// `regiongate_batched_rows_total{table, outcome="alone"}`, looked up once.
    alone_rows: prometheus::IntCounter,
    /// The flush pool last used, with the reload generation it was found in.
    pool: Mutex<Option<(u64, FlushPool)>>,
}

impl Queue {
    pub fn key(&self) -> &Key {
        &self.key
    }

    fn new(key: Key) -> Arc<Queue> {
        let alone_rows = METRICS
            .batched_rows
            .with_label_values(&[&*key.table, "alone"]);
        Arc::new(Queue {
            key,
            state: Mutex::default(),
            alone_rows,
            pool: Mutex::default(),
        })
    }

    /// Nothing queued or running, and nobody but the batcher's map holds it.
    fn is_idle(self: &Arc<Self>) -> bool {
        if Arc::strong_count(self) > 1 {
            return false;
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.rows.is_empty() && state.in_flight == 0 && state.alone == 0 && !state.timer
    }
}

/// Idle queues are swept when a new key would make more than this many.
const MAX_IDLE_QUEUES: usize = 256;

#[derive(Default)]
struct QueueState {
    rows: VecDeque<Queued>,
    bytes: usize,
    /// Batches committing.
    in_flight: usize,
    /// Rows running alone on their clients' connections.
    alone: usize,
    timer: bool,
}

/// A pool flushes run on, and a permit per connection that a flush holds while it runs.
type FlushPool = (Arc<Pool>, Arc<Semaphore>);

/// The batcher: queues by key, and the dedicated pools its flushes use.
pub struct Batcher {
    queues: Mutex<HashMap<Key, Arc<Queue>>>,
    pools: Mutex<HashMap<crate::pool::PoolKey, FlushPool>>,
    /// Bounds the rows queued or in flight over all keys: when none is left, new rows wait (backpressure).
    slots: Arc<Semaphore>,
}

impl Batcher {
    pub fn new(max_queued_rows: usize) -> Batcher {
        Batcher {
            queues: Mutex::default(),
            pools: Mutex::default(),
            slots: Arc::new(Semaphore::new(max_queued_rows.max(1))),
        }
    }

    /// Rows queued or being flushed right now.
    pub fn queued(&self) -> usize {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|q| q.state.lock().unwrap_or_else(|p| p.into_inner()).rows.len())
            .sum()
    }

    /// Rows running alone on their clients' connections right now (lanes taken).
    pub fn running_alone(&self) -> usize {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|q| q.state.lock().unwrap_or_else(|p| p.into_inner()).alone)
            .sum()
    }
}

/// Queues a row, waiting for room when the queues are full. Dropping the returned receiver before the row is
/// taken into a batch withdraws it; once taken, it runs. Cancel-safe: dropped while waiting, nothing is queued.
pub async fn submit(
    shared: &Arc<Shared>,
    queue: Arc<Queue>,
    row: Row,
) -> oneshot::Receiver<Outcome> {
    let batcher = &shared.batcher;
    let slot = match batcher.slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            METRICS.batch_queue_full.inc();
            batcher
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the batcher's semaphore is never closed")
        }
    };
    let (reply, receiver) = oneshot::channel();
    {
        let mut state = queue.state.lock().unwrap_or_else(|p| p.into_inner());
        state.bytes += row.bytes();
        state.rows.push_back(Queued {
            row,
            reply,
            arrived: Instant::now(),
            _slot: slot,
        });
    }
    poke(shared, &queue);
    receiver
}

/// A row running alone on its client's own connection. Dropped when its client's exchange is over.
pub struct Alone {
    queue: Arc<Queue>,
}

/// Whether a row of `key` may skip the queue and run on its client's own connection, as if batching were
/// off: when no row of its kind is queued and no batch of its kind is committing, there is nothing to batch it
/// with, and the queue, the flush task and the batch connection would only make its client slower. At most
/// `batching.connections` rows of a key run alone at once; past that, rows queue and batches form (they do not
/// wait for rows running alone).
pub fn alone(shared: &Arc<Shared>, queue: &Arc<Queue>) -> Option<Alone> {
    let config = shared.config.load();
    if !config.batching.alone {
        return None;
    }
    let lanes = config.batching.connections;
    {
        let mut state = queue.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.rows.is_empty() || state.in_flight > 0 || state.alone >= lanes {
            return None;
        }
        state.alone += 1;
    }
    queue.alone_rows.inc();
    Some(Alone {
        queue: queue.clone(),
    })
}

impl Drop for Alone {
    fn drop(&mut self) {
        self.queue
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alone -= 1;
    }
}

impl Batcher {
    /// The queue of `key`, made when there is none.
    pub fn queue(&self, key: Key) -> Arc<Queue> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = queues.get(&key) {
            return queue.clone();
        }
        // At 256 keys, and again each time the count doubles (so that live keys do not make every new key
        // pay for a sweep).
        if queues.len() >= MAX_IDLE_QUEUES && queues.len().is_power_of_two() {
            queues.retain(|_, queue| !queue.is_idle());
        }
        let queue = Queue::new(key.clone());
        queues.insert(key, queue.clone());
        queue
    }
}

/// Starts the batches that are due.
fn poke(shared: &Arc<Shared>, queue: &Arc<Queue>) {
    let config = shared.config.load();
    let limits = &config.batching;
    let per_batch = match &queue.key.types {
        Some(types) if !types.is_empty() => limits.max_rows.min(MAX_PARAMETERS / types.len()),
        _ => limits.max_rows,
    }
    .max(1);
    let mut state = queue.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        // Rows whose client left before their batch was formed are dropped unanswered.
        while state.rows.front().is_some_and(|q| q.reply.is_closed()) {
            let gone = state.rows.pop_front().expect("checked");
            state.bytes -= gone.row.bytes();
        }
        let Some(oldest) = state.rows.front().map(|q| q.arrived) else {
            return;
        };
        let full = state.rows.len() >= per_batch || state.bytes >= limits.max_bytes;
        let deadline = oldest + limits.max_delay;
        let due = state.in_flight == 0 || full || Instant::now() >= deadline;
        if due && state.in_flight < limits.connections {
            let mut rows = Vec::with_capacity(state.rows.len().min(per_batch));
            let mut bytes = 0;
            while rows.len() < per_batch && (rows.is_empty() || bytes < limits.max_bytes) {
                let Some(next) = state.rows.pop_front() else {
                    break;
                };
                let size = next.row.bytes();
                state.bytes -= size;
                if next.reply.is_closed() {
                    continue;
                }
                bytes += size;
                rows.push(next);
            }
            if rows.is_empty() {
                continue;
            }
            state.in_flight += 1;
            tokio::spawn(flush(shared.clone(), queue.clone(), rows, bytes));
            continue;
        }
        if !due && !state.timer {
            state.timer = true;
            let (shared, queue) = (shared.clone(), queue.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline.into()).await;
                queue.state.lock().unwrap_or_else(|p| p.into_inner()).timer = false;
                poke(&shared, &queue);
            });
        }
        return;
    }
}

/// Runs one batch and answers its rows, then lets the queue start the next.
async fn flush(shared: Arc<Shared>, queue: Arc<Queue>, rows: Vec<Queued>, bytes: usize) {
    let started = Instant::now();
    let waited = started.duration_since(rows[0].arrived);
    let count = rows.len();
    let key = &queue.key;
    if shared.is_paused() {
        shared.wait_unpaused().await;
    }
    let fail = |rows: Vec<Queued>, error: PgError| {
        for queued in rows {
            let _ = queued.reply.send(Outcome::Failed(error.clone()));
        }
        Flushed::Failed(error.message)
    };
    let result = match shared.regions().writer() {
        // Rows queued while a primary took writes: none goes to a node that does not take them now.
        regions::Writer::Refused { why } => fail(
            rows,
            PgError::error(
                "57P03",
                format!("regiongate: cannot insert this row: {why}"),
            ),
        ),
        regions::Writer::Node { url, .. } => {
            let (pool, permits) = queue.flush_pool(&shared, &url);
            // Wait for one of the database and user's flush connections without a deadline: while batches
            // are slow (a locked table), rows wait as their clients' own inserts would, instead of failing at
            // the pool's checkout timeout.
            let _permit = permits.acquire_owned().await;
            match pool.checkout().await {
                Ok(lease) => {
                    let position =
                        shared.has_replicas() && shared.regions().routing.read_your_writes;
                    run(lease, key, rows, position).await
                }
                Err(error) => fail(
                    rows,
                    PgError::error(
                        "08006",
                        format!("regiongate: cannot insert this row: {error}"),
                    ),
                ),
            }
        }
    };
    let took = started.elapsed();
    let table = &*key.table;
    METRICS.batch_rows.observe(count as f64);
    METRICS.batch_flush_seconds.observe(took.as_secs_f64());
    METRICS.batch_wait_seconds.observe(waited.as_secs_f64());
    let outcome = result.label();
    METRICS
        .batched_rows
        .with_label_values(&[table, outcome])
        .inc_by(count as u64);
    let form = key.copy.label();
    METRICS
        .batches
        .with_label_values(&[table, form, outcome])
        .inc();
    let (wait_us, duration_us) = (waited.as_micros() as u64, took.as_micros() as u64);
    match result {
        Flushed::Committed => tracing::debug!(
            table,
            form,
            rows = count,
            bytes,
            wait_us,
            duration_us,
            outcome,
            "batch flushed"
        ),
        // one_by_one: the batch failed and its rows ran alone; lost: its clients were told the outcome is
        // unknown.
        Flushed::OneByOne { error } | Flushed::Failed(error) => tracing::warn!(
            table,
            form,
            rows = count,
            bytes,
            wait_us,
            duration_us,
            outcome,
            %error,
            "batch failed"
        ),
    }
    {
        let mut state = queue.state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_flight -= 1;
        if state.rows.is_empty() {
            return;
        }
    }
    poke(&shared, &queue);
}

impl Queue {
    /// [`batch_pool`], remembered until a reload or a new primary.
    fn flush_pool(&self, shared: &Shared, primary: &ServerUrl) -> FlushPool {
        let generation = shared.generation();
        let mut cached = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((seen, (pool, permits)))
                if *seen == generation && pool.key.server == *primary && !pool.is_retired() =>
            {
                (pool.clone(), permits.clone())
            }
            _ => {
                let found = batch_pool(shared, primary, &self.key.database, &self.key.user);
                *cached = Some((generation, found.clone()));
                found
            }
        }
    }
}

/// The pool batches of a database and user run on: the primary's, apart from the clients' pools so that
/// flushes never wait behind client transactions (nor the reverse); with a permit per connection, which a
/// flush holds while it runs.
fn batch_pool(shared: &Shared, primary: &ServerUrl, database: &str, user: &str) -> FlushPool {
    let config = shared.config.load();
    let key = crate::pool::PoolKey {
        server: primary.clone(),
        database: database.to_string(),
        user: user.to_string(),
    };
    let mut pools = shared
        .batcher
        .pools
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // A reload or a failover may have moved the primary, or a reload resized the pools: those pools are
    // replaced, and retired (their connections close as their flushes end), so that a queue that remembers one
    // (`Queue::flush_pool`) takes the new one.
    pools.retain(|k, (pool, _)| {
        let keep = k.server == key.server
            && pool.config().size == config.batching.connections
            && pool.tls() == &config.server_tls;
        if !keep {
            pool.retire();
        }
        keep
    });
    if let Some((pool, permits)) = pools.get(&key) {
        return (pool.clone(), permits.clone());
    }
    let pool_config = crate::config::PoolConfig {
        size: config.batching.connections,
        min_idle: 0,
        ..config.pool.clone()
    };
    let pool = Pool::new(
        key.clone(),
        shared.server_credentials(&key.server, user),
        pool_config,
    );
    crate::pool::spawn_maintenance(&pool);
    let permits = Arc::new(Semaphore::new(config.batching.connections));
    pools.insert(key, (pool.clone(), permits.clone()));
    (pool, permits)
}

/// How a batch ended.
enum Flushed {
    Committed,
    /// The batch failed as a whole; its rows ran one by one.
    OneByOne {
        error: String,
    },
    /// The connection broke: the clients were told the outcome is unknown.
    Failed(String),
}

impl Flushed {
    fn label(&self) -> &'static str {
        match self {
            Flushed::Committed => "committed",
            Flushed::OneByOne { .. } => "one_by_one",
            Flushed::Failed(_) => "lost",
        }
    }
}

/// Runs a batch as one statement on `lease`; if it fails, runs its rows one by one. With `position`, reads
/// the WAL position after it for read-your-writes: its clients' next reads wait for a replica that has the
/// rows. The position query goes in the same write as the batch: no extra round trip.
async fn run(mut lease: Lease, key: &Key, rows: Vec<Queued>, position: bool) -> Flushed {
    let conn = lease.conn();
    let result = async {
        let mut settings = key.settings.settings.clone();
        if conn.settings_differ(&mut settings) {
            // The settings came from the clients' own sessions, where they worked.
            conn.replay_settings(&settings)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let mut out = BytesMut::new();
        batch_statement(&mut out, key, &rows);
        if position {
            protocol::query(&mut out, WAL_POSITION);
        }
        conn.send(&out).await?;
        let answer = read_answer(conn).await?;
        let lsn = if position {
            read_answer(conn).await?.lsn()
        } else {
            None
        };
        Ok((answer, lsn))
    }
    .await;
    let lost = |error: std::io::Error, rows: Vec<Queued>| {
        let error = PgError::error(
            "08006",
            format!(
                "regiongate: the connection to the primary was lost while this row's batch was committing \
                 ({error}); it may or may not have been inserted"
            ),
        );
        for queued in rows {
            let _ = queued.reply.send(Outcome::Failed(error.clone()));
        }
        Flushed::Failed(error.message)
    };
    let (answer, lsn) = match result {
        Ok(answer) => answer,
        // The lease is dropped, not released: the connection closes.
        Err(error) => return lost(error, rows),
    };
    let Some(error) = answer.error else {
        if answer.inserted != Some(rows.len() as u64) {
            // A BEFORE ROW trigger can skip rows; which ones, a multi-row statement does not say.
            tracing::warn!(
                table = %key.table,
                rows = rows.len(),
                inserted = ?answer.inserted,
                "a batch inserted a different number of rows than it had (a trigger skipped some?)"
            );
        }
        for queued in rows {
            let _ = queued.reply.send(Outcome::Committed(lsn));
        }
        lease.release();
        return Flushed::Committed;
    };
    // Nothing of the batch was committed. Run each row alone, as its client sent it, all in one round trip:
    // each ends with its own Sync or is its own Query, so one row's error does not stop the next.
    let conn = lease.conn();
    let mut out = BytesMut::new();
    for queued in &rows {
        out.extend_from_slice(&queued.row.alone);
    }
    if position {
        protocol::query(&mut out, WAL_POSITION);
    }
    if let Err(io) = conn.send(&out).await {
        return lost(io, rows);
    }
    let mut answers = Vec::with_capacity(rows.len());
    for _ in 0..rows.len() {
        match read_answer(conn).await {
            Ok(answer) => answers.push(answer.bytes),
            Err(io) => return lost(io, rows),
        }
    }
    let lsn = if position {
        match read_answer(conn).await {
            Ok(answer) => answer.lsn(),
            Err(io) => return lost(io, rows),
        }
    } else {
        None
    };
    for (queued, mut answer) in rows.into_iter().zip(answers) {
        if queued.row.drop_parse_complete && answer.first() == Some(&tag::PARSE_COMPLETE) {
            let _ = answer.split_to(5);
        }
        let _ = queued.reply.send(Outcome::Answered(answer.freeze(), lsn));
    }
    lease.release();
    Flushed::OneByOne { error }
}

/// The batch as one statement: a simple Query with the literal rows, or Parse/Bind/Execute/Sync with every
/// row's parameters renumbered into one parameter list.
fn batch_statement(out: &mut BytesMut, key: &Key, rows: &[Queued]) {
    let first = &rows[0].row.insert;
    if let (CopyForm::Text | CopyForm::Binary, Some(target)) = (key.copy, &first.copy_target) {
        return copy_statement(out, key.copy, target, rows);
    }
    let mut sql = String::with_capacity(
        first.prefix.len()
            + rows
                .iter()
                .map(|q| q.row.insert.tuple.len() + 8)
                .sum::<usize>(),
    );
    sql.push_str(&first.prefix);
    let per_row = key.types.as_ref().map_or(0, Vec::len);
    for (i, queued) in rows.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        push_renumbered(&mut sql, &queued.row.insert.tuple, i * per_row);
    }
    let Some(types) = &key.types else {
        protocol::query(out, &sql);
        return;
    };
    protocol::message(out, tag::PARSE, |out| {
        protocol::put_cstr(out, b"");
        protocol::put_cstr(out, sql.as_bytes());
        out.put_i16((types.len() * rows.len()) as i16);
        for _ in rows {
            for &oid in types {
                out.put_u32(oid);
            }
        }
    });
    protocol::message(out, tag::BIND, |out| {
        protocol::put_cstr(out, b"");
        protocol::put_cstr(out, b"");
        out.put_i16((per_row * rows.len()) as i16);
        for queued in rows {
            if let Values::Bound { formats, .. } = &queued.row.values {
                for &format in formats {
                    out.put_i16(format);
                }
            }
        }
        out.put_i16((per_row * rows.len()) as i16);
        for queued in rows {
            if let Values::Bound { values, .. } = &queued.row.values {
                out.put_slice(values);
            }
        }
        out.put_i16(0);
    });
    protocol::execute(out, b"", 0);
    protocol::sync(out);
}

/// The batch as COPY … FROM STDIN: the Query, one CopyData with every row, CopyDone, in one write. Should the
/// COPY fail before it starts, the server drops the copy messages that follow (protocol docs, "COPY
/// Operations").
fn copy_statement(out: &mut BytesMut, form: CopyForm, target: &str, rows: &[Queued]) {
    let binary = form == CopyForm::Binary;
    let format = if binary { " (FORMAT binary)" } else { "" };
    protocol::query(out, &format!("COPY {target} FROM STDIN{format}"));
    let at = protocol::start(out, tag::COPY_DATA);
    if binary {
        // Signature, flags, header extension length ("Binary Format" in the COPY documentation).
        out.put_slice(b"PGCOPY\n\xff\r\n\0");
        out.put_i32(0);
        out.put_i32(0);
    }
    let mut line = Vec::new();
    for queued in rows {
        match &queued.row.values {
            Values::Literal => {
                if let Some(copy_line) = &queued.row.insert.copy_line {
                    out.put_slice(copy_line.as_bytes());
                    out.put_u8(b'\n');
                }
            }
            Values::Bound { formats, values } if binary => {
                // A tuple is its field count and then each field as Bind carries it: length, bytes.
                out.put_i16(formats.len() as i16);
                out.put_slice(values);
            }
            Values::Bound { values, .. } => {
                line.clear();
                let mut rest = &values[..];
                let mut first = true;
                while rest.len() >= 4 {
                    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    rest = &rest[4..];
                    if !first {
                        line.push(b'\t');
                    }
                    first = false;
                    if len < 0 {
                        line.extend_from_slice(b"\\N");
                        continue;
                    }
                    let len = (len as usize).min(rest.len());
                    copy_escape(&mut line, &rest[..len]);
                    rest = &rest[len..];
                }
                line.push(b'\n');
                out.put_slice(&line);
            }
        }
    }
    if binary {
        out.put_i16(-1);
    }
    protocol::finish(out, at);
    protocol::copy_done(out);
}

/// The answers to one request, up to and including its ReadyForQuery.
struct Answer {
    bytes: BytesMut,
    error: Option<String>,
    inserted: Option<u64>,
}

impl Answer {
    /// The WAL position in the answer to [`WAL_POSITION`]: its DataRow.
    fn lsn(&self) -> Option<Lsn> {
        let mut rest = &self.bytes[..];
        while let Some(Ok((message_tag, len))) = protocol::peek_header(rest) {
            let message = rest.get(..len)?;
            if message_tag == tag::DATA_ROW {
                return server::wal_position(protocol::body(message));
            }
            rest = &rest[len..];
        }
        None
    }
}

/// Reads the answers to one request (up to ReadyForQuery): what its clients get, its error, how many rows it
/// inserted.
async fn read_answer(conn: &mut ServerConn) -> std::io::Result<Answer> {
    let mut answer = Answer {
        bytes: BytesMut::new(),
        error: None,
        inserted: None,
    };
    conn.read_answers(|message_tag, message| {
        match message_tag {
            tag::ERROR_RESPONSE => {
                let (code, text) = protocol::error_fields(protocol::body(&message));
                answer.error = Some(format!("{code}: {text}"));
            }
            tag::COMMAND_COMPLETE => {
                answer.inserted = protocol::cstr(protocol::body(&message))
                    .and_then(|(command, _)| std::str::from_utf8(command).ok())
                    .and_then(|command| command.rsplit(' ').next()?.parse().ok());
            }
            // The batch's own notices and parameter changes belong to no one client.
            tag::PARAMETER_STATUS | tag::NOTICE_RESPONSE | tag::NOTIFICATION_RESPONSE => {
                return ControlFlow::Continue(())
            }
            _ => {}
        }
        answer.bytes.unsplit(message);
        ControlFlow::Continue(())
    })
    .await?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Vec<String> {
        vec!["events".to_string(), "audit.log".to_string()]
    }

    #[test]
    fn a_statement_that_begins_like_the_last_one_reads_the_same() {
        let tables = tables();
        let first = analyze(b"INSERT INTO events (a, b) VALUES (1, 'x')", &tables).unwrap();
        for text in [
            &b"INSERT INTO events (a, b) VALUES ('y', NULL);"[..],
            b"INSERT INTO events (a, b) VALUES ($1, $2)",
            b"INSERT INTO events (a, b) VALUES (1, 2) RETURNING a",
            b"INSERT INTO events (a, b) VALUES (1, 2); DELETE FROM events",
            b"INSERT INTO other (a, b) VALUES (1, 2)",
            b"INSERT INTO events (a) VALUES (1)",
            b"INSERT INTO events (a, b) VALUES  (3, 'w')",
        ] {
            assert_eq!(
                analyze_like(text, &tables, Some(&first)),
                analyze(text, &tables),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        assert!(analyze_like(
            b"INSERT INTO events (a, b) VALUES (2, 'z')",
            &[],
            Some(&first)
        )
        .is_none());
        // The row right after VALUES, then after a space: the same prefix bytes, the row elsewhere.
        let tight = analyze(b"INSERT INTO events VALUES(1)", &tables).unwrap();
        let spaced = b"INSERT INTO events VALUES (2)";
        assert!(analyze(spaced, &tables).is_some());
        assert_eq!(
            analyze_like(spaced, &tables, Some(&tight)),
            analyze(spaced, &tables)
        );
    }

    #[test]
    fn single_row_inserts_into_enabled_tables_are_batchable() {
        let insert = analyze(b"INSERT INTO events (a, \"B\") VALUES ($1, $2)", &tables()).unwrap();
        assert_eq!(&*insert.table, "events");
        assert_eq!(&*insert.columns, "a,B");
        assert_eq!(&*insert.prefix, "INSERT INTO events (a, \"B\") VALUES ");
        assert_eq!(&*insert.tuple, "($1, $2)");
        assert_eq!(insert.params, 2);
        let insert = analyze(
            b"insert into public.Events values (1, 'it''s; (x)', now()) ; ",
            &tables(),
        )
        .unwrap();
        assert_eq!(&*insert.table, "public.events");
        assert_eq!(&*insert.tuple, "(1, 'it''s; (x)', now())");
        assert_eq!(insert.params, 0);
        assert!(analyze(b"INSERT INTO audit.log VALUES (1)", &tables()).is_some());
        let insert = analyze(
            b"/* app */ INSERT INTO \"audit\" . log (\"Weird \"\"col\"\"\", b) VALUES (E'\\')', $$)$$) -- done",
            &tables(),
        )
        .unwrap();
        assert_eq!(&*insert.table, "audit.log");
        assert_eq!(&*insert.columns, "Weird \"col\",b");
        assert_eq!(&*insert.tuple, "(E'\\')', $$)$$)");
    }

    #[test]
    fn everything_else_is_not() {
        for sql in [
            "INSERT INTO other (a) VALUES (1)",
            "INSERT INTO log (a) VALUES (1)",
            "INSERT INTO events (a) VALUES (1), (2)",
            "INSERT INTO events (a) VALUES (1) RETURNING id",
            "INSERT INTO events (a) VALUES (1) ON CONFLICT DO NOTHING",
            "INSERT INTO events (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = 2",
            "INSERT INTO events (a) SELECT 1",
            "WITH x AS (SELECT 1) INSERT INTO events (a) SELECT * FROM x",
            "INSERT INTO events (a) VALUES (1); SELECT 1",
            "INSERT INTO events (a) OVERRIDING SYSTEM VALUE VALUES (1)",
            "SELECT * FROM events",
            "INSERT INTO events (a) VALUES ((SELECT 1)",
            "INSERT INTO events AS e (a) VALUES (1)",
            "INSERT INTO events (a.b) VALUES (1)",
            "INSERT INTO events (a[1]) VALUES (1)",
            "INSERT INTO events DEFAULT VALUES",
            "INSERT INTO events (a) VALUES (1) -- ok\n, (2)",
            "INSERT INTO events (a) VALUES ($1) ; INSERT INTO events (a) VALUES ($2)",
            "INSERT INTO \"events (a) VALUES (1)",
        ] {
            assert_eq!(analyze(sql.as_bytes(), &tables()), None, "{sql}");
        }
    }

    #[test]
    fn rows_that_map_onto_columns_can_be_copied() {
        let plain = analyze(b"INSERT INTO events (a, b) VALUES ($1, $2)", &tables()).unwrap();
        assert!(plain.plain_params);
        assert_eq!(plain.copy_target.as_deref(), Some("events (a, b)"));
        assert_eq!(
            Key::copy_form(&plain, Some(&[0, 0]), &[1, 1]),
            CopyForm::Binary
        );
        assert_eq!(
            Key::copy_form(&plain, Some(&[0, 0]), &[0, 0]),
            CopyForm::Text
        );
        assert_eq!(
            Key::copy_form(&plain, Some(&[0, 0]), &[0, 1]),
            CopyForm::Values
        );
        assert_eq!(
            Key::copy_form(&plain, Some(&[23, 0]), &[1, 1]),
            CopyForm::Values
        );
        let swapped = analyze(b"INSERT INTO events (a, b) VALUES ($2, $1)", &tables()).unwrap();
        assert!(!swapped.plain_params);
        let no_columns = analyze(b"INSERT INTO events VALUES ($1, $2)", &tables()).unwrap();
        assert_eq!(
            Key::copy_form(&no_columns, Some(&[0, 0]), &[1, 1]),
            CopyForm::Values
        );
        let strings = analyze(
            b"INSERT INTO events (a, b, c) VALUES ('it''s\there', NULL, '')",
            &tables(),
        )
        .unwrap();
        assert_eq!(strings.copy_line.as_deref(), Some("it's\\there\t\\N\t"));
        assert_eq!(Key::copy_form(&strings, None, &[]), CopyForm::Text);
        for sql in [
            "INSERT INTO events (a) VALUES (1)",
            "INSERT INTO events (a) VALUES ('x'::text)",
            "INSERT INTO events (a) VALUES (E'x')",
            "INSERT INTO events (a) VALUES ('a\\b')",
            "INSERT INTO events (a) VALUES (DEFAULT)",
        ] {
            let insert = analyze(sql.as_bytes(), &tables()).unwrap();
            assert_eq!(insert.copy_line, None, "{sql}");
        }
    }

    #[test]
    fn texts_that_end_early_are_not_batchable() {
        // Found by the fuzz targets: the reader looked one byte past the end of these.
        for sql in [
            "",
            " ",
            "INSERT",
            "INSERT INTO",
            "INSERT INTO events",
            "INSERT INTO events (",
            "INSERT INTO events VALUES",
        ] {
            assert_eq!(analyze(sql.as_bytes(), &tables()), None, "{sql:?}");
        }
    }

    #[test]
    fn parameters_are_renumbered_outside_quotes() {
        let mut out = String::new();
        push_renumbered(&mut out, "($2, '$1', $1 || $$x$1$$, \"$1\")", 10);
        assert_eq!(out, "($12, '$1', $11 || $$x$1$$, \"$1\")");
    }

    #[test]
    fn table_entries_with_a_schema_match_only_that_schema() {
        assert!(enabled("events", &tables()));
        assert!(enabled("public.events", &tables()));
        assert!(enabled("audit.log", &tables()));
        assert!(!enabled("log", &tables()));
        assert!(!enabled("public.log", &tables()));
    }
}
