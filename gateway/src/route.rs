//! Which statements may run on a replica.
//!
//! sqlparser (PostgreSQL dialect) parses each statement text once; the result is cached by text (moka) and,
//! for prepared statements, kept with the statement. A read is a SELECT/VALUES/SHOW/TABLE/EXPLAIN (or a
//! WITH query) with no data-modifying CTE, no FOR UPDATE/SHARE, no SELECT INTO and no call to a function with
//! side effects; session statements (SET, RESET, DISCARD, DEALLOCATE) run anywhere; BEGIN READ ONLY opens a
//! transaction a replica can serve. Everything else, and anything that does not parse, is a write.

use self::hint::Hint;
use sqlparser::ast::{
    CopySource, CopyTarget, Expr, ObjectNamePart, Query, SetExpr, Statement, TableFactor,
    TransactionAccessMode, TransactionMode, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

/// Statements longer than this are not parsed (they go to the primary): parsing is linear but not free.
const MAX_PARSED_LEN: usize = 64 * 1024;

/// Functions whose calls change something, wherever they appear in a statement.
const SIDE_EFFECT_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "set_config",
    "txid_current",
    "pg_current_xact_id",
    "pg_notify",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_logical_emit_message",
];

/// Where a statement (or a whole Query message) may run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// A replica may serve it.
    Read,
    /// It needs the primary.
    Write,
    /// A session statement (SET, SHOW of a setting, DISCARD): anywhere, it decides nothing.
    #[default]
    Any,
}

impl Access {
    /// The access of statements run together: a write anywhere makes the whole a write.
    pub fn and(self, other: Access) -> Access {
        match (self, other) {
            (Access::Write, _) | (_, Access::Write) => Access::Write,
            (Access::Read, _) | (_, Access::Read) => Access::Read,
            _ => Access::Any,
        }
    }
}

/// What routing needs to know about a statement text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Class {
    pub access: Access,
    /// A `/* regiongate: ... */` comment at its start.
    pub hint: Option<Hint>,
    /// It is exactly one `BEGIN`/`START TRANSACTION` (with any modes): the gateway may answer it itself and
    /// decide where the transaction runs at its first statement.
    pub begin: bool,
    /// It opens a transaction (a `BEGIN` among its statements).
    pub begins: bool,
    /// The transaction modes its `BEGIN` or `SET TRANSACTION` set.
    pub modes: TxModes,
    /// A read of configured materialized views and nothing else: the set of views (bit i = the i-th view of
    /// the configuration), which routing checks against each replica's copy of them. 0 for anything else.
    pub views: u64,
}

/// Isolation levels as PostgreSQL runs them (READ UNCOMMITTED runs as READ COMMITTED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl Isolation {
    /// The value of `transaction_isolation` or `default_transaction_isolation`, as `current_setting` shows it.
    pub fn from_setting(value: &str) -> Option<Isolation> {
        match value.trim().to_ascii_lowercase().as_str() {
            "serializable" => Some(Isolation::Serializable),
            "repeatable read" => Some(Isolation::RepeatableRead),
            "read committed" | "read uncommitted" => Some(Isolation::ReadCommitted),
            _ => None,
        }
    }
}

/// Transaction modes, each when it was said (None: the session's default applies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxModes {
    pub isolation: Option<Isolation>,
    pub read_only: Option<bool>,
    pub deferrable: Option<bool>,
    /// A statement asked for READ WRITE (a session default of `default_transaction_read_only = off` does
    /// not): a standby refuses to set it, whatever a later statement sets.
    pub read_write: bool,
}

impl TxModes {
    /// These modes, and `base`'s where these say nothing (a later statement's modes over an earlier one's).
    pub fn or(self, base: TxModes) -> TxModes {
        TxModes {
            isolation: self.isolation.or(base.isolation),
            read_only: self.read_only.or(base.read_only),
            deferrable: self.deferrable.or(base.deferrable),
            read_write: self.read_write || base.read_write,
        }
    }

    /// The modes once `later`'s statements ran after the ones these came from (a BEGIN, then SET
    /// TRANSACTION): the later modes win, except that serializable, once said, stays. PostgreSQL sets each
    /// level in turn, and a standby fails at a serializable one even when a later one replaces it.
    pub fn then(self, later: TxModes) -> TxModes {
        let mut modes = later.or(self);
        if self.isolation == Some(Isolation::Serializable) {
            modes.isolation = self.isolation;
        }
        modes
    }

    pub fn read_only(&self) -> bool {
        self.read_only == Some(true)
    }

    /// A standby refuses serializable mode ("cannot use serializable mode in a hot standby"), even for
    /// `READ ONLY DEFERRABLE` (PostgreSQL 15 checks recovery before it looks at the other modes), and refuses
    /// to set `READ WRITE` ("cannot set transaction read-write mode during recovery").
    pub fn needs_primary(&self) -> bool {
        self.read_write || self.isolation == Some(Isolation::Serializable)
    }
}

