//! Statement fingerprints: the shape of a statement with its values taken out.
//!
//! Two levels, for two costs. [`shape_id`] runs on every statement: one pass of a lexer that drops comments
//! and white space, folds case, takes literals and parameters for one placeholder and collapses lists of
//! them, hashing the tokens as it goes (no output, no allocation). The same pass notes the few facts the
//! session needs of every Query (its first word, whether it holds several statements, whether it may take an
//! advisory lock), so that a plain statement is lexed once. [`canonical`] runs once per shape, when a shape
//! must be shown (an N+1 report): sqlparser parses the statement and a `VisitorMut` replaces every literal
//! with a placeholder and collapses IN lists, giving the normalized SQL people read.

use crate::lexer::{ident_end, is_ident_byte, token_end};
use sqlparser::ast::{Expr, InTarget, Value, ValueWithSpan, VisitMut, VisitorMut};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// What one pass over a statement found: its shape's hash (what detectors and caches compare) and what the
/// session asks of every Query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapeId {
    pub hash: u64,
    /// The first token, when it is a word.
    pub head: Head,
    /// A `;` with a token after it: more than one statement.
    pub several: bool,
    /// `advisory_lock`, `set_config` or `pg_temp` appears somewhere, comments and strings included (the
    /// session then looks closer).
    pub watched: bool,
}

impl ShapeId {
    /// Whether the statement only reads, as far as its first word tells (SELECT, WITH, VALUES, TABLE).
    pub fn reads(&self) -> bool {
        [
            Head::of(b"select"),
            Head::of(b"with"),
            Head::of(b"values"),
            Head::of(b"table"),
        ]
        .contains(&self.head)
    }
}

/// A statement's first word, folded to lower case, as its first eight bytes and its length: comparing one
/// is two integer comparisons. Words that share both compare equal, which errs towards a closer look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Head {
    prefix: u64,
    len: usize,
}

impl Head {
    /// The head of a lower-case word.
    pub const fn of(word: &[u8]) -> Head {
        let mut prefix = 0;
        let mut i = 0;
        while i < word.len() && i < 8 {
            prefix |= (word[i] as u64) << (8 * i);
            i += 1;
        }
        Head {
            prefix,
            len: word.len(),
        }
    }
}

/// Whether `text` mentions one of the names the session's classifier (`sql::classify`) looks further into
/// when the first word does not say: `advisory_lock`, `set_config` or `pg_temp`, in any letter case. What
/// [`ShapeId::watched`] tells; the classifier asks it too, so that the two agree. The fingerprint lexer asks
/// it of every token long enough to hold one, so it looks only where an `_` is.
pub fn mentions_watched(text: &[u8]) -> bool {
    // Whether `needle`, whose first `_` is at `at`, lies in `text` with that `_` at `p`.
    fn at_underscore(text: &[u8], p: usize, needle: &[u8], at: usize) -> bool {
        p >= at
            && p - at + needle.len() <= text.len()
            && text[p - at..p - at + needle.len()].eq_ignore_ascii_case(needle)
    }
    // A plain loop: the texts are mostly single short tokens, too short for `memchr` to pay for its setup.
    (2..text.len()).any(|p| {
        text[p] == b'_'
            && (at_underscore(text, p, b"pg_temp", 2)
                || at_underscore(text, p, b"set_config", 3)
                || at_underscore(text, p, b"advisory_lock", 8))
    })
}

/// The shapes of a session's recent Query texts. Applications send the same few statements over and over
/// with other values: a text that differs from a remembered one only in numbers has its shape, found with a
/// word-at-a-time comparison instead of a lexer pass (see [`same_but_numbers`]).
#[derive(Default)]
pub struct Recent {
    /// Sets of two, the newest first: a statement whose values change its shape now and then (a negative
    /// number is `-` and a value) keeps both shapes at hand. Each set is made when a text first lands in it:
    /// most sessions send a few statements, and an idle client's memory is what its session holds.
    sets: [Option<Box<[Option<Remembered>; 2]>>; Recent::SETS],
    /// Bytes of text held, at most [`Recent::BUDGET`].
    held: usize,
}

/// A text and its shape.
type Remembered = (Vec<u8>, ShapeId);

