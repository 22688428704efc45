//! What transaction pooling must know about a statement: where statements start and end in a multi-statement
//! Query, and whether one changes session state (SET, RESET, PREPARE, EXECUTE, DEALLOCATE, DISCARD) or ties
//! the client to its server connection (LISTEN, temporary tables, WITH HOLD cursors, session advisory locks).
//!
//! It reads statements through the shared [`crate::lexer`], which understands quoting (strings, E'' escapes,
//! quoted identifiers, dollar quotes) and comments, so a semicolon or keyword inside them is never mistaken
//! for syntax. It is not a parser: statements it does not
//! recognise are [`Kind::Other`], which is always safe (forwarded untouched).

use crate::fingerprint::{mentions_watched, Head, ShapeId};
use crate::lexer::{
    dollar_quoted_body, is_ident_byte, skip_quoted, skip_space, skip_token, token_ranges, tokens,
};
use std::ops::Range;

/// What a statement means for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Other,
    /// `SET [SESSION] name ...` (`session_authorization` and `role` included).
    Set {
        name: String,
    },
    /// `RESET name` or `SET name TO DEFAULT`, or `RESET ALL` when `name` is None: back to the session's
    /// connection-time value.
    Reset {
        name: Option<String>,
    },
    /// A statement that calls `set_config` (anywhere: FROM, a DO block's text): it may change settings for the
    /// session. `names` are the setting names given as literals (lower case), `parameters` the (zero-based)
    /// parameters given as names (`set_config($1, $2, false)`).
    SetConfig {
        names: Vec<String>,
        parameters: Vec<usize>,
    },
    /// Session state that cannot be moved between server connections.
    Pin(&'static str),
    /// `PREPARE name [(types)] AS ...` (SQL level).
    Prepare {
        name: String,
        at: Range<usize>,
    },
    /// `EXECUTE name [(args)]`.
    Execute {
        name: String,
        at: Range<usize>,
    },
    /// `DEALLOCATE [PREPARE] name`, or `DEALLOCATE ALL` when None.
    Deallocate {
        name: Option<(String, Range<usize>)>,
    },
    /// `DISCARD ALL`: the server forgets prepared statements, settings, temp tables, listens, locks.
    DiscardAll,
}

/// The byte ranges of the statements in `sql`, split at top-level semicolons; empty statements are skipped.
/// Lazy and allocation-free: every Query on the hot path goes through it.
pub fn split(sql: &[u8]) -> Statements<'_> {
    Statements { sql, at: 0 }
}

pub struct Statements<'a> {
    sql: &'a [u8],
    at: usize,
}

impl Iterator for Statements<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let s = self.sql;
        while self.at < s.len() {
            let start = self.at;
            // No semicolon, or one only at the very end (the common cases): one statement, no need to lex
            // for quotes.
            let semicolon = memchr::memchr(b';', &s[start..]).map(|p| start + p);
            let single_end = match semicolon {
                None => Some(s.len()),
                Some(p) if s[p + 1..].iter().all(u8::is_ascii_whitespace) => Some(p),
                Some(_) => None,
            };
            if let Some(end) = single_end {
                self.at = s.len();
                return (skip_space(s, start) < end).then_some(start..end);
            }
            let mut i = start;
            while i < s.len() && s[i] != b';' {
                i = skip_token(s, i);
            }
            let end = i.min(s.len());
            self.at = end + 1;
            if skip_space(s, start) < end {
                return Some(start..end);
            }
        }
        None
    }
}

/// Reads the word (identifier, possibly quoted or dotted) at or after `i`: its folded value and byte range.
pub fn word(sql: &[u8], i: usize) -> Option<(String, Range<usize>)> {
    let s = sql;
    let start = skip_space(s, i);
    if start >= s.len() {
        return None;
    }
    if s[start] == b'"' {
        let end = skip_quoted(s, start + 1, b'"', false);
        let inner = String::from_utf8_lossy(&sql[start + 1..end.saturating_sub(1).max(start + 1)]);
        return Some((inner.replace("\"\"", "\""), start..end));
    }
    let mut end = start;
    while end < s.len() && (is_ident_byte(s[end]) || s[end] == b'.') {
        end += 1;
    }
    (end > start).then(|| {
        (
            String::from_utf8_lossy(&sql[start..end]).to_ascii_lowercase(),
            start..end,
        )
    })
}

