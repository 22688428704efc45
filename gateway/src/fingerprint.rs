//! Statement fingerprints: the shape of a statement with its values taken out.
//!
//! Two levels, for two costs. [`shape`] runs on every statement: one pass of the lexer that drops comments,
//! folds white space and case, replaces literals and parameters with `?` and collapses lists of them, then
//! hashes the result (well under a microsecond for a typical statement, no allocation but the output buffer).
//! [`canonical`] runs once per shape, when a shape must be shown (an N+1 report): sqlparser parses the
//! statement and a `VisitorMut` replaces every literal with a placeholder and collapses IN lists, giving the
//! normalized SQL people read.

use sqlparser::ast::{Expr, InTarget, Value, ValueWithSpan, VisitMut, VisitorMut};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// A statement's shape and its hash; the hash is what detectors compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub hash: u64,
    pub text: Vec<u8>,
}

impl Shape {
    pub fn is_read(&self) -> bool {
        reads(&self.text)
    }
}

/// Whether a shape is a query that only reads, as far as its first word tells (SELECT, WITH, VALUES, TABLE).
fn reads(shape: &[u8]) -> bool {
    let first = shape
        .split(|b| !b.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    matches!(first, b"select" | b"with" | b"values" | b"table")
}

/// What detectors and caches need of a shape: its hash, and whether it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapeId {
    pub hash: u64,
    pub read: bool,
}

/// The shape's identity, built in a caller's reusable buffer (no allocation on the hot path).
pub fn shape_id(sql: &[u8], buffer: &mut Vec<u8>) -> ShapeId {
    shape_into(sql, buffer);
    ShapeId {
        hash: hash_bytes(buffer),
        read: reads(buffer),
    }
}

/// The shape of `sql` (see the module documentation).
pub fn shape(sql: &[u8]) -> Shape {
    let mut out = Vec::with_capacity(sql.len());
    shape_into(sql, &mut out);
    Shape {
        hash: hash_bytes(&out),
        text: out,
    }
}

fn shape_into(sql: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(sql.len());
    let s = sql;
    let mut i = 0;
    // A space is kept only between two words (keywords, identifiers, `?`): "a = ?" and "a=?" share a shape.
    let mut pending_space = false;
    // Case is folded once, over the whole output, at the end (eight bytes at a time): words are copied as they
    // are. `out[..folded]` is folded already.
    let mut folded = 0;
    // Called before a token that starts with a word byte: the white space before it becomes one space if a
    // word precedes it.
    let word_break = |out: &mut Vec<u8>, pending_space: &mut bool| {
        if std::mem::take(pending_space) && out.last().is_some_and(|&b| is_word_byte(b)) {
            out.push(b' ');
        }
    };
    while i < s.len() {
        let c = s[i];
        // Words and numbers are most of every statement: scan them here, a table lookup per byte.
        if c != b'$' && crate::sql::is_ident_byte(c) {
            let end = crate::sql::ident_end(s, i + 1);
            if c.is_ascii_digit() {
                word_break(out, &mut pending_space);
                out.push(b'?');
            } else if c.is_ascii_alphabetic() && end - i <= 2 && s.get(end) == Some(&b'\'') {
                // E'...', B'...', X'...' strings: the prefix letter starts an identifier token.
                word_break(out, &mut pending_space);
                out.push(b'?');
                i = crate::sql::token_end(s, end);
                continue;
            } else {
                word_break(out, &mut pending_space);
                out.extend_from_slice(&s[i..end]);
            }
            i = end;
            continue;
        }
        if c.is_ascii_whitespace() {
            pending_space = true;
            i += 1;
            continue;
        }
        if !matches!(c, b'-' | b'/' | b'\'' | b'"' | b'$') {
            // One byte of punctuation: nothing to lex.
            pending_space = false;
            out.push(c);
            i += 1;
            continue;
        }
        let end = crate::sql::token_end(s, i);
        let token = &s[i..end];
        match c {
            b'-' if token.starts_with(b"--") => pending_space = true,
            b'/' if token.starts_with(b"/*") => pending_space = true,
            b'\'' => {
                word_break(out, &mut pending_space);
                out.push(b'?');
            }
            b'$' if s.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                // $1: a parameter
                let mut j = i + 1;
                while j < s.len() && s[j].is_ascii_digit() {
                    j += 1;
                }
                word_break(out, &mut pending_space);
                out.push(b'?');
                i = j;
                continue;
            }
            b'$' if token.len() > 1 => {
                // $$body$$
                word_break(out, &mut pending_space);
                out.push(b'?');
            }
            b'"' => {
                word_break(out, &mut pending_space);
                // Quoted identifiers keep their case: fold what came before, then step past this one.
                lowercase(&mut out[folded..]);
                out.extend_from_slice(token);
                folded = out.len();
            }
            _ => {
                pending_space = false;
                out.extend_from_slice(token);
            }
        }
        i = end;
    }
    lowercase(&mut out[folded..]);
    collapse_lists(out);
}

/// ASCII lower case, eight bytes at a time (other bytes, UTF-8 included, are left as they are).
fn lowercase(bytes: &mut [u8]) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut chunks = bytes.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes((&*chunk).try_into().expect("chunks of eight"));
        // Per byte, on its low seven bits h (no carry crosses bytes): bit 7 of h + 63 is h >= 'A', of h + 37 is
        // h > 'Z'. Bytes with their own bit 7 set are not ASCII and stay.
        let low = word & (0x7f * ONES);
        let upper = (low + 63 * ONES) & !(low + 37 * ONES) & !word & (0x80 * ONES);
        chunk.copy_from_slice(&(word | (upper >> 2)).to_le_bytes());
    }
    chunks.into_remainder().make_ascii_lowercase();
}