impl Recent {
    const SETS: usize = 16;
    /// Longer texts are lexed every time: they are rarely repeated as they are.
    const MAX_TEXT: usize = 2048;
    /// What a session may hold in texts. A client whose statements do not fit starts over: it forgets them
    /// all rather than keep the first ones for good.
    const BUDGET: usize = 8 * 1024;

    pub fn shape_id(&mut self, sql: &[u8]) -> ShapeId {
        // The set is chosen by the first sixteen bytes with their digits blanked, so that texts of one
        // shape meet in one set whatever their values.
        const ONES: u64 = 0x0101_0101_0101_0101;
        let blank_digits = |word: u64| {
            let low = word & (0x7f * ONES);
            // Per byte, as in `lower`: bit 7 of h + 80 is h >= '0', of h + 70 is h > '9'.
            let digit = (low + 80 * ONES) & !(low + 70 * ONES) & !word & (0x80 * ONES);
            word & !((digit >> 7) * 0xff)
        };
        let n = sql.len();
        let word = |at: usize| {
            if n > at {
                load(sql, at, (n - at).min(8))
            } else {
                0
            }
        };
        let key = blank_digits(word(0)) ^ blank_digits(word(8)).rotate_left(29);
        let index = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize;
        if let Some(set) = &self.sets[index] {
            for (text, id) in set.iter().flatten() {
                if unquoted_same_but_numbers(text, sql) {
                    return *id;
                }
            }
        }
        let id = shape_id(sql);
        if n <= Self::MAX_TEXT && memchr::memchr(b'"', sql).is_none() {
            let older = self.sets[index]
                .as_ref()
                .and_then(|set| set[1].as_ref())
                .map_or(0, |(text, _)| text.len());
            if self.held - older + n > Self::BUDGET {
                *self = Recent::default();
            } else {
                self.held -= older;
            }
            self.held += n;
            // The older entry makes way for the new one, which goes first.
            let set = self.sets[index].get_or_insert_with(Box::default);
            set[1] = Some((sql.to_vec(), id));
            set.swap(0, 1);
        }
        id
    }
}

/// Whether `a` and `b` are the same text but for runs of decimal digits that stand alone (not touching an
/// identifier byte, so numbers, never parts of names or `$1`), where they may differ. Such texts have one
/// shape: a run of digits is a value to the lexer whether it is a number, inside a string or inside a
/// comment, and digits never change where a quote or comment ends. Inside a quoted identifier digits are
/// part of the name, so texts with a `"` are never called the same.
pub fn same_but_numbers(a: &[u8], b: &[u8]) -> bool {
    memchr::memchr(b'"', a).is_none() && unquoted_same_but_numbers(a, b)
}

/// [`same_but_numbers`] for an `a` known to hold no `"` (then neither does a `b` that it matches).
fn unquoted_same_but_numbers(a: &[u8], b: &[u8]) -> bool {
    let (mut i, mut j) = (0, 0);
    loop {
        let n = common_prefix(&a[i..], &b[j..]);
        if i + n == a.len() && j + n == b.len() {
            return true;
        }
        // They differ: that must be within a run of digits in both, which starts in the common part.
        let mut back = 0;
        while back < n && a[i + n - back - 1].is_ascii_digit() {
            back += 1;
        }
        let (start_a, start_b) = (i + n - back, j + n - back);
        if start_a > 0 && is_ident_byte(a[start_a - 1]) {
            return false;
        }
        let run_end = |s: &[u8], from: usize| {
            let end = from + s[from..].iter().take_while(|c| c.is_ascii_digit()).count();
            (end > from && s.get(end).is_none_or(|&c| !is_ident_byte(c))).then_some(end)
        };
        match (run_end(a, start_a), run_end(b, start_b)) {
            (Some(end_a), Some(end_b)) => (i, j) = (end_a, end_b),
            _ => return false,
        }
    }
}

/// How many leading bytes `a` and `b` share, compared eight at a time.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("eight bytes"))
            ^ u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// A statement's shape as text, for people and tests, with its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub hash: u64,
    pub text: Vec<u8>,
}

/// The shape's identity and the facts of [`ShapeId`], in one pass that allocates nothing.
pub fn shape_id(sql: &[u8]) -> ShapeId {
    let mut lists = Lists::new(Hasher(0));
    let mut id = lex(sql, &mut lists);
    id.hash = lists.finish().0;
    id
}