/// The statement's words from its start, lazily.
struct Words<'a> {
    sql: &'a [u8],
    at: usize,
}

impl Words<'_> {
    fn next(&mut self) -> Option<(String, Range<usize>)> {
        let (w, range) = word(self.sql, self.at)?;
        self.at = range.end;
        Some((w, range))
    }
}

/// First words of the statements [`classify`] looks further into (`explain`: it may EXECUTE a SQL-level
/// prepared statement, see [`executed_names`]).
const SESSION_HEADS: [&[u8]; 12] = [
    b"explain",
    b"do",
    b"call",
    b"set",
    b"reset",
    b"listen",
    b"create",
    b"declare",
    b"prepare",
    b"execute",
    b"deallocate",
    b"discard",
];

/// True when a Query, of which one lexer pass found `shape` ([`crate::fingerprint::shape_id`]), is one
/// statement that [`classify`] would call [`Kind::Other`]: the caller then needs neither [`split`] nor
/// [`classify`].
pub fn plainly_other(shape: &ShapeId) -> bool {
    const HEADS: [Head; SESSION_HEADS.len()] = {
        let mut heads = [Head::of(b""); SESSION_HEADS.len()];
        let mut i = 0;
        while i < heads.len() {
            heads[i] = Head::of(SESSION_HEADS[i]);
            i += 1;
        }
        heads
    };
    !shape.several && !shape.watched && !HEADS.contains(&shape.head)
}

/// Whether a Query, by its first word, may change what prepared statements mean: ALTER and DROP (a column
/// type changed, a type dropped and created again). CREATE OR REPLACE starts with CREATE and is caught by
/// the server's own error instead (see the session's `stale_statement`).
pub fn changes_schema(shape: &ShapeId) -> bool {
    const ALTER: Head = Head::of(b"alter");
    const DROP: Head = Head::of(b"drop");
    shape.head == ALTER || shape.head == DROP
}

/// Classifies one statement (a range from [`split`]); ranges in the result are relative to `sql`.
pub fn classify(sql: &[u8], range: Range<usize>) -> Kind {
    let text = &sql[..range.end];
    let statement = &text[range.start..];
    // Session advisory locks can hide anywhere in an expression; the transaction-scoped ones do not match.
    if mentions_advisory_lock(statement) {
        return Kind::Pin("session advisory lock");
    }
    // Most statements are not about the session: tell from the first word, without allocating.
    let start = skip_space(text, range.start);
    let head_end = (start..text.len())
        .find(|&i| !text[i].is_ascii_alphabetic())
        .unwrap_or(text.len());
    let head = &text[start..head_end];
    if !SESSION_HEADS.iter().any(|h| h.eq_ignore_ascii_case(head)) {
        if mentions_watched(statement) {
            if creates_in_pg_temp(statement, false) {
                return Kind::Pin("temporary object");
            }
            if mentions(statement, b"set_config") {
                let (names, parameters) = set_config_names(statement);
                return Kind::SetConfig { names, parameters };
            }
        }
        return Kind::Other;
    }
    let mut words = Words {
        sql: text,
        at: range.start,
    };
    let Some((head, _)) = words.next() else {
        return Kind::Other;
    };
    match head.as_str() {
        "set" => classify_set(&mut words),
        "reset" => match words.next() {
            Some((w, _)) if w == "all" => Kind::Reset { name: None },
            Some((w, _)) => Kind::Reset {
                name: Some(setting_name(&w, &mut words)),
            },
            None => Kind::Other,
        },
        "listen" => Kind::Pin("LISTEN"),
        // A DO block or a procedure may SET anything (SET ROLE included): the session's settings are read
        // back after it.
        "do" | "call" => {
            let (names, parameters) = set_config_names(statement);
            Kind::SetConfig { names, parameters }
        }
        "create" => {
            if mentions(statement, b"pg_temp") && creates_in_pg_temp(statement, true) {
                return Kind::Pin("temporary object");
            }
            for _ in 0..3 {
                match words.next() {
                    Some((w, _)) if w == "temp" || w == "temporary" => {
                        return Kind::Pin("temporary table")
                    }
                    Some((w, _))
                        if w == "global" || w == "local" || w == "or" || w == "replace" => {}
                    _ => break,
                }
            }
            Kind::Other
        }
        "declare" => {
            let mut previous = String::new();
            while let Some((w, _)) = words.next() {
                if previous == "with" && w == "hold" {
                    return Kind::Pin("WITH HOLD cursor");
                }
                if w == "for" {
                    break;
                }
                previous = w;
            }
            Kind::Other
        }
        "prepare" => match words.next() {
            Some((w, _)) if w == "transaction" => Kind::Other,
            Some((name, at)) => Kind::Prepare { name, at },
            None => Kind::Other,
        },
        "execute" => match words.next() {
            Some((name, at)) => Kind::Execute { name, at },
            None => Kind::Other,
        },
        "deallocate" => {
            let mut next = words.next();
            if matches!(&next, Some((w, _)) if w == "prepare") {
                next = words.next();
            }
            match next {
                Some((w, _)) if w == "all" => Kind::Deallocate { name: None },
                Some((name, at)) => Kind::Deallocate {
                    name: Some((name, at)),
                },
                None => Kind::Other,
            }
        }
        "discard" => match words.next() {
            Some((w, _)) if w == "all" => Kind::DiscardAll,
            _ => Kind::Other,
        },
        _ => Kind::Other,
    }
}