/// A transaction statement read token by token: `BEGIN`/`START TRANSACTION` (true) or `SET TRANSACTION`
/// (false), with the modes it sets. None for any other statement, or modes it does not know (sqlparser then
/// decides, and what it cannot parse goes to the primary). sqlparser has no `DEFERRABLE`, hence this.
pub fn transaction_statement(text: &[u8]) -> Option<(bool, TxModes)> {
    let lower: Vec<String> = crate::lexer::tokens(text)
        .take_while(|t| *t != b";")
        .map(|t| String::from_utf8_lossy(t).to_ascii_lowercase())
        .collect();
    let words: Vec<&str> = lower.iter().map(String::as_str).collect();
    let (begins, mut rest) = match words.as_slice() {
        ["begin", "work" | "transaction", rest @ ..] => (true, rest),
        ["begin", rest @ ..] => (true, rest),
        ["start", "transaction", rest @ ..] => (true, rest),
        ["set", "transaction", rest @ ..] if !rest.is_empty() => (false, rest),
        _ => return None,
    };
    let mut modes = TxModes::default();
    loop {
        rest = match rest {
            [] => return Some((begins, modes)),
            [",", rest @ ..] => rest,
            ["isolation", "level", "serializable", rest @ ..] => {
                modes.isolation = Some(Isolation::Serializable);
                rest
            }
            // PostgreSQL sets each level said, in order: one serializable among them fails on a standby even
            // when a later one replaces it, so serializable, once said, stays.
            ["isolation", "level", "repeatable", "read", rest @ ..] => {
                modes.isolation = modes.isolation.filter(|i| *i == Isolation::Serializable);
                modes.isolation.get_or_insert(Isolation::RepeatableRead);
                rest
            }
            ["isolation", "level", "read", "committed" | "uncommitted", rest @ ..] => {
                modes.isolation = modes.isolation.filter(|i| *i == Isolation::Serializable);
                modes.isolation.get_or_insert(Isolation::ReadCommitted);
                rest
            }
            ["read", "only", rest @ ..] => {
                modes.read_only = Some(true);
                rest
            }
            ["read", "write", rest @ ..] => {
                modes.read_only = Some(false);
                modes.read_write = true;
                rest
            }
            ["deferrable", rest @ ..] => {
                modes.deferrable = Some(true);
                rest
            }
            ["not", "deferrable", rest @ ..] => {
                modes.deferrable = Some(false);
                rest
            }
            _ => return None,
        };
    }
}

/// Classifies statement texts, with a cache keyed by the statement's shape (see `fingerprint`): literals do
/// not change where a statement may run, so a query run with a thousand different values is parsed once, and
/// the shape is the one N+1 detection uses.
pub struct Classifier {
    side_effects: HashSet<String>,
    /// Configured views as (schema, name), in configuration order (the bit order of [`Class::views`]).
    views: Vec<(String, String)>,
    cache: moka::sync::Cache<u64, Class>,
}

impl Classifier {
    pub fn new(extra_side_effect_functions: &[String]) -> Arc<Classifier> {
        Classifier::with_views(extra_side_effect_functions, Vec::new())
    }

    /// A classifier that also recognises reads of these views, given as (schema, name).
    pub fn with_views(
        extra_side_effect_functions: &[String],
        views: Vec<(String, String)>,
    ) -> Arc<Classifier> {
        let side_effects = SIDE_EFFECT_FUNCTIONS
            .iter()
            .map(|f| f.to_string())
            .chain(
                extra_side_effect_functions
                    .iter()
                    .map(|f| f.to_ascii_lowercase()),
            )
            .collect();
        Arc::new(Classifier {
            side_effects,
            views,
            cache: moka::sync::Cache::new(20_000),
        })
    }

    /// The class of a statement text (one or more statements).
    pub fn classify(&self, text: &[u8]) -> Class {
        self.classify_shaped(text, crate::fingerprint::shape_id(text).hash)
    }

    /// The class of a statement text whose shape hash is known, from the cache when the shape was seen before.
    /// Hints live in comments, which shapes drop, so they are read from the text itself.
    pub fn classify_shaped(&self, text: &[u8], shape: u64) -> Class {
        let class = match self.cache.get(&shape) {
            Some(class) => class,
            None => {
                let class = self.classify_uncached(text);
                self.cache.insert(shape, class);
                class
            }
        };
        Class {
            hint: hint::parse(text),
            ..class
        }
    }