/// The shape of `sql` as text: words in lower case, a `?` for each value, one space between two words.
pub fn shape(sql: &[u8]) -> Shape {
    let mut lists = Lists::new((Hasher(0), Text(Vec::with_capacity(sql.len()))));
    lex(sql, &mut lists);
    let (Hasher(hash), Text(text)) = lists.finish();
    Shape { hash, text }
}

/// A token of a shape. Words are ranges of the statement (so that a sink may read past their end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// A keyword or an identifier, folded to lower case.
    Word(usize, usize),
    /// A quoted identifier, which keeps its case.
    Quoted(usize, usize),
    /// A literal or a parameter: what varies between runs of one shape.
    Value,
    Punct(u8),
}

const COMMA: Token = Token::Punct(b',');
const OPEN: Token = Token::Punct(b'(');
const CLOSE: Token = Token::Punct(b')');

/// Where the tokens of a shape go.
trait Sink {
    fn token(&mut self, sql: &[u8], token: Token);
}

/// Lexes `sql` into `lists`, noting what [`ShapeId`] tells besides the hash (left 0).
fn lex<S: Sink>(s: &[u8], lists: &mut Lists<S>) -> ShapeId {
    let mut id = ShapeId {
        hash: 0,
        head: Head::default(),
        several: false,
        watched: false,
    };
    // The watched names are made of identifier bytes, so each lies within one token: only tokens as long as
    // the shortest (`pg_temp`) are searched.
    let mentions = |start: usize, end: usize| end - start >= 7 && mentions_watched(&s[start..end]);
    let mut first = true;
    let mut after_semicolon = false;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let token;
        // Words and numbers are most of every statement: scan them here, a table lookup per byte.
        if c != b'$' && is_ident_byte(c) {
            let mut end = ident_end(s, i + 1);
            if c.is_ascii_digit() {
                token = Token::Value;
            } else if c.is_ascii_alphabetic() && end - i <= 2 && s.get(end) == Some(&b'\'') {
                // E'...', B'...', X'...' strings: the prefix letter starts an identifier token.
                end = token_end(s, end);
                token = Token::Value;
            } else {
                token = Token::Word(i, end);
            }
            id.watched |= mentions(i, end);
            i = end;
        } else if c.is_ascii_whitespace() {
            i += 1;
            continue;
        } else if !matches!(c, b'-' | b'/' | b'\'' | b'"' | b'$') {
            // One byte of punctuation: nothing to lex.
            token = Token::Punct(c);
            i += 1;
        } else {
            let mut end = token_end(s, i);
            id.watched |= mentions(i, end);
            token = match c {
                b'-' | b'/' if end - i > 1 => {
                    i = end; // a comment
                    continue;
                }
                b'\'' => Token::Value,
                b'$' if s.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                    // $1: a parameter
                    end = i + 1;
                    while end < s.len() && s[end].is_ascii_digit() {
                        end += 1;
                    }
                    Token::Value
                }
                b'$' if end - i > 1 => Token::Value, // $$body$$
                b'"' => Token::Quoted(i, end),
                _ if end - i == 1 => Token::Punct(c),
                _ => Token::Word(i, end),
            };
            i = end;
        }
        if std::mem::replace(&mut first, false) {
            if let Token::Word(start, end) = token {
                id.head = Head {
                    prefix: load_lower(s, start, (end - start).min(8)),
                    len: end - start,
                };
            }
        }
        id.several |= after_semicolon;
        after_semicolon = token == Token::Punct(b';');
        lists.push(s, token);
    }
    id
}

/// Collapses lists of values on their way to the sink, so that IN lists and multi-row VALUES of any length
/// share a shape: `?,?,?` → `?`, then rows `(?),(?)` → `(?)` (`(1,'a'),(2,'b')` → `(?)`). Two small state
/// machines in a row, each holding back the few tokens that may turn out to repeat.
struct Lists<S> {
    sink: S,
    /// Stage one: the last token passed on was a value; a comma after it is held back.
    after_value: bool,
    comma: bool,
    /// Stage two: how much of `(?)` the last tokens passed on end with (3: all of it), and how much of a
    /// repeating `,(?)` after it is held back.
    row: u8,
    held: u8,
}