fn classify_set(words: &mut Words<'_>) -> Kind {
    let Some((mut w, _)) = words.next() else {
        return Kind::Other;
    };
    if w == "local" {
        return Kind::Other; // lasts until the end of the transaction, which stays on one server
    }
    if w == "session" {
        match words.next() {
            Some((next, _)) if next == "characteristics" => {
                return Kind::Set {
                    name: "session characteristics".into(),
                }
            }
            Some((next, _)) if next == "authorization" => {
                return Kind::Set {
                    name: "session_authorization".into(),
                }
            }
            Some((next, _)) => w = next,
            None => return Kind::Other,
        }
    }
    if w == "transaction" || w == "constraints" {
        return Kind::Other; // transaction-scoped
    }
    if w == "role" {
        return Kind::Set {
            name: "role".into(),
        };
    }
    let name = setting_name(&w, words);
    // `SET name TO DEFAULT` / `= DEFAULT` is a RESET, and so is `SET TIME ZONE LOCAL`.
    if value_is_default(words, name == "timezone") {
        return Kind::Reset { name: Some(name) };
    }
    Kind::Set { name }
}

/// After the setting's name: whether its value is the keyword DEFAULT (`TO DEFAULT`, `= DEFAULT`), or LOCAL
/// where `local` says it is the time zone's.
fn value_is_default(words: &Words<'_>, local: bool) -> bool {
    let s = words.sql;
    let mut i = skip_space(s, words.at);
    if s.get(i) == Some(&b'=') {
        i += 1;
    } else if matches!(word(s, i), Some((w, _)) if w == "to") {
        i = word(s, i).map_or(i, |(_, range)| range.end);
    }
    matches!(word(s, i), Some((w, range))
        if (w == "default" || local && w == "local") && skip_space(s, range.end) >= s.len())
}