    fn classify_uncached(&self, text: &[u8]) -> Class {
        let hint = hint::parse(text);
        let write = Class {
            access: Access::Write,
            hint,
            begin: false,
            begins: false,
            modes: TxModes::default(),
            views: 0,
        };
        if text.len() > MAX_PARSED_LEN {
            return write;
        }
        // Transaction statements, by tokens: their modes, and whether every statement is one.
        let (mut count, mut transaction_only, mut begins) = (0, true, false);
        let mut modes = TxModes::default();
        for range in crate::sql::split(text) {
            count += 1;
            match transaction_statement(&text[range]) {
                Some((begin, said)) => {
                    begins |= begin;
                    modes = modes.then(said);
                }
                None => transaction_only = false,
            }
        }
        let transaction = Class {
            access: if modes.read_only() {
                Access::Read
            } else {
                Access::Any
            },
            begin: count == 1 && begins,
            begins,
            modes,
            ..write
        };
        if count > 0 && transaction_only {
            return transaction;
        }
        let Ok(sql) = std::str::from_utf8(text) else {
            return write;
        };
        let Some(statements) = parse(sql) else {
            return write;
        };
        let access = statements
            .iter()
            .map(|s| self.statement_access(s))
            .fold(Access::Any, Access::and);
        let views = if access == Access::Read {
            self.views_read(&statements)
        } else {
            0
        };
        Class {
            access,
            views,
            ..transaction
        }
    }

    /// The set of configured views the statements read, when queries read views and nothing else (CTE names
    /// aside); 0 when any statement reads a table, a function in FROM, or is not a query.
    fn views_read(&self, statements: &[Statement]) -> u64 {
        if self.views.is_empty() {
            return 0;
        }
        let mut set = 0u64;
        for statement in statements {
            match statement {
                Statement::Query(_) => {}
                Statement::Set(_) | Statement::Reset(_) => continue,
                _ => return 0,
            }
            let mut ctes = HashSet::new();
            struct Ctes<'a>(&'a mut HashSet<String>);
            impl Visitor for Ctes<'_> {
                type Break = ();
                fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
                    for cte in query.with.iter().flat_map(|w| &w.cte_tables) {
                        self.0.insert(normalize(&cte.alias.name));
                    }
                    ControlFlow::Continue(())
                }
            }
            let _ = statement.visit(&mut Ctes(&mut ctes));
            let all_views = sqlparser::ast::visit_relations(statement, |name| {
                let parts: Vec<String> = name
                    .0
                    .iter()
                    .map(|p| match p {
                        ObjectNamePart::Identifier(ident) => normalize(ident),
                        _ => String::new(),
                    })
                    .collect();
                let found = match parts.as_slice() {
                    [name] if ctes.contains(name) => return ControlFlow::Continue(()),
                    [name] => self
                        .views
                        .iter()
                        .position(|(s, v)| s == "public" && v == name),
                    [schema, name] => self
                        .views
                        .iter()
                        .position(|(s, v)| s == schema && v == name),
                    _ => None,
                };
                match found {
                    Some(i) if i < 64 => {
                        set |= 1 << i;
                        ControlFlow::Continue(())
                    }
                    _ => ControlFlow::Break(()),
                }
            });
            if all_views.is_break() {
                return 0;
            }
        }
        set
    }

    fn statement_access(&self, statement: &Statement) -> Access {
        match statement {
            Statement::Query(query) => self.query_access(query),
            Statement::Explain {
                statement,
                analyze,
                options,
                ..
            } => {
                // EXPLAIN ANALYZE runs the statement; so does `EXPLAIN (ANALYZE [true|on|1]) ...`.
                let analyzed = *analyze
                    || options.iter().flatten().any(|option| {
                        option.name.value.eq_ignore_ascii_case("analyze")
                            && option.arg.as_ref().is_none_or(|arg| {
                                let arg = arg.to_string().to_ascii_lowercase();
                                !matches!(arg.trim_matches('\''), "false" | "off" | "0" | "no")
                            })
                    });
                if analyzed {
                    self.statement_access(statement)
                } else {
                    Access::Read
                }
            }
            // A transaction's statements decide where it runs; its opening and its modes decide nothing
            // (read only makes it a read).
            Statement::StartTransaction { modes, .. }
            | Statement::Set(sqlparser::ast::Set::SetTransaction { modes, .. }) => {
                if modes.contains(&TransactionMode::AccessMode(
                    TransactionAccessMode::ReadOnly,
                )) {
                    Access::Read
                } else {
                    Access::Any
                }
            }
            // COPY to the client reads; COPY to a server file or program acts on one host: the primary.
            Statement::Copy {
                source,
                to: true,
                target: CopyTarget::Stdout,
                ..
            } => match source {
                CopySource::Query(query) => self.query_access(query),
                CopySource::Table { .. } => Access::Read,
            },
            // PREPARE only plans; its EXECUTE is routed by what the statement does ([`Classifier::prepared`]).
            Statement::Set(_)
            | Statement::Reset(_)
            | Statement::Discard { .. }
            | Statement::Prepare { .. }
            | Statement::Deallocate { .. } => Access::Any,
            Statement::ShowVariable { .. } | Statement::ShowVariables { .. } => Access::Any,
            // Savepoints are allowed on a standby: a transaction that uses them (nested atomic blocks in
            // Django, psycopg's nested `transaction()`) reads on the replica like any other.
            Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => Access::Any,
            _ => Access::Write,
        }
    }

    /// Where the statement a SQL-level `PREPARE name AS statement` prepares may run (a write when the text
    /// is not one PREPARE). Not cached: PREPAREs are few, and their EXECUTEs reuse the answer.
    pub fn prepared(&self, text: &[u8]) -> Access {
        let statements = std::str::from_utf8(text)
            .ok()
            .filter(|_| text.len() <= MAX_PARSED_LEN)
            .and_then(parse);
        match statements.as_deref() {
            Some([Statement::Prepare { statement, .. }]) => self.statement_access(statement),
            _ => Access::Write,
        }
    }

    fn query_access(&self, query: &Query) -> Access {
        struct Finder<'a> {
            side_effects: &'a HashSet<String>,
        }
        impl Visitor for Finder<'_> {
            type Break = ();
            fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
                if !query.locks.is_empty() {
                    return ControlFlow::Break(()); // FOR UPDATE / FOR SHARE take row locks
                }
                if let SetExpr::Select(select) = query.body.as_ref() {
                    if select.into.is_some() {
                        return ControlFlow::Break(()); // SELECT INTO creates a table
                    }
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
                // Reached only for statements nested in the query: data-modifying CTEs.
                match statement {
                    Statement::Query(_) => ControlFlow::Continue(()),
                    _ => ControlFlow::Break(()),
                }
            }
            fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
                match expr {
                    Expr::Function(function) => self.call(&function.name),
                    _ => ControlFlow::Continue(()),
                }
            }
            // Functions in FROM: `FROM f(x)`, `LATERAL f(x)` (ROWS FROM's calls are expressions).
            fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
                match factor {
                    TableFactor::Table {
                        name,
                        args: Some(_),
                        ..
                    }
                    | TableFactor::Function { name, .. } => self.call(name),
                    _ => ControlFlow::Continue(()),
                }
            }
        }
        impl Finder<'_> {
            /// A call of a function with side effects (by its name without schema, as PostgreSQL would find
            /// the built-in ones); a name written with Unicode escapes (`U&"\006Eextval"`) is read as what it
            /// spells.
            fn call(&self, name: &sqlparser::ast::ObjectName) -> ControlFlow<()> {
                let Some(ObjectNamePart::Identifier(ident)) = name.0.last() else {
                    return ControlFlow::Continue(());
                };
                let name = unescape_unicode(&ident.value).to_ascii_lowercase();
                if self.side_effects.contains(&name) || name.starts_with("lo_") {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }
        }
        let mut finder = Finder {
            side_effects: &self.side_effects,
        };
        match query.visit(&mut finder) {
            ControlFlow::Break(()) => Access::Write,
            ControlFlow::Continue(()) => Access::Read,
        }
    }
}