impl<S: Sink> Lists<S> {
    fn new(sink: S) -> Self {
        Lists {
            sink,
            after_value: false,
            comma: false,
            row: 0,
            held: 0,
        }
    }

    #[inline(always)]
    fn push(&mut self, sql: &[u8], token: Token) {
        if std::mem::take(&mut self.comma) {
            if token == Token::Value {
                return; // `?,?`: the list goes on
            }
            self.rows(sql, COMMA);
        }
        if token == COMMA && self.after_value {
            self.comma = true;
            return;
        }
        self.after_value = token == Token::Value;
        self.rows(sql, token);
    }

    #[inline(always)]
    fn rows(&mut self, sql: &[u8], token: Token) {
        const REPEAT: [Token; 4] = [COMMA, OPEN, Token::Value, CLOSE];
        if self.held > 0 {
            if token == REPEAT[usize::from(self.held)] {
                // The row repeats so far; a whole one is dropped.
                self.held = (self.held + 1) % 4;
                return;
            }
            for held in &REPEAT[..usize::from(std::mem::take(&mut self.held))] {
                self.emit(sql, *held);
            }
        }
        if self.row == 3 && token == COMMA {
            self.held = 1;
            return;
        }
        self.emit(sql, token);
    }

    #[inline(always)]
    fn emit(&mut self, sql: &[u8], token: Token) {
        self.row = match (self.row, token) {
            (_, OPEN) => 1,
            (1, Token::Value) => 2,
            (2, CLOSE) => 3,
            _ => 0,
        };
        self.sink.token(sql, token);
    }

    fn finish(mut self) -> S {
        if std::mem::take(&mut self.comma) {
            self.rows(&[], COMMA);
        }
        for held in &[COMMA, OPEN, Token::Value][..usize::from(self.held)] {
            self.sink.token(&[], *held);
        }
        self.sink
    }
}

/// Hashes tokens with FxHash's mixing, eight bytes at a time. Shapes are hashed on every statement;
/// SipHash's protection against chosen collisions buys nothing here (a collision could at worst make two
/// statements look alike to the N+1 detector or the routing cache). Each token starts with its kind and
/// length, so token boundaries count (`a b` is not `ab`) but white space does not (`a=?` is `a = ?`).
struct Hasher(u64);

impl Hasher {
    #[inline(always)]
    fn mix(&mut self, word: u64) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
    }

    #[inline(always)]
    fn bytes(&mut self, sql: &[u8], start: usize, end: usize, fold: bool) {
        let fold = |word| if fold { lower(word) } else { word };
        let mut at = start;
        while end - at >= 8 {
            let eight = sql[at..at + 8].try_into().expect("eight bytes");
            self.mix(fold(u64::from_le_bytes(eight)));
            at += 8;
        }
        if at < end {
            self.mix(fold(load(sql, at, end - at)));
        }
    }
}

impl Sink for Hasher {
    #[inline(always)]
    fn token(&mut self, sql: &[u8], token: Token) {
        match token {
            Token::Word(start, end) => {
                self.mix(1 << 56 | (end - start) as u64);
                self.bytes(sql, start, end, true);
            }
            Token::Quoted(start, end) => {
                self.mix(2 << 56 | (end - start) as u64);
                self.bytes(sql, start, end, false);
            }
            Token::Value => self.mix(3 << 56),
            Token::Punct(c) => self.mix(4 << 56 | u64::from(c)),
        }
    }
}

/// The shape as text: a space only between two words (keywords, identifiers, `?`).
struct Text(Vec<u8>);

impl Sink for Text {
    fn token(&mut self, sql: &[u8], token: Token) {
        let out = &mut self.0;
        if !matches!(token, Token::Punct(_))
            && out
                .last()
                .is_some_and(|&b| is_ident_byte(b) || b == b'?' || b == b'"')
        {
            out.push(b' ');
        }
        match token {
            Token::Word(start, end) => {
                out.extend(sql[start..end].iter().map(u8::to_ascii_lowercase))
            }
            Token::Quoted(start, end) => out.extend_from_slice(&sql[start..end]),
            Token::Value => out.push(b'?'),
            Token::Punct(c) => out.push(c),
        }
    }
}