/// A fast 64-bit hash (FxHash's mixing, eight bytes at a time). Shapes and values are hashed on every
/// statement; SipHash's protection against chosen collisions buys nothing here (a collision could at worst
/// make two statements look alike to the N+1 detector).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut hash = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks of eight"));
        hash = (hash.rotate_left(5) ^ word).wrapping_mul(K);
    }
    for &byte in chunks.remainder() {
        hash = (hash.rotate_left(5) ^ u64::from(byte)).wrapping_mul(K);
    }
    hash
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'?' || b == b'"' || b >= 0x80
}

/// `(?,?,?)` → `(?)`, so IN lists and multi-row VALUES of any length share a shape.
fn collapse_lists(out: &mut Vec<u8>) {
    // Nothing to collapse is the common case: no copying then. (A `memmem` searcher costs more to build than
    // this scan of a short shape.)
    if !memchr::memchr_iter(b'?', out).any(|p| out.get(p + 1) == Some(&b',')) {
        return;
    }
    compact(out, b"?,?", 1, b",?");
    // Rows of placeholders: "(?),(?)" → "(?)".
    compact(out, b"(?),(?)", 3, b",(?)");
}

/// At each `head` in `out`, keeps its first `keep` bytes and drops the `repeat`s that follow them. In place:
/// what is written never passes what is read, so the caller's buffer is reused.
fn compact(out: &mut Vec<u8>, head: &[u8], keep: usize, repeat: &[u8]) {
    let (mut read, mut write) = (0, 0);
    while let Some(p) = memchr::memchr(head[0], &out[read..]) {
        let at = read + p;
        let found = out[at..].starts_with(head);
        let end = if found { at + keep } else { at + 1 };
        out.copy_within(read..end, write);
        write += end - read;
        read = end;
        if found {
            while out[read..].starts_with(repeat) {
                read += repeat.len();
            }
        }
    }
    out.copy_within(read.., write);
    write += out.len() - read;
    out.truncate(write);
}

/// The normalized SQL of a statement for people: sqlparser's rendering with every literal a `?` and IN lists
/// collapsed; the lexer's shape when the statement does not parse.
pub fn canonical(sql: &[u8]) -> String {
    let fallback = || String::from_utf8_lossy(&shape(sql).text).into_owned();
    let Ok(text) = std::str::from_utf8(sql) else {
        return fallback();
    };
    let Ok(mut statements) = Parser::parse_sql(&PostgreSqlDialect {}, text) else {
        return fallback();
    };
    struct Placeholders;
    impl VisitorMut for Placeholders {
        type Break = ();
        fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
            match expr {
                Expr::Value(ValueWithSpan { value, .. })
                    if !matches!(
                        value,
                        Value::Null | Value::Boolean(_) | Value::Placeholder(_)
                    ) =>
                {
                    *value = Value::Placeholder("?".to_string());
                }
                Expr::In {
                    target: InTarget::List(list),
                    ..
                } if list.len() > 1 => list.truncate(1),
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let _ = statements.visit(&mut Placeholders);
    statements
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(sql: &str) -> String {
        String::from_utf8(shape(sql.as_bytes()).text).unwrap()
    }

    #[test]
    fn literals_parameters_and_case_fold_away() {
        assert_eq!(
            text("SELECT * FROM t WHERE id = 42 AND name = 'it''s'"),
            "select*from t where id=? and name=?"
        );
        assert_eq!(
            text("select *  from T where ID=$1 -- why\n"),
            "select*from t where id=?"
        );
        assert_eq!(
            shape(b"SELECT a FROM t WHERE x = 1").hash,
            shape(b"select a from t where x=2").hash
        );
        assert_eq!(shape(b"SELECT 1").hash, shape(b"select   2").hash);
        assert_ne!(
            shape(b"SELECT a FROM t").hash,
            shape(b"SELECT b FROM t").hash
        );
        assert_eq!(
            text("select E'a\\'b', $$x$$, \"Col\" from t"),
            "select ?,\"Col\" from t"
        );
    }

    #[test]
    fn case_folds_eight_bytes_at_a_time() {
        let all: Vec<u8> = (0..=255).collect();
        let mut folded = all.clone();
        lowercase(&mut folded);
        assert_eq!(folded, all.to_ascii_lowercase());
        assert_eq!(
            text("SELECT \"MixedCase\", ÄBC, LongIdentifierName FROM \"T\" WHERE X = 1"),
            "select \"MixedCase\",Äbc,longidentifiername from \"T\" where x=?"
        );
    }

    #[test]
    fn lists_collapse() {
        assert_eq!(
            text("SELECT * FROM t WHERE id IN (1, 2, 3)"),
            "select*from t where id in(?)"
        );
        assert_eq!(
            shape(b"select * from t where id in (1)").hash,
            shape(b"select * from t where id in (4,5,6,7)").hash
        );
        assert_eq!(
            text("INSERT INTO t VALUES (1, 'a'), (2, 'b')"),
            "insert into t values(?)"
        );
    }

    #[test]
    fn canonical_sql_from_the_ast() {
        assert_eq!(
            canonical(b"SELECT name FROM products WHERE id = 17 AND tag IN ('a', 'b')"),
            "SELECT name FROM products WHERE id = ? AND tag IN (?)"
        );
        assert_eq!(
            canonical(b"SELECT * FROM t WHERE id = $1"),
            "SELECT * FROM t WHERE id = $1"
        );
        assert_eq!(canonical(b"not sql at all 5"), "not sql at all ?");
    }
}