/// Which transactions wrote, recently, by how they start (their first statement's shape, for one user and
/// database): those start on the primary, so that a read-then-write transaction pays a replay while its
/// shape is learned, not at every run. Bounded like the N+1 shapes; an entry is forgotten when a transaction
/// of its shape ends without writing, or after ten minutes.
pub struct WritingShapes {
    shapes: moka::sync::Cache<u64, ()>,
}

impl Default for WritingShapes {
    fn default() -> Self {
        WritingShapes {
            shapes: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
        }
    }
}

impl WritingShapes {
    /// The key of a transaction shape: its first statement's shape, for this user and database.
    pub fn key(user: &str, database: &str, shape: u64) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (user, database, shape).hash(&mut hasher);
        hasher.finish()
    }

    pub fn predicts_write(&self, key: u64) -> bool {
        self.shapes.contains_key(&key)
    }

    /// A transaction of this shape ended, having written or not.
    pub fn learn(&self, key: u64, wrote: bool) {
        if wrote {
            self.shapes.insert(key, ());
        } else {
            self.shapes.invalidate(&key);
        }
    }
}

/// The statements of a text, as sqlparser reads it; when it cannot, as it reads the same text with the
/// PostgreSQL syntax it lacks spelled in syntax it has (see [`spelled_for_sqlparser`]).
fn parse(sql: &str) -> Option<Vec<Statement>> {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => Some(statements),
        Err(_) => Parser::parse_sql(&PostgreSqlDialect {}, &spelled_for_sqlparser(sql)?).ok(),
    }
}