impl<A: Sink, B: Sink> Sink for (A, B) {
    fn token(&mut self, sql: &[u8], token: Token) {
        self.0.token(sql, token);
        self.1.token(sql, token);
    }
}

/// `n` (1 to 8) bytes of `sql` from `at`, little-endian: one unaligned load where eight bytes are there.
#[inline(always)]
fn load(sql: &[u8], at: usize, n: usize) -> u64 {
    match sql.get(at..at + 8) {
        Some(eight) => {
            u64::from_le_bytes(eight.try_into().expect("eight bytes")) & (u64::MAX >> (64 - 8 * n))
        }
        None => sql[at..at + n]
            .iter()
            .rev()
            .fold(0, |word, &b| word << 8 | u64::from(b)),
    }
}

fn load_lower(sql: &[u8], at: usize, n: usize) -> u64 {
    lower(load(sql, at, n))
}

/// ASCII lower case of eight bytes at once (other bytes, UTF-8 included, are left as they are).
#[inline(always)]
fn lower(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Per byte, on its low seven bits h (no carry crosses bytes): bit 7 of h + 63 is h >= 'A', of h + 37 is
    // h > 'Z'. Bytes with their own bit 7 set are not ASCII and stay.
    let low = word & (0x7f * ONES);
    let upper = (low + 63 * ONES) & !(low + 37 * ONES) & !word & (0x80 * ONES);
    word | (upper >> 2)
}

