//! A client's prepared statements, protocol-level (Parse) and SQL-level (PREPARE), and the server-side names
//! they run under.
//!
//! Transaction pooling runs a client's statements on whichever server connection it holds, so a statement is
//! prepared on each connection that runs its Bind, Describe or EXECUTE, under a name the gateway chooses: the
//! same content shares one server-side statement across clients ([`StatementNames`]), so a statement prepared
//! by one client is ready for the next. Errors and positions the server reports in those names are put back
//! into the client's words ([`Statements::client_names`], [`unshift`]).

use super::settings::Touch;
use crate::protocol::{self, PgError};
use crate::sql::{self, Kind};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    pub fn name_for(&self, content: &Bytes) -> Arc<str> {
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
    pub fn forget_all(&self) {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// A name no server connection has seen.
    pub fn fresh(&self, kind: &str) -> String {
        format!("__rg_{kind}{}", self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// A protocol-level prepared statement as the client named it.
pub struct Statement {
    pub server_name: Arc<str>,
    /// The Parse body after the statement name: query text and parameter types, sent verbatim.
    pub parse_rest: Bytes,
    /// What running it does to the session.
    pub effect: Effect,
    /// Where it may run (when read routing is on).
    pub class: Option<crate::route::Class>,
    /// Its fingerprint hash and whether it reads (when N+1 detection is on), computed once at Parse.
    pub shape: u64,
    pub reads: bool,
    /// The INSERT it is, when its rows can be batched.
    pub batch: Option<Arc<crate::batch::Insert>>,
}

impl Statement {
    /// Its query text.
    pub fn text(&self) -> Option<Bytes> {
        protocol::cstr(&self.parse_rest).map(|(t, _)| self.parse_rest.slice_ref(t))
    }
}

/// What running a protocol-level statement does to the session.
#[derive(Clone)]
pub enum Effect {
    None,
    Pin(&'static str),
    Change(Touch),
}

impl Effect {
    /// What a Parse's statement does to the session when run.
    pub fn of(text: &[u8]) -> Effect {
        let Some(range) = sql::split(text).next() else {
            return Effect::None;
        };
        match sql::classify(text, range.clone()) {
            Kind::Pin(reason) => Effect::Pin(reason),
            // SQL-level PREPARE/EXECUTE through Parse would need the same renaming as a Query; keep the client
            // on one server connection instead.
            Kind::Prepare { .. } | Kind::Execute { .. } | Kind::Deallocate { .. } => {
                Effect::Pin("SQL-level PREPARE/EXECUTE through the extended protocol")
            }
            kind => Touch::of(&kind)
                .or_else(|| Touch::hidden(text, range))
                .map_or(Effect::None, Effect::Change),
        }
    }
}

/// A SQL-level prepared statement (PREPARE name AS ...).
pub struct SqlPrepared {
    pub server_name: Arc<str>,
    /// The PREPARE statement under the server-side name, to run on connections that lack it.
    pub prepare: String,
    /// What running it does to the settings (it calls `set_config`).
    pub touch: Option<Touch>,
    /// Where its EXECUTE may run: what the prepared statement does.
    pub access: crate::route::Access,
}

/// The statements one client prepared.
pub struct Statements {
    /// Protocol-level, by the client's name.
    pub named: LazyMap<Bytes, Arc<Statement>>,
    /// The client's unnamed statement (its last unnamed Parse).
    pub unnamed: Option<Arc<Statement>>,
    /// SQL-level, by the client's name.
    pub sql: LazyMap<String, Arc<SqlPrepared>>,
    /// `limits.max_prepared_statements`.
    max: usize,
}

/// A map made at its first insert: most clients prepare nothing (or nothing SQL-level), and an empty map
/// would take 48 bytes of every idle client.
#[allow(clippy::box_collection)] // the box is the point: 8 bytes while empty
pub struct LazyMap<K, V>(Option<Box<HashMap<K, V>>>);

impl<K, V> Default for LazyMap<K, V> {
    fn default() -> Self {
        LazyMap(None)
    }
}

impl<K: std::hash::Hash + Eq, V> LazyMap<K, V> {
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|map| map.is_empty())
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |map| map.len())
    }

    #[inline]
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.as_ref()?.get(key)
    }

    #[inline]
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    pub fn insert(&mut self, key: K, value: V) {
        self.0.get_or_insert_default().insert(key, value);
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.as_mut()?.remove(key)
    }

    pub fn clear(&mut self) {
        self.0 = None;
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().flat_map(|map| map.iter())
    }
}

impl<K: std::hash::Hash + Eq, V> std::ops::Index<&K> for LazyMap<K, V> {
    type Output = V;

    fn index(&self, key: &K) -> &V {
        self.get(key).expect("a key the caller found in the map")
    }
}

impl Statements {
    pub fn new(max: usize) -> Statements {
        Statements {
            named: LazyMap::default(),
            unnamed: None,
            sql: LazyMap::default(),
            max,
        }
    }

    /// The statement a Bind or Describe names ("" is the unnamed one).
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    /// A new named statement must fit within `limits.max_prepared_statements`; past it the client is
    /// disconnected (its statements would otherwise grow without bound in the gateway's memory).
    /// A reload: `limits.max_prepared_statements` from the client's next statement (statements it holds
    /// already stay).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn check_room(&self, name: &[u8]) -> Result<(), PgError> {
        if self.named.len() < self.max || self.named.contains_key(name) {
            return Ok(());
        }
        Err(PgError::fatal(
            "53400",
            format!(
                "regiongate: too many prepared statements on this connection (limits.max_prepared_statements \
                 is {}); close or deallocate the ones no longer used",
                self.max
            ),
        ))
    }

    /// A statement the client parsed (unnamed, or under `name`, which must have room).
    pub fn insert(&mut self, name: Bytes, statement: Arc<Statement>) -> Result<(), PgError> {
        if name.is_empty() {
            self.unnamed = Some(statement);
        } else {
            self.check_room(&name)?;
            self.named.insert(name, statement);
        }
        Ok(())
    }

    /// DEALLOCATE ALL and DISCARD ALL: the client has no statements any more.
    pub fn clear(&mut self) {
        self.named.clear();
        self.sql.clear();
    }

    /// `text` with the server-side names of this client's prepared statements put back as the client's.
    pub fn client_names(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("__rg_") {
            out.push_str(&rest[..at]);
            let end = rest[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(rest.len(), |n| at + n);
            let server = &rest[at..end];
            let client = self
                .sql
                .iter()
                .find(|(_, p)| &*p.server_name == server)
                .map(|(name, _)| name.clone())
                .or_else(|| {
                    self.named
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
}

/// A name the gateway put in place of the client's, in a Query it rewrote, in characters: where the client's
/// was, how long it was, and how long the replacement is (for error positions).
#[derive(Clone, Copy, Debug, Default)]
pub struct Shift {
    pub at: usize,
    pub was: usize,
    pub now: usize,
}

/// An error position (1-based, in characters) in a rewritten Query, as a position in the client's text.
pub fn unshift(position: usize, shifts: &[Shift]) -> usize {
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

/// `text` with each range replaced by its name, and where the replacements moved the text (in characters).
pub fn rename(
    text: &[u8],
    mut rewrites: Vec<(std::ops::Range<usize>, Arc<str>)>,
) -> (String, Vec<Shift>) {
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
    (String::from_utf8_lossy(&rewritten).into_owned(), shifts)
}

/// Whether an error says a statement of the gateway's naming exists already.
pub fn duplicate_server_statement(body: &[u8]) -> bool {
    let (code, message) = protocol::error_fields(body);
    code == "42P05" && message.contains("\"__rg_s")
}

/// Whether an error says a prepared statement no longer matches the schema.
pub fn stale_statement(body: &[u8]) -> bool {
    let (code, message) = protocol::error_fields(body);
    (code == "0A000" && message.starts_with("cached plan must not change result type"))
        || (code == "XX000" && message.starts_with("cache lookup failed for type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_text_maps_error_positions_back() {
        let text = b"EXPLAIN EXECUTE p(1); EXECUTE p(2)";
        let name: Arc<str> = Arc::from("__rg_q7");
        let (rewritten, shifts) = rename(text, vec![(30..31, name.clone()), (16..17, name)]);
        assert_eq!(rewritten, "EXPLAIN EXECUTE __rg_q7(1); EXECUTE __rg_q7(2)");
        // `(2)` is at 32 in the client's text (1-based), 44 in the rewritten one.
        assert_eq!(unshift(44, &shifts), 32);
        // Inside a replacement: where the client's name starts.
        assert_eq!(unshift(19, &shifts), 17);
        assert_eq!(unshift(1, &shifts), 1);
    }
}