/// The text with three query forms that sqlparser does not parse written as ones that read the same things
/// and call the same functions, so that their class is found; None when it has none of them. The result is
/// only classified, never run.
/// - `TABLE t` (a query of its own: first, or after `(`, `AS` or a set operator) as `SELECT * FROM t`;
/// - `ROWS FROM (f(..), g(..))` as `unnest(f(..), g(..))`: the same calls, in one table function;
/// - a recursive CTE's `SEARCH … SET col` and `CYCLE … [USING col]` clauses are dropped: they name columns
///   and constants, and call nothing.
///
/// A rewrite can only make a statement that parsed as a query parse as a query: whatever else a statement
/// is, it stays.
fn spelled_for_sqlparser(sql: &str) -> Option<String> {
    let text = sql.as_bytes();
    let tokens: Vec<std::ops::Range<usize>> = crate::lexer::token_ranges(text).collect();
    let is = |i: usize, word: &str| {
        tokens
            .get(i)
            .is_some_and(|t| text[t.clone()].eq_ignore_ascii_case(word.as_bytes()))
    };
    // An identifier (a column name), plain or quoted.
    let word = |i: usize| {
        tokens.get(i).is_some_and(|t| {
            let first = text[t.start];
            first == b'"' || first == b'_' || first.is_ascii_alphabetic() || first >= 0x80
        })
    };
    // After a column list starting at `i` (`a`, `a, b`): the index of the token that follows it.
    let columns = |mut i: usize| {
        if !word(i) {
            return None;
        }
        while is(i + 1, ",") {
            i += 2;
            if !word(i) {
                return None;
            }
        }
        Some(i + 1)
    };
    let mut out = String::with_capacity(sql.len() + 16);
    let mut copied = 0; // text before this is in `out`
    let mut changed = false;
    let mut i = 0;
    while i < tokens.len() {
        let token = tokens[i].clone();
        let after_query_start = i == 0
            || [
                "(",
                ")",
                ";",
                "as",
                "union",
                "intersect",
                "except",
                "all",
                "distinct",
                "explain",
            ]
            .iter()
            .any(|w| is(i - 1, w));
        let (replacement, skip) = if is(i, "table") && after_query_start {
            ("SELECT * FROM", 1)
        } else if is(i, "rows") && is(i + 1, "from") && is(i + 2, "(") {
            ("unnest", 2)
        } else if i > 0 && is(i - 1, ")") && is(i, "search") {
            // SEARCH {DEPTH|BREADTH} FIRST BY col[, …] SET col: only this grammar, token by token.
            if !(is(i + 1, "depth") || is(i + 1, "breadth"))
                || !is(i + 2, "first")
                || !is(i + 3, "by")
            {
                return None;
            }
            let set = columns(i + 4)?;
            if !is(set, "set") || !word(set + 1) {
                return None;
            }
            ("", set + 2 - i)
        } else if i > 0 && is(i - 1, ")") && is(i, "cycle") {
            // CYCLE col[, …] SET col [TO value DEFAULT value] [USING col]
            let set = columns(i + 1)?;
            if !is(set, "set") || !word(set + 1) {
                return None;
            }
            let mut end = set + 2;
            if is(end, "to") {
                if !is(end + 2, "default") {
                    return None;
                }
                end += 4;
            }
            if is(end, "using") {
                if !word(end + 1) {
                    return None;
                }
                end += 2;
            }
            ("", end - i)
        } else {
            i += 1;
            continue;
        };
        let last = tokens.get(i + skip - 1)?.clone();
        out.push_str(&sql[copied..token.start]);
        out.push_str(replacement);
        out.push(' ');
        copied = last.end;
        changed = true;
        i += skip;
    }
    out.push_str(&sql[copied..]);
    changed.then_some(out)
}

/// `\XXXX` and `\+XXXXXX` escapes of a `U&"..."` identifier, as the characters they name (other text as it is).
fn unescape_unicode(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains('\\') {
        return value.into();
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let (digits, skip) = match rest.strip_prefix('+') {
            Some(after) => (after.get(..6), 7),
            None => (rest.get(..4), 4),
        };
        match digits
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .and_then(char::from_u32)
        {
            Some(c) => {
                out.push(c);
                rest = &rest[skip..];
            }
            None => out.push('\\'),
        }
    }
    out.push_str(rest);
    out.into()
}

/// An identifier as PostgreSQL folds it: unquoted ones to lower case.
fn normalize(ident: &sqlparser::ast::Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_lowercase(),
    }
}

/// The settings of the gateway's own that a session may SET, under a prefix that is the gateway's.
pub const SESSION_SETTINGS: &[&str] = &["regiongate.max_lag", "regiongate.explain"];
pub const SESSION_SETTING_PREFIX: &str = "regiongate.";

/// A Boolean setting's value as PostgreSQL reads it: on/off, true/false, yes/no, 1/0, and unique prefixes.
pub fn parse_bool(value: &str) -> Option<bool> {
    let v = value.trim().to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(&v);
    if v == "1" || v == "on" || prefix_of("true", 1) || prefix_of("yes", 1) {
        Some(true)
    } else if v == "0" || prefix_of("off", 2) || prefix_of("false", 1) || prefix_of("no", 1) {
        Some(false)
    } else {
        None
    }
}