/// A fast 64-bit hash of bytes (the mixing of [`Hasher`]), for parameter values.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = Hasher(bytes.len() as u64);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        hasher.mix(u64::from_le_bytes(
            chunk.try_into().expect("chunks of eight"),
        ));
    }
    for &byte in chunks.remainder() {
        hasher.mix(u64::from(byte));
    }
    hasher.0
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

    fn hash(sql: &str) -> u64 {
        shape_id(sql.as_bytes()).hash
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
            hash("SELECT a FROM t WHERE x = 1"),
            hash("select a from t where x=2 /* a comment */")
        );
        assert_eq!(hash("SELECT 1"), hash("select   2"));
        assert_ne!(hash("SELECT a FROM t"), hash("SELECT b FROM t"));
        assert_ne!(hash("SELECT ab FROM t"), hash("SELECT a b FROM t"));
        assert_ne!(hash("SELECT \"a\" FROM t"), hash("SELECT a FROM t"));
        assert_eq!(
            text("select E'a\\'b', $$x$$, \"Col\" from t"),
            "select ?,\"Col\" from t"
        );
    }

    #[test]
    fn the_text_and_the_hash_agree() {
        let statements = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
            "select abalance from PGBENCH_ACCOUNTS where aid=$1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5",
            "SELECT a_very_long_identifier_name, b FROM t WHERE id IN (1, 2)",
            "select A_VERY_LONG_IDENTIFIER_NAME,b from t where id in(7)",
            "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')",
            "insert into t values (9)",
            "SELECT f(1), (2), (3)",
            "SELECT \"Col\" FROM t",
            "UPDATE t SET a = a + 1 WHERE id = 3; SELECT 1",
        ];
        for a in statements {
            let (sa, ia) = (shape(a.as_bytes()), shape_id(a.as_bytes()));
            assert_eq!(sa.hash, ia.hash, "{a}");
            for b in statements {
                let sb = shape(b.as_bytes());
                assert_eq!(sa.text == sb.text, sa.hash == sb.hash, "{a} / {b}");
            }
        }
    }

    #[test]
    fn case_folds_eight_bytes_at_a_time() {
        for b in 0..=255u8 {
            for at in 0..8 {
                let word = u64::from(b) << (8 * at);
                let expected = u64::from(b.to_ascii_lowercase()) << (8 * at);
                assert_eq!(lower(word), expected, "byte {b:#x} at {at}");
            }
        }
        assert_eq!(
            text("SELECT \"MixedCase\", ÄBC, LongIdentifierName FROM \"T\" WHERE X = 1"),
            "select \"MixedCase\",Äbc,longidentifiername from \"T\" where x=?"
        );
        // Loads near the end of the text, where eight bytes are not there.
        assert_eq!(
            hash("select x from ABCDEFGHIJ"),
            hash("select x from abcdefghij")
        );
    }

    #[test]
    fn lists_collapse() {
        assert_eq!(
            text("SELECT * FROM t WHERE id IN (1, 2, 3)"),
            "select*from t where id in(?)"
        );
        assert_eq!(
            hash("select * from t where id in (1)"),
            hash("select * from t where id in (4,5,6,7)")
        );
        assert_eq!(
            text("INSERT INTO t VALUES (1, 'a'), (2, 'b')"),
            "insert into t values(?)"
        );
        // What only starts like a list is kept as it came.
        assert_eq!(text("SELECT (1), (2, x), 3, y"), "select(?),(?,x),?,y");
        assert_eq!(text("VALUES (1), (2"), "values(?),(?");
        assert_eq!(text("VALUES (1), ("), "values(?),(");
        assert_eq!(text("SELECT 1,"), "select ?,");
    }

    #[test]
    fn facts_for_the_session() {
        let id = shape_id(b"  /* hint */ SELECT 1; ");
        assert!(id.reads() && !id.several && !id.watched);
        assert_eq!(id.head, Head::of(b"select"));
        assert_eq!(shape_id(b"DeAllocate ALL").head, Head::of(b"deallocate"));
        assert_ne!(shape_id(b"deallocatex").head, Head::of(b"deallocate"));
        assert!(!shape_id(b"(SELECT 1)").reads());
        assert!(shape_id(b"select 1; select 2").several);
        assert!(shape_id(b"select 1;;").several);
        assert!(!shape_id(b"select 1; -- done").several);
        for sql in [
            "SELECT pg_advisory_lock(1)",
            "SELECT 'PG_ADVISORY_LOCK'",
            "SELECT 1 -- pg_try_advisory_lock\n",
            "SELECT \"pg_advisory_lock\"(1)",
        ] {
            assert!(shape_id(sql.as_bytes()).watched, "{sql}");
        }
        assert!(!shape_id(b"SELECT pg_advisory_xact_lock(1)").watched);
    }

    #[test]
    fn texts_that_differ_in_numbers_share_a_shape() {
        let same = [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 123456;",
            ),
            ("select 1", "select 22"),
            (
                "UPDATE t SET a = a + 1, b = 2.5 WHERE id = 3",
                "UPDATE t SET a = a + 40, b = 7.25 WHERE id = 9",
            ),
            ("SELECT 'a 1', 2 /* 3 */", "SELECT 'a 9', 8 /* 7 */"),
            ("SELECT x FROM t", "SELECT x FROM t"),
        ];
        for (a, b) in same {
            assert!(same_but_numbers(a.as_bytes(), b.as_bytes()), "{a} / {b}");
            assert_eq!(shape_id(a.as_bytes()), shape_id(b.as_bytes()), "{a} / {b}");
        }
        let different = [
            ("SELECT * FROM t1", "SELECT * FROM t2"),
            ("SELECT $1", "SELECT $2"),
            ("SELECT \"col 1\" FROM t", "SELECT \"col 2\" FROM t"),
            ("SELECT \"col\" FROM t", "SELECT \"col\" FROM t"),
            ("SELECT 1", "SELECT 1.5"),
            ("SELECT 1", "SELECT -1"),
            ("SELECT 1", "SELECT 1; SET x = 1"),
            ("SELECT 1e5", "SELECT 2e5"),
            ("SELECT 10", "SELECT 1x"),
            ("SELECT 1 FROM t", "SELECT 1 FROM u"),
            ("SELECT 1", "SELECT 1 "),
            ("SELECT 1", "SELECT"),
            ("", "1"),
        ];
        for (a, b) in different {
            assert!(!same_but_numbers(a.as_bytes(), b.as_bytes()), "{a} / {b}");
        }
    }

    #[test]
    fn recent_texts_give_the_lexers_shape() {
        let mut recent = Recent::default();
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
            "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid = 5;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 99;",
            "SELECT \"x 1\" FROM t",
            "SELECT \"x 2\" FROM t",
            "SELECT 1; SET search_path = a",
            "SELECT 2; SET search_path = a",
            "SELECT 7",
            "",
            "BEGIN;",
        ];
        for _ in 0..3 {
            for text in texts {
                assert_eq!(
                    recent.shape_id(text.as_bytes()),
                    shape_id(text.as_bytes()),
                    "{text}"
                );
            }
        }
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