/// Whether `text` contains `needle` (lower case) in any letter case, comments and strings included.
fn mentions(text: &[u8], needle: &[u8]) -> bool {
    text.windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

/// SQL-level prepared statements a statement runs other than at its head: `EXPLAIN [ANALYZE] EXECUTE name`,
/// `CREATE [TEMP] TABLE t AS EXECUTE name`. Their names (folded) and where they are, relative to `sql`.
/// Names inside strings (a DO block's text) are not seen.
pub fn executed_names(sql: &[u8], range: Range<usize>) -> Vec<(String, Range<usize>)> {
    let statement = &sql[range.start..range.end];
    let mut found = Vec::new();
    let mut after_execute = false;
    for token in token_ranges(statement) {
        let text = &statement[token.clone()];
        if after_execute {
            if let Some((name, at)) = word(statement, token.start) {
                found.push((name, range.start + at.start..range.start + at.end));
            }
        }
        after_execute = text.eq_ignore_ascii_case(b"execute");
    }
    found
}

/// Whether a statement creates something in the session's temporary schema without saying TEMP: `pg_temp`
/// after INTO (SELECT INTO), or anywhere in a CREATE (`CREATE TABLE pg_temp.t`, `CREATE STATISTICS
/// pg_temp.s`).
fn creates_in_pg_temp(statement: &[u8], create: bool) -> bool {
    let mut previous: &[u8] = b"";
    tokens(statement).any(|token| {
        let temp =
            token.eq_ignore_ascii_case(b"pg_temp") || token.eq_ignore_ascii_case(b"\"pg_temp\"");
        let hit = temp && (create || previous.eq_ignore_ascii_case(b"into"));
        previous = token;
        hit
    })
}

/// Whether a statement calls `set_config` anywhere (a PREPARE's, EXPLAIN's, CREATE ... AS or DECLARE's
/// query included): the setting names and name parameters it gives, as for [`Kind::SetConfig`].
pub fn set_config_in(sql: &[u8], range: Range<usize>) -> Option<(Vec<String>, Vec<usize>)> {
    let statement = &sql[range];
    mentions(statement, b"set_config").then(|| set_config_names(statement))
}

/// The setting names `set_config` calls in a statement are given: string literals (lower case), and the
/// zero-based numbers of parameters (`$1`) whose values are names.
fn set_config_names(statement: &[u8]) -> (Vec<String>, Vec<usize>) {
    let (mut names, mut parameters) = (Vec::new(), Vec::new());
    let mut tokens = tokens(statement).peekable();
    while let Some(token) = tokens.next() {
        if let Some(body) = dollar_quoted_body(token) {
            // A DO block's or a function's body: its own set_config calls and SETs of custom settings.
            let (more_names, _) = set_config_names(body);
            names.extend(more_names);
            for token in token_ranges(body) {
                if body[token.clone()].eq_ignore_ascii_case(b"set") {
                    if let Some((name, _)) = word(body, token.end) {
                        if name.contains('.') {
                            names.push(name);
                        }
                    }
                }
            }
            continue;
        }
        if !token.eq_ignore_ascii_case(b"set_config") || tokens.peek() != Some(&&b"("[..]) {
            continue;
        }
        tokens.next();
        match tokens.next() {
            Some(literal) if literal.len() >= 2 && literal[0] == b'\'' => {
                let inner = &literal[1..literal.len() - 1];
                names.push(
                    String::from_utf8_lossy(inner)
                        .replace("''", "'")
                        .to_ascii_lowercase(),
                );
            }
            // `$` is one token and its digits the next.
            Some(b"$") => {
                if let Some(n) = tokens
                    .next()
                    .and_then(|digits| std::str::from_utf8(digits).ok()?.parse::<usize>().ok())
                    .filter(|&n| n >= 1)
                {
                    parameters.push(n - 1);
                }
            }
            _ => {}
        }
    }
    (names, parameters)
}

/// A `SET [SESSION | LOCAL] name {= | TO} value` of a setting whose name starts with `prefix`: its name
/// (folded) and value as the server would read it (a quoted string unquoted; a list or expression as
/// written). None for other statements, and for `TO DEFAULT` (a RESET).
pub fn set_with_prefix(sql: &[u8], range: Range<usize>, prefix: &str) -> Option<(String, String)> {
    let statement = &sql[range];
    let mut words = Words {
        sql: statement,
        at: 0,
    };
    if words.next()?.0 != "set" {
        return None;
    }
    let (mut name, mut at) = words.next()?;
    if name == "session" || name == "local" {
        (name, at) = words.next()?;
    }
    if !name.starts_with(prefix) {
        return None;
    }
    let mut i = skip_space(statement, at.end);
    if statement.get(i) == Some(&b'=') {
        i += 1;
    } else if matches!(word(statement, i), Some((w, _)) if w == "to") {
        i = word(statement, i)?.1.end;
    } else {
        return None;
    }
    // The value's tokens, comments skipped: one string, identifier or word is the value as the server reads
    // it; more (a list, a sign and a number) are the value as written.
    let rest = &statement[i..];
    let mut values: Vec<Range<usize>> = token_ranges(rest).collect();
    // E'…' is one string to the server, two tokens to the lexer.
    if let [e, string] = values.as_slice() {
        if rest[e.clone()].eq_ignore_ascii_case(b"e") && e.end == string.start {
            values = std::iter::once(e.start..string.end).collect();
        }
    }
    let text = |range: Range<usize>| String::from_utf8_lossy(&rest[range]).into_owned();
    let value = match values.as_slice() {
        [] => return None,
        [one] => {
            let token = text(one.clone());
            let unquoted = |t: &str, quote: char| {
                let inner = t.strip_prefix(quote)?.strip_suffix(quote)?;
                Some(inner.replace(&format!("{quote}{quote}"), &quote.to_string()))
            };
            if token.eq_ignore_ascii_case("default") {
                return None;
            }
            unquoted(&token, '\'')
                .or_else(|| unquoted(token.strip_prefix(['E', 'e'])?, '\''))
                .or_else(|| unquoted(&token, '"'))
                .unwrap_or(token)
        }
        [first, .., last] => text(first.start..last.end),
    };
    Some((name, value))
}

/// Canonical setting names for the SET/RESET spellings that are not `name = value`.
fn setting_name(first: &str, words: &mut Words<'_>) -> String {
    match first {
        "time" => {
            words.next(); // ZONE
            "timezone".into()
        }
        "names" => "client_encoding".into(),
        "schema" => "search_path".into(),
        "session" => {
            words.next(); // AUTHORIZATION
            "session_authorization".into()
        }
        other => other.to_string(),
    }
}

/// Whether `text` mentions a session advisory lock function (`pg_advisory_lock`, `pg_try_advisory_lock`,
/// their `_shared` forms) in any letter case.
pub(crate) fn mentions_advisory_lock(text: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"advisory_lock";
    const UNDERSCORE_AT: usize = 8;
    // A plain loop over where the needle's `_` could be: the texts are mostly single tokens, too short for
    // `memchr` to pay for its setup.
    text.len() >= NEEDLE.len()
        && (UNDERSCORE_AT..=text.len() - (NEEDLE.len() - UNDERSCORE_AT)).any(|p| {
            text[p] == b'_'
                && text[p - UNDERSCORE_AT..p - UNDERSCORE_AT + NEEDLE.len()]
                    .eq_ignore_ascii_case(NEEDLE)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plainly_other_only_where_split_and_classify_find_nothing() {
        let cases: &[&str] = &[
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
            "select 1 ;  -- trailing\n",
            "SELECT 'a;b', $$c;d$$, E'\\';' FROM t",
            "/* SET x = 1; */ SELECT 1",
            "UPDATE t SET a = 1 WHERE id = 2",
            "  SET search_path = app",
            "set statement_timeout to 5",
            "RESET ALL",
            "SELECT 1; SET x = 2",
            "SELECT 1;;",
            "SELECT pg_advisory_lock(1)",
            "SELECT 'pg_advisory_lock'",
            "LISTEN channel",
            "CREATE TEMP TABLE t (a int)",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "DEALLOCATE ALL",
            "DISCARD ALL",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "SELECT \"a;b\" FROM t",
            "(SELECT 1)",
            "",
            ";",
        ];
        for sql in cases {
            let text = sql.as_bytes();
            let shape = crate::fingerprint::shape_id(text);
            let ranges: Vec<_> = split(text).collect();
            let other = ranges
                .iter()
                .all(|r| classify(text, r.clone()) == Kind::Other);
            if plainly_other(&shape) {
                assert!(
                    other,
                    "{sql}: plainly other, but split/classify say {ranges:?}"
                );
            }
        }
        // The common cases do take the short way.
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
            "UPDATE t SET a = 1",
        ] {
            let text = sql.as_bytes();
            assert!(plainly_other(&crate::fingerprint::shape_id(text)), "{sql}");
        }
    }

    fn kinds(sql: &str) -> Vec<Kind> {
        let sql = sql.as_bytes();
        split(sql).map(|r| classify(sql, r)).collect()
    }

    #[test]
    fn splits_at_top_level_semicolons_only() {
        let sql = "select ';' ; select $$a;b$$; select $x$ ; $x$ -- c;\n; select \"a;\" /* ; /* ; */ */; ;";
        let parts: Vec<&str> = split(sql.as_bytes()).map(|r| sql[r].trim()).collect();
        assert_eq!(
            parts,
            vec![
                "select ';'",
                "select $$a;b$$",
                "select $x$ ; $x$ -- c;",
                "select \"a;\" /* ; /* ; */ */"
            ]
        );
    }

    #[test]
    fn escape_strings_and_parameters() {
        assert_eq!(split(br"select E'\';' ; select 1").count(), 2);
        assert_eq!(split(b"select $1; select $2").count(), 2);
        assert_eq!(split(b"select 'it''s;'").count(), 1);
        assert_eq!(split(b"select '\xff;'; select 2").count(), 2);
    }

    #[test]
    fn session_statements() {
        assert_eq!(
            kinds("SET search_path = a, b")[0],
            Kind::Set {
                name: "search_path".into()
            }
        );
        assert_eq!(
            kinds("set session TIME ZONE 'UTC'")[0],
            Kind::Set {
                name: "timezone".into()
            }
        );
        assert_eq!(kinds("SET LOCAL work_mem = '1MB'")[0], Kind::Other);
        assert_eq!(kinds("SET TRANSACTION READ ONLY")[0], Kind::Other);
        assert_eq!(
            kinds("set regiongate.max_lag = '5s'")[0],
            Kind::Set {
                name: "regiongate.max_lag".into()
            }
        );
        assert_eq!(kinds("/* hi */ RESET ALL")[0], Kind::Reset { name: None });
        assert_eq!(
            kinds("reset statement_timeout")[0],
            Kind::Reset {
                name: Some("statement_timeout".into())
            }
        );
        assert_eq!(kinds("DISCARD ALL")[0], Kind::DiscardAll);
        let reset = |name: &str| Kind::Reset {
            name: Some(name.into()),
        };
        assert_eq!(kinds("SET work_mem TO DEFAULT")[0], reset("work_mem"));
        assert_eq!(kinds("set work_mem = default")[0], reset("work_mem"));
        assert_eq!(kinds("SET TIME ZONE LOCAL")[0], reset("timezone"));
        assert_eq!(
            kinds("SET search_path = local")[0],
            Kind::Set {
                name: "search_path".into()
            }
        );
        assert_eq!(
            kinds("SET ROLE bob")[0],
            Kind::Set {
                name: "role".into()
            }
        );
    }

    #[test]
    fn set_config_is_found_wherever_it_is_called() {
        let set_config = |names: &[&str], parameters: &[usize]| Kind::SetConfig {
            names: names.iter().map(|n| n.to_string()).collect(),
            parameters: parameters.to_vec(),
        };
        assert_eq!(
            kinds("SELECT set_config('App.Tenant', '1', false)")[0],
            set_config(&["app.tenant"], &[])
        );
        assert_eq!(
            kinds("select * from pg_catalog.set_config('search_path', 'x', false)")[0],
            set_config(&["search_path"], &[])
        );
        assert_eq!(
            kinds("SELECT set_config($2, $1, false)")[0],
            set_config(&[], &[1])
        );
        assert_eq!(
            kinds("DO $body$ BEGIN PERFORM set_config('app.x', '1', false); END $body$")[0],
            set_config(&["app.x"], &[])
        );
        assert_eq!(kinds("CALL p()")[0], set_config(&[], &[]));
        // Not a call: a mention in a string or a comment still looks closer, and finds no name.
        assert_eq!(
            kinds("SELECT 'set_config' -- set_config(")[0],
            set_config(&[], &[])
        );
        assert_eq!(kinds("SELECT 1")[0], Kind::Other);
    }

    #[test]
    fn objects_in_pg_temp_pin_and_mentions_do_not() {
        let pin = Kind::Pin("temporary object");
        assert_eq!(kinds("CREATE TABLE pg_temp.t (x int)")[0], pin);
        assert_eq!(kinds("create statistics PG_TEMP.s on a, b from t")[0], pin);
        assert_eq!(kinds("SELECT 1 AS x INTO pg_temp.t")[0], pin);
        assert_eq!(kinds("SELECT * FROM pg_temp.t")[0], Kind::Other);
        assert_eq!(
            kinds("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'pg_temp%'")[0],
            Kind::Other
        );
    }

    #[test]
    fn sql_level_executes_inside_other_statements_are_found() {
        let sql = b"EXPLAIN (ANALYZE) EXECUTE s1(2); CREATE TEMP TABLE t AS EXECUTE \"S2\"";
        let found: Vec<String> = split(sql)
            .flat_map(|range| executed_names(sql, range))
            .map(|(name, at)| format!("{name}@{}", String::from_utf8_lossy(&sql[at])))
            .collect();
        assert_eq!(found, ["s1@s1", "S2@\"S2\""]);
    }

    #[test]
    fn pinning_statements() {
        assert_eq!(kinds("LISTEN chan")[0], Kind::Pin("LISTEN"));
        assert_eq!(
            kinds("create temporary table t (a int)")[0],
            Kind::Pin("temporary table")
        );
        assert_eq!(
            kinds("CREATE GLOBAL TEMP TABLE t (a int)")[0],
            Kind::Pin("temporary table")
        );
        assert_eq!(kinds("create table t (temp int)")[0], Kind::Other);
        assert_eq!(
            kinds("declare c cursor with hold for select 1")[0],
            Kind::Pin("WITH HOLD cursor")
        );
        assert_eq!(kinds("declare c cursor for select 1")[0], Kind::Other);
        assert_eq!(
            kinds("select pg_advisory_lock(1)")[0],
            Kind::Pin("session advisory lock")
        );
        assert_eq!(
            kinds("SELECT PG_TRY_ADVISORY_LOCK(1)")[0],
            Kind::Pin("session advisory lock")
        );
        assert_eq!(kinds("select pg_advisory_xact_lock(1)")[0], Kind::Other);
    }

    #[test]
    fn gateway_settings_and_their_values() {
        let set = |sql: &str| set_with_prefix(sql.as_bytes(), 0..sql.len(), "regiongate.");
        let found = |name: &str, value: &str| Some((name.to_string(), value.to_string()));
        assert_eq!(
            set("SET regiongate.max_lag = '5s'"),
            found("regiongate.max_lag", "5s")
        );
        assert_eq!(
            set("set Regiongate.Max_Lag to 100ms"),
            found("regiongate.max_lag", "100ms")
        );
        assert_eq!(
            set("SET LOCAL regiongate.max_lag = 'it''s'"),
            found("regiongate.max_lag", "it's")
        );
        assert_eq!(
            set("SET SESSION regiongate.max_lag = ''"),
            found("regiongate.max_lag", "")
        );
        assert_eq!(
            set("SET regiongate.max_lag = -1"),
            found("regiongate.max_lag", "-1")
        );
        assert_eq!(
            set("SET regiongate.max_lag = 'a', 'b'"),
            found("regiongate.max_lag", "'a', 'b'")
        );
        assert_eq!(set("SET regiongate.max_lag TO DEFAULT"), None);
        assert_eq!(
            set("SET regiongate.max_lag = '5s' -- why"),
            found("regiongate.max_lag", "5s")
        );
        assert_eq!(
            set("SET /* c */ LOCAL regiongate.max_lag = /* d */ \"5s\""),
            found("regiongate.max_lag", "5s")
        );
        assert_eq!(
            set("SET regiongate.max_lag = E'5s'"),
            found("regiongate.max_lag", "5s")
        );
        assert_eq!(set("SET work_mem = '1MB'"), None);
        assert_eq!(set("RESET regiongate.max_lag"), None);
    }

    #[test]
    fn prepared_statements_at_sql_level() {
        let sql = "PREPARE \"Q1\" (int) AS SELECT $1; execute q2(3); deallocate prepare q3; DEALLOCATE ALL";
        let k = kinds(sql);
        assert_eq!(
            k[0],
            Kind::Prepare {
                name: "Q1".into(),
                at: 8..12
            }
        );
        assert!(matches!(&k[1], Kind::Execute { name, .. } if name == "q2"));
        assert!(matches!(&k[2], Kind::Deallocate { name: Some((n, _)) } if n == "q3"));
        assert_eq!(k[3], Kind::Deallocate { name: None });
        assert_eq!(kinds("PREPARE TRANSACTION 'x'")[0], Kind::Other);
    }
}