/// Checks a `SET regiongate.name = value` before it runs: the error PostgreSQL would give for a bad value of
/// one of its own settings (22023), or for an unknown name under a reserved prefix (42602).
pub fn check_session_setting(name: &str, value: &str) -> Result<(), crate::protocol::PgError> {
    use crate::protocol::PgError;
    match name {
        "regiongate.max_lag" => humantime::parse_duration(value).map(drop).map_err(|_| {
            PgError::error(
                "22023",
                format!("invalid value for parameter \"{name}\": \"{value}\""),
            )
            .with_hint("Valid values are durations such as 500ms, 5s or 1min; RESET returns to routing.max_lag.")
        }),
        "regiongate.explain" => parse_bool(value).map(drop).ok_or_else(|| {
            PgError::error(
                "22023",
                format!("parameter \"{name}\" requires a Boolean value"),
            )
        }),
        _ => Err(PgError::error(
            "42602",
            format!("invalid configuration parameter name \"{name}\""),
        )
        .with_detail(format!(
            "\"regiongate\" is the gateway's prefix; its settings are {}.",
            SESSION_SETTINGS.join(", ")
        ))),
    }
}

/// Routing hints in a leading comment: `/* regiongate: primary */`, `/* regiongate: max_lag=5s */`.
pub mod hint {
    use super::Duration;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Hint {
        Primary,
        MaxLag(Duration),
    }

    /// The hint in the comments at the start of `text`, if any.
    pub fn parse(text: &[u8]) -> Option<Hint> {
        directive(text).and_then(parse_directive)
    }

    /// The error for a `regiongate:` comment at the start of `text` that is not a hint: a statement with a
    /// misspelled hint fails rather than run where the hint did not mean.
    pub fn malformed(text: &[u8]) -> Option<crate::protocol::PgError> {
        // Nearly every statement starts with a word: no comment, no hint (one byte looked at, per Query).
        if text.first().is_some_and(u8::is_ascii_alphabetic) {
            return None;
        }
        let directive = directive(text).filter(|d| parse_directive(d).is_none())?;
        Some(crate::protocol::PgError::error(
            "22023",
            format!("invalid routing hint \"regiongate: {directive}\""),
        ).with_hint("Valid hints are /* regiongate: primary */ and /* regiongate: max_lag=<duration> */, with a duration such as 500ms or 5s."))
    }

    /// What follows `regiongate:` in the comments at the start of `text`, trimmed.
    fn directive(text: &[u8]) -> Option<&str> {
        let mut rest = text;
        loop {
            rest = trim_start(rest);
            let comment = rest.strip_prefix(b"/*")?;
            let end = memchr::memmem::find(comment, b"*/")?;
            let inner = std::str::from_utf8(&comment[..end]).ok()?.trim();
            if let Some(directive) = inner.strip_prefix("regiongate:") {
                return Some(directive.trim());
            }
            rest = &comment[end + 2..];
        }
    }

    fn parse_directive(directive: &str) -> Option<Hint> {
        if directive.eq_ignore_ascii_case("primary") {
            return Some(Hint::Primary);
        }
        let (key, value) = directive.split_once('=')?;
        if key.trim().eq_ignore_ascii_case("max_lag") {
            return humantime::parse_duration(value.trim())
                .ok()
                .map(Hint::MaxLag);
        }
        None
    }

    fn trim_start(text: &[u8]) -> &[u8] {
        let start = text
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(text.len());
        &text[start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(sql: &str) -> Access {
        Classifier::new(&["audit_log".to_string()])
            .classify(sql.as_bytes())
            .access
    }

    #[test]
    fn reads() {
        for sql in [
            "SELECT 1",
            "select * from t where id = $1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "VALUES (1), (2)",
            "SELECT a FROM t UNION SELECT b FROM u",
            "EXPLAIN SELECT 1",
            "EXPLAIN (COSTS OFF) DELETE FROM t",
            "EXPLAIN (ANALYZE false) DELETE FROM t",
            "EXPLAIN (ANALYZE off, VERBOSE) DELETE FROM t",
            "BEGIN READ ONLY",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "SET TRANSACTION READ ONLY",
            "SELECT now(), pg_sleep(0)",
            "SELECT * FROM generate_series(1, 3)",
            "SELECT * FROM t, LATERAL generate_series(1, t.n) g",
            "TABLE t",
            "table only s.t",
            "SELECT 1 UNION ALL TABLE t",
            "SELECT * FROM (TABLE t) x",
            "WITH x AS (TABLE t) TABLE x",
            "EXPLAIN TABLE t",
            "COPY t TO STDOUT",
            "COPY t (a, b) TO STDOUT WITH (FORMAT csv)",
            "COPY (SELECT * FROM t WHERE a > 1) TO STDOUT",
            "COPY (TABLE t) TO STDOUT",
            "SELECT * FROM ROWS FROM (generate_series(1, 2), generate_series(1, 3)) AS x(a, b)",
            "SELECT * FROM ROWS FROM (generate_series(1, 2)) WITH ORDINALITY",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
             SEARCH DEPTH FIRST BY n SET ord SELECT * FROM r ORDER BY ord",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
             SEARCH BREADTH FIRST BY n SET ord, s AS (SELECT 2) SELECT * FROM r, s",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
             CYCLE n SET looped USING path SELECT * FROM r",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
             CYCLE n SET looped TO 'y' DEFAULT 'n' USING path SELECT * FROM r",
        ] {
            assert_eq!(access(sql), Access::Read, "{sql}");
        }
    }

    #[test]
    fn writes() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR SHARE SKIP LOCKED",
            "SELECT nextval('s')",
            "SELECT pg_catalog.setval('s', 1)",
            "SELECT pg_advisory_lock(1)",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT txid_current()",
            "SELECT lo_create(0)",
            "SELECT audit_log('x')",
            "SELECT * INTO new_table FROM t",
            "CREATE TABLE t (a int)",
            "LISTEN chan",
            "EXPLAIN ANALYZE DELETE FROM t",
            "EXPLAIN (ANALYZE) DELETE FROM t",
            "EXPLAIN (analyze true, BUFFERS) UPDATE t SET a = 1",
            "EXPLAIN (VERBOSE, ANALYZE 1) INSERT INTO t VALUES (1)",
            "SELECT 1; INSERT INTO t VALUES (1)",
            "this is not sql",
            "SELECT (SELECT nextval('s'))",
            "SELECT * FROM pg_advisory_lock(4242)",
            "SELECT * FROM nextval('s')",
            "SELECT * FROM t, LATERAL pg_notify('c', t.x) AS n",
            "SELECT * FROM ROWS FROM (txid_current(), generate_series(1, 2))",
            "SELECT * FROM (VALUES (nextval('s'))) v",
            "SELECT * FROM pg_catalog.set_config('a.b', 'c', false)",
            "SELECT pg_logical_emit_message(true, 'p', 'x')",
            "SELECT U&\"\\006Eextval\"('s')",
            "SELECT * FROM U&\"\\+00006Eextval\"('s')",
            "COPY t TO '/tmp/t.csv'",
            "COPY (SELECT 1) TO PROGRAM 'cat'",
            "COPY (SELECT nextval('s')) TO STDOUT",
            "COPY t FROM STDIN",
            "SELECT * FROM ROWS FROM (generate_series(1, 2), nextval('s'))",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
             SEARCH DEPTH FIRST BY n SET ord SELECT nextval('s') FROM r",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
             CYCLE n SET looped USING path DELETE FROM t",
            "CREATE TABLE t2 AS TABLE t",
            "INSERT INTO t2 TABLE t",
            "EXECUTE p(1)",
            // Clause words that are not the clauses: nothing may be dropped across statements.
            "SELECT (1) cycle FROM t FOR KEY SHARE; UPDATE t SET a = 1",
            "SELECT 1 FROM (SELECT 1) cycle FOR KEY SHARE; ALTER TABLE t SET SCHEMA s",
            "SELECT (1) search FROM t FOR KEY SHARE; UPDATE t SET a = 1",
        ] {
            assert_eq!(access(sql), Access::Write, "{sql}");
        }
    }

    #[test]
    fn session_statements_go_anywhere() {
        assert_eq!(access("SET search_path = a"), Access::Any);
        assert_eq!(access("RESET regiongate.max_lag"), Access::Any);
        assert_eq!(access("RESET ALL"), Access::Any);
        assert_eq!(access("SHOW work_mem"), Access::Any);
        assert_eq!(access("DISCARD ALL"), Access::Any);
        assert_eq!(access("SET x = 1; SELECT 1"), Access::Read);
        // A transaction's opening decides nothing: its statements do.
        assert_eq!(access("BEGIN"), Access::Any);
        assert_eq!(access("BEGIN ISOLATION LEVEL REPEATABLE READ"), Access::Any);
        assert_eq!(
            access("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            Access::Any
        );
        assert_eq!(access("BEGIN; INSERT INTO t VALUES (1)"), Access::Write);
        assert_eq!(access("PREPARE p AS DELETE FROM t"), Access::Any);
        assert_eq!(access("DEALLOCATE p"), Access::Any);
    }

    #[test]
    fn a_prepared_statement_is_classed_by_what_it_runs() {
        let classifier = Classifier::new(&[]);
        let prepared = |sql: &str| classifier.prepared(sql.as_bytes());
        assert_eq!(
            prepared("PREPARE p (int) AS SELECT * FROM t WHERE a = $1"),
            Access::Read
        );
        assert_eq!(prepared("prepare p as table t"), Access::Read);
        assert_eq!(prepared("PREPARE p AS SELECT nextval('s')"), Access::Write);
        assert_eq!(prepared("PREPARE p AS UPDATE t SET a = 1"), Access::Write);
        assert_eq!(prepared("SELECT 1"), Access::Write);
    }

    #[test]
    fn transaction_openings_and_their_modes_are_recognised() {
        let classifier = Classifier::new(&[]);
        let class = |sql: &str| classifier.classify(sql.as_bytes());
        assert!(class("BEGIN").begin);
        assert!(class("start transaction").begin);
        assert!(class("BEGIN READ ONLY").begin);
        assert!(!class("BEGIN; SELECT 1").begin);
        assert!(class("BEGIN; SELECT 1").begins);
        assert!(!class("SET TRANSACTION READ ONLY").begins);
        assert_eq!(class("BEGIN").modes, TxModes::default());
        let serializable = Some(Isolation::Serializable);
        let modes = class("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY DEFERRABLE").modes;
        assert_eq!(
            modes,
            TxModes {
                isolation: serializable,
                read_only: Some(true),
                deferrable: Some(true),
                read_write: false,
            }
        );
        assert!(
            modes.needs_primary(),
            "a standby refuses serializable, deferrable or not"
        );
        assert!(class("BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .modes
            .needs_primary());
        assert!(class("begin read only isolation level serializable")
            .modes
            .needs_primary());
        assert!(class("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .modes
            .needs_primary());
        assert!(
            class("BEGIN ISOLATION LEVEL SERIALIZABLE, ISOLATION LEVEL READ COMMITTED")
                .modes
                .needs_primary(),
            "a standby fails at the first level said"
        );
        // A standby refuses to set READ WRITE; the later statement's mode wins.
        assert!(class("BEGIN READ ONLY; SET TRANSACTION READ WRITE")
            .modes
            .needs_primary());
        assert!(class("BEGIN READ WRITE").modes.needs_primary());
        assert!(class("BEGIN READ WRITE; SET TRANSACTION READ ONLY")
            .modes
            .needs_primary());
        assert!(!class("BEGIN READ ONLY").modes.needs_primary());
        assert_eq!(
            class("START TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
                .modes
                .isolation,
            Some(Isolation::ReadCommitted)
        );
        // The later statement's modes win, but serializable, once said, stays: a standby fails at it.
        let later = class(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
        );
        assert_eq!(later.modes.isolation, Some(Isolation::ReadCommitted));
        let later = class(
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        );
        assert!(later.modes.needs_primary());
        assert_eq!(class("SELECT 1").modes, TxModes::default());
        assert_eq!(
            Isolation::from_setting("repeatable read"),
            Some(Isolation::RepeatableRead)
        );
    }

    #[test]
    fn reads_of_views_only_carry_the_set_of_views() {
        let classifier = Classifier::with_views(
            &[],
            vec![
                ("public".into(), "daily_sales".into()),
                ("reporting".into(), "top".into()),
            ],
        );
        let views = |sql: &str| classifier.classify(sql.as_bytes()).views;
        assert_eq!(views("SELECT * FROM daily_sales WHERE day > $1"), 0b01);
        assert_eq!(views("select * from public.DAILY_SALES"), 0b01);
        assert_eq!(
            views("SELECT * FROM reporting.top ORDER BY revenue DESC LIMIT 10"),
            0b10
        );
        assert_eq!(
            views("WITH d AS (SELECT * FROM daily_sales) SELECT * FROM d JOIN reporting.top t ON true"),
            0b11
        );
        assert_eq!(views("SELECT (SELECT max(day) FROM daily_sales)"), 0b01);
        // Anything else read with them, or another schema, or not a read: not a view read.
        assert_eq!(views("SELECT * FROM daily_sales JOIN orders ON true"), 0);
        assert_eq!(views("SELECT * FROM top"), 0);
        assert_eq!(views("SELECT * FROM \"Daily_sales\""), 0);
        assert_eq!(views("SELECT 1"), 0);
        assert_eq!(views("SELECT * FROM daily_sales FOR UPDATE"), 0);
        assert_eq!(views("SELECT * FROM generate_series(1, 3)"), 0);
        assert_eq!(views("SELECT * FROM daily_sales; SELECT * FROM orders"), 0);
        assert_eq!(
            Classifier::new(&[])
                .classify(b"SELECT * FROM daily_sales")
                .views,
            0
        );
    }

    #[test]
    fn hints() {
        use super::hint::{parse, Hint};
        assert_eq!(
            parse(b"/* regiongate: primary */ SELECT 1"),
            Some(Hint::Primary)
        );
        assert_eq!(
            parse(b"  /* app */ /* regiongate: max_lag=5s */ SELECT 1"),
            Some(Hint::MaxLag(Duration::from_secs(5)))
        );
        assert_eq!(parse(b"SELECT 1 /* regiongate: primary */"), None);
        assert_eq!(parse(b"/* regiongate: nonsense */ SELECT 1"), None);
    }
}
